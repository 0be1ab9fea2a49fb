# Every target sets up .venv itself (python3 -m venv + pip install -e '.[dev]', editable_mode=strict).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-node lint docs docs-serve mutation mutation-applies bench bench-node clean

# editable_mode=strict: the editable install is a tree of links to the sources (under build/) named
# on a static .pth, which type checkers read: mypy in a project that installed titan-broker this way
# finds titan_broker and its py.typed (setuptools' default editable finder is an import hook they
# cannot see). A module added or removed changes the list in .venv/.files and reinstalls at the
# next make; edits to existing files need nothing.
PACKAGE_FILES := $(sort $(shell find titan_broker worker/titan_worker cli/titan_cli -type f \
	\( -name '*.py' -o -name '*.lua' -o -name py.typed \) -not -path '*/__pycache__/*' 2>/dev/null))

.PHONY: package-files
$(VENV)/.files: package-files
	@mkdir -p $(VENV)
	@echo '$(PACKAGE_FILES)' | cmp -s - $@ || echo '$(PACKAGE_FILES)' > $@

$(VENV)/.installed: pyproject.toml $(VENV)/.files
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' --config-settings editable_mode=strict
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m examples.usage

test: install
	$(BIN)/pytest

# The Node client (clients/node): npm ci from its lock file, build, then its tests against private
# Redis servers and titan-worker processes from this .venv.
NODE_DIR := clients/node

test-node: install
	cd $(NODE_DIR) && npm ci --no-audit --no-fund
	cd $(NODE_DIR) && TITAN_VENV=$(CURDIR)/$(VENV) npm test

bench-node: install
	cd $(NODE_DIR) && npm ci --no-audit --no-fund
	$(BIN)/python -m bench.bench_node

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The documentation site (mkdocs.yml, docs/): strict, so a broken link, a missing reference or any
# warning fails the build. docs-serve rebuilds as pages change, on http://127.0.0.1:8000.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict --dev-addr 127.0.0.1:8000

# Break each reliability promise in a scratch copy and run the tests that must catch it (several minutes).
mutation: install
	$(BIN)/python tests/mutation_check.py

# Only whether every mutation still applies to the code, and docs/reliability-table.md is current (seconds).
mutation-applies: install
	$(BIN)/python tests/mutation_check.py --applies

# BENCH_CORE_ARGS: e.g. --workers 2,4,8 --rounds 5, or --json (python -m bench.bench_core --help).
BENCH_CORE_ARGS ?= --rounds 3 --workers 2,4,8

bench: install
	$(BIN)/python -m bench.bench_core $(BENCH_CORE_ARGS)
	$(BIN)/python -m bench.bench_pool
	$(BIN)/python -m bench.bench_cluster
	$(BIN)/python -m bench.bench_shards
	$(BIN)/python -m bench.bench_jobs
	$(BIN)/python -m bench.bench_serve
	$(BIN)/python -m bench.bench_lean

clean:
	rm -rf $(VENV) site .mypy_cache .ruff_cache .pytest_cache $(NODE_DIR)/node_modules $(NODE_DIR)/dist $(NODE_DIR)/test-dist $(NODE_DIR)/lua

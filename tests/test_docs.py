"""The documentation's examples work: every Python block of the site's pages and the README compiles,
imports only public names, and the complete examples run against a private Redis.

A complete example is marked in the Markdown, on the line before its fence, by a comment the site does
not show:

    <!-- docs-test: file calculator.py -->   the block is a file the examples after it use
    <!-- docs-test: run -->                  the block is a program: run it, it must exit 0

The files of a page are written, in the page's order, into a folder of their own, and each program
runs there (as ``python main.py`` would) with ``$TITAN_REDIS_URL`` and ``$TITAN_NAMESPACE`` set, so a
``ProcessManager()`` without arguments reaches the private Redis in a namespace of its own.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import titan_broker
import titan_broker.testing

from .conftest import ROOT

DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*$")
MARKER = re.compile(r"^<!-- docs-test: (?P<what>run|file (?P<name>[\w./-]+\.py)) -->$")
PUBLIC = {"titan_broker": titan_broker, "titan_broker.testing": titan_broker.testing}
RUN_TIMEOUT = 50.0


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    marker: str | None  # "run", "file NAME.py" or None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, each with the docs-test marker on the line before it."""
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, start = opening["indent"], i
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        code = "\n".join(line.removeprefix(indent) for line in lines[start + 1 : i])
        marker = MARKER.match(lines[start - 1].strip()) if start else None
        found.append(Block(page, start + 1, opening["lang"], code, marker["what"] if marker else None))
        i += 1
    return found


def python_blocks(page: Path) -> list[Block]:
    return [b for b in blocks(page) if b.lang in ("python", "py")]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [p for p in PAGES if any(b.marker == "run" for b in python_blocks(p))]


def test_the_pages_have_python_examples_and_complete_ones() -> None:
    assert sum(len(python_blocks(p)) for p in PAGES) >= 25
    assert {"README.md", "docs/getting-started.md"} <= {page_id(p) for p in RUNNABLE}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_python_block_compiles(page: Path) -> None:
    """Fragments may await at the top level (as in an ``async with ProcessManager()`` block)."""
    for block in python_blocks(page):
        try:
            compile(block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
        except SyntaxError as exc:
            pytest.fail(f"{block.where}: the example does not compile: {exc}")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_examples_import_only_public_names(page: Path) -> None:
    """A name imported from titan_broker or titan_broker.testing is exported; no example imports a
    private module (``titan_broker._calling``, ``titan_broker.testing._local_redis``)."""
    for block in python_blocks(page):
        for node in ast.walk(ast.parse(block.code)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("titan_broker"):
                assert node.module in PUBLIC, f"{block.where}: imports the private module {node.module}"
                exported = set(PUBLIC[node.module].__all__)
                missing = {alias.name for alias in node.names} - exported
                assert not missing, f"{block.where}: {node.module} does not export {sorted(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_markers_name_python_blocks(page: Path) -> None:
    for block in blocks(page):
        if block.marker:
            assert block.lang == "python", f"{block.where}: a docs-test marker on a {block.lang!r} block"


@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_complete_examples_run(page: Path, redis_url: str, namespace: str, tmp_path: Path) -> None:
    env = {**os.environ, "TITAN_REDIS_URL": redis_url, "TITAN_NAMESPACE": namespace}
    env.pop("PYTHONPATH", None)  # the examples import titan_broker as installed, and their own files
    for block in python_blocks(page):
        if block.marker is None:
            continue
        if block.marker.startswith("file "):
            (tmp_path / block.marker.removeprefix("file ")).write_text(block.code + "\n", encoding="utf-8")
            continue
        program = tmp_path / "main.py"
        program.write_text(block.code + "\n", encoding="utf-8")
        run = subprocess.run(
            [sys.executable, str(program)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert run.returncode == 0, f"{block.where} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"


def test_product_text_names_no_issue_or_session() -> None:
    """The pages speak to users: no issue numbers, no work sessions."""
    pattern = re.compile(r"\bissues? #?\d+|\bthis session\b|\bsession's\b", re.I)
    for page in [*PAGES, ROOT / "PROTOCOL.md", ROOT / "ARCHITECTURE.md"]:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert not pattern.search(line), f"{page.relative_to(ROOT)}:{number}: {line.strip()}"


def test_readme_links_reach_files_of_the_repository() -> None:
    """The README is the front page on the forge: its links into docs/ must not dangle."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert len(local) > 20
    assert [t for t in local if not (ROOT / t).exists()] == []


def test_the_readme_keeps_its_commands() -> None:
    """.ci/run calls the README's test command: the set-up, demo and test commands stay on the page."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in ("make install", "make demo", "make test"):
        assert re.search(rf"^{command}\b", readme, re.M), command


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_yaml_examples_parse(page: Path) -> None:
    """compose files, Kubernetes manifests and Prometheus configurations are at least valid YAML."""
    import yaml

    for block in blocks(page):
        if block.lang in ("yaml", "yml"):
            try:
                list(yaml.safe_load_all(block.code))
            except yaml.YAMLError as exc:
                pytest.fail(f"{block.where}: not valid YAML: {exc}")


def test_every_titan_worker_flag_the_docs_use_exists() -> None:
    """A flag on a line that runs titan-worker (a shell line, a unit, a manifest's args) or in the
    options table of the workers page is one `titan-worker run` accepts."""
    import typer
    from titan_worker.main import app

    group = typer.main.get_command(app)
    run = group.commands["run"]  # type: ignore[attr-defined]
    accepted = {opt for param in run.params for opt in (*param.opts, *param.secondary_opts)}
    used: dict[str, str] = {}
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if "titan-worker" in line or (page.name == "workers.md" and line.startswith("| `-")):
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", line):
                    used.setdefault(flag, f"{page.relative_to(ROOT)}:{number}")
    assert len(used) >= 10
    assert {flag: where for flag, where in used.items() if flag not in accepted} == {}

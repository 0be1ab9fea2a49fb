"""The shape of the code: floors without cycles, named surfaces for worker/ and cli/, no unpickling."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from .conftest import (
    ROOT,
)

pytestmark = pytest.mark.anyio


UNPICKLERS = frozenset(
    {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"}
)


"""Modules that turn bytes into arbitrary objects (or code)."""


LIBRARY = ("titan_broker", "worker/titan_worker", "cli/titan_cli")


def unsafe_loading(source: str) -> list[str]:
    """What in ``source`` could unpickle, or import or run code named by data.

    Flags any import of an unpickler (``import dill``, ``from pickle import loads``,
    ``import cloudpickle as cp``, submodules too), and ``__import__``,
    ``importlib.import_module``, ``eval`` and ``exec`` called on anything but a
    string literal (or on a literal naming an unpickler).
    """
    found: list[str] = []
    tree = ast.parse(source)
    importers = {"__import__", "import_module"}  # names bound to a dynamic importer
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in UNPICKLERS:
                found.append(f"from {node.module} import ...")
            if node.module == "importlib":
                importers |= {a.asname or a.name for a in node.names if a.name == "import_module"}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name not in importers | {"eval", "exec"}:
            continue
        first = node.args[0] if node.args else None
        literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
        if not literal or (name != "eval" and str(first.value).split(".")[0] in UNPICKLERS):  # type: ignore[union-attr]
            found.append(f"{name}(...) at line {node.lineno}")
    return found


LAYERS = (
    "_errors",
    "_wire",
    "_config",
    "_redis_import",
    "_redis",
    "_service",
    "_registry",
    "_calling",
    "_processes",
    "testing",
)


"""The floors of ``titan_broker``, ground first: a part imports only from its own floor or the ones below."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The modules of ``titan_broker`` that ``path`` imports (relative or absolute, TYPE_CHECKING too)."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            if not base.startswith("titan_broker"):
                continue
            for alias in node.names:  # `from .._wire import protocol` imports the module protocol
                module = f"{base}.{alias.name}"
                found.add(module if (ROOT / module.replace(".", "/")).with_suffix(".py").exists() else base)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in (ROOT / "titan_broker").rglob("*.py")}


@pytest.mark.parametrize(
    "source",
    [
        "import pickle", "import _pickle", "from pickle import loads", "import cloudpickle as cp",
        "from dill.detect import trace", "import marshal", "import shelve", "import jsonpickle",
        "def f(x):\n    import dill\n    return dill.loads(x)", "mod = __import__(name)",
        "import importlib\nimportlib.import_module(data['m'])", "__import__('pickle')",
        "from importlib import import_module as im\nim(name)", "eval(text)",
        "exec(compile(src, 'f', 'exec'))",
    ],
)  # fmt: skip
def test_the_unpickler_check_catches(source: str) -> None:
    assert unsafe_loading(source), source


def test_the_unpickler_check_passes_plain_code() -> None:
    source = "import json\nimport msgpack\nimport importlib.util\nfrom importlib import resources\n"
    assert unsafe_loading(source + "value = json.loads(data)\nimportlib.import_module('json')\n") == []


def test_no_module_can_unpickle_or_import_by_data() -> None:
    root = Path(__file__).resolve().parent.parent
    checked = 0
    for folder in LIBRARY:
        for path in sorted((root / folder).rglob("*.py")):
            assert unsafe_loading(path.read_text()) == [], path
            checked += 1
    assert checked >= 20  # the folders were found


def test_titan_broker_has_no_import_cycle() -> None:
    graph = _graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(m for m in graph if m != "titan_broker" and reaches(m, m, set()))
    assert cycles == [], f"modules in an import cycle: {cycles}"
    assert (
        "titan_broker._processes.manager"
        not in graph["titan_broker._processes.pool"] | graph["titan_broker._processes.supervisor"]
    )


def test_each_part_of_titan_broker_imports_only_its_own_floor_or_lower() -> None:
    def floor(module: str) -> int:
        part = module.split(".")[1] if "." in module else ""
        return LAYERS.index(part) if part in LAYERS else len(LAYERS)  # the facade is the roof

    upward = sorted(
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if floor(target) > floor(module)
    )
    assert upward == [], f"imports that run back up: {upward}"


def test_worker_and_cli_reach_the_library_through_its_named_surfaces() -> None:
    """The worker and the CLI import ``titan_broker``, its two modules or a folder's ``__init__``, never
    a module inside a folder: what they use of each folder is listed in one place, its ``__all__``."""
    deep = sorted(
        f"{path.relative_to(ROOT)}: {node.module}"
        for folder in ("worker", "cli")
        for path in (ROOT / folder).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        and node.module
        and node.module.startswith("titan_broker.")
        and node.module.count(".") > 1
    )
    assert deep == []

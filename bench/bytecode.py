"""Bytecode for what the benchmarks' worker processes import, written before they start.

An installed titan-broker has the bytecode of its modules (pip writes it at install time), and a
checkout gets it at its first import. With ``PYTHONDONTWRITEBYTECODE`` set and an editable install,
it never does: every worker a benchmark spawns would compile titan-broker's modules, its service
and the loop's worker from source, about 40 ms and 1 MiB that no installed worker spends. So the
benchmarks that time a worker's start or weigh an idle worker write that bytecode first
(``--no-compile`` leaves a checkout as it is).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# The packages wherever ``python`` may import them from: the checkout itself (a worker started with
# ``-m`` in it puts it first on sys.path) and the install (an editable one may link them from
# elsewhere); then the services and the loop the benchmarks start.
_CODE = """
import compileall, importlib.machinery, os, sys
found = [importlib.machinery.PathFinder.find_spec(name, path)
         for name in ("titan_broker", "titan_worker") for path in ([os.getcwd()], sys.path[1:])]
dirs = {d for spec in found if spec is not None for d in spec.submodule_search_locations or ()}
sys.exit(0 if all(compileall.compile_dir(d, quiet=1) for d in [*sorted(dirs), *sys.argv[1:]]) else 1)
"""


def compile_checkout(checkout: Path, python: Path | str = sys.executable) -> None:
    """Write the bytecode of titan-broker's modules, the example and bench services and the loop."""
    dirs = [d for d in ("processes", "tests/services", "bench") if (checkout / d).is_dir()]
    subprocess.run([str(python), "-c", _CODE, *dirs], cwd=checkout, check=True, timeout=300)

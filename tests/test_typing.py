"""mypy checks calls through a proxy against the service class (run by the suite, not by eye)."""

from __future__ import annotations

import re

import pytest
from mypy import api

from .conftest import ROOT

CASES = ROOT / "tests" / "typing_cases"


def run_mypy(file: str) -> tuple[str, int]:
    stdout, stderr, status = api.run(
        ["--strict", "--no-incremental", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", "/dev/null", str(CASES / file)]
    )  # fmt: skip
    return stdout + stderr, status


@pytest.mark.timeout(180)
def test_correct_use_of_a_typed_proxy_passes_mypy() -> None:
    output, status = run_mypy("good_calls.py")
    assert status == 0, output
    found = re.findall(r'good_calls\.py:\d+: note: Revealed type is "(.*)"', output)
    revealed = [r.replace("builtins.", "") for r in found]
    assert revealed == [
        "processes.database.User",  # await db.get_user(7)
        "datetime.datetime",  # its created_at
        "processes.database.User",  # an item of a streaming method
        "list[processes.database.User]",
        "titan_broker._calling.jobs.Job[float]",  # pm.submit(calc.add, 5, 3)
        "float",  # pm.job(id, float).result()
    ], output


@pytest.mark.timeout(180)
def test_mypy_reports_wrong_arguments_and_wrong_use_of_results() -> None:
    output, status = run_mypy("bad_calls.py")
    assert status == 1, output
    errors = {int(m.group(1)): m.group(2) for m in re.finditer(r"bad_calls\.py:(\d+): error: (.*)", output)}
    assert 'Argument 1 to "add" of "Calculator" has incompatible type "str"' in errors[7]
    assert 'Incompatible types in assignment (expression has type "float"' in errors[8]
    assert '"Calculator" has no attribute "no_such_method"' in errors[9]
    assert '"upper"' in errors[11]
    assert 'Argument 1 to "get" of "Typed" has incompatible type "str"; expected "int"' in errors[25]
    assert 'expression has type "datetime", variable has type "str"' in errors[35]
    assert '"Coroutine[Any, Any, User]" has no attribute "name"' in errors[36]
    assert (
        'Argument 2 to "submit" of "ProcessManager" has incompatible type "str"; expected "float"'
        in errors[41]
    )
    assert 'expression has type "float", variable has type "str"' in errors[42]
    assert set(errors) == {7, 8, 9, 11, 25, 35, 36, 41, 42}


@pytest.mark.timeout(180)
def test_serve_gives_a_proxy_typed_as_the_service_class() -> None:
    output, status = run_mypy("served.py")
    found = re.findall(r'served\.py:\d+: note: Revealed type is "(.*)"', output)
    assert found == [
        "processes.calculator.Calculator",  # serve(Calculator)
        "float",  # await calc.add(1, 2)
        "processes.calculator.Calculator",  # serve(path, Calculator)
    ], output
    errors = re.findall(r"served\.py:(\d+): error: (.*)", output)
    assert [int(line) for line, _ in errors] == [24, 25], output
    assert 'Argument 1 to "add" of "Calculator" has incompatible type "str"' in errors[0][1]
    assert '"Calculator" has no attribute "no_such_method"' in errors[1][1]
    assert status == 1, output

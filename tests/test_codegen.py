"""``titan codegen typescript``: TypeScript declarations from the signatures services registered.

The Node package's tests run tsc on a caller against this output (clients/node/test/codegen.test.ts).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from titan_cli.codegen import interface_name, parse, typescript

from processes.calculator import Calculator
from processes.database import Database
from tests.conftest import Workers
from tests.services.typed import Typed
from titan_broker._registry.records import ServiceInfo
from titan_broker._service.definition import describe

ROOT = Path(__file__).resolve().parent.parent


def _info(cls: type) -> ServiceInfo:
    service = describe(cls)
    methods = [m.describe() for m in service.methods.values()]
    return ServiceInfo(service.name, service.version, cls.__doc__ or "", methods)


def test_scalars_containers_and_streams() -> None:
    text = typescript([_info(Calculator), _info(Database)])
    assert "export interface Calculator {" in text
    assert "  add(a: number, b: number): Promise<number>;" in text
    assert "  factorial(n: number | bigint): Promise<number | bigint>;" in text
    assert "  get_all_users(limit?: number | bigint, offset?: number | bigint): Promise<Array<User>>;" in text
    assert "  update_user(user_id: number | bigint, name?: string | null, email?: string | null)" in text
    assert "  users_since(since: Date): AsyncIterable<User>;" in text
    assert "  get_database_stats(): Promise<Record<string, unknown>>;" in text
    user = ["id: number | bigint;", "name: string;", "email: string;", "created_at: Date;"]
    assert "export interface User {\n" + "".join(f"  {field}\n" for field in user) + "}" in text


def test_dataclasses_enums_typeddicts_namedtuples_and_keywords() -> None:
    text = typescript([_info(Typed)])
    for line in (
        'export type Color = "red" | "green";',
        "export type Level = 1 | 2;",
        "export type Pair = [number | bigint, string];",
        "export interface Row {\n  name: string;\n  score: string;\n}",
        '  kind: "a" | "b";',
        "  by_day: Record<string, Array<[string, string]>>;",
        "  blob: Uint8Array;",
        "  maybe: number | bigint | null;",
        "  shapes(value: Array<Point | Size | Pair>): Promise<Array<string>>;",
        "  either(value: string | Date): Promise<string | Date>;",
        "  repeat(value: Everything, n: number | bigint): AsyncIterable<Everything>;",
        "...args: Array<Point> | [...Array<Point>, Kw<{ maybe?: Point | null; [name: string]: unknown }>]",
    ):
        assert line in text, line


def test_unknown_and_unimportable_types_are_unknown() -> None:
    info = ServiceInfo("x-y", "1", "", [
        {"name": "f", "signature": "f(a)", "params": [
            {"name": "a", "kind": "positional_or_keyword", "annotation": "nowhere.Thing"},
            {"name": "function", "kind": "positional_or_keyword", "annotation": None},
            {"name": "o", "kind": "keyword_only", "annotation": "int"},
        ], "returns": "typing.Optional[socket.socket]", "streaming": False},
    ])  # fmt: skip
    text = typescript([info])
    assert "export interface XY {" in text
    assert (
        "  f(a: unknown, function_: unknown, kw: Kw<{ o: number | bigint }>): Promise<unknown | null>;"
        in text
    )
    assert interface_name("image-processor") == "ImageProcessor"


def test_parse_reads_literals_and_nesting() -> None:
    node = parse("dict[str, list[typing.Literal['a', 2, None]]] | None")
    assert node.name == "|" and node.args[0].name == "dict"
    with pytest.raises(ValueError):
        parse("list[int")


def test_cli_writes_declarations_of_registered_services(
    redis_url: str, namespace: str, workers: Workers, tmp_path: Path
) -> None:
    workers.start(ROOT / "processes" / "calculator.py")
    workers.start(ROOT / "tests" / "services" / "typed.py")
    workers.wait_registered("calculator", 1)
    workers.wait_registered("typed", 1)
    out = tmp_path / "services.ts"
    cmd = [sys.executable, "-m", "titan_cli", "--redis", redis_url, "-n", namespace, "codegen", "typescript"]
    done = subprocess.run([*cmd, "calculator", "typed", "-o", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "export interface Calculator {" in text and "export interface Typed {" in text
    assert "export interface Everything {" in text
    missing = subprocess.run([*cmd, "nosuch"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 3
    assert "'nosuch' is not in the registry" in missing.stderr

"""Rich types across the wire: what the annotations say is what arrives, checked.

Through a real worker: arguments are decoded into the parameters' annotations
before the method runs, results into the return annotation of the caller's
class; a caller without the class gets plain data; a value that does not fit
is refused with a message saying where, and a value that cannot be sent at
all fails at the caller before anything is sent.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import socket
import subprocess
import sys
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from titan_broker import (
    BadArguments,
    BadResult,
    ConfigError,
    EncodeError,
    ProcessManager,
    RemoteError,
    process,
    public,
)

from .conftest import (
    CALCULATOR,
    SERVICES,
    Workers,
)
from .services.promised import Color as PromisedColor
from .services.promised import User
from .services.typed import Color, Everything, Level, Mode, Pair, Point, Size, Typed

pytestmark = pytest.mark.anyio

TYPED = SERVICES / "typed.py"
AWARE = datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=timezone(timedelta(hours=2)))


def sample(huge: int = 2**80) -> Everything:
    return Everything(
        naive=datetime(2024, 5, 1, 12, 30, 15, 123456),
        aware=AWARE,
        day=date(2024, 5, 1),
        clock=time(23, 59, 58, 5000),
        span=timedelta(days=2, seconds=3, microseconds=500),
        ident=UUID("12345678-1234-5678-1234-567812345678"),
        amount=Decimal("12.50"),
        color=Color.GREEN,
        level=Level.HIGH,
        mode=Mode.SAFE,
        blob=b"\x00\xffbytes",
        tags={"x", "y"},
        frozen=frozenset({1, 2}),
        pair=(1, "one"),
        named=Pair(2, "two"),
        row={"name": "ada", "score": Decimal("99.9")},
        kind="b",
        maybe=None,
        points=[Point(1, 2), Point(3, 4)],
        by_day={"mon": [(date(2024, 5, 6), Decimal("1.25"))]},
        huge=huge,
    )


def assert_same(got: Everything, sent: Everything) -> None:
    """Equal, and of the same types field by field (1 == 1.0 and Pair(2, 'two') == (2, 'two') are not)."""
    assert got == sent
    for f in dataclasses.fields(Everything):
        assert type(getattr(got, f.name)) is type(getattr(sent, f.name)), f.name
    assert got.aware.utcoffset() == timedelta(0)  # a timestamp is an instant: it arrives in UTC
    assert got.naive.tzinfo is None
    assert all(type(p) is Point for p in got.points)
    assert type(got.by_day["mon"][0]) is tuple and type(got.by_day["mon"][0][1]) is Decimal


@pytest.mark.parametrize("huge", [5, 2**80], ids=["int64", "bigint"])
@pytest.mark.parametrize("method", ["echo", "echo_sync"])
async def test_every_type_round_trips_through_a_typed_proxy(
    pm: ProcessManager, method: str, huge: int
) -> None:
    typed = await pm.spawn(TYPED, Typed)
    sent = sample(huge)
    assert_same(await getattr(typed, method)(sent), sent)


async def test_a_proxy_from_connect_decodes_into_the_class_it_was_given(pm: ProcessManager) -> None:
    await pm.spawn(TYPED)
    typed = await pm.connect("typed", Typed)
    sent = sample()
    assert_same(await typed.echo(sent), sent)


async def test_the_worker_receives_the_annotated_types_not_plain_data(pm: ProcessManager) -> None:
    typed = await pm.spawn(TYPED, Typed)
    seen = await typed.seen(sample())
    assert seen == {
        "naive": "datetime", "aware": "datetime", "day": "date", "clock": "time", "span": "timedelta",
        "ident": "UUID", "amount": "Decimal", "color": "Color", "level": "Level", "mode": "Mode",
        "blob": "bytes", "tags": "set", "frozen": "frozenset", "pair": "tuple", "named": "Pair",
        "row": "dict", "kind": "str", "maybe": "NoneType", "points": "list", "by_day": "dict",
        "huge": "int", "points[0]": "Point", "by_day[][0]": "date,Decimal", "row.score": "Decimal",
    }  # fmt: skip


async def test_streamed_items_arrive_as_dataclasses(pm: ProcessManager) -> None:
    typed = await pm.spawn(TYPED, Typed)
    sent = sample()
    items = [item async for item in typed.repeat(sent, 3)]
    assert len(items) == 3
    for item in items:
        assert_same(item, sent)


async def test_top_level_parameters_of_every_kind_are_decoded(pm: ProcessManager) -> None:
    typed = await pm.spawn(TYPED, Typed)
    names = await typed.top(
        AWARE, UUID(int=7), Decimal("0.1"), Color.RED, frozenset({"a"}), (1, "b"), Point(0, 0), Point(1, 1),
        maybe=Point(2, 2), later=date(2030, 1, 1),
    )  # fmt: skip
    assert names == ["datetime", "UUID", "Decimal", "Color", "frozenset", "tuple", "Point", "Point", "Point",
                     "date"]  # fmt: skip
    # The same call as plain data (what a client in another language sends) is decoded the same way.
    plain = await pm.client.call(
        "typed", "top",
        ("2024-05-01T10:30:15Z", "00000000-0000-0000-0000-000000000007", "0.1", "red", ["a"], [1, "b"],
         {"x": 0, "y": 0}),
        {"maybe": None, "later": "2030-01-01"},
    )  # fmt: skip
    assert plain == [
        "datetime", "UUID", "Decimal", "Color", "frozenset", "tuple", "Point", "NoneType", "date",
    ]  # fmt: skip


async def test_a_caller_without_the_class_gets_plain_data_as_protocol_md_describes(
    pm: ProcessManager,
) -> None:
    await pm.spawn(TYPED)
    untyped = await pm.connect("typed")
    plain = await untyped.echo(sample())
    assert plain.pop("aware") == AWARE and plain.pop("aware", None) is None
    assert sorted(plain.pop("tags")) == ["x", "y"]
    assert sorted(plain.pop("frozen")) == [1, 2]
    assert plain == {
        "naive": "2024-05-01T12:30:15.123456",
        "day": "2024-05-01",
        "clock": "23:59:58.005000",
        "span": "P2DT3.0005S",
        "ident": "12345678-1234-5678-1234-567812345678",
        "amount": "12.50",
        "color": "green",
        "level": 2,
        "mode": "safe",
        "blob": b"\x00\xffbytes",
        "pair": [1, "one"],
        "named": [2, "two"],
        "row": {"name": "ada", "score": "99.9"},
        "kind": "b",
        "maybe": None,
        "points": [{"x": 1, "y": 2}, {"x": 3, "y": 4}],
        "by_day": {"mon": [["2024-05-06", "1.25"]]},
        "huge": 2**80,
    }
    assert [type(v).__name__ async for v in untyped.repeat(sample(), 1)] == ["dict"]


async def test_the_aware_datetime_arrives_in_utc_for_plain_callers_too(pm: ProcessManager) -> None:
    await pm.spawn(TYPED)
    value = await pm.client.call("typed", "either", (AWARE,))
    assert value == AWARE and value.tzinfo == UTC


async def test_unions_of_two_string_like_or_two_object_like_types(pm: ProcessManager) -> None:
    typed = await pm.spawn(TYPED, Typed)
    assert await typed.either("plain text") == "plain text"
    got = await typed.either(AWARE)
    assert type(got) is datetime and got == AWARE
    assert await typed.blob_or_text(b"aGVsbG8=") == ["bytes"]
    assert await typed.blob_or_text("aGVsbG8=") == ["str"]  # not taken for base64 bytes
    assert await typed.shapes([Point(1, 2), Size(3, 4), Pair(3, "c")]) == ["Point", "Size", "Pair"]
    with pytest.raises(BadArguments, match=r"argument 'value' must be str \| datetime, got int \(5\)"):
        await typed.either(5)  # type: ignore[arg-type]  # the error under test


async def test_a_wrong_argument_is_refused_naming_the_parameter_the_type_and_what_came(
    pm: ProcessManager,
) -> None:
    typed = await pm.spawn(TYPED, Typed)
    with pytest.raises(BadArguments, match=r"argument 'when' must be datetime, got str \('next tuesday'\)"):
        await pm.client.call("typed", "top", ("next tuesday", str(UUID(int=1)), "1", "red", [], [1, "a"]))
    with pytest.raises(BadArguments, match=r"argument 'color' must be Color, got str \('purple'\)"):
        await pm.client.call("typed", "top", (AWARE, str(UUID(int=1)), "1", "purple", [], [1, "a"]))
    missing_y = r"argument '\*rest\[1\]' must be Point.*missing required field `y`"
    with pytest.raises(BadArguments, match=missing_y):
        await pm.client.call("typed", "top", (AWARE, str(UUID(int=1)), "1", "red", [], [1, "a"],
                                              {"x": 1, "y": 1}, {"x": 1}))  # fmt: skip
    plain = await pm.client.call("typed", "echo", (sample(),))  # what a right value looks like, as data
    plain["points"][1]["y"] = "four"
    with pytest.raises(BadArguments) as info:
        await pm.client.call("typed", "echo", (plain,))
    message = info.value.message
    assert "argument 'value' must be Everything, got dict" in message, message
    assert "value.points[1].y" in message and "Expected `int`, got `str`" in message, message
    assert await typed.runs_so_far() == 1  # only the call that gave the right value ran


async def test_a_result_that_breaks_its_annotation_is_a_bad_result_from_the_worker(
    pm: ProcessManager,
) -> None:
    typed = await pm.spawn(TYPED, Typed)
    untyped = await pm.connect("typed")
    for proxy in (untyped, typed):  # the worker refuses it: a caller without the class is told too
        with pytest.raises(BadResult, match=r"result of bad_result\(\) must be Point.*\.x.*Expected `int`"):
            await proxy.bad_result()
    with pytest.raises(BadResult, match=r"result of bad_nested_result\(\) must be Everything, got dict"):
        await typed.bad_nested_result()
    assert isinstance(BadResult("titan.BadResult", ""), RemoteError)


async def test_a_streamed_item_that_breaks_its_annotation_ends_the_stream_after_the_good_ones(
    pm: ProcessManager,
) -> None:
    typed = await pm.spawn(TYPED, Typed)
    got: list[Point] = []
    with pytest.raises(BadResult, match=r"item 1 of bad_item\(\) must be Point, got dict") as info:
        async for item in typed.bad_item():
            got.append(item)
    assert got == [Point(1, 2)] and type(got[0]) is Point
    assert info.value.details["items"] == 1


@process(name="typed")
class OtherTyped:
    """The typed service as a caller with another version of the class sees it."""

    @public
    async def runs_so_far(self) -> date:
        raise NotImplementedError


async def test_a_result_that_does_not_fit_the_callers_own_class_is_a_bad_result_at_the_caller(
    pm: ProcessManager,
) -> None:
    await pm.spawn(TYPED)
    other = await pm.connect("typed", OtherTyped)
    with pytest.raises(BadResult, match=r"result of typed\.runs_so_far\(\) must be date, got int \(0\)"):
        await other.runs_so_far()


@pytest.mark.parametrize(
    ("value", "type_name"), [(socket.socket(), "socket"), (lambda: 1, "function")], ids=["socket", "lambda"]
)
async def test_a_value_that_cannot_cross_the_wire_fails_at_the_caller_before_anything_is_sent(
    pm: ProcessManager, value: Any, type_name: str
) -> None:
    typed = await pm.spawn(TYPED, Typed)
    with pytest.raises(EncodeError, match=rf"arguments of echo\(\) cannot be encoded.*'{type_name}'"):
        await typed.echo(value)
    with pytest.raises(EncodeError, match=rf"arguments of either\(\).*'{type_name}'"):
        await typed.either(value=[1, {"deep": value}])
    assert await pm.client.redis.xlen(pm.client.keys.calls("typed")) == 0
    assert await typed.runs_so_far() == 0
    if isinstance(value, socket.socket):
        value.close()


def test_titan_call_on_the_command_line_sends_and_prints_plain_data(
    workers: Workers, redis_url: str, namespace: str
) -> None:
    workers.start(TYPED)
    workers.wait_registered("typed", 1)
    result = subprocess.run(
        [sys.executable, "-m", "titan_cli", "--redis", redis_url, "--namespace", namespace,
         "call", "typed", "shift", '"2024-05-01T10:30:15+02:00"', '"PT1H30M"'],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == "2024-05-01T10:00:15+00:00"


async def test_pydantic_models_round_trip_and_are_validated_by_pydantic(pm: ProcessManager) -> None:
    pytest.importorskip("pydantic")
    from .services.typed_pydantic import Account, Accounts, Entry

    accounts = await pm.spawn(SERVICES / "typed_pydantic.py", Accounts)
    entry = Entry(at=AWARE, amount=Decimal("9.99"))
    account = Account(id=UUID(int=5), owner="ada")
    opened = await accounts.open(account, entry)
    assert type(opened) is Account and opened == Account(id=UUID(int=5), owner="ada", entries=[entry])
    assert type(opened.entries[0].at) is datetime and opened.entries[0].amount == Decimal("9.99")
    assert [e async for e in accounts.entries(opened)] == [entry]
    assert await accounts.kinds([opened]) == ["Account:UUID:datetime"]
    with pytest.raises(BadArguments, match=r"argument 'account' must be Account, got dict .*owner"):
        await pm.client.call("accounts", "open", ({"id": str(UUID(int=1)), "owner": ""},))
    with pytest.raises(BadResult, match=r"result of broken\(\) must be Account.*id: "):
        await accounts.broken()


class Plain:
    """Neither a dataclass nor any other type that crosses the wire."""


@dataclasses.dataclass
class Ambiguous:
    when: str | datetime  # a naive datetime arrives as a string: which one was it?


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({"conn": socket.socket}, r"Service\.f: parameter 'conn': socket cannot cross the wire: socket\."),
        ({"return": list[Plain]}, r"Service\.f: return annotation: list\[Plain\] cannot cross the wire"),
        ({"event": Ambiguous}, r"parameter 'event': Ambiguous cannot be decoded unambiguously: .*str-like"),
        ({"events": dict[str, Ambiguous]}, r"parameter 'events': Ambiguous cannot be decoded unambiguously"),
    ],
    ids=["socket", "plain-class", "ambiguous-field", "ambiguous-field-nested"],
)
def test_an_annotation_that_cannot_cross_the_wire_is_refused_when_the_class_is_read(
    annotations: dict[str, Any], message: str
) -> None:
    from titan_broker._service.definition import describe

    async def f(self: Any, **kwargs: Any) -> Any: ...

    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)] + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann)
        for name, ann in annotations.items()
        if name != "return"
    ]
    signature = inspect.Signature(params, return_annotation=annotations.get("return", Any))
    f.__signature__ = signature  # type: ignore[attr-defined]
    service = process(name="service")(type("Service", (), {"f": public(f)}))
    with pytest.raises(ConfigError, match=message):
        describe(service)


def test_a_name_only_known_to_type_checkers_leaves_that_parameter_unchecked_and_the_others_checked(
    tmp_path: Path,
) -> None:
    from titan_broker._service.definition import load_service_file

    path = tmp_path / "lazy.py"
    path.write_text(
        "from __future__ import annotations\n"
        "from datetime import date\n"
        "from typing import TYPE_CHECKING\n"
        "from titan_broker import process, public\n"
        "if TYPE_CHECKING:\n"
        "    from sqlite3 import Connection\n"
        "@process(name='lazy')\n"
        "class Lazy:\n"
        "    @public\n"
        "    async def f(self, conn: Connection, day: date) -> date: ...\n"
    )
    spec = load_service_file(path).methods["f"]
    args: list[Any] = ["anything at all", "2024-05-01"]
    assert spec.parameters.decode("f", args, {}) is None
    assert args == ["anything at all", date(2024, 5, 1)]
    assert spec.returns is not None and spec.returns.decode("2024-05-02") == date(2024, 5, 2)


@pytest.mark.parametrize(
    ("annotation", "plain", "decoded"),
    [
        (tuple[str | datetime, int], ["2024", 1], ("2024", 1)),
        (tuple[str | datetime, int], [AWARE, 1], (AWARE, 1)),
        (tuple[Point | Size, ...], [{"x": 1, "y": 2}, {"w": 3, "h": 4}], (Point(1, 2), Size(3, 4))),
        (set[bytes | str], [b"a", "a"], {b"a", "a"}),
        (
            dict[str, Point | Size],
            {"p": {"x": 1, "y": 2}, "q": {"w": 3, "h": 4}},
            {"p": Point(1, 2), "q": Size(3, 4)},
        ),
        (dict[str, list[Point | Size | None]], {"p": [None, {"w": 1, "h": 2}]}, {"p": [None, Size(1, 2)]}),
    ],
)
def test_containers_of_unions_msgspec_refuses_are_decoded_item_by_item(
    annotation: Any, plain: Any, decoded: Any
) -> None:
    from titan_broker._wire.values import wire_type

    kind = wire_type(annotation)
    assert kind is not None
    got = kind.decode(plain)
    assert got == decoded and type(got) is type(decoded)
    kind.check(decoded)  # what a method returns checks as its plain form decodes


@pytest.mark.parametrize(
    ("annotation", "plain", "where"),
    [
        (tuple[str | datetime, int], ["2024", "1"], r"\[1\]: Expected `int`, got `str`"),
        (tuple[str | datetime, int], ["2024"], r"Expected `array` of length 2, got `list`"),
        (list[Point | Size], [{"x": 1, "y": 2}, {"x": 1}], r"\[1\]: Expected `Point \| Size`, got `dict`"),
        (dict[str, Point | Size], {"p": 5}, r"\['p'\]: Expected `Point \| Size`, got `int`"),
        (list[Point | Pair], [{"x": 1}], r"\[0\]: Object missing required field `y`"),  # msgspec's own
    ],
)
def test_containers_of_unions_say_where_a_value_does_not_fit(annotation: Any, plain: Any, where: str) -> None:
    from titan_broker._wire.values import Mismatch, wire_type

    kind = wire_type(annotation)
    assert kind is not None
    with pytest.raises(Mismatch) as info:
        kind.decode(plain)
    assert re.search(where, info.value.explain("value", "value", kind.shown, plain)), info.value


@pytest.mark.parametrize("method", ["cached_in_redis", "cached_here"])
async def test_a_cached_result_arrives_as_its_type_too(pm: ProcessManager, method: str) -> None:
    typed = await pm.spawn(TYPED, Typed)
    first = await getattr(typed, method)(date(2024, 5, 6))
    again = await getattr(typed, method)("2024-05-06")  # the same argument, once decoded: a cache hit
    assert first == again == [Point(5, 6)] and type(again[0]) is Point
    assert await typed.runs_so_far() == 1


def test_without_pydantic_everything_else_works_and_titan_broker_never_imports_it() -> None:
    code = (
        "import sys\n"
        "sys.modules['pydantic'] = None  # any import of it fails\n"
        "from titan_broker._service.definition import load_service_file\n"
        "from titan_broker._wire.codec import pack, unpack\n"
        f"spec = load_service_file({str(TYPED)!r}).methods['shift']\n"
        "args = ['2024-05-01T10:30:15Z', 'PT1H']\n"
        "assert spec.parameters.decode('shift', args, {}) is None, args\n"
        "result = args[0] + args[1]\n"
        "spec.returns.check(result)\n"
        "assert spec.returns.decode(unpack(pack(result))) == result\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


PROMISED = SERVICES / "promised.py"


class Stub:
    """The caller's view of `promised`, without @process: its annotations are what it decodes into."""

    async def users(self) -> list[User]: ...

    async def color(self) -> PromisedColor: ...


class Unusable:
    async def users(self) -> socket.socket: ...


async def test_wrong_argument_types_are_refused_before_the_method_runs(pm: ProcessManager) -> None:
    calc = await pm.spawn(CALCULATOR)
    with pytest.raises(BadArguments, match=r"argument 'a' must be float, got str \('five'\)"):
        await calc.add("five", 3)
    with pytest.raises(BadArguments, match="argument 'n' must be int, got float"):
        await calc.factorial(2.5)
    assert (await calc.get_stats())["operation_count"] == 0
    assert await calc.add(1, 2.5) == 3.5


async def test_a_proxy_of_any_class_decodes_into_its_annotations(pm: ProcessManager) -> None:
    await pm.spawn(str(PROMISED))
    stub = await pm.connect("promised", Stub)
    assert await stub.users() == [User(1, "ann")]
    with pytest.raises(BadResult, match=r"must be Color, got str \('purple'\)"):
        await stub.color()
    with pytest.raises(ConfigError, match=r"Unusable.users.*socket"):
        await pm.connect("promised", Unusable)


async def test_a_datetime_sent_for_a_date_is_named(pm: ProcessManager) -> None:
    await pm.spawn(str(PROMISED))
    with pytest.raises(
        BadArguments, match=r"must be date, got a datetime \(sent as str '2024-02-29T10:00:00'\)"
    ):
        await pm.client.call("promised", "day", (datetime(2024, 2, 29, 10),))

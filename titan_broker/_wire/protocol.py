"""The wire protocol, version 3 (PROTOCOL.md is its specification).

A request is one stream entry with short fields; a reply is one msgpack map
added to the caller's reply stream. Values are msgpack only: a value msgpack
cannot encode is an error, never a pickle (``codec``). Decoding is bounded:
the entry's size is checked before anything is decoded, and ``codec.unpack``
bounds what a payload may hold.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
from msgspec import Raw

from .._errors import EncodeError, PayloadTooLarge, WireError
from .codec import EXT_BIGINT as EXT_BIGINT
from .codec import MAX_CONTAINERS as MAX_CONTAINERS
from .codec import MAX_DEPTH as MAX_DEPTH
from .codec import pack as pack
from .codec import unpack as unpack

VERSION = b"3"
DEFAULT_MAX_PAYLOAD = 1024 * 1024
ENTRY_OVERHEAD = 4096
"""Bytes an entry may hold beyond its payload (ids, method, reply key, trace context)."""

# Stream entry fields.
F_VERSION = b"v"
F_ID = b"id"
F_METHOD = b"m"
F_ARGS = b"a"
F_REPLY = b"r"
F_TIMEOUT = b"ttl"
"""Milliseconds the call may take, counted from its entry id (Redis's clock at XADD)."""
F_TRACE = b"t"
F_MOVES = b"x"
"""How often the entry was moved to another stream (off a dead worker's own stream, or handed to
another version); absent means 0."""
F_JOB = b"j"
"""A job's token: its outcome is kept in the job's hash (``Keys.job``), not sent to a reply stream."""
F_ATTEMPT = b"n"
"""Which run of the call this is under @retry (1 when absent)."""

F_USER = b"@"
"""In a delayed call's member only (never in an entry): the registered caller user whose request
stream the call goes to when it comes due (``promote.lua`` takes it out)."""

NO_DEADLINE_MS = 315_360_000_000
"""The timeout of a job without a deadline: ten years (``ttl`` is always a number)."""
_TOKEN = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# Reply stream entry field.
F_REPLY_VALUE = b"reply"


def excerpt(raw: bytes | str | None, limit: int = 80) -> str:
    """A field's value for a message or a log line, cut to ``limit`` characters."""
    if raw is None:
        return "nothing"
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return repr(text[:limit]) + (f"... ({len(raw)} bytes)" if len(text) > limit else "")


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded request entry."""

    call_id: str
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    reply_to: str | None
    """The caller's reply stream; None for a job."""
    deadline_ms: int
    """In Redis's clock: the entry id's milliseconds plus the call's timeout."""
    trace: str | None = None
    job: str | None = None
    """A job's token (its outcome goes to its hash)."""
    attempt: int = 1


class BadEntry(Exception):
    """A stream entry is not a valid request; ``call_id`` and ``reply_to`` are set when readable."""

    def __init__(
        self,
        message: str,
        *,
        call_id: str | None,
        reply_to: str | None,
        type: str = WireError.BAD_REQUEST,
    ) -> None:
        super().__init__(message)
        self.call_id = call_id
        self.reply_to = reply_to
        self.type = type


def encode_request(
    call_id: str,
    method: str,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    reply_to: str | None,
    timeout_ms: int,
    *,
    trace: str | None = None,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    job: str | None = None,
) -> dict[bytes, bytes]:
    """Build the fields of a request entry; raise PayloadTooLarge or EncodeError.

    ``timeout_ms`` counts from the moment Redis adds the entry (its id), so the
    deadline is in Redis's clock and no host's clock matters. A job has a
    token (``job``) instead of a reply stream.
    """
    try:
        payload = pack([list(args), dict(kwargs)])
    except EncodeError as exc:
        raise EncodeError(exc.type, f"arguments of {method}() {exc.message}") from exc
    if len(payload) > max_payload:
        raise PayloadTooLarge(
            WireError.PAYLOAD_TOO_LARGE,
            f"arguments of {method}() are {len(payload)} bytes, over the limit of {max_payload}",
        )
    fields = {
        F_VERSION: VERSION,
        F_ID: call_id.encode(),
        F_METHOD: method.encode(),
        F_ARGS: payload,
        F_TIMEOUT: str(max(0, timeout_ms)).encode(),
    }
    if reply_to is not None:
        fields[F_REPLY] = reply_to.encode()
    if job is not None:
        fields[F_JOB] = job.encode()
    if trace is not None:
        fields[F_TRACE] = trace.encode()
    return fields


def job_token(fields: Mapping[bytes, bytes]) -> str | None:
    """A request's job token (field ``j``) when it has a valid one."""
    token = field_text(fields, F_JOB)
    return token if token is not None and _TOKEN.fullmatch(token) else None


def flat_fields(fields: Mapping[bytes, bytes]) -> list[bytes]:
    """An entry's fields as ``[name, value, name, value, ...]``: the ARGV of a script that XADDs them."""
    flat: list[bytes] = []
    for name, value in fields.items():
        flat += (name, value)
    return flat


def pack_fields(fields: Mapping[bytes, bytes]) -> bytes:
    """A request's fields as one msgpack map of byte strings: a call in the delayed set.

    msgpack-python, not msgspec, and byte strings as msgpack's raw (str) type,
    not bin: Redis's Lua (cmsgpack) reads no bin type, and unpacks raw into
    the byte strings promote.lua adds back as the entry's fields.
    """
    return msgpack.packb(dict(fields), use_bin_type=False)  # type: ignore[no-any-return]


def moves(fields: Mapping[bytes, bytes]) -> int:
    """How often an entry was moved (field ``x``); junk, or an absurdly long number, counts as 0."""
    raw = fields.get(F_MOVES, b"0")
    return int(raw) if raw.isdigit() and len(raw) < 6 else 0


def next_attempt(fields: Mapping[bytes, bytes], timeout_ms: int) -> dict[bytes, bytes]:
    """A request's fields for its next attempt (@retry): the attempt number one higher, ``timeout_ms``
    (what is left of its deadline from its due time) as its ttl, and no count of moves."""
    fields = dict(fields)
    fields[F_ATTEMPT] = str(int(fields.get(F_ATTEMPT, b"1")) + 1).encode()
    fields[F_TIMEOUT] = str(max(0, timeout_ms)).encode()
    fields.pop(F_MOVES, None)
    return fields


def field_text(fields: Mapping[bytes, bytes], name: bytes) -> str | None:
    """A field of a stream entry as text; None when missing or not UTF-8."""
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def entry_time_ms(entry_id: bytes) -> int:
    """The milliseconds part of a stream entry id: Redis's clock when the entry was added."""
    return int(entry_id.split(b"-", 1)[0])


def entry_size(fields: Mapping[bytes, bytes]) -> int:
    """The bytes an entry holds, names and values."""
    return sum(len(k) + len(v) for k, v in fields.items())


def decode_request(
    fields: Mapping[bytes, bytes],
    entry_id: bytes,
    *,
    reply_prefix: str,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> Request:
    """Parse a request entry; raise BadEntry saying which field is at fault.

    The entry's size is checked first, before anything is decoded. A reply
    key must start with ``reply_prefix`` (``<ns>:reply:``): an entry cannot
    make a worker write into any other key. Such an entry has no usable reply
    key and is answered nowhere (it is dead-lettered).
    """
    call_id = _small_text(fields, F_ID)
    reply_to = _small_text(fields, F_REPLY)
    if reply_to is not None and (not reply_to.startswith(reply_prefix) or len(reply_to) > 256):
        raise BadEntry(
            f"reply key {excerpt(reply_to)} is not under {reply_prefix!r}", call_id=call_id, reply_to=None
        )
    size = entry_size(fields)
    if size > max_payload + ENTRY_OVERHEAD:
        raise BadEntry(
            f"request entry is {size} bytes, over the limit of {max_payload + ENTRY_OVERHEAD}",
            call_id=call_id,
            reply_to=reply_to,
            type=WireError.PAYLOAD_TOO_LARGE,
        )

    def bad(message: str, type: str = WireError.BAD_REQUEST) -> BadEntry:
        return BadEntry(message, call_id=call_id, reply_to=reply_to, type=type)

    version = fields.get(F_VERSION)
    if version != VERSION:
        raise bad(f"unsupported protocol version {excerpt(version)}; this worker speaks {VERSION.decode()}")
    if not call_id:
        raise bad("request has no call id (field 'id', at most 256 bytes of UTF-8)")
    job = _small_text(fields, F_JOB)
    if job is not None and not _TOKEN.fullmatch(job):
        raise bad(f"job token {excerpt(job)} is not 1 to 128 letters, digits, '_', '.', ':' or '-'")
    if not reply_to and job is None:
        raise bad("request has no reply key (field 'r') and is no job (field 'j')")
    raw_attempt = fields.get(F_ATTEMPT, b"1")
    if not raw_attempt.isdigit() or len(raw_attempt) > 6 or int(raw_attempt) < 1:
        raise bad(f"request has no valid attempt number (field 'n' = {excerpt(raw_attempt)})")
    method = _small_text(fields, F_METHOD)
    if not method:
        raise bad("request has no method name (field 'm', at most 256 bytes of UTF-8)")
    raw_timeout = fields.get(F_TIMEOUT, b"")
    if not raw_timeout.isdigit() or len(raw_timeout) > 12:
        raise bad(f"request has no valid timeout (field 'ttl' = {excerpt(raw_timeout)}; milliseconds)")
    try:
        deadline_ms = entry_time_ms(entry_id) + int(raw_timeout)
    except ValueError:
        raise bad(f"entry id {excerpt(entry_id)} is not a stream id") from None
    payload = fields.get(F_ARGS)
    if payload is None:
        raise bad("request has no arguments (field 'a')")
    if len(payload) > max_payload:
        raise bad(
            f"arguments of {method}() are {len(payload)} bytes, over the limit of {max_payload}",
            WireError.PAYLOAD_TOO_LARGE,
        )
    try:
        decoded = unpack(payload)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise bad(f"arguments of {method}() are not valid msgpack: {exc}") from exc
    if (
        not isinstance(decoded, list)
        or len(decoded) != 2
        or not isinstance(decoded[0], list)
        or not isinstance(decoded[1], dict)
        or not all(isinstance(k, str) for k in decoded[1])
    ):
        raise bad(f"arguments of {method}() must be a msgpack array [args, {{name: value}}]")
    return Request(
        call_id=call_id,
        method=method,
        args=decoded[0],
        kwargs=decoded[1],
        reply_to=reply_to,
        deadline_ms=deadline_ms,
        trace=_small_text(fields, F_TRACE),
        job=job,
        attempt=int(raw_attempt),
    )


_FIELDS = frozenset(
    {F_VERSION, F_ID, F_METHOD, F_ARGS, F_REPLY, F_TIMEOUT, F_TRACE, F_MOVES, F_JOB, F_ATTEMPT}
)
"""The fields a request of this version has;
others are ignored, so that later versions can add optional ones."""


def _small_text(fields: Mapping[bytes, bytes], name: bytes) -> str | None:
    """A short text field (id, method, reply key, trace); None when missing, too long or not UTF-8."""
    raw = fields.get(name)
    return field_text(fields, name) if raw is not None and len(raw) <= 256 else None


def encode_ok(call_id: str, value: Any, worker_id: str) -> bytes:
    """A success reply; raise EncodeError when the value cannot be encoded."""
    return pack({"id": call_id, "ok": True, "v": value, "w": worker_id})


def encode_error(
    call_id: str, type: str, message: str, worker_id: str, details: dict[str, Any] | None = None
) -> bytes:
    """An error reply; details that cannot be encoded are replaced by their repr."""
    error = {"type": type, "message": message, "details": details or {}}
    try:
        return pack({"id": call_id, "ok": False, "e": error, "w": worker_id})
    except EncodeError:
        error["details"] = {"repr": safe_repr(details)}
        return pack({"id": call_id, "ok": False, "e": error, "w": worker_id})


def safe_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters; never raises (huge ints and broken __repr__ do)."""
    return _safe(repr, value, limit)


def safe_str(value: Any, limit: int = 2000) -> str:
    """``str(value)`` cut to ``limit`` characters; never raises (an exception's message can)."""
    return _safe(str, value, limit)


def _safe(render: Callable[[Any], str], value: Any, limit: int) -> str:
    try:
        text = render(value)
    except Exception as exc:
        return f"<{type(value).__name__} object: {render.__name__}() raised {type(exc).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def dead_letter_fields(
    fields: Mapping[bytes, bytes],
    *,
    reason: str,
    deliveries: int,
    worker: str,
    source_id: bytes,
    max_size: int = DEFAULT_MAX_PAYLOAD + ENTRY_OVERHEAD,
    user: str | None = None,
) -> dict[bytes, bytes]:
    """The fields of a dead-letter entry: the original entry and why it is here; ``user``: the
    registered caller user whose request stream it came from (a replay goes back there).

    The entry is kept whole, for replay, unless it is over the size limit:
    then only its known short fields are kept (it could not be served anyway).
    """
    if entry_size(fields) > max_size:
        fields = {k: v for k, v in fields.items() if k in _FIELDS and k != F_ARGS and len(v) <= 256}
        reason += " (the entry was over the size limit: only its short fields are kept)"
    dead = {
        b"entry": pack(dict(fields)),
        b"reason": reason.encode(),
        b"deliveries": str(deliveries).encode(),
        b"worker": worker.encode(),
        b"source_id": source_id,
        b"at": str(int(time.time() * 1000)).encode(),
    }
    for name in (F_ID, F_METHOD):
        if name in fields:
            dead[name] = fields[name]
    if user is not None:
        dead[b"user"] = user.encode()
    return dead


@dataclass(frozen=True, slots=True)
class Reply:
    """A decoded reply."""

    call_id: str
    ok: bool
    value: Any
    error: dict[str, Any] | None
    worker_id: str | None
    seq: int | None = None
    """Set on a message of stream items: the position of its first item, from 0."""
    end: int | None = None
    """Set on the end of a stream: how many items it had."""
    items: list[Any] | None = None
    """Set on a message of stream items: the items, in order from position ``seq``."""


def decode_reply(data: bytes) -> Reply | None:
    """Parse a reply; None when it is not a valid reply map (it is then ignored)."""
    try:
        msg = unpack(data)
    except Exception:
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("id"), str):
        return None
    ok = bool(msg.get("ok"))
    error = msg.get("e")
    if not ok and not isinstance(error, dict):
        error = {"type": WireError.BAD_REPLY, "message": "reply carries neither value nor error"}
    seq, end = msg.get("s"), msg.get("end")
    items = msg.get("i")
    if isinstance(seq, int) and not isinstance(items, list):
        items = [msg.get("v")]  # one item, as workers before multi-item messages sent it
    return Reply(
        msg["id"],
        ok,
        msg.get("v"),
        None if ok else error,
        msg.get("w"),
        seq if isinstance(seq, int) else None,
        end if isinstance(end, int) else None,
        items if isinstance(seq, int) else None,
    )


STREAM_WINDOW = 32
"""Stream items a worker may send beyond those its caller has consumed."""


STREAM_MESSAGE_OVERHEAD = 512
"""Bytes a message of stream items may add to its items (call id, worker id, framing)."""


def encode_items(call_id: str, seq: int, items: list[bytes], worker_id: str) -> bytes:
    """A message of consecutive stream items from position ``seq``, each already encoded (``pack``)."""
    return pack({"id": call_id, "ok": True, "s": seq, "i": [Raw(item) for item in items], "w": worker_id})


def encode_end(call_id: str, count: int, worker_id: str) -> bytes:
    """The end of a streamed result that had ``count`` items."""
    return pack({"id": call_id, "ok": True, "end": count, "w": worker_id})


def size_error(what: str, size: int, limit: int) -> PayloadTooLarge:
    """The error for a value over the size limit."""
    return PayloadTooLarge(WireError.PAYLOAD_TOO_LARGE, f"{what} is {size} bytes, over the limit of {limit}")

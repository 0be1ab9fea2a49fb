"""Opening Redis connections from a URL, with errors that say which server failed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, cast

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._config import redact
from .._errors import RedisOutOfMemory, RedisUnavailable, TitanError
from .denied import access_denied, is_denied
from .topology import Address, Topology, discover, unreachable

logger = logging.getLogger(__name__)

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis

    _hiredis_pack = hiredis.pack_command
except ImportError:  # hiredis is optional: redis-py's own packing then
    _hiredis_pack = None

Redis = aioredis.Redis | RedisCluster
"""A pooled client: redis-py's for one Redis (or a Sentinel-managed primary) or for a cluster."""

CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.RedisClusterUnreachableError,  # no node of a cluster answered: the cluster is out of reach
    OSError,
)
REDIS_ERRORS: tuple[type[Exception], ...] = (rexc.RedisError, OSError)
"""Everything redis-py raises: catch these where an error must become a TitanError (``titan_error``)."""


DEFAULT_MAX_CONNECTIONS = 64

SOCKET_TIMEOUT = 10.0
"""Seconds one command may wait for its reply before the connection counts as lost.

Set explicitly: redis-py 5 to 7 default to no timeout at all (a stopped or
partitioned Redis hangs a command for ever), redis-py 8 to 5 s. A connection
that sends blocking commands (XREAD/XREADGROUP ... BLOCK) needs a timeout
longer than its BLOCK: see ``Channel.open(..., socket_timeout=)``.
"""
CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection (TCP, TLS, AUTH, SELECT)."""


def _timeouts(socket_timeout: float | None) -> dict[str, Any]:
    """Connection options pinned here rather than left to the redis-py version's defaults.

    redis-py retries nothing by itself either (redis-py 6+ retries 3 to 10
    times when a client is built without a pool): every retry loop here has
    its own bound, so a library retry would only stretch it.
    """
    return {
        "socket_timeout": SOCKET_TIMEOUT if socket_timeout is None else socket_timeout,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
    }


async def open_redis(
    where: str | Topology,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    socket_timeout: float | None = None,
) -> Redis:
    """Connect to the Redis behind ``where`` (a URL, or a Topology found already) and check it answers.

    One Redis, a cluster (any node's URL) or a Sentinel-managed primary (see
    topology.py). Passwords, ACL users (``redis://user:pass@host``), TLS
    (``rediss://``, with ``?ssl_ca_certs=...``) and the db number come from
    the URL. On one Redis, commands beyond ``max_connections`` at once wait
    for a free connection rather than fail. A command waits at most
    ``socket_timeout`` (default SOCKET_TIMEOUT) for its reply, whatever the
    redis-py version. Raises RedisUnavailable naming the server (password hidden).
    """
    topology = where if isinstance(where, Topology) else await discover(where)
    url = topology.url
    client = topology.client(
        decode_responses=False, max_connections=max_connections, timeout=None, health_check_interval=30,
        **_timeouts(socket_timeout),
    )  # fmt: skip
    try:
        await client.ping()
    except (rexc.RedisError, OSError) as exc:
        await client.aclose()
        raise unreachable(url, exc) from exc
    return client


def titan_error(
    exc: Exception, doing: str, *, command: str | None = None, key: str | None = None
) -> TitanError:
    """The TitanError for a redis-py exception raised while ``doing`` (e.g. "send calc.add()").

    Connection failures and timeouts: RedisUnavailable; a write refused at
    ``maxmemory``: RedisOutOfMemory; an ACL refusal: AccessDenied naming
    ``command``, ``key`` and the role (denied.py); any other error reply:
    TitanError with Redis's message.
    """
    if isinstance(exc, TitanError):
        return exc
    if isinstance(exc, rexc.OutOfMemoryError):
        return RedisOutOfMemory(f"cannot {doing}: Redis is out of memory ({exc})")
    if is_denied(exc):
        return access_denied(exc, doing, command, key)
    if isinstance(exc, rexc.AuthenticationError):
        return RedisUnavailable(f"cannot {doing}: Redis refused the credentials ({exc})")
    if isinstance(exc, CONNECTION_ERRORS):
        return RedisUnavailable(f"cannot {doing}: Redis is unreachable ({exc or type(exc).__name__})")
    return TitanError(f"cannot {doing}: Redis answered with an error ({exc})")


def text(value: bytes | str) -> str:
    """A Redis reply as str (clients here use decode_responses=False)."""
    return value.decode() if isinstance(value, bytes) else value


async def _connect(topology: Topology, key: str) -> aioredis.Redis:
    """A single-connection client to the node serving ``key``, connected (at most CONNECT_TIMEOUT)."""
    url = topology.node_url(topology.locate(key))
    options = {**_timeouts(None), "socket_timeout": None}  # the channel's watchdog bounds replies
    client = aioredis.Redis.from_url(
        url, decode_responses=False, single_connection_client=True, protocol=2, **options
    )
    try:
        # The handshake (AUTH, HELLO/SETINFO) has no socket timeout here: bound it all.
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await client.initialize()
            assert client.connection is not None
            await client.connection.connect()  # type: ignore[no-untyped-call]
    except BaseException as exc:
        await client.aclose()
        if isinstance(exc, TimeoutError):
            raise RedisUnavailable(
                f"Redis at {redact(url)} did not answer within {CONNECT_TIMEOUT:g} s"
            ) from exc
        if isinstance(exc, CONNECTION_ERRORS):
            raise RedisUnavailable(f"cannot reach Redis at {redact(url)}: {exc}") from exc
        raise
    return client


def _packed(conn: Any, args: tuple[Any, ...]) -> bytes | list[bytes]:
    """A command in RESP: by hiredis in one C call when it is installed (a fifth of a caller's
    CPU went to redis-py's per-argument encoding), else by redis-py, which also explains a value
    neither can send (DataError)."""
    if _hiredis_pack is not None:
        try:
            return _hiredis_pack(args)
        except TypeError:
            pass
    return conn.pack_command(*args)  # type: ignore[no-any-return]


def _packed_many(conn: Any, commands: list[tuple[Any, ...]]) -> bytes | list[bytes]:
    if _hiredis_pack is not None:
        try:
            return b"".join([_hiredis_pack(args) for args in commands])
        except TypeError:
            pass
    return conn.pack_commands(commands)  # type: ignore[no-any-return]


class WrongNode(rexc.ConnectionError):
    """The node a channel spoke to no longer serves its key (a failover, a replica now, a cluster
    that lost a primary): the channel reads the topology again before its next command. Callers
    treat it as a lost connection."""


_MOVED_OR_DOWN = (rexc.ReadOnlyError, rexc.ClusterDownError, rexc.TryAgainError, rexc.AskError)
"""Error replies that mean "not here, or not now": the key is moving or its node is failing over.
(MovedError is an AskError; a MOVED is followed at once, the others relocate before the next command.)"""


def _unblocked(exc: rexc.ResponseError) -> bool:
    """A blocking command ended because its node became a replica (a failover): like READONLY."""
    return str(exc).startswith("UNBLOCKED")


class Channel:
    """One connection of its own for a hot path: commands go straight to the socket.

    No pool to acquire from, no retry wrapper, no response callbacks: replies
    come back as RESP2 values (bytes, ints, lists; nil as None). That saves
    about a quarter of redis-py's per-command cost. An error reply raises
    ResponseError and leaves the connection usable; any other failure
    (including cancellation mid-command) drops the connection, and the next
    command reconnects. The owner handles retries.

    A channel serves the keys of one hash slot (``key``'s): on a cluster or
    behind Sentinel it follows that slot's primary. A MOVED reply retargets
    it and the command is sent again at once (it did not run); after a lost
    connection, a READONLY or UNBLOCKED (the primary became a replica), CLUSTERDOWN,
    TRYAGAIN or ASK it raises WrongNode (a ConnectionError) and reads the
    topology again before its next command.

    A reply slower than ``stall_after`` seconds drops the connection and the
    command raises TimeoutError, whatever the redis-py version. A watchdog
    timer does it, armed at most once per ``stall_after`` while commands are
    in flight, rather than redis-py's socket timeout, which costs a timer per
    read (a fifth of the hot path's CPU).
    """

    def __init__(self, client: aioredis.Redis, stall_after: float, topology: Topology, key: str) -> None:
        self._client = client
        self.stall_after = stall_after
        self.topology = topology
        self.key = key
        self._stale = False
        """Set after a failure that may mean the key moved: the next command relocates first."""
        self._generation = topology.generation
        """The topology's map this channel last checked its node against."""
        self._since = 0.0
        """Event-loop time the command in flight was sent; 0 when none is."""
        self._watch: asyncio.TimerHandle | None = None
        self._stalled = False
        self._dropping: set[asyncio.Task[None]] = set()

    @classmethod
    async def open(
        cls, where: str | Topology, key: str = "", *, socket_timeout: float | None = None
    ) -> Channel:
        """Connect to the node serving ``key`` (any on one Redis); raise RedisUnavailable like open_redis.

        Connecting, handshake included, takes at most CONNECT_TIMEOUT; a node
        that cannot be reached on a cluster or behind Sentinel has the
        topology read again and the node now serving ``key`` tried once more
        (a failover since the map was last read). A reply slower than
        ``socket_timeout`` (default SOCKET_TIMEOUT) drops the connection with
        TimeoutError: a channel that BLOCKs must pass more than its longest BLOCK.
        """
        topology = where if isinstance(where, Topology) else await discover(where)
        stall_after = SOCKET_TIMEOUT if socket_timeout is None else socket_timeout
        try:
            return cls(await _connect(topology, key), stall_after, topology, key)
        except RedisUnavailable:
            if not topology.can_move:
                raise
        await topology.refresh()
        return cls(await _connect(topology, key), stall_after, topology, key)

    @property
    def address(self) -> Address:
        """The node this channel speaks to."""
        conn = self._client.connection
        assert conn is not None, "channel is closed"
        if isinstance(conn, aioredis.UnixDomainSocketConnection):
            return conn.path, 0
        return conn.host, conn.port

    async def _retarget(self, address: Address) -> None:
        conn = self._client.connection
        assert conn is not None, "channel is closed"
        if isinstance(conn, aioredis.UnixDomainSocketConnection):
            return  # one Redis, one socket: nowhere else to go
        if (conn.host, conn.port) != address:
            await conn.disconnect(nowait=True)
            conn.host, conn.port = address
            logger.info("channel for %s now speaks to %s:%d", self.key or "Redis", *address)

    async def _relocate(self) -> None:
        """Read the topology again and follow the key (it stays stale if that fails)."""
        try:
            await self.topology.refresh()
        except TitanError as exc:
            raise WrongNode(str(exc)) from exc
        self._generation = self.topology.generation
        await self._retarget(self.topology.locate(self.key))
        self._stale = False

    def _moved(self, exc: rexc.ResponseError) -> WrongNode:
        """After a "not here, or not now" reply: relocate before the next command."""
        self._stale = True
        return WrongNode(f"{self.key or 'the key'} is not served at {self.address[0]}:{self.address[1]} now "
                          f"({exc}); the topology is read again")  # fmt: skip

    def _sent(self) -> None:
        loop = asyncio.get_running_loop()
        self._since = loop.time()
        if self._watch is None:
            self._watch = loop.call_at(self._since + self.stall_after, self._check)

    def _check(self) -> None:
        self._watch = None
        if not self._since:
            return
        loop = asyncio.get_running_loop()
        due = self._since + self.stall_after
        if loop.time() < due:
            self._watch = loop.call_at(due, self._check)
            return
        conn = self._client.connection
        if conn is not None:  # closing the socket ends the read in flight
            self._stalled = True
            task = loop.create_task(conn.disconnect(nowait=True))
            self._dropping.add(task)
            task.add_done_callback(self._dropping.discard)

    async def _failed(self, conn: Any, exc: BaseException) -> None:
        """Drop the connection after a failure; a stalled reply becomes a TimeoutError."""
        await conn.disconnect(nowait=True)
        if self.topology.can_move:
            self._stale = True  # a failover looks like this first
        stalled, self._stalled = self._stalled, False
        if stalled and isinstance(exc, Exception):
            raise rexc.TimeoutError(f"Redis did not answer within {self.stall_after:g} s") from exc

    async def _follow(self) -> None:
        """Another channel read a new map: check where the key lives now (no I/O unless it moved)."""
        self._generation = self.topology.generation
        await self._retarget(self.topology.locate(self.key))

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply."""
        if self._stale:
            await self._relocate()
        elif self._generation != self.topology.generation:
            await self._follow()
        conn = self._client.connection
        assert conn is not None, "channel is closed"
        moved: rexc.MovedError | None = None
        for _ in range(2):  # a MOVED reply: the command did not run; send it where it belongs
            self._sent()
            try:
                await conn.send_packed_command(_packed(conn, args), check_health=False)
                return await conn.read_response()
            except rexc.MovedError as exc:
                moved = exc
                await self._retarget((exc.host, exc.port))
            except _MOVED_OR_DOWN as exc:
                raise self._moved(exc) from exc
            except rexc.ResponseError as exc:
                if _unblocked(exc):
                    raise self._moved(exc) from exc
                raise
            except BaseException as exc:
                await self._failed(conn, exc)
                raise
            finally:
                self._since = 0.0
        assert moved is not None
        raise self._moved(moved)

    async def execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send commands in one write; return their replies in order, errors as values.

        Commands answered MOVED are sent again where they belong (they did not run).
        """
        if self._stale:
            await self._relocate()
        elif self._generation != self.topology.generation:
            await self._follow()
        results = await self._execute_many(commands)
        moved = [i for i, r in enumerate(results) if isinstance(r, rexc.MovedError)]
        if moved:
            first = results[moved[0]]
            await self._retarget((first.host, first.port))
            again = await self._execute_many([commands[i] for i in moved])
            for i, result in zip(moved, again, strict=True):
                results[i] = result
        for i, result in enumerate(results):
            if isinstance(result, _MOVED_OR_DOWN) or (
                isinstance(result, rexc.ResponseError) and _unblocked(result)
            ):
                results[i] = self._moved(result)
        return results

    async def _execute_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        conn = self._client.connection
        assert conn is not None, "channel is closed"
        results: list[Any] = []
        self._sent()
        try:
            await conn.send_packed_command(_packed_many(conn, commands), check_health=False)
            for _ in commands:
                try:
                    results.append(await conn.read_response())
                except rexc.ResponseError as exc:
                    results.append(exc)
        except BaseException as exc:
            await self._failed(conn, exc)
            raise
        finally:
            self._since = 0.0
        return results

    async def reset(self) -> None:
        """Drop the connection (if any): the next command opens a new one."""
        conn = self._client.connection
        if conn is not None:
            await conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        await self._client.aclose()


class BatchScript(Protocol):
    """What an auto-pipeline needs of a script whose parts it merges (``scripting.Batch``)."""

    sha: str
    source: str


MAX_PARTS = 256
"""Parts of one script merged into one EVALSHA at most."""


class _Part(NamedTuple):
    script: BatchScript
    shared: tuple[Any, ...]
    keys: Sequence[Any]
    args: Sequence[Any]


class _Merged:
    """Parts of one script, with the same shared arguments and hash tag, sent as one EVALSHA."""

    __slots__ = ("args", "futs", "keys", "script", "shared")

    def __init__(self, script: BatchScript, shared: tuple[Any, ...]) -> None:
        self.script = script
        self.shared = shared
        self.keys: list[Any] = []
        self.args: list[Any] = []
        self.futs: list[asyncio.Future[Any]] = []

    def add(self, part: _Part, fut: asyncio.Future[Any]) -> None:
        self.keys += part.keys
        self.args += (len(part.keys), len(part.args), *part.args)
        self.futs.append(fut)

    def command(self) -> tuple[Any, ...]:
        shared = self.shared
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, len(shared), *shared, *self.args)

    def settle(self, result: Any) -> None:
        """Hand each part its answer (or the error of the whole call)."""
        if isinstance(result, list) and len(result) == len(self.futs):
            for fut, answer in zip(self.futs, result, strict=True):
                if fut.done():
                    continue
                if isinstance(answer, Exception):
                    fut.set_exception(answer)
                else:
                    fut.set_result(answer)
            return
        if not isinstance(result, Exception):
            result = rexc.ResponseError(f"a batched script answered {len(self.futs)} parts with {result!r}")
        for fut in self.futs:
            if not fut.done():
                fut.set_exception(result)


def _as_error(exc: BaseException) -> Exception:
    """What a command's future gets when its write failed (cancellation too: the command may have run)."""
    return exc if isinstance(exc, Exception) else RedisUnavailable(str(exc) or "the write was cancelled")


def _hash_tag(key: Any) -> Any:
    """The part of a key that picks its cluster slot: what is between its first ``{`` and ``}``."""
    if isinstance(key, str):
        start = key.find("{")
        if start >= 0:
            end = key.find("}", start + 1)
            if end > start + 1:
                return key[start + 1 : end]
    return key


class AutoPipeline:
    """Sends commands over one channel from a task of its own, batching those issued together.

    A caller queues a command (``submit`` returns its future; ``execute``
    awaits it). A flusher task sends what is queued in one write when the
    previous write has returned, and hands each command its own result or
    error (no transaction across the batch). Parts of a batch script
    (``submit_part``) queued together are merged into one EVALSHA per script,
    shared arguments and hash tag. A caller that stops waiting
    (cancelled, or past a deadline) never interrupts a write that others
    share: a command not yet sent is dropped, one already sent runs and its
    future still gets the reply, for whoever holds it.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._queue: list[tuple[tuple[Any, ...] | _Part, asyncio.Future[Any]]] = []
        self._busy = False
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _queued(self, item: tuple[Any, ...] | _Part) -> asyncio.Future[Any]:
        # The loop is looked up once: the flusher task and the connection belong to it anyway, and
        # on Python 3.11 each look-up costs a getpid() system call.
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((item, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._flush())
        elif self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        return fut

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; its future gets the reply or the error."""
        return self._queued(args)

    def submit_part(
        self, script: BatchScript, shared: tuple[Any, ...], keys: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """Queue one part of a batch script (see ``scripting.Batch``); its future gets the part's answer."""
        return self._queued(_Part(script, shared, keys, args))

    async def execute(self, *args: Any) -> Any:
        """Run one command and return its reply, raising its error."""
        return await self.submit(*args)

    @property
    def address(self) -> Address:
        """The node the channel speaks to."""
        return self._channel.address

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
            queue, self._queue = self._queue, []
            batch: list[tuple[tuple[Any, ...], asyncio.Future[Any] | _Merged]] = []
            merged: dict[tuple[Any, ...], _Merged] = {}
            for item, fut in queue:
                if fut.done():
                    continue
                if type(item) is _Part:
                    key = (item.script.sha, item.shared, _hash_tag(item.keys[0]) if item.keys else None)
                    group = merged.get(key)
                    if group is None or len(group.futs) >= MAX_PARTS:
                        group = merged[key] = _Merged(item.script, item.shared)
                        batch.append(((), group))
                    group.add(item, fut)
                else:
                    batch.append((item, fut))
            if merged:
                batch = [(owner.command(), owner) if type(owner) is _Merged else (command, owner)
                         for command, owner in batch]  # fmt: skip
            if batch:
                self._busy = True
                try:
                    await self._send(batch)
                finally:
                    self._busy = False

    async def aclose(self) -> None:
        """Stop the flusher; commands still queued fail."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(RedisUnavailable("the connection was closed before the command was sent"))
        self._queue.clear()

    async def reset(self) -> None:
        """Drop the channel's connection unless a send is in flight (a connection known to be stale)."""
        if not self._busy:
            await self._channel.reset()

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any] | _Merged]]) -> None:
        cut: BaseException | None = None
        try:
            results = await self._results([command for command, _ in batch])
        except BaseException as exc:
            results, cut = [_as_error(exc)] * len(batch), exc
        unknown = [i for i, (result, (_, owner)) in enumerate(zip(results, batch, strict=True))
                   if type(owner) is _Merged and isinstance(result, rexc.NoScriptError)]  # fmt: skip
        if unknown and cut is None:  # Redis restarted or SCRIPT FLUSH: load the scripts, send those again
            # with EVAL (the source itself), which no other flush can beat; later sends use EVALSHA.
            try:
                scripts = [cast(_Merged, batch[i][1]).script.source for i in unknown]
                await self._results([("SCRIPT", "LOAD", source) for source in set(scripts)])
                again = await self._results(
                    [("EVAL", source, *batch[i][0][2:]) for i, source in zip(unknown, scripts, strict=True)]
                )
            except BaseException as exc:
                again, cut = [_as_error(exc)] * len(unknown), exc
            for i, result in zip(unknown, again, strict=True):
                results[i] = result
        for (_, owner), result in zip(batch, results, strict=True):
            if type(owner) is _Merged:
                owner.settle(result)
                continue
            fut = cast(asyncio.Future[Any], owner)
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        if cut is not None and not isinstance(cut, Exception):
            raise cut  # cancelled: the futures have their error

    async def _results(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies to commands sent in one write, errors as values."""
        if len(commands) == 1:
            try:
                return [await self._channel.execute(*commands[0])]
            except rexc.ResponseError as exc:
                return [exc]
        return await self._channel.execute_many(commands)


def stream_entries(reply: Any) -> list[tuple[bytes, bytes, dict[bytes, bytes]]]:
    """(stream, entry id, fields) of each entry in a raw RESP2 XREAD/XREADGROUP reply (nil: none)."""
    if not reply:
        return []
    return [
        (stream, entry_id, dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {})
        for stream, entries in reply
        for entry_id, fields in entries
    ]

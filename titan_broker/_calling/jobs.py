"""Background jobs: a call whose answer is kept in Redis, for whoever asks later.

A job is an ordinary request on the service's stream (same backlog limit,
at-least-once delivery, dead letters, deadline) whose request carries a
token (field ``j``) instead of a reply stream: its worker writes the outcome
into the job's hash (``<ns>:{<svc>}:job:<token>``), kept ``result_ttl``
after it ended. Its id, ``<service>:<token>``, is all another process needs
to read it. The hash says where the job stands (``JobState``) as it goes:
queued (on the stream, or in the delayed set), running (a worker took it;
``attempts`` counts the runs), retrying (@retry: the last run failed, the
next is due), then done, failed, dead (dead-lettered) or cancelled.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

import anyio
from redis.asyncio.cluster import RedisCluster

from .._config import check_name
from .._errors import CallTimeout, ConfigError, JobCancelled, JobNotFound, RemoteError
from .._redis.connection import CONNECTION_ERRORS, REDIS_ERRORS, Redis, text, titan_error
from .._redis.scripting import Script
from .._wire import protocol
from .._wire.keys import GROUP, USER_MARK, Keys
from .replies import error_of

T = TypeVar("T")

_CANCEL = Script("cancel")

POLL_FIRST = 0.01
POLL_AT_MOST = 0.25
"""``Job.result`` reads the job's hash, first after POLL_FIRST seconds, then less often, up to this."""


DEFAULT_RESULT_TTL = 86_400.0
"""Seconds a job's outcome is kept after it ends, unless the submit says otherwise."""


class JobState(enum.StrEnum):
    """Where a job is: queued (or delayed), running, retrying (waiting out its backoff), or ended."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.DEAD, JobState.CANCELLED)


@dataclass(frozen=True)
class JobStatus:
    """Where a job stands, as its hash says (times in Redis's clock, UTC)."""

    id: str
    method: str
    state: JobState
    attempts: int
    submitted: datetime | None
    due: datetime | None
    """When it may start (its delay, or its next attempt's backoff)."""
    queued: datetime | None
    """When its request reached the service's stream (a delayed job: when it came due and moved)."""
    started: datetime | None
    """When its last run started."""
    finished: datetime | None
    worker: str | None
    error: RemoteError | None
    """The error of a failed or dead job, or of the last run of a retrying one."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (``titan job --json``)."""
        return {
            "id": self.id,
            "method": self.method,
            "state": str(self.state),
            "attempts": self.attempts,
            **{
                name: when.isoformat() if when else None
                for name, when in (
                    ("submitted", self.submitted),
                    ("due", self.due),
                    ("queued", self.queued),
                    ("started", self.started),
                    ("finished", self.finished),
                )
            },
            "worker": self.worker,
            "error": {"type": self.error.type, "message": self.error.message} if self.error else None,
        }


def split_id(job_id: str) -> tuple[str, str]:
    """(service, token) of a job id; raise ConfigError naming what is wrong with it."""
    service, sep, token = job_id.partition(":")
    shown = protocol.excerpt(job_id, 80)
    if not sep or protocol.job_token({protocol.F_JOB: token.encode()}) is None:
        raise ConfigError(f"{shown} is not a job id (<service>:<token>, as submit returned it)")
    try:
        check_name(service, "service")
    except ConfigError as exc:
        raise ConfigError(f"{shown} is not a job id: {exc}") from None
    return service, token


def _when(raw: bytes | None) -> datetime | None:
    if not raw or not raw.isdigit() or len(raw) > 15:
        return None
    try:
        return datetime.fromtimestamp(int(raw) / 1000, tz=UTC)
    except (ValueError, OverflowError, OSError):  # a time no datetime holds: shown as unknown
        return None


def status_of(job_id: str, fields: dict[bytes, bytes]) -> JobStatus:
    """A job's status from its hash's fields."""
    error: RemoteError | None = None
    result = fields.get(b"result")
    if result:
        reply = protocol.decode_reply(result)
        if reply is not None and not reply.ok:
            error = error_of(reply)
    try:
        state = JobState(text(fields.get(b"status", b"queued")))
    except ValueError:
        state = JobState.QUEUED
    attempts = fields.get(b"attempts", b"0")
    worker = fields.get(b"worker")
    return JobStatus(
        id=job_id, method=text(fields.get(b"method", b"")), state=state,
        attempts=int(attempts) if attempts.isdigit() else 0,
        submitted=_when(fields.get(b"submitted")), due=_when(fields.get(b"due")),
        queued=_when(fields.get(b"queued")),
        started=_when(fields.get(b"started")), finished=_when(fields.get(b"finished")),
        worker=text(worker) if worker else None, error=error,
    )  # fmt: skip


class Job(Generic[T]):
    """A job submitted to a service: its id, where it stands, its result.

    ``ProcessManager.submit`` makes one (``Client.submit`` returns its id);
    ``ProcessManager.job(id)`` and ``Client.job(id)`` find one from its id, in
    any process: the id, ``<service>:<token>``, is all another process needs.
    A job is an ordinary call on the service's stream (same backlog limit,
    at-least-once delivery, dead letters, deadline) whose outcome is kept
    ``result_ttl`` seconds after it ends. Its ``JobState`` goes from queued
    (or delayed) to running (``attempts`` counts the runs), retrying (``@retry``:
    the last run failed, the next is due), then done, failed, dead
    (dead-lettered) or cancelled.
    """

    def __init__(
        self,
        redis: Callable[[], Redis],
        keys: Keys,
        job_id: str,
        decode: Callable[[Any], T] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.service, self.token = split_id(job_id)
        self.id = job_id
        self._redis = redis
        self._keys = keys
        self._decode = decode
        self.key = keys.job(self.service, self.token)
        self._run_id = run_id
        """The ``run_id`` of the Redis that held the job when it was last seen there (its submit, or
        a read that found it): a job gone from a Redis whose run_id changed since was lost with its
        data, as a call is (CallLost)."""

    async def status(self) -> JobStatus:
        """Where the job stands now; raises JobNotFound (never submitted, or expired)."""
        try:
            fields = cast(dict[bytes, bytes], await self._redis().hgetall(self.key))
        except REDIS_ERRORS as exc:
            raise titan_error(exc, f"read job {self.id}") from exc
        if not fields:
            raise await self._not_found()
        await self._seen()
        return status_of(self.id, fields)

    async def result(self, timeout: float | None = None) -> T:
        """Wait for the job to end (at most ``timeout`` seconds; None: as long as it takes), and
        return its result or raise its error (RemoteError, DeadLettered, JobCancelled).

        Raises CallTimeout when it did not end in time (it goes on), JobNotFound
        when there is no such job (any more), RedisUnavailable when Redis was
        still out of reach when the time was up: a shorter outage is waited out.
        """
        until = None if timeout is None else anyio.current_time() + timeout
        delay = POLL_FIRST
        first = True  # read once whatever the timeout: timeout=0 reads a job that ended
        while True:
            ended, outage = None, None
            left = math.inf if until is None else until - anyio.current_time()
            with anyio.move_on_after(math.inf if first else left):
                try:
                    ended = await self._ended()
                except CONNECTION_ERRORS as exc:  # Redis restarting, a failover: read again
                    outage = exc
            first = False
            if ended is not None:
                return self._outcome(ended)
            left = math.inf if until is None else until - anyio.current_time()
            if left <= 0:
                if outage is not None:
                    raise titan_error(outage, f"read job {self.id}") from outage
                raise CallTimeout(
                    f"job {self.id} did not end within {timeout:g} s; it goes on (see job.status())"
                )
            await anyio.sleep(min(delay, left))
            delay = min(POLL_AT_MOST, delay * 1.5)

    async def _ended(self) -> bytes | None:
        """The job's result when it ended (b"" for none); None while it waits or runs. Raises its
        JobNotFound, JobCancelled; redis-py's CONNECTION_ERRORS as they are."""
        try:
            state, result, attempts = await self._redis().hmget(self.key, ["status", "result", "attempts"])
        except CONNECTION_ERRORS:
            raise
        except REDIS_ERRORS as exc:
            raise titan_error(exc, f"read job {self.id}") from exc
        if state is None:
            raise await self._not_found()
        await self._seen()
        if text(state) == "cancelled":
            runs = int(attempts) if attempts and attempts.isdigit() else 0
            if runs:  # cancelled while @retry's backoff was due: it ran, and failed
                raise JobCancelled(f"job {self.id} was cancelled after {runs} run{'s' if runs > 1 else ''}, "
                                   "waiting for its next attempt")  # fmt: skip
            raise JobCancelled(f"job {self.id} was cancelled before it started")
        if text(state) in ("done", "failed", "dead"):
            return cast(bytes, result or b"")
        return None

    def _outcome(self, raw: bytes | None) -> T:
        reply = protocol.decode_reply(raw or b"")
        if reply is None:
            raise JobNotFound(f"job {self.id} ended but its result cannot be read")
        if not reply.ok:
            raise error_of(reply)
        value: Any = reply.value
        return self._decode(value) if self._decode is not None else value

    async def cancel(self) -> bool:
        """Cancel the job if it has not started; True when it was. A job that runs, or has
        ended, is left as it is (False). Raises JobNotFound."""
        try:
            outcome = await cancel(self._redis(), self._keys, self.service, self.key)
        except REDIS_ERRORS as exc:
            raise titan_error(exc, f"cancel job {self.id}") from exc
        if outcome == "unknown":
            raise await self._not_found()
        return outcome == "cancelled"

    async def _run_id_now(self) -> str | None:
        """The run_id of the Redis that serves the job's key; None when it cannot be told (INFO
        denied by ACL rules, Redis out of reach)."""
        redis = self._redis()
        try:
            if isinstance(redis, RedisCluster):
                info: Any = await redis.info("server", target_nodes=redis.get_node_from_key(self.key))
            else:
                info = await redis.info("server")
        except REDIS_ERRORS:
            return None
        if isinstance(info, dict) and "run_id" not in info and len(info) == 1:
            info = next(iter(info.values()))  # a cluster's answer, by node
        run_id = info.get("run_id") if isinstance(info, dict) else None
        return str(run_id) if run_id else None

    async def _seen(self) -> None:
        """The job is there: note which Redis holds it, once."""
        if self._run_id is None:
            self._run_id = await self._run_id_now() or ""

    async def _not_found(self) -> JobNotFound:
        if self._run_id:
            now = await self._run_id_now()
            if now and now != self._run_id:
                return JobNotFound(
                    f"job {self.id} was lost: Redis restarted or failed over (run_id {self._run_id} -> "
                    f"{now}) without its data (no persistence, or a replica that had not received it) "
                    "since the job was seen there; it may or may not have run: submit it again if it must"
                )
        return JobNotFound(
            f"job {self.id} is unknown: it was never submitted, it ended longer ago than its "
            "result_ttl (its outcome expired), or Redis lost it (a restart without persistence)"
        )

    def __repr__(self) -> str:
        return f"<Job {self.id}>"


async def cancel(redis: Redis, keys: Keys, service: str, job_key: str) -> str:
    """Cancel a job unless a worker has it (cancel.lua): its status after, or 'unknown'.

    A job a registered caller user submitted waits on that user's stream (its hash's ``stream``):
    only that user (or the operator) may delete it there. Raises redis-py errors."""
    stream = keys.calls(service)
    found = text(await redis.hget(job_key, "stream") or b"")
    if found.startswith(stream + USER_MARK):  # never a key outside the service's request streams
        stream = found
    return text(await _CANCEL(redis, [job_key, stream, keys.delayed(service)], [GROUP]))


async def list_jobs(
    redis: Redis, keys: Keys, service: str, *, state: JobState | None = None, count: int = 100
) -> list[JobStatus]:
    """The service's latest jobs, newest first (``count`` at most, of the given ``state``).

    Ids whose hash has expired are dropped from the index as they are met.
    """
    index = keys.jobs(service)
    found: list[JobStatus] = []
    start = 0
    while len(found) < count:
        ids = [text(i) for i in cast(list[bytes], await redis.zrevrange(index, start, start + 199))]
        if not ids:
            break
        start += len(ids)
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.job(service, job_id.partition(":")[2]))
            hashes: list[dict[bytes, bytes]] = await pipe.execute()
        gone = [job_id for job_id, fields in zip(ids, hashes, strict=True) if not fields]
        if gone:
            await redis.zrem(index, *gone)
            start -= len(gone)
        for job_id, fields in zip(ids, hashes, strict=True):
            if fields:
                status = status_of(job_id, fields)
                if state is None or status.state == state:
                    found.append(status)
    return found[:count]

"""Being alive in the registry: registration, the heartbeat and the renewal of calls in flight.

Liveness must not depend on the event loop being free: a method that blocks
it (``time.sleep`` in an ``async def``, the commonest mistake in async code)
would otherwise stop the heartbeat, and another worker would take its call
over and run it a second time. So the heartbeat runs on a thread of its own
with a connection of its own: every beat it refreshes the worker's record
and its TTL, re-registers if the record was lost (Redis restarted, keys
deleted), renews the entries in flight (so nobody claims them) and measures
Redis's clock. The loop only hands it fresh numbers (a snapshot) and a tick;
a loop that misses its ticks is reported in the log, once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis
import redis.cluster

from titan_broker._errors import ConfigError
from titan_broker._redis import Script, Topology
from titan_broker._registry import WorkerInfo
from titan_broker._wire import GROUP

from .context import WorkerContext

_RENEW = Script("renew")
_REGISTER = Script("register")
_RESCUE = Script("rescue")
_DELETE_CONSUMER = Script("delete_consumer")


class Heartbeat:
    """The worker's registry record and the renewal of its calls, kept from a thread.

    ``record`` (set by the loop) is the worker's latest record; ``active``
    returns the ids of the entries in flight, per shard's stream.
    """

    def __init__(self, ctx: WorkerContext, active: Callable[[], dict[str, list[bytes]]]) -> None:
        self.ctx = ctx
        self.active = active
        self.record: WorkerInfo | None = None
        self.tick = time.monotonic()
        """Set by the event loop every beat; a stale tick means user code blocks the loop."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | redis.cluster.RedisCluster | None = None
        self._timeout = max(0.5, ctx.options.heartbeat_ttl / 2)

    def connect(self, topology: Topology) -> None:
        """Open the heartbeat's own connection (sync; run it off the loop)."""
        self._client = topology.sync_client(
            decode_responses=False,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            single_connection_client=True,
        )

    @property
    def client(self) -> redis.Redis | redis.cluster.RedisCluster:
        assert self._client is not None, "heartbeat is not connected"
        return self._client

    def _time(self) -> tuple[int, int]:
        """Redis's TIME, from the node that serves the service's stream (whose clock its entry ids use)."""
        client = self.client
        if isinstance(client, redis.cluster.RedisCluster):
            node = client.get_node_from_key(self.ctx.stream)  # type: ignore[no-untyped-call]
            return client.time(target_nodes=node)
        return client.time()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def register(self) -> None:
        """Write the whole record, the registry entries and the service's limits (sync).

        Measures Redis's clock first: the worker reads no call before its deadlines make sense.
        """
        ctx = self.ctx
        sent = time.monotonic()
        ctx.clock.measured(self._time(), sent, time.monotonic())
        definition = ctx.definition
        assert self.record is not None, "the worker publishes its record before registering"
        description = {
            "name": ctx.service,
            "version": definition.version,
            "description": definition.info.description.strip(),
            "methods": self.record.methods,
        }
        # A sharded service's limit is shared evenly: each shard's submit counts its own stream.
        max_backlog = -(-definition.info.max_backlog // ctx.shards)
        max_deliveries = ctx.options.max_deliveries or definition.info.max_deliveries
        # The directory first (its own key, maybe on another cluster node): a record is only
        # written for a service the directory lists, and a failure here leaves no record, so
        # the next beat registers again.
        self.client.hset(ctx.keys.services, ctx.service, json.dumps(description))
        keys = [ctx.record_key, ctx.keys.workers(ctx.service), ctx.keys.affinity(ctx.service),
                ctx.keys.config(ctx.service), ctx.keys.idle(ctx.service)]  # fmt: skip
        args: list[Any] = [ctx.shards, ctx.worker_id, int(ctx.options.heartbeat_ttl * 1000),
                           ctx.keys.worker(ctx.service, ""), max_backlog, max_deliveries]  # fmt: skip
        for name, value in self._fields(heartbeat_only=False).items():
            args += [name, value]
        try:
            _REGISTER.run_sync(self.client, keys, args)
        except redis.ResponseError as exc:
            if not str(exc).startswith("TITANSHARDS"):
                raise
            _, count, *live = str(exc).split()
            raise ConfigError(mismatch(ctx.service, int(count), live, ctx.shards)) from None
        limits = {"max_backlog": max_backlog, "max_deliveries": max_deliveries}
        for scope in ctx.scopes[1:]:  # each shard's submit reads the limits in its own slot
            self.client.hset(ctx.keys.config(scope), mapping=limits)  # type: ignore[arg-type]

    def _fields(self, *, heartbeat_only: bool) -> dict[str, str]:
        assert self.record is not None, "the worker publishes its record before registering"
        return replace(self.record, heartbeat_at=time.time()).to_fields(heartbeat_only=heartbeat_only)

    async def start(self, topology: Topology) -> None:
        """Connect, register, then beat, all on the heartbeat's own thread; return once registered.

        Raises what connecting or registering raised (the thread then ends). One thread for all of
        it: registering on another one would leave that thread, with its stack and malloc arena,
        idle for the worker's life.
        """
        registered: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(topology, registered), name=f"heartbeat-{self.ctx.worker_id}", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(registered)

    def stop(self) -> None:
        """Stop beating (sync: joins the thread; run it off the loop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout * 4 + 1)

    def _run(self, topology: Topology, registered: concurrent.futures.Future[None]) -> None:
        if not registered.set_running_or_notify_cancel():
            return  # the start was cancelled before this thread ran; from here on, stop() ends it
        try:
            self.connect(topology)
            self.register()
        except Exception as exc:
            registered.set_exception(exc)
            return
        registered.set_result(None)
        ctx = self.ctx
        interval = ctx.options.heartbeat_interval
        renewed = time.monotonic()
        while not self._stop.wait(interval):
            try:
                self.beat()
                ctx.log.over(("beat",), "worker %s: heartbeat reaches Redis again", ctx.worker_id)
                # A lapse past the TTL lets other workers claim the calls this one runs: they run
                # twice. Said every time (it is rare, and it explains a rerun), with its length.
                beaten, renewed = renewed, time.monotonic()
                if renewed - beaten > ctx.options.heartbeat_ttl:
                    ctx.log.logger.warning(
                        "worker %s: %.2f s between two heartbeats, past its TTL of %.2f s (the process "
                        "was stopped or starved of CPU, or Redis answered late): calls it runs may "
                        "have been taken over by other workers", ctx.worker_id, renewed - beaten,
                        ctx.options.heartbeat_ttl,
                    )  # fmt: skip
            except Exception as exc:  # the heartbeat must outlive any Redis trouble
                ctx.log.log(logging.WARNING, "beat", "worker %s: heartbeat failed (%s); still trying",
                            ctx.worker_id, exc)  # fmt: skip
            stalled = time.monotonic() - self.tick
            if stalled > max(2.0, 3 * interval):
                ctx.log.log(logging.WARNING, "stalled",
                            "worker %s: its event loop has been blocked for %.1f s: a method blocks it "
                            "(time.sleep or blocking I/O in an 'async def'); make it a plain 'def' "
                            "or use anyio.to_thread.run_sync. Its calls are kept, not taken over.",
                            ctx.worker_id, stalled)  # fmt: skip

    def beat(self) -> None:
        """Refresh the record and its TTL, re-register if it was lost, renew calls in flight."""
        ctx = self.ctx
        ttl_ms = int(ctx.options.heartbeat_ttl * 1000)
        sent = time.monotonic()
        ctx.clock.measured(self._time(), sent, time.monotonic())
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(ctx.record_key)
        pipe.hset(ctx.record_key, mapping=self._fields(heartbeat_only=True))  # type: ignore[arg-type]
        pipe.pexpire(ctx.record_key, ttl_ms)
        pipe.sadd(ctx.keys.workers(ctx.service), ctx.worker_id)
        # Every command runs even if one fails: on a full Redis the HSET and SADD are refused
        # (OOM) but the PEXPIRE and the renewal below still keep this worker's calls its own.
        results = pipe.execute(raise_on_error=False)
        failures = [r for r in results if isinstance(r, Exception)]
        existed = results[0]
        if existed == 0:
            # The record had expired (the worker was cut off, or stopped, longer than its TTL) or
            # was deleted (a restart without persistence, a FLUSHALL): register anew, whole.
            ctx.log.logger.warning("worker %s: its registry record was gone; registering anew", ctx.worker_id)
            self.register()
        lost = 0
        for stream, ids in self.active().items():
            lost += _RENEW.run_sync(self.client, [stream], [GROUP, ctx.worker_id, *ids])[1]
        if lost:
            ctx.log.log(logging.WARNING, "renew-lost",
                        "worker %s: %d call(s) in flight were taken over by another worker; "
                        "their results will not be sent from here", ctx.worker_id, lost)  # fmt: skip
        if failures:
            raise failures[0]

    def deregister(self) -> None:
        """Leave the registry; move calls waiting on this worker's own stream to the shared one (sync)."""
        ctx = self.ctx
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(ctx.record_key)
            pipe.srem(ctx.keys.workers(ctx.service), ctx.worker_id)
            pipe.execute()
            for scope in ctx.scopes:  # its record is gone (above): each registered user's own streams
                for mine, theirs in zip(ctx.own_user_streams(scope), ctx.user_streams(scope), strict=True):
                    _RESCUE.run_sync(self.client, [mine, theirs], [ctx.worker_id])
            for scope in ctx.scopes[1:]:  # each shard's own stream
                own = [ctx.own_stream_of(scope), ctx.keys.calls(scope)]
                _RESCUE.run_sync(self.client, own, [ctx.worker_id])
            keys = [ctx.own_stream, ctx.stream, ctx.record_key, ctx.keys.affinity(ctx.service)]
            _RESCUE.run_sync(self.client, keys, [ctx.worker_id])
            pending: Any = self.client.xpending_range(
                ctx.stream, GROUP, min="-", max="+", count=1, consumername=ctx.worker_id
            )
            if not pending:
                # Only a consumer with nothing pending may go: DELCONSUMER drops its entries.
                self.client.xgroup_delconsumer(ctx.stream, GROUP, ctx.worker_id)
            others = [*ctx.streams[1:], *(s for scope in ctx.scopes for s in ctx.user_streams(scope))]
            for stream in others:  # each other stream: its check made in one script
                _DELETE_CONSUMER.run_sync(self.client, [stream], [GROUP, ctx.worker_id])
        except redis.RedisError as exc:
            ctx.log.logger.warning("worker %s: could not deregister (%s); the record expires by itself",
                                   ctx.worker_id, exc)  # fmt: skip


def mismatch(service: str, registered: int, live: list[str], shards: int) -> str:
    """Why a worker with ``shards`` may not serve ``service``, which its live workers serve with another
    count, and how to change it."""
    return (
        f"service {service!r} is served with shards={registered} by {len(live)} live worker(s) "
        f"({', '.join(sorted(live)[:3])}); this worker has shards={shards}. Every worker of a service "
        "must use the same shard count: to change it, stop every worker, let each shard's backlog "
        "drain (titan queues), then start them with the new count"
    )

"""Calls that run later: moving due delayed calls onto the stream, and queuing @periodic ticks.

There is no scheduler process and no leader: every worker of a service runs
this loop, and each step is one script that only one worker can win.

- Delayed calls (``with_options(proxy, delay=...)``, jobs submitted with a
  delay, and @retry's next runs) wait in the service's delayed set, scored
  by their due time in Redis's clock; ``promote.lua`` moves those that are
  due onto the stream, ZREM and XADD together. The loop wakes at least every
  PROMOTE_EVERY seconds, sooner when the next call is due sooner, and at once
  when a call due before its next look is added (by any process: the script
  that adds it pushes a token on the wake list, which one worker pops).
- A @periodic method's tick is queued by ``tick.lua``, which compares it
  with the last tick queued and writes it in one step: one run per tick
  whatever the number of workers (a tick whose previous run has not started
  is skipped). A worker only asks when its own clock (the Redis clock it
  measures) says a new tick has come, so the script runs once per tick and
  worker, not every loop; the script itself refuses a tick ahead of Redis's
  clock, so a worker whose clock jumped cannot stop the schedule. A tick
  older than TICK_GRACE (no worker was ticking when it fell: a deploy, an
  outage) is noted but not run.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass

import anyio
import anyio.abc

from titan_broker._redis import Script
from titan_broker._service import PeriodicOptions
from titan_broker._wire import GROUP, protocol

from .call import Entry
from .context import WorkerContext

_PROMOTE = Script("promote")
_TICK = Script("tick")
_OVERTAKEN = Script("overtaken")

PROMOTE_EVERY = 0.25
"""Seconds between two looks at the delayed set at most: a delayed call starts at most about this late."""
TICK_GRACE = 1.0
"""Seconds a tick may be late and still run: an older one fell while no worker was ticking, and is
not made up. Well above the loop's sleep (PROMOTE_EVERY), so a live worker queues each tick in time."""
WAKE_BLOCK = 1.0
"""Seconds one wait on the wake list blocks before it is asked again."""
PROMOTE_BATCH = 200
"""Calls one look moves at most; a full batch is followed by another look at once."""


@dataclass
class _Periodic:
    method: str
    options: PeriodicOptions
    last: int = 0
    """The latest tick this worker saw queued (by itself or another)."""


class Scheduler:
    """A worker's part in running delayed calls and periodic ticks (see the module's doc)."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.periodic = [
            _Periodic(spec.name, spec.periodic)
            for spec in ctx.definition.methods.values()
            if spec.periodic is not None
        ]
        self.methods = {periodic.method for periodic in self.periodic}
        self._wake = anyio.Event()
        self.ticking = True
        """False once the worker drains: it would queue runs it no longer reads."""

    def stop_ticking(self) -> None:
        """Queue no more ticks (the worker drains). Delayed calls are still moved: whichever
        worker reads them runs them, and their time to live counts from their due time anyway."""
        self.ticking = False

    async def run(self) -> None:
        """Until cancelled; Redis's absences are logged (once) and waited out."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._listen)
            await self._loop()

    async def _listen(self) -> None:
        """Wake the loop when a caller adds a delayed call due before its next look (a token on the
        wake list: one worker of the service pops it, and any worker may move the call)."""
        ctx = self.ctx
        # One list per shard: a cluster would refuse one BLPOP on keys of several slots.
        keys = [ctx.keys.delayed_wake(scope) for scope in ctx.scopes]
        while True:
            try:
                if await self._pop_any(keys):
                    self._wake.set()
            except Exception as exc:  # Redis away: the loop's regular looks go on meanwhile
                ctx.log.log(logging.WARNING, "wake", "worker %s: cannot wait for delayed calls due soon "
                            "(%s); still trying", ctx.worker_id, exc)  # fmt: skip
                await anyio.sleep(1.0)

    async def _pop_any(self, keys: list[str]) -> bool:
        """Wait up to WAKE_BLOCK for a token on any of the wake lists (one BLPOP per slot)."""
        redis = self.ctx.redis
        if len(keys) == 1:
            return bool(await redis.blpop(keys, timeout=WAKE_BLOCK))
        woken = False

        async def pop(key: str, tg: anyio.abc.TaskGroup) -> None:
            nonlocal woken
            if await redis.blpop([key], timeout=WAKE_BLOCK):
                woken = True
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(pop, key, tg)
        return woken

    async def _loop(self) -> None:
        ctx = self.ctx
        while True:
            wait = PROMOTE_EVERY
            self._wake = anyio.Event()  # before the look: a wake during it means look again
            try:
                for scope in ctx.scopes:  # each shard's delayed set onto its own stream (one slot)
                    moved, next_in = await _PROMOTE(
                        ctx.writer_for(scope),
                        [ctx.keys.delayed(scope), ctx.keys.calls(scope), ctx.keys.dead(scope)],
                        [PROMOTE_BATCH, ctx.keys.job_prefix(scope), ctx.options.dead_letter_maxlen,
                         ctx.keys.gone_prefix(scope)],
                    )  # fmt: skip
                    if moved >= PROMOTE_BATCH:
                        wait = 0.0
                    elif next_in >= 0:
                        wait = min(wait, next_in / 1000)
                ctx.log.over(("schedule",), "worker %s: delayed calls reach Redis again", ctx.worker_id)
            except Exception as exc:  # the loop outlives any trouble with Redis
                ctx.log.log(logging.WARNING, "schedule", "worker %s: cannot run delayed calls "
                            "now (%s); still trying", ctx.worker_id, exc)  # fmt: skip
                wait = 1.0
            for periodic in self.periodic if self.ticking else ():
                # Each schedule on its own: one whose tick cannot be computed or queued must not
                # hold up the others, nor the delayed calls above.
                kind = f"tick:{periodic.method}"
                try:
                    await self._tick(periodic)
                    ctx.log.over((kind,), "worker %s: the ticks of %s() are queued again",
                                 ctx.worker_id, periodic.method)  # fmt: skip
                except Exception as exc:
                    ctx.log.log(logging.WARNING, kind, "worker %s: cannot queue the ticks of %s() now "
                                "(%s); still trying", ctx.worker_id, periodic.method, exc)  # fmt: skip
            with anyio.move_on_after(wait):
                await self._wake.wait()

    async def overtaken(self, entry: Entry) -> bool:
        """Whether ``entry``, claimed from a dead worker, is the run of a periodic tick that a later
        tick has overtaken: then it was acknowledged and its job cancelled, and it must not run.

        Run only for reclaimed entries (a first delivery is always current). When Redis cannot
        tell, the run goes ahead: a run too many is better than a run lost.
        """
        ctx = self.ctx
        method = protocol.field_text(entry.fields, protocol.F_METHOD)
        token = protocol.field_text(entry.fields, protocol.F_JOB)
        if method is None or token is None or method not in self.methods or entry.stream != ctx.stream:
            return False  # ticks are queued on the first shard's stream only
        tick = token.split("-")[1] if token.count("-") == 2 else ""
        if not tick.isdigit() or token != _token(method, int(tick)):
            return False  # a job submitted by a caller, not a tick's run
        keys = [ctx.stream, ctx.keys.schedule(ctx.service), ctx.keys.job(ctx.service, token)]
        try:
            dropped = await _OVERTAKEN(ctx.writer, keys, [GROUP, entry.id, ctx.worker_id, method, int(tick)])
        except Exception as exc:
            ctx.log.log(logging.WARNING, "overtaken", "worker %s: cannot tell whether the run of %s() "
                        "for its tick at %s is overtaken (%s); running it", ctx.worker_id, method, tick,
                        exc)  # fmt: skip
            return False
        if dropped == 1:
            ctx.log.log(logging.WARNING, f"overtaken:{method}", "worker %s: dropped the run of %s() "
                        "for its tick at %s left by a dead worker: a later tick has come since",
                        ctx.worker_id, method, tick)  # fmt: skip
        return bool(dropped == 1)

    async def _tick(self, periodic: _Periodic) -> None:
        """Queue the run of the tick that has come, unless this or another worker did already."""
        ctx = self.ctx
        options = periodic.options
        tick = options.tick_at_or_before(int(ctx.clock.now_ms()))
        if tick <= periodic.last:
            return
        token = _token(periodic.method, tick)
        following = options.tick_after(tick)
        call_id = f"{token}-{uuid.uuid4().hex[:6]}"
        no_deadline = protocol.NO_DEADLINE_MS  # a run is not cut at the next tick
        fields = protocol.encode_request(call_id, periodic.method, (), {}, None, no_deadline, job=token)
        flat = protocol.flat_fields(fields)
        keys = [ctx.keys.schedule(ctx.service), ctx.stream]
        keys += [ctx.keys.job(ctx.service, token), ctx.keys.jobs(ctx.service)]
        args = [periodic.method, tick, following, f"{ctx.service}:{token}", int(options.result_ttl * 1000)]
        args += [ctx.keys.job_prefix(ctx.service), int(TICK_GRACE * 1000)]
        queued = await _TICK(ctx.writer, keys, [*args, *flat])
        if queued == 1:
            ctx.log.logger.info(
                "worker %s: queued %s() for its tick at %d", ctx.worker_id, periodic.method, tick
            )
        elif queued == 2:
            ctx.log.log(logging.WARNING, f"tick-skipped:{periodic.method}",
                        "worker %s: skipped a tick of %s(): its previous run has not started yet",
                        ctx.worker_id, periodic.method)  # fmt: skip
        elif queued == 3:
            ctx.log.log(logging.INFO, f"tick-missed:{periodic.method}",
                        "worker %s: did not run %s() for its tick at %d: it fell while no worker was "
                        "ticking; the next tick runs", ctx.worker_id, periodic.method, tick)  # fmt: skip
        periodic.last = tick


def _token(method: str, tick: int) -> str:
    """The job token of ``method``'s run for ``tick``: it fits a job token whatever the method is
    called (non-ASCII, long)."""
    return f"periodic-{tick}-{hashlib.sha1(method.encode()).hexdigest()[:12]}"

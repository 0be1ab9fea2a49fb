"""A caller process of the nemesis run: a mixed workload from a seed, every call and outcome noted.

``python -m tests.nemesis.workload --url URL --namespace NS --caller NAME --seed N --folder DIR
--seconds S``: ``--tasks`` concurrent loops, each picking its next operation from the seed:
plain calls with varied deadlines (some meant to run past them), calls that raise, streaming calls
(some abandoned part-way), jobs submitted here and read back by other callers and by the run,
delayed calls, a method that @retry runs again, and calls to the pool the run scales.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

import anyio

from titan_broker import Client, RemoteError, TitanError

from .history import History, digest

SERVICE = "nem"
POOL = "nem-pool"
TIMEOUTS = (2.0, 5.0, 10.0)


def tap_replies(history: History) -> None:
    """Note every reply this process's client reads off its reply stream, duplicates included (the
    client hands a call the first and drops the rest): one answer per call is checked on the wire."""
    from titan_broker._calling.replies import ReplyDispatcher
    from titan_broker._redis import stream_entries
    from titan_broker._wire import protocol

    route = ReplyDispatcher._route

    def noted(self: ReplyDispatcher, res: object) -> bool:
        for _stream, entry_id, fields in stream_entries(res):
            reply = protocol.decode_reply(fields.get(protocol.F_REPLY_VALUE, b""))
            if reply is None or reply.seq is not None or reply.end is not None:
                continue  # stream items: counted by the stream's own checks
            value = reply.value
            token = value[0] if isinstance(value, list) and value and isinstance(value[0], str) else None
            history.record(
                "reply",
                call=reply.call_id,
                worker=reply.worker_id,
                ok=reply.ok,
                token=token,
                entry=entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id),
            )
        return route(self, res)

    ReplyDispatcher._route = noted  # type: ignore[method-assign]


def error_name(exc: BaseException) -> str:
    """What the history calls an error: the remote type for a RemoteError, else the class name."""
    if isinstance(exc, RemoteError) and type(exc) is RemoteError:
        return f"remote:{exc.type}"
    return type(exc).__name__


class Caller:
    def __init__(self, client: Client, name: str, seed: int, folder: Path, until: float) -> None:
        self.client = client
        self.name = name
        self.seed = seed
        self.folder = folder
        self.until = until
        self.history = History(folder / f"caller-{name}.jsonl")
        self.count = 0
        self.known_jobs: list[str] = []
        self._jobs_read_at = 0.0
        self._read_up_to: dict[str, int] = {}
        """How far each other caller's history was read for its jobs."""

    def token(self) -> str:
        self.count += 1
        return f"{self.name}:{self.count}"

    def invoke(
        self, token: str, method: str, args: Any, timeout: float, expect: str, delay: float = 0.0
    ) -> None:
        self.history.record("invoke", id=token, caller=self.name, method=method, args=digest(args),
                            timeout=timeout, delay=delay, expect=expect)  # fmt: skip

    def outcome(
        self, token: str, *, value: Any = None, error: BaseException | None = None, **more: Any
    ) -> None:
        if error is None:
            self.history.record("outcome", id=token, ok=True, value=value, **more)
        else:
            self.history.record("outcome", id=token, ok=False, error=error_name(error),
                                message=str(error)[:200], **more)  # fmt: skip

    async def call(self, rng: random.Random) -> None:
        token, timeout = self.token(), rng.choice(TIMEOUTS)
        late = rng.random() < 0.08
        ms = timeout * 1000 + 800 if late else rng.uniform(0, 150)
        self.invoke(token, "echo", [token, ms], timeout, "late" if late else "ok")
        try:
            value = await self.client.call(SERVICE, "echo", (token, ms), timeout=timeout)
        except TitanError as exc:
            self.outcome(token, error=exc)
        else:
            self.outcome(token, value=value)

    async def delayed(self, rng: random.Random) -> None:
        token, delay = self.token(), round(rng.uniform(0.2, 1.5), 3)
        ms = rng.uniform(0, 100)
        self.invoke(token, "echo", [token, ms], 5.0, "ok", delay=delay)
        try:
            value = await self.client.call(SERVICE, "echo", (token, ms), timeout=5.0, delay=delay)
        except TitanError as exc:
            self.outcome(token, error=exc)
        else:
            self.outcome(token, value=value)

    async def boom(self, rng: random.Random) -> None:
        token, timeout = self.token(), rng.choice(TIMEOUTS)
        self.invoke(token, "boom", [token], timeout, "remote:ValueError")
        try:
            await self.client.call(SERVICE, "boom", (token,), timeout=timeout)
        except TitanError as exc:
            self.outcome(token, error=exc)
        else:
            self.outcome(token, value=None)

    async def flaky(self, rng: random.Random) -> None:
        token, fails = self.token(), rng.randint(0, 2)
        self.invoke(token, "flaky", [token, fails], 10.0, "ok")
        try:
            value = await self.client.call(SERVICE, "flaky", (token, fails), timeout=10.0)
        except TitanError as exc:
            self.outcome(token, error=exc, fails=fails)
        else:
            self.outcome(token, value=value, fails=fails)

    async def stream(self, rng: random.Random) -> None:
        token, n = self.token(), rng.randint(5, 80)
        stop_at = rng.randint(1, n) if rng.random() < 0.3 else None
        self.invoke(token, "numbers", [token, n], 10.0, "ok")
        got: list[int] = []
        try:
            with anyio.fail_after(30):  # the stream's own timeout bounds it; this only guards the run
                async for item in self.client.stream(SERVICE, "numbers", (token, n), timeout=10.0):
                    got.append(item)
                    if stop_at is not None and len(got) >= stop_at:
                        break
        except TitanError as exc:
            self.outcome(token, error=exc, items=len(got), in_order=got == list(range(len(got))))
        else:
            whole = stop_at is None
            self.outcome(token, value=len(got), abandoned=not whole,
                         in_order=got == list(range(len(got))) and (not whole or len(got) == n))  # fmt: skip

    async def submit(self, rng: random.Random) -> None:
        token, ms = self.token(), rng.uniform(0, 200)
        try:
            job = await self.client.submit(SERVICE, "echo", (token, ms), timeout=60)
        except TitanError as exc:
            self.history.record("job_refused", id=token, error=error_name(exc))
            return
        self.history.record("job_submit", id=token, job=job)

    async def read_job(self, rng: random.Random) -> None:
        """Read a job another caller submitted (its id from that caller's history)."""
        now = time.monotonic()
        if now - self._jobs_read_at > 3:
            self._jobs_read_at = now
            # Only what the files gained since the last look: read whole, they grow to megabytes
            # in a long run, and reading them held this caller's event loop (its calls timed out late).
            for file in self.folder.glob("caller-*.jsonl"):
                if file.name == f"caller-{self.name}.jsonl":
                    continue
                with file.open("rb") as f:
                    f.seek(self._read_up_to.get(file.name, 0))
                    new = f.read()
                whole = new[: new.rfind(b"\n") + 1]  # a line being written is read next time
                self._read_up_to[file.name] = self._read_up_to.get(file.name, 0) + len(whole)
                for line in whole.decode(errors="replace").splitlines():
                    if '"job_submit"' in line:
                        with contextlib.suppress(json.JSONDecodeError, KeyError):
                            self.known_jobs.append(json.loads(line)["job"])
        if not self.known_jobs:
            return
        job_id = rng.choice(self.known_jobs)
        try:
            status = await self.client.job(job_id).status()
        except TitanError as exc:
            self.history.record("job_seen", job=job_id, by=self.name, error=error_name(exc))
        else:
            self.history.record("job_seen", job=job_id, by=self.name, state=str(status.state),
                                attempts=status.attempts)  # fmt: skip

    async def pool(self, rng: random.Random) -> None:
        token = self.token()
        self.invoke(token, "pool.echo", [token], 10.0, "ok")
        try:
            value = await self.client.call(POOL, "echo", (token, rng.uniform(0, 50)), timeout=10.0)
        except TitanError as exc:
            self.outcome(token, error=exc)
        else:
            self.outcome(token, value=value)

    async def loop(self, index: int) -> None:
        rng = random.Random(f"{self.seed}:{self.name}:{index}")
        ops = [(self.call, 40), (self.boom, 8), (self.stream, 10), (self.submit, 10), (self.delayed, 8),
               (self.flaky, 7), (self.read_job, 10), (self.pool, 7)]  # fmt: skip
        while time.monotonic() < self.until:
            op = rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
            await op(rng)
            await anyio.sleep(rng.uniform(0, 0.02))


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--caller", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args(argv)
    until = time.monotonic() + args.seconds
    async with Client(args.url, namespace=args.namespace, default_timeout=10.0) as client:
        caller = Caller(client, args.caller, args.seed, args.folder, until)
        tap_replies(caller.history)
        caller.history.record("caller_start", caller=args.caller)
        async with anyio.create_task_group() as tg:
            for i in range(args.tasks):
                tg.start_soon(caller.loop, i)
        caller.history.record("caller_end", caller=args.caller)
        caller.history.close()


if __name__ == "__main__":
    anyio.run(main)

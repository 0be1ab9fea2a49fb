"""The ACL rules ``titan acl`` writes, applied to a real Redis 7: each role can do its work and
nothing else. Service ``a`` is client_log, ``b`` the calculator; ``alice`` and ``bob`` call ``a``."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import redis as sync_redis
import redis.exceptions as rexc

from titan_broker import AccessDenied, CallTimeout, Client, ConfigError, DeadlineExceeded
from titan_broker._wire import acl
from titan_broker._wire.keys import Keys
from titan_broker.testing import LocalCluster, LocalRedis

from .conftest import (
    CALCULATOR,
    ROOT,
    SERVICES,
    RoutedWorkers,
    Workers,
    in_thread,
    skip_without_cluster_binaries,
    titan,
    wait_until,
)
from .test_dashboard import dead_letter

A, B = "client_log", "calculator"
CLIENT_LOG = SERVICES / "client_log.py"
ADMIN_PASSWORD = "adminpass"

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Secured:
    """A Redis (one node or a cluster) with the generated rules applied for every role."""

    urls: dict[str, str]  # user -> URL with its password
    admin: Any  # a client of the admin user (a cluster client on a cluster)
    namespace: str
    connect_admin: Callable[[], Any]  # another admin client (workers close the ones they read with)

    def admin_ask(self, *command: Any) -> None:
        """A command as the admin user, on every primary of a cluster."""
        if isinstance(self.admin, sync_redis.RedisCluster):
            self.admin.execute_command(*command, target_nodes=sync_redis.RedisCluster.PRIMARIES)
        else:
            self.admin.execute_command(*command)

    def set_rule(self, rule: acl.Rule) -> None:
        """Apply a rule as ``titan acl ROLE --apply`` does: its user registered with the services it
        calls, then its ACL SETUSER (the password its name with ``-pw``)."""
        for service in rule.registers:
            self.admin.sadd(self.keys.users(service), rule.user)
        self.admin_ask(*rule.command(f"{rule.user}-pw"))

    def workers(self, user: str) -> Workers:
        """Workers run as ``user``, whose registration is read by an admin client."""
        return RoutedWorkers(self.urls[user], self.namespace, self.connect_admin)

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)

    def user(self, name: str) -> Any:
        """A client connected as ``name``."""
        return type(self.admin).from_url(self.urls[name])


def rules(namespace: str) -> list[acl.Rule]:
    keys = Keys(namespace)
    return [
        acl.worker_rule(keys, A, "a-worker"),
        acl.worker_rule(keys, B, "b-worker"),
        acl.caller_rule(keys, (A,), "alice"),
        acl.caller_rule(keys, (A,), "bob"),
        acl.caller_rule(keys, (B,), "carol"),
        acl.operator_rule(keys, "operator"),
        acl.observer_rule(keys, "observer"),
    ]


def apply(ask: Any, namespace: str) -> None:
    """Set every rule, each user's password its name with ``-pw``, each caller registered with the
    services it calls (as ``titan acl ... --apply`` does)."""
    keys = Keys(namespace)
    for rule in rules(namespace):
        for service in rule.registers:
            ask("SADD", keys.users(service), rule.user)
        ask(*rule.command(f"{rule.user}-pw"))


def denied_log(admin: Any) -> list[str]:
    """What Redis refused since the last ACL LOG RESET: ``user command key``."""
    if isinstance(admin, sync_redis.RedisCluster):  # every node's log
        per_node = admin.execute_command("ACL", "LOG", "128", target_nodes=sync_redis.RedisCluster.ALL_NODES)
        entries = [e for node in per_node.values() for e in node]
    else:
        entries = admin.execute_command("ACL", "LOG", "128")
    found = []
    for entry in entries:
        row = dict(zip(entry[::2], entry[1::2], strict=True)) if isinstance(entry, list) else entry
        row = {(k.decode() if isinstance(k, bytes) else k): v for k, v in row.items()}
        found.append(" ".join(str(v.decode() if isinstance(v, bytes) else v) for v in (
            row["username"], row["context"], row["object"])))  # fmt: skip
    return found


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """3 primaries, no replicas, the default user behind a password."""
    skip_without_cluster_binaries()
    with LocalCluster(primaries=3, replicas=0, password=ADMIN_PASSWORD) as c:
        yield c


def applied_by_the_cli(url: str, namespace: str) -> None:
    """Every rule set with ``titan acl ROLE ... --apply`` (on every primary of a cluster)."""
    try:
        for rule in rules(namespace):
            os.environ["TEST_ACL_PASSWORD"] = f"{rule.user}-pw"  # the titan subprocess inherits it
            what = list(rule.services) if rule.role in ("worker", "caller") else []
            done = titan(url, namespace, "acl", rule.role, *what, "--user", rule.user,
                         "--password-env", "TEST_ACL_PASSWORD", "--apply")  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert "-pw" not in done.stdout  # the password is printed as its SHA-256 only
    finally:
        os.environ.pop("TEST_ACL_PASSWORD", None)


@pytest.fixture(params=["one Redis", "cluster"])
def secured(request: pytest.FixtureRequest, namespace: str) -> Iterator[Secured]:
    if request.param == "cluster":
        c: LocalCluster = request.getfixturevalue("cluster")
        applied_by_the_cli(c.url, namespace)
        port = c.nodes[1].port
        urls = {r.user: f"redis://{r.user}:{r.user}-pw@127.0.0.1:{port}" for r in rules(namespace)}
        admin = c.client()
        try:
            yield Secured(urls, admin, namespace, c.client)
        finally:
            admin.close()
        return
    with LocalRedis(extra_args=["--requirepass", ADMIN_PASSWORD]) as server:
        admin = sync_redis.Redis(port=server.port, password=ADMIN_PASSWORD)
        apply(admin.execute_command, namespace)
        base = f"127.0.0.1:{server.port}/0"
        urls = {r.user: f"redis://{r.user}:{r.user}-pw@{base}" for r in rules(namespace)}
        try:
            yield Secured(
                urls, admin, namespace, lambda: sync_redis.Redis(port=server.port, password=ADMIN_PASSWORD)
            )
        finally:
            admin.close()


def refused(client: Any, *command: Any) -> None:
    with pytest.raises(rexc.NoPermissionError):
        client.execute_command(*command)


async def serve_and_call(secured: Secured, workers: Workers) -> None:
    """Everything the worker of ``a`` and its callers do, under their rules: none of it refused."""
    a_workers = secured.workers("a-worker")
    try:
        worker = a_workers.start(CLIENT_LOG)
        workers.start(CALCULATOR)
        a_workers.wait_registered(A, 1)
        workers.wait_registered(B, 1)
        async with Client(secured.urls["alice"], namespace=secured.namespace) as alice:
            assert alice.client_id.startswith("alice.")
            svc = alice.proxy(A)
            assert await svc.run("a") == "a"
            assert [i async for i in svc.count(40)] == list(range(40))  # credit granted on the way
            async for _ in svc.count(1000, 0.001):
                break  # a stream left early: its control hash says cancel
            with pytest.raises((CallTimeout, DeadlineExceeded)):  # whichever side sees the deadline first
                await svc.with_options(timeout=0.3).run("slow", 3.0)
            assert await svc.with_options(wait_for_worker=False, key="k").run("b") == "b"
            await alice.invalidate_cache(A, "run")
            job = alice.job(await alice.submit(A, "run", ("job",)))
            assert await job.result(timeout=10) == "job"
            later = alice.job(await alice.submit(A, "run", ("later",), delay=60))
            assert await later.cancel() is True
            assert await alice.streaming_methods(A) == frozenset({"count"})
        async with Client(secured.urls["carol"], namespace=secured.namespace) as carol:
            assert await carol.call(B, "add", (2, 3)) == 5
        assert b"NOPERM" not in a_workers.output(worker)
    finally:
        a_workers.close()


@pytest.fixture
def b_workers(secured: Secured) -> Iterator[Workers]:
    w = secured.workers("b-worker")
    yield w
    w.close()


async def test_each_role_does_its_work_without_a_refusal(secured: Secured, b_workers: Workers) -> None:
    if isinstance(secured.admin, sync_redis.RedisCluster):
        secured.admin.execute_command("ACL", "LOG", "RESET", target_nodes=sync_redis.RedisCluster.ALL_NODES)
    else:
        secured.admin.execute_command("ACL", "LOG", "RESET")
    await serve_and_call(secured, b_workers)
    assert denied_log(secured.admin) == []


def test_a_worker_cannot_touch_another_services_keys(secured: Secured) -> None:
    keys, worker = secured.keys, secured.user("a-worker")
    worker.xgroup_create(keys.calls(A), "workers", "0", mkstream=True)  # its own: allowed
    for command in forbidden_on_b(keys):
        refused(worker, *command)
    worker.close()


def forbidden_on_b(keys: Keys) -> list[Sequence[Any]]:
    """What neither a worker nor a caller of ``a`` may do to ``b``."""
    return [
        ("XRANGE", keys.calls(B), "-", "+"),  # read b's calls
        ("XREADGROUP", "GROUP", "workers", "w", "STREAMS", keys.calls(B), ">"),
        ("XCLAIM", keys.calls(B), "workers", "w", "0", "0-1"),
        ("XADD", keys.reply(B, "carol.x"), "*", "reply", "forged"),
        ("HSET", keys.worker(B, "w1"), "status", "ready"),
        ("HSET", keys.config(B), "max_backlog", "1"),
        ("XADD", keys.calls(B), "*", "v", "3"),
        ("DEL", keys.dead(B)),
    ]


def test_a_caller_cannot_touch_another_service_or_another_users_keys(secured: Secured) -> None:
    keys, alice = secured.keys, secured.user("alice")
    bob_id = "bob.0123456789abcdef"
    secured.admin.xadd(keys.reply(A, bob_id), {"reply": "x"})
    for command in [
        *forbidden_on_b(keys),
        ("DEL", keys.reply(A, bob_id)),
        ("XREAD", "STREAMS", keys.reply(A, bob_id), "0"),
        ("XDEL", keys.reply(A, bob_id), "0-1"),
        ("XADD", keys.reply(A, bob_id), "*", "reply", "forged"),
        ("SET", keys.gone(A, f"{bob_id}-1"), "1"),
        ("HSET", keys.stream_control(A, f"{bob_id}-1"), "cancel", "1"),
        ("XADD", keys.reply(A, "alicex.1"), "*", "reply", "x"),  # a user whose name starts with hers
        # its own service's machinery
        ("HSET", keys.config(A), "max_backlog", "1"),
        ("HSET", keys.worker(A, "w1"), "status", "ready"),
        ("XGROUP", "DESTROY", keys.calls(A), "workers"),
        ("XREADGROUP", "GROUP", "workers", "w", "STREAMS", keys.calls(A), ">"),
        ("DEL", keys.calls(A)),
        ("SADD", keys.users(A), "mallory"),
        ("HSET", keys.services, A, "{}"),
        ("GET", "outside-the-namespace"),
        ("FLUSHALL",),
    ]:
        refused(alice, *command)
    secured.admin.xadd(keys.reply(A, "alice.1"), {"reply": "x"})
    assert alice.xread({keys.reply(A, "alice.1"): "0"})  # her own reply stream: read, deleted
    assert alice.delete(keys.reply(A, "alice.1")) == 1
    alice.close()


@pytest.mark.parametrize(("user", "other"), [("alice", "bob"), ("bob", "alice")])
def test_a_caller_cannot_read_delete_or_write_another_users_requests(
    secured: Secured, user: str, other: str
) -> None:
    """Two registered callers of the same service: each one's requests are its own."""
    keys, caller = secured.keys, secured.user(user)
    theirs = [keys.user_calls(A, other), keys.user_worker_calls(A, "w1", other), keys.calls(A)]
    for stream in theirs:  # the other user's streams, and the shared one
        secured.admin.xadd(stream, {"v": "3", "a": "secret"})
        refused(caller, "XRANGE", stream, "-", "+")
        refused(caller, "XDEL", stream, "0-1")
        refused(caller, "XADD", stream, "*", "v", "3")
        refused(caller, "XLEN", stream)
    sharded = keys.user_calls(f"{A}#1", other)
    refused(caller, "XADD", sharded, "*", "v", "3")
    secured.admin.zadd(keys.delayed(A), {"another's delayed call": 1})
    refused(caller, "ZREVRANGE", keys.delayed(A), "0", "-1")  # delayed calls hold arguments too
    refused(caller, "ZRANGE", keys.delayed(A), "0", "-1")
    for stream in (
        keys.user_calls(A, user),
        keys.user_calls(f"{A}#1", user),
        keys.user_worker_calls(A, "w1", user),
    ):
        entry = caller.xadd(stream, {"v": "3"})  # its own: written, read, withdrawn
        assert caller.xrange(stream)
        assert caller.xdel(stream, entry) == 1
    assert caller.sismember(keys.users(A), user)
    caller.close()


def registered(secured: Secured) -> None:
    """``a`` in the directory, as its workers register it, with a dead letter."""
    entry = {"name": A, "version": "1.0.0", "description": "", "methods": []}
    secured.admin.hset(secured.keys.services, A, json.dumps(entry))
    secured.admin.xadd(secured.keys.dead(A), {"entry": "x", "reason": "r"})


def test_the_observer_reads_everything_and_changes_nothing(secured: Secured) -> None:
    ns, keys = secured.namespace, secured.keys
    registered(secured)
    url = secured.urls["observer"]
    for command in (["services"], ["workers"], ["health"], ["queues"], ["stats"], ["jobs", A],
                    ["schedules"], ["dead-letters", A]):  # fmt: skip
        done = titan(url, ns, *command, "--json")
        assert done.returncode in (0, 1), (command, done.stderr)  # 1: health finds no live worker
        assert "NOPERM" not in done.stderr and "permission" not in done.stderr, (command, done.stderr)
    observer = secured.user("observer")
    for command in (
        ("HSET", keys.services, A, "{}"),
        ("XADD", keys.calls(A), "*", "v", "3"),
        ("XDEL", keys.dead(A), "0-1"),
        ("DEL", keys.dead(A)),
        ("SET", keys.idle(A), "1"),
        ("HSET", keys.config(A), "max_backlog", "1"),
        ("GET", "outside-the-namespace"),
    ):
        refused(observer, *command)
    done = titan(url, ns, "dead-letters", A, "--purge", "--yes")
    assert done.returncode != 0 and "observer" in done.stderr, done.stderr
    assert secured.admin.xlen(keys.dead(A)) == 1
    observer.close()


def test_the_operator_replays_and_purges_dead_letters_cancels_jobs_purges_and_forgets(
    secured: Secured,
) -> None:
    ns, keys = secured.namespace, secured.keys
    url = secured.urls["operator"]
    registered(secured)
    done = titan(url, ns, "dead-letters", A, "--purge", "--yes")
    assert done.returncode == 0, done.stderr
    assert secured.admin.xlen(keys.dead(A)) == 0
    dead_letter(secured.admin, keys, A, "c1", 1, 2)
    done = titan(url, ns, "dead-letters", A, "--replay", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == {"replayed": 1}, done.stderr
    assert secured.admin.xlen(keys.calls(A)) == 1
    submitted = titan(secured.urls["alice"], ns, "submit", A, "run", "later", "--delay", "60")  # a caller's
    assert submitted.returncode == 0, submitted.stderr
    done = titan(url, ns, "cancel", submitted.stdout.strip().strip('"'))
    assert done.returncode == 0, done.stdout + done.stderr
    done = titan(url, ns, "purge", A, "--yes")
    assert done.returncode == 0, done.stderr
    assert secured.admin.xlen(keys.calls(A)) == 0
    done = titan(url, ns, "forget", A, "--yes")
    assert done.returncode == 0, done.stderr
    assert not secured.admin.hexists(keys.services, A)
    operator = secured.user("operator")
    for command in (("GET", "outside-the-namespace"), ("FLUSHALL",), ("CONFIG", "SET", "maxmemory", "1"),
                    ("KEYS", "*"), ("ACL", "SETUSER", "x")):  # fmt: skip
        refused(operator, *command)
    operator.close()


async def test_a_refusal_is_an_access_denied_naming_command_key_and_role(secured: Secured) -> None:
    keys = secured.keys
    async with Client(secured.urls["alice"], namespace=secured.namespace) as alice:
        with pytest.raises(AccessDenied) as info:
            await alice.call(B, "add", (1, 2), timeout=5)
    message = str(info.value)
    assert "alice" in message and "caller" in message, message
    assert keys.calls(B) in message or B in message, message


def test_a_refused_multi_is_an_access_denied_naming_multi_and_the_role(secured: Secured) -> None:
    """redis-py sends MULTI, the commands and EXEC in one write: a refused MULTI shows as EXEC's
    "EXEC without MULTI", which must not be what the user reads."""
    registered(secured)
    secured.admin_ask("ACL", "SETUSER", "operator", "-multi")
    done = titan(secured.urls["operator"], secured.namespace, "dead-letters", A, "--purge", "--yes")
    assert done.returncode == 4, done.stderr  # AccessDenied is a RedisUnavailable
    message = " ".join(done.stderr.split())
    assert "refused MULTI" in message and "'operator'" in message and "titan acl operator" in message, message
    assert "EXEC without MULTI" not in message, message


async def test_calls_refused_both_their_send_and_their_reply_read_leave_no_error_unretrieved(
    secured: Secured,
) -> None:
    """alice may neither send to ``b`` nor read her replies from it: the reader's refusals fail the
    calls waiting at that moment, some of them still sending (a delayed call, an affinity call
    looking up its worker). Each call raises one AccessDenied; no error is left on a future nobody
    reads ("Future exception was never retrieved")."""
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    raised: list[type[BaseException]] = []  # not the errors: their tracebacks would keep the futures
    try:
        async with Client(secured.urls["alice"], namespace=secured.namespace) as alice:

            async def calls(options: dict[str, Any]) -> None:
                until = anyio.current_time() + 2.0  # past several of the reader's refusals (backoff)
                while anyio.current_time() < until:
                    try:
                        await alice.call(B, "add", (1, 2), timeout=5, **options)
                    except Exception as exc:
                        raised.append(type(exc))
                        # Its own error: the send's refusal, not the reply read's ("were sent, may have run").
                        assert str(exc).startswith((f"cannot send {B}.add()", f"cannot route {B}.add()")), exc

            async with anyio.create_task_group() as tg:
                for options in [{}, {"delay": 0.01}, {"key": "k"}] * 6:
                    tg.start_soon(calls, options)
        gc.collect()  # an unretrieved error is reported when its future is collected
        await anyio.lowlevel.checkpoint()
    finally:
        loop.set_exception_handler(previous)
    assert raised and set(raised) == {AccessDenied}, set(raised)
    assert not unretrieved, unretrieved[:3]


async def test_a_caller_whose_rule_refuses_acl_whoami_takes_its_user_name_from_the_url(
    secured: Secured,
) -> None:
    """Without its user's name the client id would not match the rule's reply keys (``<user>.*``),
    and every call would fail with an AccessDenied on its reply stream that WHOAMI caused."""
    secured.admin_ask("ACL", "SETUSER", "alice", "-acl|whoami")
    secured.admin_ask("ACL", "LOG", "RESET")
    async with Client(secured.urls["alice"], namespace=secured.namespace) as alice:
        assert alice.client_id.startswith("alice."), alice.client_id
        with pytest.raises(CallTimeout):  # no worker serves it: waited for, not refused
            await alice.call(A, "run", ("x",), timeout=0.5)
    assert not [e for e in denied_log(secured.admin) if e.startswith("alice ") and "whoami" not in e]


def without_reply_rights(admin: Any, user: str) -> list[str]:
    """ACL SETUSER arguments that keep ``user``'s rule but the selector of its reply streams."""
    row = admin.execute_command("ACL", "GETUSER", user)
    row = row if isinstance(row, dict) else next(iter(row.values()))  # a cluster: every node alike
    kept = [
        f"({sel[b'keys'].decode()} {sel[b'commands'].decode()})"
        for sel in row[b"selectors"]
        if b":reply:" not in sel[b"keys"]
    ]
    return ["clearselectors", *kept]


async def test_replies_a_caller_may_no_longer_read_fail_its_calls_with_access_denied(
    secured: Secured, b_workers: Workers
) -> None:
    """A refused read of the reply stream is not an outage: the waiting call fails at once, it does
    not wait for its timeout while the reader retries."""
    b_workers.start(CALCULATOR)
    b_workers.wait_registered(B, 1)
    async with Client(secured.urls["carol"], namespace=secured.namespace) as carol:
        assert await carol.call(B, "add", (1, 2)) == 3
        secured.admin_ask("ACL", "LOG", "RESET")
        secured.admin_ask("ACL", "SETUSER", "carol", *without_reply_rights(secured.admin, "carol"))
        # A read already blocked keeps the rights it started with: wait for the reader's next one.
        await in_thread(wait_until, lambda: any(
            e.startswith("carol ") and e.endswith(" xread") for e in denied_log(secured.admin)
        ), 10, "carol's reader refused an XREAD")  # fmt: skip
        started = time.monotonic()
        with pytest.raises(AccessDenied) as info:
            await carol.call(B, "add", (2, 3), timeout=8)
        took = time.monotonic() - started
    message = str(info.value)
    assert "XREAD" in message and ":reply:carol." in message and "carol" in message and "caller" in message, (
        message
    )
    assert took < 5, f"the call waited {took:.1f} s: the refusal was retried, not reported"


async def test_a_caller_whose_rule_lacks_xtrim_still_gets_its_replies(
    secured: Secured, b_workers: Workers
) -> None:
    """A rule written before replies were trimmed: trimming is refused, reading is not, so every
    call is still answered (a call that ran is never reported as refused)."""
    b_workers.start(CALCULATOR)
    b_workers.wait_registered(B, 1)
    row = secured.admin.execute_command("ACL", "GETUSER", "carol")
    row = row if isinstance(row, dict) else next(iter(row.values()))
    selectors = [
        f"({sel[b'keys'].decode()} {sel[b'commands'].decode().replace('+xtrim', '')})"
        for sel in row[b"selectors"]
    ]
    secured.admin_ask("ACL", "SETUSER", "carol", "clearselectors", *selectors)
    async with Client(secured.urls["carol"], namespace=secured.namespace) as carol:
        answers = []
        for i in range(6):  # over two seconds: the reader tries to trim at least once a second
            answers.append(await carol.call(B, "add", (i, 1), timeout=5))
            await anyio.sleep(0.4)
    assert answers == [i + 1 for i in range(6)]
    assert any(e.startswith("carol ") and e.endswith(" xtrim") for e in denied_log(secured.admin))


def test_titan_acl_prints_the_rules_as_text_and_json(namespace: str) -> None:
    done = titan("redis://127.0.0.1:1", namespace, "acl", "caller", A, B, "--user", "alice", "--json")
    assert done.returncode == 0, done.stderr
    [rule] = json.loads(done.stdout)
    assert rule["role"] == "caller" and rule["user"] == "alice" and rule["services"] == [A, B]
    assert rule["setuser"][:3] == ["ACL", "SETUSER", "alice"]
    text = titan("redis://127.0.0.1:1", namespace, "acl", "worker", A, "--user", "w")
    assert text.returncode == 0 and text.stdout.startswith("ACL SETUSER w on resetkeys"), text.stdout
    assert f"~{namespace}:{{{A}}}:*" in text.stdout


def test_a_worker_refused_by_its_rule_exits_naming_the_worker_role(secured: Secured) -> None:
    """The worker user of ``a`` serving ``b``: it stops at once with AccessDenied, not a traceback."""
    wrong = secured.workers("a-worker")
    try:
        proc = wrong.start(CALCULATOR)
        proc.wait(timeout=30)
        output = wrong.output(proc).decode()
        assert proc.returncode != 0 and "Traceback" not in output, output
        assert "worker rule" in output and "a-worker" in output, output
    finally:
        wrong.close()


@pytest.mark.timeout(120)
def test_the_examples_serve_and_the_remote_demo_calls_each_under_its_own_user(
    secured: Secured, tmp_path: Path
) -> None:
    """calculator, database and image-processor each under a worker user of its own; the remote demo
    (examples/remote.py) under one caller user of the three: it works unchanged."""
    ns, keys = secured.namespace, secured.keys
    examples = ("calculator", "database", "image-processor")
    caller = acl.caller_rule(keys, examples, "demo-caller")
    for rule in (*(acl.worker_rule(keys, s, f"{s}-worker") for s in examples), caller):
        secured.set_rule(rule)
    url = secured.urls["observer"].replace("observer:observer-pw", "{user}:{user}-pw")
    started: list[Workers] = []
    try:
        for service, file, args in (
            ("calculator", "calculator.py", ()),
            ("database", "database.py", ("--dep", f'config={{"path": "{tmp_path / "u.db"}"}}')),
            ("image-processor", "image_processor.py", ()),
        ):
            w = RoutedWorkers(url.format(user=f"{service}-worker"), ns, secured.connect_admin)
            started.append(w)
            w.start(ROOT / "processes" / file, *args)
        env = {**os.environ, "TITAN_REDIS_URL": url.format(user="demo-caller"), "TITAN_NAMESPACE": ns}
        result = subprocess.run(
            [sys.executable, "-m", "examples.remote", "--wait", "30"], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=100,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "calculator: 6 * 7 = 42" in result.stdout
        assert "thumbnail of" in result.stdout and "(96, 72)" in result.stdout
        for w in started:
            for proc in w.procs:
                assert b"NOPERM" not in w.output(proc) and b"AccessDenied" not in w.output(proc)
    finally:
        for w in started:
            w.close()


def grant_lines() -> list[str]:
    """Each grant of each role as PROTOCOL.md lists it (``<ns>``, ``<svc>``, ``<user>`` in the patterns)."""
    keys = Keys("NS")
    lines = []
    for rule in (acl.worker_rule(keys, "SVC", "USER"), acl.caller_rule(keys, ("SVC",), "USER"),
                 acl.operator_rule(keys, "USER"), acl.observer_rule(keys, "USER")):  # fmt: skip
        for grant in rule.grants:
            patterns = " ".join(f"`{k}`" for k in grant.keys) or "no key"
            patterns = patterns.replace("NS", "<ns>").replace("SVC", "<svc>").replace("USER", "<user>")
            lines.append(f"- {patterns}: " + ", ".join(f"`{c.upper()}`" for c in grant.commands))
    return lines


def test_the_protocol_lists_every_key_pattern_and_command_of_each_role() -> None:
    protocol = (ROOT / "PROTOCOL.md").read_text()
    section = protocol[protocol.index("## ACL rules") : protocol.index("## Compatibility")]
    missing = [line for line in grant_lines() if line not in section.splitlines()]
    assert missing == [], "PROTOCOL.md's ACL rules differ from titan_broker/_wire/acl.py:\n" + "\n".join(
        missing
    )


async def test_a_worker_retries_and_ticks_under_its_rule(secured: Secured, tmp_path: Path) -> None:
    """@retry (delayed runs queued again, a job marked retrying) and @periodic (tick.lua) need nothing
    beyond the worker rule of their service; the caller of tasks submits and reads the jobs."""
    ns, keys = secured.namespace, secured.keys
    for rule in (
        acl.worker_rule(keys, "tasks", "tasks-worker"),
        acl.worker_rule(keys, "ticker", "ticker-worker"),
        acl.caller_rule(keys, ("tasks",), "tasks-caller"),
    ):
        secured.set_rule(rule)
    url = secured.urls["observer"].replace("observer:observer-pw", "{user}:{user}-pw")
    secured.admin_ask("ACL", "LOG", "RESET")
    tasks = RoutedWorkers(url.format(user="tasks-worker"), ns, secured.connect_admin)
    ticker = RoutedWorkers(url.format(user="ticker-worker"), ns, secured.connect_admin)
    ticks = tmp_path / "ticks"
    try:
        tasks.start(SERVICES / "tasks.py", "--dep", f"log={json.dumps(str(tmp_path / 'runs'))}")
        ticker.start(SERVICES / "ticker.py", "--dep", f"log={json.dumps(str(ticks))}")
        tasks.wait_registered("tasks", 1)
        async with Client(url.format(user="tasks-caller"), namespace=ns) as caller:
            recovers = caller.job(await caller.submit("tasks", "flaky", (1, "recovers")))
            assert await recovers.result(timeout=20) == "ok after 2"
        wait_until(lambda: ticks.exists() and ticks.read_text().strip(), 20, "a periodic tick")
        assert denied_log(secured.admin) == []
    finally:
        tasks.close()
        ticker.close()


async def test_a_call_is_handed_off_to_a_newer_version_under_the_worker_rule(secured: Secured) -> None:
    """Two versions of one service, both under its worker rule: a call for the method only v2 has,
    read by v1, is handed to v2 (handoff.lua on v2's own stream), with nothing refused."""
    ns, keys = secured.namespace, secured.keys
    for rule in (
        acl.worker_rule(keys, "edge-upgrade", "edge-worker"),
        acl.caller_rule(keys, ("edge-upgrade",), "edge-caller"),
    ):
        secured.set_rule(rule)
    url = secured.urls["observer"].replace("observer:observer-pw", "{user}:{user}-pw")
    secured.admin_ask("ACL", "LOG", "RESET")
    edge = RoutedWorkers(url.format(user="edge-worker"), ns, secured.connect_admin)
    try:
        edge.start(SERVICES / "edge_v1.py")
        v2 = edge.start(SERVICES / "edge_v2.py")
        edge.wait_registered("edge-upgrade", 2)
        async with Client(url.format(user="edge-caller"), namespace=ns) as caller:
            for i in range(10):
                assert await caller.call("edge-upgrade", "new_method", (i,), timeout=20) == [i, v2.pid]
        assert denied_log(secured.admin) == []
    finally:
        edge.close()


def test_a_read_only_dashboard_runs_under_the_observer_rule(secured: Secured) -> None:
    """``titan dashboard`` without a token, as the observer: it shows the services and their dead letters."""
    from .test_dashboard import Dashboard, service

    registered(secured)
    secured.admin_ask("ACL", "LOG", "RESET")
    board = Dashboard(secured.urls["observer"], secured.namespace)
    try:
        board.wait(lambda snap: service(snap, A) is not None, "client_log on the dashboard")
        assert len(board.get(f"/api/services/{A}/dead-letters")) == 1
    finally:
        board.close()
    assert [line for line in denied_log(secured.admin) if line.startswith("observer")] == []


@pytest.mark.parametrize(
    "args",
    [
        ["worker", "a", "--calls", "*"],
        ["worker", "a", "--calls", "c}:x"],
        ["worker", "a?", "--user", "w"],
        ["worker", "a", "--user", "x*"],
        ["worker", "a", "--user", ""],
        ["operator", "--user", "a.b"],
        ["observer", "--user", "o[1]"],
        ["caller", "a", "b*", "--user", "alice"],
        ["caller", "a\n", "--user", "alice"],
        ["worker", "a", "--namespace", "x*"],
        ["observer", "--namespace", "a b"],
    ],
)
def test_titan_acl_refuses_a_name_that_would_widen_or_break_a_rule(args: list[str]) -> None:
    """A glob character in a service, user or namespace name would make a pattern match other keys."""
    done = titan("redis://127.0.0.1:1", "ns", "acl", *args)
    assert done.returncode == 2, (args, done.stdout, done.stderr)
    assert "ACL SETUSER" not in done.stdout and "Traceback" not in done.stderr, done.stderr
    assert "error:" in done.stderr, done.stderr
    assert "not valid" in done.stderr or "cannot be used" in done.stderr, done.stderr


def test_rules_built_in_python_refuse_the_same_names() -> None:
    keys = Keys("ns")
    for build in (
        lambda: acl.worker_rule(keys, "a", "a-worker", ("*",)),
        lambda: acl.worker_rule(keys, "a*", "w"),
        lambda: acl.worker_rule(keys, "a", "w*"),
        lambda: acl.caller_rule(keys, ("a", "{b}"), "alice"),
        lambda: acl.observer_rule(keys, "o?"),
        lambda: acl.operator_rule(Keys("n*"), "op"),
    ):
        with pytest.raises((ConfigError, ValueError)):
            build()
    # The same service named twice grants once.
    assert acl.caller_rule(keys, ("a", "a"), "alice") == acl.caller_rule(keys, ("a",), "alice")

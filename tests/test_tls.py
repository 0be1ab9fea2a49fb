"""Mutual TLS: a Redis that asks every client for a certificate its CA signed (``tls-auth-clients yes``).
Workers, callers and the CLI present theirs through the URL: ``rediss://...?ssl_ca_certs=CA
&ssl_certfile=CERT&ssl_keyfile=KEY``."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from titan_broker import Client, ConfigError, RedisUnavailable
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


def url_of(port: int, folder: Path, *, client_cert: bool = True, scheme: str = "rediss", **files: str) -> str:
    """The URL with the CA of ``folder`` and its client certificate; ``files`` replace any of the three."""
    paths = {"ssl_ca_certs": str(folder / "ca.crt")}
    if client_cert:
        paths |= {"ssl_certfile": str(folder / "client.crt"), "ssl_keyfile": str(folder / "client.key")}
    query = "&".join(f"{name}={quote(path, safe='/')}" for name, path in (paths | files).items())
    return f"{scheme}://127.0.0.1:{port}/0?{query}"


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


@pytest.mark.parametrize(
    ("option", "path", "says"),
    [
        ("ssl_ca_certs", "missing.crt", "No such file"),
        ("ssl_certfile", "missing.crt", "No such file"),
        ("ssl_keyfile", "missing.key", "No such file"),
        ("ssl_certfile", ".", "Is a directory"),
        ("ssl_ca_certs", "client.key", "without a PEM certificate"),  # a file of the wrong kind
        ("ssl_keyfile", "ca.crt", "do not hold a PEM certificate and its private key"),
    ],
)
async def test_a_tls_file_that_cannot_be_read_is_a_config_error_naming_option_and_path(
    mtls: tuple[int, Path], namespace: str, option: str, path: str, says: str
) -> None:
    """Not the "Error 2 connecting to 127.0.0.1" of an unreachable server: the caller, a worker and
    the CLI name the option and its file, before connecting."""
    port, folder = mtls
    bad = str(folder / path)
    url = url_of(port, folder, **{option: bad})
    with pytest.raises(ConfigError) as info:
        async with Client(url, namespace=namespace):
            pass
    assert f"{option}={bad}" in str(info.value) and says in str(info.value), info.value
    workers = Workers(url, namespace)
    try:
        worker = workers.start(CALCULATOR)
        assert worker.wait(timeout=30) == 2  # a usage error, not a crash or an unreachable Redis
        assert f"{option}={bad}".encode() in workers.output(worker), workers.output(worker)
    finally:
        workers.close()
    done = titan(url, namespace, "services")
    assert done.returncode == 2 and f"{option}={bad}" in done.stderr.replace("\n", ""), done.stderr


@pytest.mark.parametrize("scheme", ["redis", "redis+sentinel"])
async def test_tls_options_on_a_url_without_tls_say_to_use_its_tls_scheme(
    mtls: tuple[int, Path], namespace: str, scheme: str
) -> None:
    port, folder = mtls
    url = url_of(port, folder, scheme=scheme)
    with pytest.raises(
        ConfigError,
        match=rf"ssl_ca_certs.* {re.escape(scheme)}:// does not use TLS: use {re.escape(scheme)}s://",
    ):
        async with Client(url, namespace=namespace):
            pass
    done = titan(url, namespace, "services")
    assert done.returncode == 2 and f"use {scheme}s://" in done.stderr, done.stderr

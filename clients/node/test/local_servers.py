"""Start a private Redis set-up for the Node tests of URLs, from the Python test helpers.

``local_servers.py sentinel``: a primary, a replica and one sentinel (titan_broker.testing.LocalSentinel).
``local_servers.py tls``: a TLS-only redis-server whose certificate a fresh private CA signed.

It prints one JSON line ``{"url": ..., ...}`` on stdout, then reads commands from stdin, a line each,
answering each with a JSON line: ``failover`` (sentinel: kill the primary, wait for the sentinels to
promote the replica, answer ``{"old": port, "new": port}``). It closes everything when stdin closes
(the test ended) or on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path

from titan_broker.testing import LocalRedis, LocalSentinel
from titan_broker.testing._local_redis import TlsFiles, free_port


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def sentinel() -> None:
    with LocalSentinel(sentinels=1) as setup:
        say(url=setup.url, primary=setup.primary().port)
        for line in sys.stdin:
            if line.strip() == "failover":
                old = setup.kill_primary()
                new = setup.wait_failover(old, timeout=30.0)
                say(old=old.port, new=new.port)
            else:
                say(error=f"unknown command {line.strip()!r}")


def tls() -> None:
    with tempfile.TemporaryDirectory(prefix="titan-node-tls-") as folder:
        files = TlsFiles.make(Path(folder))
        # A second CA, which did not sign the server's certificate: the "wrong CA" of the tests.
        other = Path(folder) / "other"
        other.mkdir()
        wrong = TlsFiles.make(other).ca
        port = free_port()
        with LocalRedis(port=port, extra_args=files.server_args(port)):
            bare = f"rediss://127.0.0.1:{port}/0"
            say(url=bare + files.query, bare=bare, ca=files.ca, wrong_ca=wrong)
            for line in sys.stdin:
                say(error=f"unknown command {line.strip()!r}")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    kinds = {"sentinel": sentinel, "tls": tls}
    if len(sys.argv) != 2 or sys.argv[1] not in kinds:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(kinds)}")
    kinds[sys.argv[1]]()


if __name__ == "__main__":
    main()

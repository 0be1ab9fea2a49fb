"""Start a private Redis Cluster for the Node tests (titan_broker/testing/_local_cluster.py), print its URL
as a line ``URL <url>``, and close it when stdin closes (the test ended) or on SIGTERM."""

from __future__ import annotations

import signal
import sys

from titan_broker.testing._local_cluster import LocalCluster


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with LocalCluster(primaries=3, replicas=0) as cluster:
        print(f"URL {cluster.url}", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()

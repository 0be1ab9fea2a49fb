"""Another "host" for discovery tests: its own ProcessManager in its own process.

Prints "ready" once its calculator is up; on each line of input prints the
JSON list of service names it sees; stops at end of input.
"""

import json
import sys
from pathlib import Path

import anyio

from titan_broker import ProcessManager

CALCULATOR = Path(__file__).resolve().parent.parent / "processes" / "calculator.py"


async def main(url: str, namespace: str) -> None:
    async with ProcessManager(url, namespace=namespace) as pm:
        await pm.spawn(CALCULATOR)
        print("ready", flush=True)
        while await anyio.to_thread.run_sync(sys.stdin.readline):
            print(json.dumps([s.name for s in await pm.services()]), flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])

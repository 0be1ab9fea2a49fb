"""The history of a nemesis run: JSON lines, a file per process, merged by time when checked.

Every event is ``{"k": kind, "t": time.monotonic(), ...}``: monotonic time is shared by every
process of the host and left alone by the clock-shift fault (FAKETIME_DONT_FAKE_MONOTONIC). Kinds:

- ``invoke`` (a caller sent a call: ``id``, ``caller``, ``method``, ``args`` digest, ``timeout``,
  ``delay``, ``expect``) and ``outcome`` (``id``, ``ok``, ``error`` type, ``value``);
- ``job_submit`` (``id`` the call's token, ``job``), ``job_seen`` (a state read by any process),
  ``job_final`` (read back by the run's own process after the faults healed);
- ``run_start``, ``run_end``, ``tick`` (written by the service, tests/services/nemesis_work.py);
- ``fault`` (``kind``, ``target``, ``start``, ``end``), ``worker_exit``, ``memory``, ``phase``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from typing import IO, Any


class History:
    """Appends events to one file, a line each, flushed at once (a kill -9 loses none written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = path.open("a", buffering=1)

    def record(self, event: str, /, **fields: Any) -> None:
        self._file.write(json.dumps({"k": event, "t": round(time.monotonic(), 4), **fields}) + "\n")

    def close(self) -> None:
        self._file.close()


def digest(args: Any) -> str:
    """A short digest of a call's arguments."""
    return hashlib.sha1(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:10]


def read(folder: Path) -> list[dict[str, Any]]:
    """Every event of every file in ``folder`` (``*.jsonl``), in time order."""
    events: list[dict[str, Any]] = []
    for file in sorted(folder.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # the last line of a process killed mid-write
                events.append(json.loads(line))
    events.sort(key=lambda e: float(e["t"]))
    return events

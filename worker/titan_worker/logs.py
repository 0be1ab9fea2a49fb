"""Logging that stays bounded however often the same thing goes wrong.

A flood of bad entries, an out-of-memory Redis or a method that fails on
every call must not write a line (or a traceback) per occurrence: the first
of a kind is logged at once, later ones are counted and summed up in one line
at most every ``every`` seconds.

The formats of ``titan-worker run``'s log are here too: text (the default) or JSON lines
(``--log-format json``), both with readable UTC times.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any


class ThrottledLog:
    """Logs each kind of message at most once per ``every`` seconds, with a count of the rest."""

    MAX_KINDS = 256
    """Kinds remembered at once; beyond that the memory is cleared (bounded, whatever the input)."""

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.logger = logger
        self.every = every
        self._kinds: dict[str, list[float | int]] = {}  # kind -> [logged at, suppressed since]

    def log(self, level: int, kind: str, message: str, *args: Any, exc_info: Any = None) -> bool:
        """Log ``message % args`` unless a message of this ``kind`` was logged recently.

        Returns whether it was logged.
        """
        now = time.monotonic()
        state = self._kinds.get(kind)
        if state is not None and now - state[0] < self.every:
            state[1] += 1
            return False
        if len(self._kinds) >= self.MAX_KINDS:
            self._kinds.clear()
        suppressed = int(state[1]) if state is not None else 0
        self._kinds[kind] = [now, 0]
        if suppressed:
            message += " (%d more like this in the last %.0f s)"
            args = (*args, suppressed, now - float(state[0]) if state else self.every)
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True

    def over(self, kinds: tuple[str, ...], message: str, *args: Any) -> None:
        """The condition these kinds report is over: say so once (if any was logged), and log the
        next occurrence of each at once."""
        over = False
        for kind in kinds:  # a loop, not any(generator): this runs once per settled call
            if kind in self._kinds:
                del self._kinds[kind]
                over = True
        if over:
            self.logger.warning(message, *args)


_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def readable_time(created: float) -> str:
    """``2026-05-01T10:30:15.123+00:00``: a log line's time, in UTC to the millisecond."""
    return datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``2026-05-01T10:30:15.123+00:00 INFO titan_worker: message`` (times in UTC, not raw numbers)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return readable_time(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers: time, level, logger, message, the record's extra
    fields, and ``traceback`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": readable_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS and not name.startswith("_"):
                line[name] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(verbose: int, log_format: str) -> None:
    """Root logging for ``titan-worker run``: warnings by default, INFO at -v, DEBUG at -vv."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)

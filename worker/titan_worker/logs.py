"""Logging that stays bounded however often the same thing goes wrong.

A flood of bad entries, an out-of-memory Redis or a method that fails on
every call must not write a line (or a traceback) per occurrence: the first
of a kind is logged at once, later ones are counted and summed up in one line
at most every ``every`` seconds.
"""

from __future__ import annotations

import logging
import time
from typing import Any


class Throttled:
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
        if any(self._kinds.pop(kind, None) is not None for kind in kinds):
            self.logger.warning(message, *args)

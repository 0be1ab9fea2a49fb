"""A schedule that cannot tick beside one that can, and a plain method to run delayed.

``a_broken`` carries a cron expression that never matches (30 February),
attached without the decorator's checks, as a service built before them
would: its ticks cannot be computed. It sorts first, so the worker meets it
before ``b_tick`` on every pass.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from titan_broker import periodic, process, public
from titan_broker._service.decorators import FEATURES_ATTR, PUBLIC_ATTR, PeriodicOptions, PublicOptions


@process(name="broken_schedule", version="1.0.0")
class BrokenSchedule:
    async def init(self, log: str) -> None:
        self.log = Path(log)

    def _record(self, what: str) -> None:
        with self.log.open("a") as f:
            f.write(f"{what} - {os.getpid()} {time.time():.3f}\n")

    async def a_broken(self) -> None:
        self._record("broken")

    setattr(a_broken, PUBLIC_ATTR, PublicOptions())
    setattr(a_broken, FEATURES_ATTR, {PeriodicOptions.feature: PeriodicOptions(cron="0 0 30 2 *")})

    @periodic(every=1)
    async def b_tick(self) -> None:
        self._record("tick")

    @public
    async def stamp(self) -> None:
        self._record("stamp")

"""A periodic method that always fails: its schedule shows the last run's error."""

from __future__ import annotations

from titan_broker import periodic, process


@process(name="failing-ticker", version="1.0.0")
class FailingTicker:
    @periodic(every=1)
    async def tick(self) -> None:
        raise RuntimeError("the tick failed")

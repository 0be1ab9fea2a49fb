"""A latency histogram with fixed, log-spaced buckets: cheap to record, exact to merge.

Workers publish theirs in the registry; a pool or the CLI merges them and
reads percentiles off the merged counts (to within one bucket, 25 %).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping

# Upper bounds in seconds: 50 us * 1.25^k, up to about 60 s.
BOUNDS: tuple[float, ...] = tuple(0.00005 * 1.25**k for k in range(64))


class LatencyHistogram:
    """Counts of durations per bucket."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS, seconds)] += 1

    @property
    def count(self) -> int:
        return sum(self.counts)

    def percentile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the q-th quantile (0 < q <= 1); None when empty."""
        total = self.count
        if not total:
            return None
        rank = q * total
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank and n:
                return BOUNDS[i] if i < len(BOUNDS) else BOUNDS[-1]
        return BOUNDS[-1]

    def summary(self) -> dict[str, float | None]:
        """p50/p95/p99 in milliseconds."""
        return {
            f"p{int(q * 100)}": (None if (v := self.percentile(q)) is None else round(v * 1000, 3))
            for q in (0.5, 0.95, 0.99)
        }

    def to_dict(self) -> dict[str, int]:
        """Sparse form for JSON: bucket index -> count."""
        return {str(i): n for i, n in enumerate(self.counts) if n}

    @classmethod
    def from_dict(cls, data: Mapping[str, int]) -> LatencyHistogram:
        hist = cls()
        for key, n in data.items():
            i = int(key)
            if 0 <= i < len(hist.counts):
                hist.counts[i] += int(n)
        return hist

    @classmethod
    def merged(cls, histograms: Iterable[LatencyHistogram]) -> LatencyHistogram:
        out = cls()
        for h in histograms:
            for i, n in enumerate(h.counts):
                out.counts[i] += n
        return out

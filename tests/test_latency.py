"""The latency histogram: percentiles within one bucket, merges, its sparse JSON form."""

from __future__ import annotations

import math
import random

from titan_broker._registry.latency import BOUNDS, LatencyHistogram


def exact_quantile(values: list[float], q: float) -> float:
    """The smallest value with at least q of all values at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(round(q * len(ordered), 6)))  # round: no float noise in q * n
    return ordered[rank - 1]


def within_one_bucket(reported: float | None, true: float) -> bool:
    """A percentile is the upper bound of the bucket holding the true value: true <= reported < 1.25 true."""
    return reported is not None and true <= reported < true * 1.25


def test_histogram_percentiles_of_a_uniform_distribution() -> None:
    hist = LatencyHistogram()
    values = [ms / 1000 for ms in range(1, 1001)]  # 1 ms .. 1 s
    for v in random.Random(1).sample(values, len(values)):
        hist.observe(v)
    assert hist.count == 1000
    for q, true in ((0.5, 0.5), (0.95, 0.95), (0.99, 0.99)):
        assert within_one_bucket(hist.percentile(q), true), (q, hist.percentile(q))
    summary = hist.summary()
    assert set(summary) == {"p50", "p95", "p99"}
    assert 500 <= summary["p50"] < 625 and 950 <= summary["p95"] < 1187.5  # type: ignore[operator]
    assert summary["p50"] < summary["p95"] <= summary["p99"]  # type: ignore[operator]


def test_histogram_percentiles_see_the_tail_not_the_median() -> None:
    hist = LatencyHistogram()
    values = [0.002] * 90 + [0.3] * 8 + [2.0] * 2  # 90 % fast, a slow tail
    for v in values:
        hist.observe(v)
    for q in (0.5, 0.9, 0.95, 0.98, 0.99, 1.0):
        assert within_one_bucket(hist.percentile(q), exact_quantile(values, q)), q
    assert hist.percentile(0.9) < 0.0025  # type: ignore[operator]
    assert 0.3 <= hist.percentile(0.95) < 0.375  # type: ignore[operator]
    assert 2.0 <= hist.percentile(0.99) < 2.5  # type: ignore[operator]


def test_histogram_of_a_lognormal_sample_is_within_one_bucket() -> None:
    rng = random.Random(42)
    values = [rng.lognormvariate(-6, 1.5) for _ in range(20_000)]  # about 2.5 ms median, a long tail
    hist = LatencyHistogram()
    for v in values:
        hist.observe(v)
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        assert within_one_bucket(hist.percentile(q), exact_quantile(values, q)), q


def test_empty_histogram_has_no_percentiles() -> None:
    hist = LatencyHistogram()
    assert hist.percentile(0.5) is None
    assert hist.summary() == {"p50": None, "p95": None, "p99": None}
    assert hist.to_dict() == {}


def test_histogram_extremes_land_in_the_first_and_last_buckets() -> None:
    hist = LatencyHistogram()
    hist.observe(0.0)
    assert hist.percentile(1.0) == BOUNDS[0]
    hist.observe(10_000.0)  # beyond the largest bound: counted, reported as the largest bound
    assert hist.count == 2
    assert hist.percentile(1.0) == BOUNDS[-1]
    assert BOUNDS[-1] > 60


def test_merged_histograms_equal_one_histogram_of_all_values() -> None:
    rng = random.Random(7)
    parts = [[rng.expovariate(1 / scale) for _ in range(500)] for scale in (0.001, 0.01, 0.1)]
    separate = []
    for values in parts:
        hist = LatencyHistogram()
        for v in values:
            hist.observe(v)
        separate.append(hist)
    whole = LatencyHistogram()
    for values in parts:
        for v in values:
            whole.observe(v)
    merged = LatencyHistogram.merged(separate)
    assert merged.counts == whole.counts
    assert merged.summary() == whole.summary()
    assert [h.count for h in separate] == [500, 500, 500]  # merging changes none of its inputs
    everything = [v for values in parts for v in values]
    assert within_one_bucket(merged.percentile(0.99), exact_quantile(everything, 0.99))


def test_histogram_survives_its_sparse_json_form() -> None:
    hist = LatencyHistogram()
    for v in (0.001, 0.001, 0.02, 0.5):
        hist.observe(v)
    data = hist.to_dict()
    assert sum(data.values()) == 4 and len(data) == 3  # only non-empty buckets
    assert LatencyHistogram.from_dict(data).counts == hist.counts
    # A record from a newer worker with more buckets: unknown indexes are ignored, not a crash.
    assert LatencyHistogram.from_dict({**data, "999": 5, "-1": 5}).counts == hist.counts

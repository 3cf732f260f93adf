"""The soak's arithmetic: quantiles from a Prometheus exposition, RSS growth."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from loadtests.soak import quantiles, rss_growth


def test_quantiles_interpolate_inside_buckets_across_label_sets() -> None:
    registry = CollectorRegistry()
    h = Histogram("stage_seconds", "a stage", ["agreement"], buckets=(1, 2, 4), registry=registry)
    for _ in range(50):
        h.labels("a").observe(0.5)  # bucket (0, 1]
    for _ in range(49):
        h.labels("b").observe(1.5)  # bucket (1, 2]
    h.labels("b").observe(3.0)  # bucket (2, 4]
    (name, (p50, p99, count)), *rest = quantiles(generate_latest(registry).decode()).items()
    assert rest == [] and name == "stage_seconds" and count == 100
    assert math.isclose(p50, 1.0)  # rank 50 = the whole first bucket
    assert math.isclose(p99, 2.0)  # rank 99 = the end of the second bucket
    h.labels("b").observe(100.0)  # past the last finite bound: the quantile stops there
    _, p99_after, _ = quantiles(generate_latest(registry).decode())["stage_seconds"]
    assert 2.0 < p99_after <= 4.0


def test_rss_growth_compares_the_end_with_the_middle_not_the_warm_up() -> None:
    warm_up_then_flat = [100.0 + 10 * i for i in range(10)] + [200.0] * 30
    assert rss_growth(warm_up_then_flat) == 0.0
    leaking = [100.0 + i for i in range(40)]
    growth = rss_growth(leaking)
    assert growth is not None and 0.12 < growth < 0.14  # (137.5 - 121.5) / 121.5
    assert rss_growth([1.0, float("nan")]) is None  # too few samples to say

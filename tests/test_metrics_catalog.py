"""The turnaround clocks' histograms have a bucket bound at every agreement's SLA, so the share
of studies read within the SLA is one bucket over the count, on the edge's AI clock and the
reading room's contractual clock alike."""

from __future__ import annotations

import yaml
from prometheus_client import Histogram

from radbridge.agreements import load_agreements, parse_agreements
from radbridge.db import Database
from radbridge.metrics import EdgeMetrics, with_sla_bounds
from review.metrics import ReviewMetrics
from tests.conftest import REPO


def _agreements_with_sla(stat_minutes: int):  # type: ignore[no-untyped-def]
    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
    raw["agreements"][0]["sla_minutes"]["stat"] = stat_minutes
    return parse_agreements(raw)


def _bounds(histogram: Histogram) -> set[float]:
    """The finite bucket bounds a histogram exports (one observation made it export them)."""
    return {
        float(sample.labels["le"])
        for family in histogram.collect()
        for sample in family.samples
        if sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf"
    }


def test_every_sla_is_a_bucket_bound_of_both_turnaround_clocks() -> None:
    agreements = _agreements_with_sla(45)  # 2700 s: no default bound
    edge = EdgeMetrics(agreements=agreements)
    edge.turnaround.labels("demo-hospital-to-center", "stat").observe(100.0)
    review = ReviewMetrics(Database("sqlite://"), agreements)
    review.turnaround.labels("demo-hospital-to-center", "stat").observe(100.0)
    slas = {float(m) * 60 for m in agreements.agreements[0].sla_minutes.values()}
    assert 2700.0 in slas
    edge_bounds, review_bounds = _bounds(edge.turnaround), _bounds(review.turnaround)
    assert slas <= edge_bounds and slas <= review_bounds


def test_without_agreements_the_default_bounds_stay() -> None:
    demo = load_agreements(REPO / "radbridge/defaults/agreements.yaml")
    assert with_sla_bounds((1.0, 2.0), None) == (1.0, 2.0)
    assert with_sla_bounds((1.0, 3600.0), demo) == (1.0, 3600.0, 14400.0, 86400.0)

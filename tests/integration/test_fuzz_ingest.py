"""Mutated instances over real associations: nothing corrupt acknowledged, everything answered.

The fuzzer is ``loadtests.fuzz_ingest`` (its docstring lists the mutations and the oracle: dcmtk's
dcmdump and pydicom, not the edge's own parser). The slow set sends 2,000 seeded cases; the soak
set (``./run soak``) sends 10,000 with another seed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.fuzz_ingest import BYTE_MUTATIONS, FuzzReport, run_fuzz
from tests.corpus import running_edge


def _fuzz(tmp_path: Path, count: int, seed: int) -> FuzzReport:
    with running_edge(f"sqlite:///{tmp_path / 'edge.db'}", tmp_path / "store") as edge:
        return run_fuzz(edge.port, count, seed=seed, time_limit_s=900)


def _assert_clean(report: FuzzReport, count: int) -> None:
    summary = report.summary()
    assert report.sent == count, summary  # not cut short by the time limit
    assert report.crashes == 0, summary
    assert report.unanswered == 0, summary
    assert report.corrupt_acknowledged == [], summary
    assert report.c211 == 0 and report.tracebacks == 0, summary
    # The fuzzer reached both sides: intact-enough cases stored, broken ones refused, and every
    # kind of mutation was tried.
    assert report.acknowledged > count // 20, summary
    for status in ("0xC001", "0xC002", "0xC000", "0xA900"):
        assert report.statuses[status] > 0, summary
    assert set(BYTE_MUTATIONS) <= set(report.by_mutation), summary


@pytest.mark.slow
def test_two_thousand_mutated_instances(tmp_path: Path) -> None:
    report = _fuzz(tmp_path, 2000, seed=2026)
    print(report.summary())
    _assert_clean(report, 2000)


@pytest.mark.soak
def test_ten_thousand_mutated_instances(tmp_path: Path) -> None:
    report = _fuzz(tmp_path, 10_000, seed=7)
    print(report.summary())
    _assert_clean(report, 10_000)

"""loadtests.ingest_bench's report: a ratio against a receiver that waits is not printed."""

from __future__ import annotations

from pathlib import Path

from loadtests.ingest_bench import (
    Corpus,
    Gateway,
    Orthanc,
    Run,
    Storescp,
    _table,
    parse_strace_counts,
)


def _corpus(tmp: Path) -> Corpus:
    files = [tmp / f"{i}.dcm" for i in range(100)]
    for f in files:
        f.write_bytes(b"\0" * 1000)
    return Corpus("ct", files, {"CT"}, 100, set())


def test_ratios_when_the_pace_setter_works(tmp_path: Path) -> None:
    results = {
        Storescp.name: [Run(0.1, 0.08)],
        Orthanc.name: [Run(1.0, 0.9)],
        Gateway.name: [Run(0.5, 0.45)],
    }
    text = _table(_corpus(tmp_path), results, 1)
    assert "gateway/storescp 0.20x" in text and "gateway/Orthanc 2.00x" in text


def test_a_ratio_against_an_idle_bottleneck_is_withheld(tmp_path: Path) -> None:
    results = {
        Storescp.name: [Run(0.1, 0.08)],
        Orthanc.name: [Run(5.0, 0.5)],  # 10 % busy: waiting (Nagle), not working
        Gateway.name: [Run(0.5, 0.45)],
    }
    text = _table(_corpus(tmp_path), results, 1)
    assert "gateway/Orthanc withheld" in text and "10% busy" in text
    assert "gateway/storescp 0.20x" in text


def test_the_sync_calls_are_read_from_strace_summaries() -> None:
    """``strace -c``'s table (with and without an errors column) gives calls per sync call;
    the rest of the table and its total are ignored."""
    text = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 78.26    0.022689          55       406           fdatasync
 21.74    0.006304          31       200         3 fsync
------ ----------- ----------- --------- --------- ----------------
100.00    0.028993          47       606         3 total
"""
    assert parse_strace_counts(text) == {"fdatasync": 406, "fsync": 200}
    assert parse_strace_counts("") == {}

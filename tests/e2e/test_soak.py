"""The soak (loadtests/soak.py) as ./run soak runs it: a short run of the real thing.

Left out of CI (``-m soak``): its point is minutes of load. It checks the report's promises,
not figures: every acknowledged study has its result at the PACS, every plot and the summary
are written, and the stack's own histograms were scraped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.soak
@pytest.mark.timeout(1500)
def test_a_short_soak_loses_nothing_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    command = [sys.executable, "-m", "loadtests.soak", "--minutes", "2"]
    run = subprocess.run(
        [*command, "--drain-minutes", "10", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1400,
    )
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "**lost (acknowledged, no result after a 10-min drain): 0**" in summary
    for png in ("rss.png", "studies.png", "http.png"):
        assert (out / png).stat().st_size > 10_000, png
    assert "radbridge_edge_study_forward_seconds" in summary
    assert "radbridge_center_" in summary

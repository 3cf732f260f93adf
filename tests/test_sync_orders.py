"""loadtests.sync_orders: every writer writes every file once, in a folder it then deletes."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.sync_orders import WRITERS, run_once


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_writer_writes_every_file_and_leaves_nothing(tmp_path: Path, name: str) -> None:
    rate, cpu_ms = run_once(WRITERS[name], tmp_path, files=12, threads=3, size=4096)
    assert rate > 0 and cpu_ms >= 0
    assert list(tmp_path.iterdir()) == []


def test_a_short_count_is_an_error_not_a_figure(tmp_path: Path) -> None:
    def make(folder: Path):  # type: ignore[no-untyped-def]
        (folder / "s").mkdir()
        return lambda folder, i, data: (folder / "s" / "same.dcm").write_bytes(data)

    with pytest.raises(RuntimeError, match="1 of 5 files written"):
        run_once(make, tmp_path, files=5, threads=2, size=16)

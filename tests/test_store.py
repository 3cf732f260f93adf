import os
from pathlib import Path

import pytest

from dicom_io.store import STAGING, DurableStore
from radbridge.errors import StorageError


def test_write_is_atomic_and_leaves_no_staging(tmp_path: Path) -> None:
    store = DurableStore(tmp_path)
    f = store.write("a/b/c.dcm", b"x" * 1000)
    assert (tmp_path / "a/b/c.dcm").read_bytes() == b"x" * 1000
    assert f.size == 1000 and len(f.sha256) == 64
    assert list((tmp_path / STAGING).iterdir()) == []


def test_recover_removes_half_written_files(tmp_path: Path) -> None:
    store = DurableStore(tmp_path)
    (tmp_path / STAGING / "dead.part").write_bytes(b"half")
    assert store.recover() == 1
    assert list((tmp_path / STAGING).iterdir()) == []


def test_refuses_paths_outside_the_store(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="escapes"):
        DurableStore(tmp_path / "s").write("../evil", b"x")


def test_disk_watermark_refuses_before_writing(tmp_path: Path) -> None:
    store = DurableStore(tmp_path, min_free_bytes=2**62)
    with pytest.raises(StorageError, match="watermark"):
        store.write("x.dcm", b"x")
    assert not (tmp_path / "x.dcm").exists()


def test_write_failure_cleans_staging(tmp_path: Path) -> None:
    store = DurableStore(tmp_path)
    (tmp_path / "blocked").write_text("a file where a folder must go")
    with pytest.raises(StorageError):
        store.write("blocked/x.dcm", b"data")
    assert os.listdir(tmp_path / STAGING) == []

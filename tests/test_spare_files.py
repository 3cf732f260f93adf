"""Unnamed files made ahead for the receive path: used once, refilled, named in any folder of
the store, freed on close."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from dicom_io.spare_files import SpareFiles
from dicom_io.store import STAGING, DurableStore


def _wait_ready(spares: SpareFiles, n: int) -> None:
    deadline = time.monotonic() + 10
    while spares.ready < n:
        assert time.monotonic() < deadline, f"{spares.ready} spare files ready, not {n}"
        time.sleep(0.01)


def test_spares_are_unnamed_and_refilled_as_taken(tmp_path: Path) -> None:
    spares = SpareFiles(tmp_path, 3)
    try:
        _wait_ready(spares, 3)
        fd = spares.take()
        assert fd is not None
        try:
            # an O_TMPFILE file: no name in the folder, "/#<inode> (deleted)" in /proc
            assert os.listdir(tmp_path) == []
            assert os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)")
            assert os.fstat(fd).st_nlink == 0
        finally:
            os.close(fd)
        _wait_ready(spares, 3)
    finally:
        spares.close()
    assert os.listdir(tmp_path) == []
    probe = os.open(tmp_path, os.O_RDONLY)  # likely the number the folder's descriptor had
    try:
        spares.close()  # a second close closes nothing
        os.fstat(probe)
    finally:
        os.close(probe)


def test_the_store_names_a_spare_in_the_instances_folder(tmp_path: Path) -> None:
    store = DurableStore(tmp_path, spare_files=2)
    try:
        assert store._spares is not None
        _wait_ready(store._spares, 2)
        store.write("a/b/1.dcm", b"one" * 1000)
        store.write("a/c/2.dcm", b"two" * 1000)
        store.write("a/c/3.dcm", b"three")  # the third may find no spare ready: made in place
        assert (tmp_path / "a/b/1.dcm").read_bytes() == b"one" * 1000
        assert (tmp_path / "a/c/2.dcm").read_bytes() == b"two" * 1000
        assert (tmp_path / "a/c/3.dcm").read_bytes() == b"three"
        assert (tmp_path / "a/b/1.dcm").stat().st_nlink == 1
        assert list((tmp_path / STAGING).iterdir()) == []
        _wait_ready(store._spares, 2)
    finally:
        store.close()
    store.write("after/close.dcm", b"x")  # a closed store still writes, making each file
    assert (tmp_path / "after/close.dcm").read_bytes() == b"x"


def test_a_spare_that_cannot_be_named_there_stops_the_spares_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder on another file system (EXDEV on the link): that write goes the staged way,
    the store closes its spares and makes the next files in place."""
    store = DurableStore(tmp_path, spare_files=1)
    assert store._spares is not None
    _wait_ready(store._spares, 1)
    real_link = os.link
    calls: list[str] = []

    def cross_device_once(src, dst, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(dst)
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", cross_device_once)
    store.write("s/1.dcm", b"one")
    assert store._spares is None
    store.write("s/2.dcm", b"two")
    assert (tmp_path / "s/1.dcm").read_bytes() == b"one"
    assert (tmp_path / "s/2.dcm").read_bytes() == b"two"
    assert calls == ["1.dcm", "2.dcm"]  # the second: an unnamed file made in its folder
    assert list((tmp_path / STAGING).iterdir()) == []

import os
from pathlib import Path

import pytest

from dicom_io import store as store_module
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


@pytest.mark.parametrize(
    "relpath", ["../evil", "a/../../evil", "/etc/evil", "", ".", "a/..", "a/\x00b"]
)
def test_refuses_paths_outside_the_store(tmp_path: Path, relpath: str) -> None:
    with pytest.raises(StorageError, match="escapes"):
        DurableStore(tmp_path / "s").write(relpath, b"x")
    assert not (tmp_path / "evil").exists()


def test_a_path_inside_the_store_is_kept_under_its_root(tmp_path: Path) -> None:
    store = DurableStore(tmp_path / "s")
    store.write("a/./b/../c.dcm", b"x")
    assert (tmp_path / "s" / "a" / "c.dcm").read_bytes() == b"x"


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


def test_write_many_writes_every_file_and_syncs_each_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: dict[str, list[int]] = {"fsync": [], "fdatasync": []}
    for name in synced:
        real = getattr(os, name)

        def counting(fd: int, real=real, calls=synced[name]) -> None:  # type: ignore[no-untyped-def]
            calls.append(fd)
            real(fd)

        monkeypatch.setattr(os, name, counting)
    store = DurableStore(tmp_path)
    files = [(f"s/{i % 2}/{i}.dcm", bytes([i]) * (1000 + i)) for i in range(130)]  # 3 groups
    store.write_many(files)
    for relpath, data in files:
        assert (tmp_path / relpath).read_bytes() == data
    assert list((tmp_path / STAGING).iterdir()) == []
    assert len(synced["fdatasync"]) == 130  # each file's data
    assert len(synced["fsync"]) == 2  # then each of its two folders once


def test_write_many_is_all_or_none(tmp_path: Path) -> None:
    """The second group's last file cannot be renamed into place (a file stands where its
    folder must go): the files already under their final names go as well as the staged."""
    store = DurableStore(tmp_path)
    (tmp_path / "blocked").write_text("a file where a folder must go")
    files = [(f"ok/{i}.dcm", b"x" * 100) for i in range(99)] + [("blocked/99.dcm", b"y")]
    with pytest.raises(StorageError, match="write failed"):
        store.write_many(files)
    assert [p for p in tmp_path.rglob("*.dcm")] == []
    assert list((tmp_path / STAGING).iterdir()) == []


def test_write_many_respects_the_watermark_for_the_whole_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DurableStore(tmp_path, min_free_bytes=8_500)
    monkeypatch.setattr(store, "free_bytes", lambda: 10_000)  # room for one file of 1000, not two
    store.write_many([("one.dcm", b"1" * 1000)])
    with pytest.raises(StorageError, match="watermark"):
        store.write_many([("a.dcm", b"a" * 1000), ("b.dcm", b"b" * 1000)])
    assert not (tmp_path / "a.dcm").exists()


@pytest.mark.parametrize("journaled", [False, True], ids=["no journal", "journal"])
def test_write_names_an_unnamed_file_without_a_staging_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journaled: bool
) -> None:
    """On a file system with O_TMPFILE (ext4 here) the file is created unnamed in its own
    folder and linked into place: the staged path (a cross-folder rename) is not used. The
    file's link count gets a sync of its own only where no journal commits it with the
    folder's entry (``dicom_io.file_systems``; both cases, whatever this machine's is)."""
    monkeypatch.setattr(store_module, "journals_metadata", lambda _: journaled)
    store = DurableStore(tmp_path)

    def no_staging(*_: object) -> None:
        raise AssertionError("the staged path ran")

    monkeypatch.setattr(store, "_write_staged", no_staging)
    synced: list[str] = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)

        def sync(fd: int, real=real, name=name) -> None:  # type: ignore[no-untyped-def]
            synced.append(name if not os.path.isdir(f"/proc/self/fd/{fd}") else f"{name} dir")
            real(fd)

        monkeypatch.setattr(os, name, sync)
    store.write("s/1.dcm", b"a" * 5000)
    # the bytes before the name; after it, the file's link count (no journal), then the
    # folder's entry
    assert (
        synced == ["fdatasync", "fsync dir"] if journaled else ["fdatasync", "fsync", "fsync dir"]
    )
    assert (tmp_path / "s/1.dcm").read_bytes() == b"a" * 5000
    assert (tmp_path / "s/1.dcm").stat().st_mode & 0o777 == 0o640 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_a_second_write_under_a_name_replaces_it_whole(tmp_path: Path) -> None:
    store = DurableStore(tmp_path)
    store.write("s/1.dcm", b"old" * 100)
    store.write("s/1.dcm", b"new")
    assert (tmp_path / "s/1.dcm").read_bytes() == b"new"
    assert list((tmp_path / STAGING).iterdir()) == []


def test_without_o_tmpfile_the_store_stages_and_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that refuses O_TMPFILE (EOPNOTSUPP) gets the staged write, and the store
    stops asking."""
    import errno

    real_open = os.open
    refused: list[int] = []

    def no_tmpfile(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            refused.append(flags)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    store = DurableStore(tmp_path)
    store.write("s/1.dcm", b"one")
    store.write("s/2.dcm", b"two")
    assert (tmp_path / "s/1.dcm").read_bytes() == b"one"
    assert (tmp_path / "s/2.dcm").read_bytes() == b"two"
    assert len(refused) == 1
    assert list((tmp_path / STAGING).iterdir()) == []


def test_a_failure_before_the_name_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def broken_link(*_: object, **__: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", broken_link)
    store = DurableStore(tmp_path)
    with pytest.raises(StorageError, match="Input/output error"):
        store.write("s/1.dcm", b"data")
    assert os.listdir(tmp_path / "s") == []
    assert list((tmp_path / STAGING).iterdir()) == []

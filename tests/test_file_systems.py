"""dicom_io.file_systems: which file systems count as journaling metadata (read from a /proc and
/sys laid out here as the kernel lays them out, then from this machine's own)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_io.file_systems import journals_metadata


def _machine(tmp_path: Path, fs_type: str, jbd2: list[str], device: str = "vdb") -> dict[str, Path]:
    """A /proc and /sys where ``tmp_path``'s device is mounted as ``fs_type`` from ``device``."""
    st = os.stat(tmp_path)
    majmin = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        f"27 1 {majmin} / /data rw,relatime shared:1 - {fs_type} /dev/{device} rw\n"
    )
    (proc / "fs" / "jbd2").mkdir(parents=True)
    for name in jbd2:
        (proc / "fs" / "jbd2" / name).mkdir()
    (sys / "devices" / "virtual" / "block" / device).mkdir(parents=True)
    (sys / "dev" / "block").mkdir(parents=True)
    (sys / "dev" / "block" / majmin).symlink_to(f"../../devices/virtual/block/{device}")
    return {"proc": proc, "sys": sys}


@pytest.mark.parametrize(
    ("fs_type", "jbd2", "journaled"),
    [
        ("ext4", ["vdb-8"], True),  # ext4 with its journal
        ("ext4", [], False),  # ext4 made without a journal (mkfs.ext4 -O ^has_journal)
        ("ext4", ["vdb1-8", "vdc-8"], False),  # other devices' journals only
        ("ext3", ["vdb-8"], True),
        ("xfs", [], True),  # XFS always logs metadata
        ("btrfs", [], False),  # not known for sure: the extra sync stays
        ("tmpfs", [], False),
        ("nfs4", [], False),
    ],
)
def test_journaling_is_read_from_the_mount_and_the_jbd2_journals(
    tmp_path: Path, fs_type: str, jbd2: list[str], journaled: bool
) -> None:
    assert journals_metadata(tmp_path, **_machine(tmp_path, fs_type, jbd2)) is journaled


def test_a_folder_it_cannot_place_reads_as_not_journaling(tmp_path: Path) -> None:
    paths = _machine(tmp_path, "ext4", ["vdb-8"])
    assert journals_metadata(tmp_path / "missing", **paths) is False
    (paths["proc"] / "self" / "mountinfo").write_text("22 27 0:21 / /proc rw - proc proc rw\n")
    assert journals_metadata(tmp_path, **paths) is False  # its device is in no mount


def test_this_machines_answer_matches_its_kernel(tmp_path: Path) -> None:
    """On the real /proc: an ext4 folder journals exactly when the kernel lists a jbd2 journal
    for its device (this project's CI machines have none: the answer there is False)."""
    st = os.stat(tmp_path)
    device = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve().name
    mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    majmin = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    types = [ln.split(" - ")[1].split()[0] for ln in mounts if ln.split()[2] == majmin]
    if not types or types[-1] not in ("ext4", "ext3"):
        assert journals_metadata(tmp_path) is (bool(types) and types[-1] == "xfs")
        return
    journals = os.listdir("/proc/fs/jbd2") if os.path.isdir("/proc/fs/jbd2") else []
    expected = any(j.rpartition("-")[0] == device for j in journals)
    assert journals_metadata(tmp_path) is expected

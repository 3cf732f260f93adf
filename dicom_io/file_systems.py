"""Does the file system under a folder journal its metadata? (Linux, read from /proc and /sys.)

The store names a synced file with ``linkat`` and then syncs the folder. Where the file system
journals metadata, the link's two changes (the folder's entry and the file's link count) are
one transaction, and the folder's sync makes both durable. Without a journal (ext2, or ext4
made without one, as this project's CI machines are) they are separate writes: a synced entry
naming an inode still at 0 links on disk is what fsck deletes after a crash, so the file is
synced too. Where there is a journal, that extra sync is a journal commit of its own per file
(``loadtests.sync_orders`` compares the two orders on any file system).

Only what is known for sure counts as journaling:

- ext3/ext4 when the kernel runs a jbd2 journal for the device (``/proc/fs/jbd2/<dev>-<n>``);
  ext4 mounted without a journal has none there;
- XFS, which always logs metadata; a link logs the entry and the inode in one transaction.

Everything else (btrfs, ZFS, NFS, overlay, tmpfs, a folder this cannot place) reads as not
journaling, so the store keeps its extra sync there.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["journals_metadata"]

_ALWAYS_JOURNALED = frozenset({"xfs"})
_JBD2 = frozenset({"ext3", "ext4"})


def journals_metadata(folder: Path, proc: Path = Path("/proc"), sys: Path = Path("/sys")) -> bool:
    """True when ``folder``'s file system is known to journal metadata (see the module)."""
    try:
        dev = os.stat(folder).st_dev
        fs_type = _fs_type(proc / "self" / "mountinfo", os.major(dev), os.minor(dev))
        if fs_type in _ALWAYS_JOURNALED:
            return True
        if fs_type not in _JBD2:
            return False
        name = (sys / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}").resolve().name
        jbd2 = proc / "fs" / "jbd2"
        return any(p.name.rpartition("-")[0] == name for p in jbd2.iterdir())
    except OSError:
        return False


def _fs_type(mountinfo: Path, major: int, minor: int) -> str | None:
    """The file system type of the mount with device ``major:minor`` (the last one listed:
    a later mount of the same device hides none of its type)."""
    found = None
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[2] == f"{major}:{minor}" and " - " in line:
            found = line.split(" - ", 1)[1].split()[0]
    return found

"""Durable folder store: unnamed file -> fdatasync -> name -> fsync directory (and file).

A file is visible under its final name only once its bytes are on disk. ``write`` creates the
file unnamed (Linux ``O_TMPFILE``; in its final folder, or a spare made ahead, see
``spare_files``), writes and syncs it, then gives it its name (``linkat``) and syncs the folder
(its entry) and, where the file system keeps no journal to commit it with the entry, the file
(its link count; ``file_systems``): a crash before the name leaves nothing (the file system
frees an unnamed file on its own), and no rename crosses folders (a cross-folder rename takes
the file system's rename lock, which every receiving thread then queues on).
Where the file system has no ``O_TMPFILE`` (or no ``/proc``), and to replace an existing
name, it writes a staging file under ``.staging`` and renames it into place; a crash then
leaves at most a staging file, which ``recover()`` removes at start-up. ``write_many`` stages
a batch (one STOW-RS request) with the fsyncs issued together, which the file system commits in
one journal transaction or a few instead of one per file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from dicom_io.file_systems import journals_metadata
from dicom_io.spare_files import SpareFiles
from radbridge.errors import StorageError

__all__ = ["DurableStore", "StoredFile"]

STAGING = ".staging"
_GROUP = 64  # files whose fsyncs are issued together (and open file descriptors at once)
_fsync_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_T = TypeVar("_T")
# No unnamed files here: the file system lacks O_TMPFILE (EOPNOTSUPP, or EISDIR/EINVAL on
# older kernels), or /proc is not mounted (ENOENT on the link), or the link is refused.
_NO_UNNAMED = frozenset(
    {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.EXDEV, errno.EPERM}
)


@dataclass(frozen=True)
class StoredFile:
    relpath: str
    size: int
    sha256: str


class DurableStore:
    """A folder of immutable files addressed by relative path."""

    def __init__(self, root: Path, min_free_bytes: int = 0, spare_files: int = 0) -> None:
        """``spare_files``: unnamed files kept open ahead of need (``SpareFiles``) for a
        receive path that writes one file per instance; 0 (the default) makes each file on
        demand. A store with spares is ``close()``d."""
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        (self.root / STAGING).mkdir(parents=True, exist_ok=True)
        self._resolved = self.root.resolve()
        self._unnamed = hasattr(os, "O_TMPFILE")  # off for good after a refusal
        # Without a journal the link count needs a sync of its own (see _write_unnamed).
        self._sync_link_count = not journals_metadata(self.root)
        self._spares: SpareFiles | None = None
        if spare_files and self._unnamed:
            self._spares = SpareFiles(self.root / STAGING, spare_files)

    def close(self) -> None:
        """Close the spare files, if any (the store still writes, making each file)."""
        spares, self._spares = self._spares, None
        if spares is not None:
            spares.close()

    def path(self, relpath: str) -> Path:
        """The file's path under the store's root; a path that would leave the root (absolute,
        ``..``, empty) is refused. Checked on the text, not by resolving each component on
        disk (a dozen system calls per instance on the receive path): the store holds no
        symbolic links, and every name in it is built from checked UIDs and ids."""
        norm = os.path.normpath(relpath)
        if (
            not relpath
            or "\x00" in relpath
            or os.path.isabs(norm)
            or norm.split(os.sep)[0] in ("..", ".")
        ):
            raise StorageError(f"path escapes the store: {relpath!r}")
        return self._resolved / norm

    def free_bytes(self) -> int:
        return int(shutil.disk_usage(self.root).free)

    def has_room(self, nbytes: int) -> bool:
        return self.free_bytes() - nbytes >= self.min_free_bytes

    def write(
        self, relpath: str, data: bytes | memoryview, sha256: str | None = None
    ) -> StoredFile:
        """Write ``data`` durably under ``relpath``, atomically: a file already under that
        name is replaced whole, never seen half-written.

        ``sha256`` may be passed when the caller already hashed ``data``.
        """
        final = self.path(relpath)
        if not self.has_room(len(data)):
            raise StorageError("disk watermark reached")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if not (self._unnamed and self._write_unnamed(final, data)):
                self._write_staged(final, data)
        except OSError as exc:
            raise StorageError(f"write failed: {exc.strerror or exc}") from exc
        return StoredFile(relpath, len(data), sha256 or hashlib.sha256(data).hexdigest())

    def _write_unnamed(self, final: Path, data: bytes | memoryview) -> bool:
        """The ``O_TMPFILE`` path; False when it cannot be used here (then this store stops
        trying it) or when ``final`` exists (the staged path replaces it)."""
        dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            spares = self._spares
            spare = spares.take() if spares is not None else None
            if spare is not None:
                fd = spare  # made in the staging folder; linkat names it in any folder
            else:
                try:
                    fd = os.open(".", os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC, 0o640, dir_fd=dfd)
                except OSError as exc:
                    if exc.errno not in _NO_UNNAMED:
                        raise
                    self._unnamed = False
                    return False
            try:
                _write_all(fd, data)
                os.fdatasync(fd)  # the data and the size that reads it; the name comes next
                try:
                    # linkat(AT_SYMLINK_FOLLOW) through /proc: names the open file without
                    # CAP_DAC_READ_SEARCH (which AT_EMPTY_PATH would need).
                    os.link(f"/proc/self/fd/{fd}", final.name, dst_dir_fd=dfd, follow_symlinks=True)
                except FileExistsError:
                    return False
                except OSError as exc:
                    if exc.errno not in _NO_UNNAMED:
                        raise
                    if spare is not None:  # e.g. this folder is another file system's
                        self.close()  # the next writes make their files in place
                    else:
                        self._unnamed = False
                    return False
                # Its link count (0 until the link) on disk: a journaling file system commits
                # it with the folder's entry (the folder's sync below), but without a journal
                # a synced entry naming an inode still at 0 links on disk is what fsck
                # deletes after a crash (dicom_io.file_systems).
                if self._sync_link_count:
                    os.fsync(fd)
            finally:
                os.close(fd)  # an unnamed file is freed here; a named one stays
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return True

    def _write_staged(self, final: Path, data: bytes | memoryview) -> None:
        staging = self._staging()
        try:
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                _write_all(fd, data)
                os.fdatasync(fd)  # the data and the size that reads it; the name comes next
            finally:
                os.close(fd)
            os.replace(staging, final)
            _fsync_dir(final.parent)
        except OSError:
            staging.unlink(missing_ok=True)
            raise

    def write_many(self, files: Sequence[tuple[str, bytes | memoryview]]) -> None:
        """Write each ``(relpath, data)`` durably, as ``write`` would, with the fsyncs of up to
        64 files issued together. All or none: when one fails, none of ``files`` is left
        (neither staged nor under its final name), and ``StorageError`` is raised."""
        finals = [self.path(relpath) for relpath, _ in files]
        if not self.has_room(sum(len(data) for _, data in files)):
            raise StorageError("disk watermark reached")
        staged: list[Path] = []
        renamed: list[Path] = []
        try:
            for start in range(0, len(files), _GROUP):
                group = files[start : start + _GROUP]
                staged_here = self._stage(group, staged)
                for staging, final in zip(staged_here, finals[start:], strict=False):
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging, final)
                    renamed.append(final)
            _together(_fsync_dir, {final.parent for final in finals})
        except OSError as exc:
            for p in [*staged, *renamed]:
                p.unlink(missing_ok=True)
            raise StorageError(f"write failed: {exc.strerror or exc}") from exc

    def _stage(
        self, group: Sequence[tuple[str, bytes | memoryview]], staged: list[Path]
    ) -> list[Path]:
        """Write ``group`` to staging files (appended to ``staged`` as they are made) and
        fsync them together; returns their paths, in order."""
        fds: list[int] = []
        paths: list[Path] = []
        try:
            for _, data in group:
                staging = self._staging()
                fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                staged.append(staging)
                paths.append(staging)
                fds.append(fd)
                _write_all(fd, data)
            _together(os.fdatasync, fds)
        finally:
            for fd in fds:
                os.close(fd)
        return paths

    def _staging(self) -> Path:
        return self.root / STAGING / f"{uuid.uuid4().hex}.part"

    def read(self, relpath: str) -> bytes:
        return self.path(relpath).read_bytes()

    def delete(self, relpath: str) -> None:
        p = self.path(relpath)
        p.unlink(missing_ok=True)
        _fsync_dir(p.parent)

    def recover(self) -> int:
        """Remove staging leftovers of an interrupted write; returns how many."""
        n = 0
        for leftover in (self.root / STAGING).glob("*.part"):
            leftover.unlink(missing_ok=True)
            n += 1
        return n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _together(sync: Callable[[_T], None], items: Iterable[_T]) -> None:
    """``sync`` each item at once on a shared pool (fsync releases the GIL; the file system
    commits concurrent fsyncs together); the first error is raised after all finished."""
    global _fsync_pool
    items = list(items)
    if len(items) <= 1:
        for item in items:
            sync(item)
        return
    with _pool_lock:
        if _fsync_pool is None:
            _fsync_pool = ThreadPoolExecutor(_GROUP // 4, thread_name_prefix="radbridge-fsync")
    futures = [_fsync_pool.submit(sync, item) for item in items]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error

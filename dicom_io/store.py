"""Durable folder store: staging file -> fsync -> rename -> fsync directory.

A file is visible under its final name only once its bytes are on disk; a crash leaves at
most a staging file, which ``recover()`` removes at start-up.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from radbridge.errors import StorageError

__all__ = ["DurableStore", "StoredFile"]

STAGING = ".staging"


@dataclass(frozen=True)
class StoredFile:
    relpath: str
    size: int
    sha256: str


class DurableStore:
    """A folder of immutable files addressed by relative path."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        (self.root / STAGING).mkdir(parents=True, exist_ok=True)

    def path(self, relpath: str) -> Path:
        p = (self.root / relpath).resolve()
        if self.root.resolve() not in p.parents:
            raise StorageError(f"path escapes the store: {relpath!r}")
        return p

    def free_bytes(self) -> int:
        return int(shutil.disk_usage(self.root).free)

    def has_room(self, nbytes: int) -> bool:
        return self.free_bytes() - nbytes >= self.min_free_bytes

    def write(
        self, relpath: str, data: bytes | memoryview, sha256: str | None = None
    ) -> StoredFile:
        """Write ``data`` durably under ``relpath``; replaces nothing that already exists.

        ``sha256`` may be passed when the caller already hashed ``data``.
        """
        final = self.path(relpath)
        if not self.has_room(len(data)):
            raise StorageError("disk watermark reached")
        staging = self.root / STAGING / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            staging.unlink(missing_ok=True)
            raise StorageError(f"write failed: {exc.strerror or exc}") from exc
        return StoredFile(relpath, len(data), sha256 or hashlib.sha256(data).hexdigest())

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

"""Unnamed files opened ahead of need, so a new file's inode is not made on the receive path.

``DurableStore.write`` names an unnamed file (``O_TMPFILE``) once its bytes are synced. Making
that file (allocating its inode) costs from tens of microseconds to half a millisecond on a
busy or journal-less ext4 (measured here: 0.5 ms of a 3 ms C-STORE on one association), and an
association waits for it between two instances. A ``SpareFiles`` keeps a few such files open
in the store's staging folder, made by its own thread while the associations wait for their
peers' next bytes; ``linkat`` may name a file in any folder of the same file system.

A spare is used once. An unnamed file left open at a crash or at close is freed by the file
system: nothing is ever left on disk.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

__all__ = ["SpareFiles"]

log = logging.getLogger("radbridge.store")


class SpareFiles:
    """Up to ``count`` unnamed, empty, writable files in ``folder``, refilled in the
    background as they are taken."""

    def __init__(self, folder: Path, count: int) -> None:
        self._folder = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._count = count
        self._fds: list[int] = []
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._closed = False
        self._wanted.set()
        self._thread = threading.Thread(
            target=self._fill, name="radbridge-spare-files", daemon=True
        )
        self._thread.start()

    def take(self) -> int | None:
        """An unnamed file's descriptor, now the caller's to close; None when none is ready
        (the caller makes its own)."""
        with self._lock:
            fd = self._fds.pop() if self._fds else None
        self._wanted.set()
        return fd

    @property
    def ready(self) -> int:
        with self._lock:
            return len(self._fds)

    def close(self) -> None:
        """Stop refilling and close the spares (their inodes are freed). Once: a second call
        (another thread's) returns at once, closing no descriptor twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            fds, self._fds = self._fds, []
        self._wanted.set()
        self._thread.join(timeout=10)
        for fd in fds:
            os.close(fd)
        os.close(self._folder)

    def _fill(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            while True:
                with self._lock:
                    if self._closed:
                        return
                    if len(self._fds) >= self._count:
                        break
                try:
                    fd = os.open(
                        ".",
                        os.O_WRONLY | os.O_TMPFILE | os.O_CLOEXEC,
                        0o640,
                        dir_fd=self._folder,
                    )
                except OSError as exc:  # no O_TMPFILE here, or the disk is full: stop making
                    log.warning("no spare files (%s); each write makes its own", exc.strerror)
                    return
                with self._lock:
                    if self._closed:
                        os.close(fd)
                        return
                    self._fds.append(fd)

"""What every demo model's build shares: torch set up for a reproducible run, and a file put in
place whole.

``reproducible_torch`` fixes the thread count (a float sum's order, hence the trained weights,
depends on it) and turns on torch's deterministic algorithms for the block, then gives the
caller's process its own settings back: a build run inside a longer process (a test session,
``radbridge models build --retrain``) leaves it as it found it.

``installed_file`` is a temporary file beside the target, renamed onto it when the block ends
without an error and removed when it does not, so an interrupted build never leaves half a
model where the repository looks for one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

__all__ = ["TRAINING_THREADS", "installed_file", "reproducible_torch"]

TRAINING_THREADS = 2  # the shipped models were trained with 2; another count changes weights


@contextmanager
def reproducible_torch(threads: int = TRAINING_THREADS) -> Iterator[None]:
    """torch with ``threads`` intra-op threads and deterministic algorithms, for the block."""
    threads_before = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@contextmanager
def installed_file(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target`` to write; it becomes ``target`` (mode 0644: the
    serving user must read it; mkstemp makes 0600) if the block ends without an error."""
    fd, name = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=target.suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)

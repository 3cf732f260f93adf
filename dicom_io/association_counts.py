"""Open associations, counted per agreement and in all, where the edge's limits read them:
in one process (``LocalCounts``), or in shared memory across the gateway's receiving processes
(``SharedCounts``, when ``edge.receivers`` > 1), so each limit holds for the edge as a whole."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterable
from typing import Any, Protocol

__all__ = ["AssociationCounts", "LocalCounts", "SharedCounts"]


class AssociationCounts(Protocol):
    def connect(self, limit: int) -> bool:
        """Count a new connection; False (not counted) when ``limit`` are already open."""

    def disconnect(self) -> None: ...

    def open(self, agreement_id: str, limit: int | None) -> bool:
        """Count an accepted association of the agreement; False (not counted) at ``limit``."""

    def close(self, agreement_id: str) -> None: ...

    @property
    def connections(self) -> int: ...


class LocalCounts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections = 0
        self._open: dict[str, int] = {}

    def connect(self, limit: int) -> bool:
        with self._lock:
            if self._connections >= limit:
                return False
            self._connections += 1
            return True

    def disconnect(self) -> None:
        with self._lock:
            self._connections = max(self._connections - 1, 0)

    def open(self, agreement_id: str, limit: int | None) -> bool:
        with self._lock:
            if limit is not None and self._open.get(agreement_id, 0) >= limit:
                return False
            self._open[agreement_id] = self._open.get(agreement_id, 0) + 1
            return True

    def close(self, agreement_id: str) -> None:
        with self._lock:
            self._open[agreement_id] = max(self._open.get(agreement_id, 1) - 1, 0)

    @property
    def connections(self) -> int:
        return self._connections


class SharedCounts:
    """The same counts in a ``multiprocessing`` array (slot 0: connections; then one slot per
    agreement known at start, in the order given), guarded by the array's own lock. Made in
    the gateway process and handed to each receiving process it starts."""

    def __init__(self, agreement_ids: Iterable[str], context: Any = None) -> None:
        ctx = context or multiprocessing.get_context("spawn")
        self._slots = {aid: i + 1 for i, aid in enumerate(agreement_ids)}
        self._array = ctx.Array("q", len(self._slots) + 1, lock=True)

    def connect(self, limit: int) -> bool:
        with self._array.get_lock():
            if self._array[0] >= limit:
                return False
            self._array[0] += 1
            return True

    def disconnect(self) -> None:
        with self._array.get_lock():
            self._array[0] = max(self._array[0] - 1, 0)

    def open(self, agreement_id: str, limit: int | None) -> bool:
        slot = self._slots.get(agreement_id)
        if slot is None:  # not an agreement of this start: nothing to count it against
            return limit is None or limit > 0
        with self._array.get_lock():
            if limit is not None and self._array[slot] >= limit:
                return False
            self._array[slot] += 1
            return True

    def close(self, agreement_id: str) -> None:
        slot = self._slots.get(agreement_id)
        if slot is None:
            return
        with self._array.get_lock():
            self._array[slot] = max(self._array[slot] - 1, 0)

    @property
    def connections(self) -> int:
        return int(self._array[0])

"""Priority admission in front of a batcher: STAT first, routine never starved, queue bounded.

A :class:`PriorityGate` lets at most ``capacity`` requests through at a time (the runner's
default: one full batch, see :mod:`serving.runner`). Waiting requests are admitted highest priority
first, first come first served within a priority; a request that has waited longer than its
priority's cap (``max_wait_s``) jumps the queue, so routine work under a flood of STAT work
still progresses. Beyond ``max_waiting`` waiting requests, sheddable requests are refused with
:class:`~radbridge.errors.OverloadedError` (HTTP 503 + Retry-After); durable work (a study
already acknowledged) is never shed, only queued.

Pure asyncio, no Ray: it runs on a replica's event loop and is unit-tested on its own.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from radbridge.agreements import Priority
from radbridge.errors import OverloadedError

__all__ = ["RANK", "GateStats", "PriorityGate"]

RANK: Mapping[str, int] = {Priority.STAT: 0, Priority.URGENT: 1, Priority.ROUTINE: 2}


@dataclass(order=True)
class _Waiter:
    rank: int
    seq: int
    enqueued: float = field(compare=False)
    priority: str = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


@dataclass
class GateStats:
    admitted: dict[str, int] = field(default_factory=dict)
    shed: dict[str, int] = field(default_factory=dict)
    promoted: int = 0


class PriorityGate:
    def __init__(
        self,
        capacity: int,
        max_waiting: int,
        max_wait_s: Mapping[str, float] | None = None,
    ) -> None:
        if capacity < 1 or max_waiting < 0:
            raise ValueError("capacity must be >= 1 and max_waiting >= 0")
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.max_wait_s = dict(max_wait_s or {})
        self.running = 0
        self.stats = GateStats()
        self._heap: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._heap if not w.future.done())

    def retry_after_s(self) -> float:
        """A hint for clients: the wait of the whole queue at one batch per second, 1-30 s."""
        return float(min(30, max(1, self.waiting // max(self.capacity, 1))))

    def check_room(self, n: int, priority: str) -> None:
        """Sheddable work of ``n`` requests that must be served whole (one HTTP request's
        images): refused with :class:`OverloadedError` unless free slots and the bounded queue
        hold all of them now. Once admitted they queue as durable work, so such a request is
        never refused half-served."""
        room = max(0, self.capacity - self.running) + max(0, self.max_waiting - self.waiting)
        if n > room:
            self._count(self.stats.shed, priority)
            raise OverloadedError(
                f"{n} requests do not fit: room for {room}", retry_after_s=self.retry_after_s()
            )

    @asynccontextmanager
    async def slot(self, priority: str, *, shed: bool = False) -> AsyncIterator[float]:
        """Hold one of ``capacity`` slots; yields the seconds spent waiting for it."""
        t0 = time.monotonic()
        await self._acquire(priority, shed)
        try:
            yield time.monotonic() - t0
        finally:
            self._release()

    async def _acquire(self, priority: str, shed: bool) -> None:
        rank = RANK.get(priority, RANK[Priority.ROUTINE])
        if self.running < self.capacity and not self._heap:
            self.running += 1
            self._count(self.stats.admitted, priority)
            return
        if shed and self.waiting >= self.max_waiting:
            self._count(self.stats.shed, priority)
            raise OverloadedError(
                f"{self.waiting} requests already waiting", retry_after_s=self.retry_after_s()
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, _Waiter(rank, next(self._seq), time.monotonic(), priority, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # admitted, then cancelled: give it back
                self._release()
            raise
        self._count(self.stats.admitted, priority)

    def _release(self) -> None:
        self.running -= 1
        while self.running < self.capacity:
            waiter = self._next()
            if waiter is None:
                return
            self.running += 1
            waiter.future.set_result(None)

    def _next(self) -> _Waiter | None:
        """The oldest waiter past its priority's cap, else the best-ranked one."""
        self._heap = [w for w in self._heap if not w.future.done()]
        if not self._heap:
            return None
        now = time.monotonic()
        overdue = [
            w
            for w in self._heap
            if w.priority in self.max_wait_s and now - w.enqueued >= self.max_wait_s[w.priority]
        ]
        if overdue:
            chosen = min(overdue, key=lambda w: w.enqueued)
            if chosen is not self._heap[0]:
                self.stats.promoted += 1
            self._heap.remove(chosen)
            heapq.heapify(self._heap)
            return chosen
        heapq.heapify(self._heap)
        return heapq.heappop(self._heap)

    @staticmethod
    def _count(counter: dict[str, int], priority: str) -> None:
        counter[priority] = counter.get(priority, 0) + 1

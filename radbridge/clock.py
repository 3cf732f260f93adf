"""The wall clock as the edge's outboxes read it.

Their waits are wall-clock timestamps in the database: a study is stable once
``last_received_at + quiet period <= now``, a retry or a lease is due once
``next_attempt_at <= now``. A clock that steps back (an NTP step correction, a virtual machine
restored from a snapshot, a mistaken manual set) would hold every one of those waits for as long
as the step: an hour back, and every study waits an hour more. Each outbox therefore keeps a
``WallClock``: when ``stepped_back(now)`` reports a step, it moves its future waits back by it.

A step forward needs nothing: waits end early (a quiet period cut short forwards a study that
may still grow, and a late instance then makes a new result version, as it would anyway).
"""

from __future__ import annotations

from datetime import datetime, timedelta

__all__ = ["WallClock"]


class WallClock:
    """Notices the wall clock stepping back between two readings of one process."""

    def __init__(self, tolerance: timedelta = timedelta(seconds=1)) -> None:
        self._tolerance = tolerance
        self._latest: datetime | None = None

    def stepped_back(self, now: datetime) -> timedelta | None:
        """How far ``now`` lies before the latest reading, when more than the tolerance
        (a reading a little before the latest is ordinary: readings come from threads)."""
        latest = self._latest
        if latest is None or now > latest:
            self._latest = now
            return None
        step = latest - now
        if step <= self._tolerance:
            return None
        self._latest = now
        return step

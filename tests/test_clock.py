"""The wall clock as the outboxes read it: a step back is noticed once, by how far."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from radbridge.clock import WallClock

T = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def test_a_step_back_beyond_the_tolerance_is_reported_once_by_its_size() -> None:
    clock = WallClock()
    assert clock.stepped_back(T) is None  # the first reading
    assert clock.stepped_back(T + timedelta(minutes=5)) is None  # forward: nothing to do
    back = T + timedelta(minutes=5) - timedelta(hours=1)
    assert clock.stepped_back(back) == timedelta(hours=1)
    assert clock.stepped_back(back + timedelta(seconds=1)) is None  # from the new time on


def test_readings_a_little_out_of_order_are_no_step() -> None:
    clock = WallClock(tolerance=timedelta(seconds=1))
    assert clock.stepped_back(T) is None
    assert clock.stepped_back(T - timedelta(milliseconds=900)) is None
    assert clock.stepped_back(T - timedelta(seconds=3)) == timedelta(seconds=3)

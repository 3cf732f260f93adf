"""PriorityGate: STAT first, FIFO per priority, capped routine wait, bounded sheddable queue."""

from __future__ import annotations

import asyncio

import pytest

from radbridge.errors import OverloadedError
from serving.scheduling import PriorityGate


async def _hold(
    gate: PriorityGate, priority: str, order: list[str], tag: str, release: asyncio.Event
) -> None:
    async with gate.slot(priority):
        order.append(tag)
        await release.wait()


async def _run(
    gate: PriorityGate, priority: str, order: list[str], tag: str, shed: bool = False
) -> float:
    async with gate.slot(priority, shed=shed) as waited:
        order.append(tag)
        await asyncio.sleep(0)
        return waited


def test_stat_overtakes_routine_and_fifo_within_priority() -> None:
    async def main() -> list[str]:
        gate = PriorityGate(capacity=1, max_waiting=100)
        order: list[str] = []
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(gate, "routine", order, "holder", release))
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(_run(gate, "routine", order, f"r{i}")) for i in range(3)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(_run(gate, "urgent", order, "u0"))]
        tasks += [asyncio.create_task(_run(gate, "stat", order, f"s{i}")) for i in range(2)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(holder, *tasks)
        return order

    assert asyncio.run(main()) == ["holder", "s0", "s1", "u0", "r0", "r1", "r2"]


def test_routine_past_its_cap_goes_before_newer_stat() -> None:
    async def main() -> list[str]:
        gate = PriorityGate(capacity=1, max_waiting=100, max_wait_s={"routine": 0.05})
        order: list[str] = []
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(gate, "stat", order, "holder", release))
        await asyncio.sleep(0)
        old = asyncio.create_task(_run(gate, "routine", order, "old-routine"))
        await asyncio.sleep(0.08)  # the routine request is now over its 50 ms cap
        stats = [asyncio.create_task(_run(gate, "stat", order, f"s{i}")) for i in range(3)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(holder, old, *stats)
        assert gate.stats.promoted == 1
        return order

    assert asyncio.run(main()) == ["holder", "old-routine", "s0", "s1", "s2"]


def test_sheddable_requests_refused_beyond_bound_durable_ones_queue() -> None:
    async def main() -> None:
        gate = PriorityGate(capacity=2, max_waiting=3)
        order: list[str] = []
        release = asyncio.Event()
        holders = [
            asyncio.create_task(_hold(gate, "routine", order, f"h{i}", release)) for i in range(2)
        ]
        await asyncio.sleep(0)
        waiting = [
            asyncio.create_task(_run(gate, "routine", order, f"w{i}", shed=True)) for i in range(3)
        ]
        await asyncio.sleep(0)
        assert gate.waiting == 3
        with pytest.raises(OverloadedError) as refused:
            await _run(gate, "stat", order, "refused", shed=True)
        assert refused.value.retry_after_s >= 1
        durable = asyncio.create_task(_run(gate, "routine", order, "durable", shed=False))
        await asyncio.sleep(0)
        assert gate.waiting == 4  # durable work is queued beyond the bound, never refused
        release.set()
        await asyncio.gather(*holders, *waiting, durable)
        assert "refused" not in order and "durable" in order and len(order) == 6
        assert gate.stats.shed == {"stat": 1}
        assert gate.running == 0

    asyncio.run(main())


def test_cancelled_waiter_gives_its_place_back() -> None:
    async def main() -> None:
        gate = PriorityGate(capacity=1, max_waiting=10)
        order: list[str] = []
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(gate, "routine", order, "holder", release))
        await asyncio.sleep(0)
        doomed = asyncio.create_task(_run(gate, "stat", order, "doomed"))
        later = asyncio.create_task(_run(gate, "routine", order, "later"))
        await asyncio.sleep(0)
        doomed.cancel()
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(holder, later)
        assert order == ["holder", "later"]
        assert gate.running == 0 and gate.waiting == 0

    asyncio.run(main())


def test_capacity_is_never_exceeded() -> None:
    async def main() -> int:
        gate = PriorityGate(capacity=3, max_waiting=1000)
        peak = 0

        async def one(i: int) -> None:
            nonlocal peak
            async with gate.slot(("stat", "urgent", "routine")[i % 3]):
                peak = max(peak, gate.running)
                await asyncio.sleep(0.001)

        await asyncio.gather(*(one(i) for i in range(60)))
        assert gate.running == 0
        return peak

    assert asyncio.run(main()) == 3


def test_room_for_a_whole_request_counts_free_slots_and_queue() -> None:
    async def main() -> None:
        gate = PriorityGate(capacity=2, max_waiting=3)
        gate.check_room(5, "routine")  # 2 free slots + 3 queue places
        with pytest.raises(OverloadedError, match="room for 5"):
            gate.check_room(6, "routine")
        order: list[str] = []
        release = asyncio.Event()
        holders = [asyncio.create_task(_hold(gate, "routine", order, "h1", release))]
        await asyncio.sleep(0)
        gate.check_room(4, "stat")  # 1 free slot + 3 queue places
        holders += [
            asyncio.create_task(_hold(gate, "routine", order, f"h{i}", release)) for i in (2, 3)
        ]
        await asyncio.sleep(0)
        assert (gate.running, gate.waiting) == (2, 1)
        gate.check_room(2, "stat")  # no free slot, 2 queue places
        with pytest.raises(OverloadedError) as refused:
            gate.check_room(3, "stat")
        assert refused.value.retry_after_s >= 1
        assert gate.stats.shed == {"routine": 1, "stat": 1}
        release.set()
        await asyncio.gather(*holders)
        assert gate.running == 0 and order == ["h1", "h2", "h3"]

    asyncio.run(main())

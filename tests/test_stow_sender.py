"""A study's STOW-RS requests: in order, one in flight while the caller goes on, the identity
map committed before each leaves, and a refusal stopping the study."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from dicom_io.identity_map import lookup_pseudonym
from dicom_io.pseudonyms import Pseudonymizer
from dicom_io.stow import decode_multipart
from dicom_io.stow_sender import StudySender
from radbridge.db import Database
from radbridge.errors import CenterError, PolicyError

AGREEMENT = "demo-hospital-to-center"
MB = 1024 * 1024


class FakeCenter:
    """Answers each STOW-RS request with ``answer(index, parts)``; records what came."""

    def __init__(self, answer: Callable[[int, list[bytes]], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[list[bytes]] = []
        self.concurrent = 0
        self.most_concurrent = 0
        self._lock = threading.Lock()

    def store_instances(
        self, agreement_id: str, priority: str, body: bytes, content_type: str
    ) -> httpx.Response:
        assert (agreement_id, priority) == (AGREEMENT, "stat")
        with self._lock:
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
            index = len(self.requests)
            parts = decode_multipart(body, content_type)
            self.requests.append(parts)
        try:
            return self.answer(index, parts)
        finally:
            with self._lock:
                self.concurrent -= 1


def _stored(index: int, parts: list[bytes]) -> httpx.Response:
    return httpx.Response(200, json={"00081199": {"vr": "SQ", "Value": [{} for _ in parts]}})


def _refused(code: int) -> httpx.Response:
    failed = {"00081197": {"vr": "US", "Value": [code]}}
    return httpx.Response(409, json={"00081198": {"vr": "SQ", "Value": [failed]}})


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as p:
        yield p


def _part(i: int, size: int) -> bytes:
    return bytes([i % 256]) * size


def test_requests_leave_in_order_one_at_a_time_each_after_its_pseudonyms_are_committed(
    edge_db: Database, pool: ThreadPoolExecutor
) -> None:
    pseudo = Pseudonymizer(b"k" * 32)
    missing: list[str] = []
    uids_before: list[list[str]] = []  # per request: the originals issued before it left

    def answer(index: int, parts: list[bytes]) -> httpx.Response:
        for original in uids_before[index]:
            if lookup_pseudonym(edge_db, AGREEMENT, "uid", original) is None:
                missing.append(original)
        return _stored(index, parts)

    center = FakeCenter(answer)
    sender = StudySender(pool, center, edge_db, AGREEMENT, "stat", pseudo, 8 * MB)  # type: ignore[arg-type]
    issued: list[str] = []
    for i in range(7):  # 3 MB each: requests of 2, 2, 2 and 1 instances
        original = f"1.2.826.0.1.3680043.10.{i + 1}"
        pseudo.uid(original)  # what de-identifying instance i issues
        issued.append(original)
        if i % 2 == 0 and i:
            uids_before.append(list(issued[:-1]))  # add() below sends the previous two
        sender.add(_part(i, 3 * MB))
    uids_before.append(list(issued))
    sender.finish()

    assert [len(r) for r in center.requests] == [2, 2, 2, 1]
    flat = [p for r in center.requests for p in r]
    assert flat == [_part(i, 3 * MB) for i in range(7)]
    assert center.most_concurrent == 1
    assert missing == []
    assert (sender.sent, sender.sent_bytes) == (7, 21 * MB)


def test_a_request_is_in_flight_while_the_next_instance_is_prepared(
    edge_db: Database, pool: ThreadPoolExecutor
) -> None:
    second_added = threading.Event()
    seen_while_in_flight: list[bool] = []

    def answer(index: int, parts: list[bytes]) -> httpx.Response:
        if index == 0:  # a serial sender would still be in add(): this wait would time out
            seen_while_in_flight.append(second_added.wait(10))
        return _stored(index, parts)

    center = FakeCenter(answer)
    sender = StudySender(pool, center, edge_db, AGREEMENT, "stat", Pseudonymizer(b"k" * 32), MB)  # type: ignore[arg-type]
    sender.add(_part(0, MB))
    sender.add(_part(1, MB))  # completes request 1 (instance 0) and sends it
    second_added.set()
    sender.finish()
    assert seen_while_in_flight == [True]
    assert [len(r) for r in center.requests] == [1, 1]


@pytest.mark.parametrize(
    ("code", "error"), [(0x0111, PolicyError), (0xA700, CenterError)], ids=["refused", "full"]
)
def test_a_refused_request_stops_the_study_and_nothing_after_it_leaves(
    edge_db: Database, pool: ThreadPoolExecutor, code: int, error: type[Exception]
) -> None:
    center = FakeCenter(lambda i, parts: _refused(code) if i == 0 else _stored(i, parts))
    sender = StudySender(pool, center, edge_db, AGREEMENT, "stat", Pseudonymizer(b"k" * 32), MB)  # type: ignore[arg-type]
    sender.add(_part(0, MB))
    sender.add(_part(1, MB))  # request 1 leaves
    with pytest.raises(error):
        sender.add(_part(2, MB))  # request 2 would leave: request 1's refusal is raised first
    sender.abandon()
    assert len(center.requests) == 1
    assert sender.sent == 0


def test_abandon_waits_for_the_request_in_flight(
    edge_db: Database, pool: ThreadPoolExecutor
) -> None:
    release = threading.Event()
    center = FakeCenter(lambda i, parts: (release.wait(10), _stored(i, parts))[1])
    sender = StudySender(pool, center, edge_db, AGREEMENT, "stat", Pseudonymizer(b"k" * 32), MB)  # type: ignore[arg-type]
    sender.add(_part(0, MB))
    sender.add(_part(1, MB))
    threading.Timer(0.2, release.set).start()
    sender.abandon()  # returns only once request 1 was answered; instance 1 never leaves
    assert release.is_set() and center.concurrent == 0
    assert len(center.requests) == 1


def test_flush_sends_what_is_queued_without_waiting_and_failed_tells_of_a_refusal(
    edge_db: Database, pool: ThreadPoolExecutor
) -> None:
    """The forwarder's early requests: ``flush`` sends a partial request at once and returns
    while it is in flight; ``failed`` says, without raising, that it was refused."""
    release = threading.Event()

    def answer(index: int, parts: list[bytes]) -> httpx.Response:
        release.wait(10)
        return _refused(0xA700) if index == 1 else _stored(index, parts)

    center = FakeCenter(answer)
    pseudo = Pseudonymizer(b"k" * 32)
    sender = StudySender(pool, center, edge_db, AGREEMENT, "stat", pseudo, 4 * MB)  # type: ignore[arg-type]
    sender.add(_part(0, MB))
    sender.flush()  # one instance, far from a full request: it leaves now
    assert not sender.failed  # in flight, not answered
    release.set()
    sender.add(_part(1, MB))
    sender.flush()  # waits for request 1's answer first (in order), then sends request 2
    pool.submit(lambda: None).result()  # request 2 answered (the pool runs one at a time)
    assert sender.failed and sender.sent == 1
    with pytest.raises(CenterError):
        sender.finish()
    assert [len(r) for r in center.requests] == [1, 1]

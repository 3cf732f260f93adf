"""A receiving process's instances are indexed by the gateway process (dicom_io/index_link.py):
over a real pipe, an Ingestor without a database stores the file itself and gets back the
gateway Ingestor's outcome; each error comes back as the class that picks the same DIMSE
status; a gateway that is gone is a storage error, not a hang."""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_io.dimse_statuses import OUT_OF_RESOURCES, status_for
from dicom_io.header import parse_header
from dicom_io.index_link import IndexClient, IndexFailure, serve_index
from dicom_io.ingest import Ingestor, IngestOutcome, Pending
from dicom_io.store import DurableStore
from radbridge.db import Database
from radbridge.db.tables import InstanceRow, StudyRow
from radbridge.errors import DatasetError, StorageError
from tests.conftest import make_instance
from tests.test_ingest_index import _agreement, _raw


@pytest.fixture
def pipe() -> Iterator[tuple[Any, Any]]:
    ours, theirs = multiprocessing.Pipe()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_a_receivers_instances_are_indexed_by_the_gateways_ingestor(
    edge_db: Database, tmp_path: Path, pipe: tuple[Any, Any]
) -> None:
    ours, theirs = pipe
    gateway = Ingestor(edge_db, DurableStore(tmp_path))
    woken: list[int] = []
    gateway.on_stored = lambda: woken.append(1)
    server = serve_index(ours, gateway.index_entries, threading.Event(), "receiver-1")
    receiver = Ingestor(None, DurableStore(tmp_path), index=IndexClient(theirs))
    first = make_instance()
    second = make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=1)
    outcomes = [receiver.accept(_agreement(), _raw(ds))[0] for ds in (first, second, first)]
    assert outcomes == [IngestOutcome.STORED, IngestOutcome.STORED, IngestOutcome.DUPLICATE]
    assert woken == [1]  # the new series woke the gateway's forwarder, in the gateway
    with edge_db.session() as s:
        assert s.scalars(select(StudyRow.instance_count)).one() == 2
        paths = s.scalars(select(InstanceRow.path)).all()
    assert len(paths) == 2 and all((tmp_path / p).is_file() for p in paths)
    theirs.close()  # the receiving process exits: the gateway's thread ends
    server.join(5)
    assert not server.is_alive()


def _entry(n: int) -> Pending:
    header = parse_header(_raw(make_instance(seed=n)))
    return Pending("a", header, f"a/{n}.dcm", 10, "0" * 64, "routine")


def test_each_error_comes_back_as_the_class_of_its_status(pipe: tuple[Any, Any]) -> None:
    ours, theirs = pipe
    errors = [
        DatasetError("modality_not_allowed", "CT is not allowed"),
        StorageError("database is full"),
        RuntimeError("UNIQUE constraint failed: PATIENT-NAME-IN-A-VALUE"),
        None,
    ]

    def index(batch: list[Pending]) -> None:
        for entry, error in zip(batch, errors, strict=True):
            entry.error = error
            entry.outcome = IngestOutcome.STORED if error is None else None
            entry.done = True

    serve_index(ours, index, threading.Event(), "receiver-1")
    batch = [_entry(n) for n in range(4)]
    IndexClient(theirs)(batch)
    assert all(entry.done for entry in batch)
    dataset, storage, other, ok = (entry.error for entry in batch)
    assert isinstance(dataset, DatasetError) and dataset.reason == "modality_not_allowed"
    assert status_for(dataset) == status_for(errors[0])  # type: ignore[arg-type]
    assert isinstance(storage, StorageError) and status_for(storage) == OUT_OF_RESOURCES
    # An unexpected error crosses as its type only: no value from its text leaves the gateway.
    assert isinstance(other, IndexFailure) and "PATIENT" not in str(other)
    assert "RuntimeError" in str(other)
    assert ok is None and batch[3].outcome == IngestOutcome.STORED


def test_an_index_that_raises_fails_the_batch_and_keeps_serving(pipe: tuple[Any, Any]) -> None:
    ours, theirs = pipe
    calls: list[int] = []

    def index(batch: list[Pending]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise StorageError("the index is unreachable")
        for entry in batch:
            entry.outcome, entry.done = IngestOutcome.STORED, True

    serve_index(ours, index, threading.Event(), "receiver-1")
    first, second = [_entry(1), _entry(2)], [_entry(3)]
    IndexClient(theirs)(first)
    assert all(isinstance(e.error, StorageError) and e.done for e in first)
    IndexClient(theirs)(second)
    assert second[0].outcome == IngestOutcome.STORED and second[0].error is None


def test_a_gateway_that_is_gone_is_a_storage_error_for_every_entry(
    pipe: tuple[Any, Any],
) -> None:
    ours, theirs = pipe
    ours.close()
    batch = [_entry(1), _entry(2)]
    IndexClient(theirs)(batch)
    assert all(isinstance(e.error, StorageError) and e.done for e in batch)
    assert "cannot be reached" in str(batch[0].error)


def test_an_ingestor_needs_a_database_or_an_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="database"):
        Ingestor(None, DurableStore(tmp_path))

"""The edge's receive path indexes instances in short transactions with the study and series
ids cached (dicom_io/ingest.py): what it writes must be what the ORM path wrote, a cached id
whose row went away must not lose an instance, and instances of several associations queued
during one commit share the next (group commit) with each answer still its own."""

from __future__ import annotations

import copy
import threading
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import delete, event, select

from dicom_io.ingest import Ingestor, IngestOutcome
from dicom_io.store import DurableStore
from radbridge.agreements import Agreement, load_agreements
from radbridge.db import Database
from radbridge.db.tables import InstanceRow, SeriesRow, StudyRow
from radbridge.lifecycle import EdgeStudyState
from tests.conftest import REPO, make_instance

AGREEMENT = "demo-hospital-to-center"


def _raw(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _agreement() -> Agreement:
    agreement = load_agreements(REPO / "radbridge/defaults/agreements.yaml").get(AGREEMENT)
    assert agreement is not None
    return agreement


def _study(db: Database, uid: str) -> StudyRow:
    with db.session() as s:
        return s.scalars(select(StudyRow).where(StudyRow.study_uid == uid)).one()


def _instances(db: Database) -> list[InstanceRow]:
    with db.session() as s:
        return list(s.scalars(select(InstanceRow).order_by(InstanceRow.id)))


def test_a_series_is_indexed_once_and_counted_per_instance(
    edge_db: Database, tmp_path: Path
) -> None:
    ingestor = Ingestor(edge_db, DurableStore(tmp_path))
    first = make_instance()
    first.NumberOfStudyRelatedInstances = 3
    outcomes = [ingestor.accept(_agreement(), _raw(first))[0]]
    for seed in (1, 2):
        ds = make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=seed)
        outcomes.append(ingestor.accept(_agreement(), _raw(ds))[0])
    assert outcomes == [IngestOutcome.STORED] * 3
    study = _study(edge_db, str(first.StudyInstanceUID))
    assert study.instance_count == 3
    assert study.expected_instances == 3  # a later instance without it keeps the stated count
    assert study.state == EdgeStudyState.RECEIVING
    assert study.first_received_at <= study.last_received_at
    rows = _instances(edge_db)
    assert len({r.series_id for r in rows}) == 1
    for row in rows:
        assert (tmp_path / row.path).is_file() and row.version == 1 and row.size > 0


def test_a_resend_is_a_duplicate_and_new_bytes_a_new_version(
    edge_db: Database, tmp_path: Path
) -> None:
    ingestor = Ingestor(edge_db, DurableStore(tmp_path))
    ds = make_instance()
    assert ingestor.accept(_agreement(), _raw(ds))[0] == IngestOutcome.STORED
    assert ingestor.accept(_agreement(), _raw(ds))[0] == IngestOutcome.DUPLICATE
    ds.StudyDescription = "CHEST PA corrected"
    assert ingestor.accept(_agreement(), _raw(ds))[0] == IngestOutcome.NEW_VERSION
    (row,) = _instances(edge_db)
    assert row.version == 2
    assert len(list(tmp_path.rglob("*.dcm"))) == 2  # the earlier file is kept beside the new
    assert _study(edge_db, str(ds.StudyInstanceUID)).instance_count == 1


def test_a_blocked_study_stays_blocked_and_a_forwarded_one_reopens(
    edge_db: Database, tmp_path: Path
) -> None:
    ingestor = Ingestor(edge_db, DurableStore(tmp_path))
    blocked, forwarded = make_instance(), make_instance(seed=5)
    for ds in (blocked, forwarded):
        ingestor.accept(_agreement(), _raw(ds))
    with edge_db.session() as s:
        for ds, state in ((blocked, EdgeStudyState.BLOCKED), (forwarded, EdgeStudyState.FORWARDED)):
            row = s.scalars(select(StudyRow).where(StudyRow.study_uid == ds.StudyInstanceUID)).one()
            row.state = state
    for ds, seed in ((blocked, 6), (forwarded, 7)):
        late = make_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, seed=seed)
        ingestor.accept(_agreement(), _raw(late))
    assert _study(edge_db, str(blocked.StudyInstanceUID)).state == EdgeStudyState.BLOCKED
    assert _study(edge_db, str(forwarded.StudyInstanceUID)).state == EdgeStudyState.RECEIVING


def _purge(db: Database, study_uid: str) -> None:
    """Delete a study's rows behind the receive path's cache (as a purge does)."""
    with db.session() as s:
        study_id = s.scalars(select(StudyRow.id).where(StudyRow.study_uid == study_uid)).one()
        series_ids = select(SeriesRow.id).where(SeriesRow.study_id == study_id)
        s.execute(delete(InstanceRow).where(InstanceRow.series_id.in_(series_ids)))
        s.execute(delete(SeriesRow).where(SeriesRow.study_id == study_id))
        s.execute(delete(StudyRow).where(StudyRow.id == study_id))


def test_a_cached_study_whose_rows_went_away_is_indexed_again(
    edge_db: Database, tmp_path: Path
) -> None:
    ingestor = Ingestor(edge_db, DurableStore(tmp_path))
    first = make_instance()
    ingestor.accept(_agreement(), _raw(first))
    _purge(edge_db, str(first.StudyInstanceUID))
    late = make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=9)
    assert ingestor.accept(_agreement(), _raw(late))[0] == IngestOutcome.STORED
    assert _study(edge_db, str(first.StudyInstanceUID)).instance_count == 1
    (row,) = _instances(edge_db)
    assert row.sop_instance_uid == late.SOPInstanceUID


def test_an_id_reused_by_another_study_never_takes_a_late_instance(
    edge_db: Database, tmp_path: Path
) -> None:
    ingestor = Ingestor(edge_db, DurableStore(tmp_path))
    a = make_instance()
    ingestor.accept(_agreement(), _raw(a))
    a_id = _study(edge_db, str(a.StudyInstanceUID)).id
    _purge(edge_db, str(a.StudyInstanceUID))
    # Another process's receive path (its own cache) indexes study B, which on SQLite takes
    # A's old ids; this receive path still has A's ids cached.
    b = make_instance(seed=3)
    Ingestor(edge_db, DurableStore(tmp_path)).accept(_agreement(), _raw(b))
    late_a = make_instance(a.StudyInstanceUID, a.SeriesInstanceUID, seed=4)
    ingestor.accept(_agreement(), _raw(late_a))
    study_a, study_b = (
        _study(edge_db, str(a.StudyInstanceUID)),
        _study(edge_db, str(b.StudyInstanceUID)),
    )
    assert study_a.instance_count == 1 and study_b.instance_count == 1
    assert study_a.id != study_b.id
    if edge_db.engine.dialect.name == "sqlite":
        assert study_b.id == a_id  # the reuse this test is about did happen
    with edge_db.session() as s:
        uids = {
            str(r.sop_instance_uid): str(series_uid)
            for r, series_uid in s.execute(
                select(InstanceRow, SeriesRow.series_uid).join(SeriesRow)
            )
        }
    assert uids == {
        str(late_a.SOPInstanceUID): str(a.SeriesInstanceUID),
        str(b.SOPInstanceUID): str(b.SeriesInstanceUID),
    }


def _queued_together(ingestor: Ingestor, datasets: list[Dataset]) -> list[object]:
    """Accept ``datasets`` on one thread each while the index lock is held, so that each one's
    file is written and queued before any is indexed; then let them go. Returns each thread's
    outcome or exception, in order."""
    answers: list[object] = [None] * len(datasets)

    def accept(i: int, ds: Dataset) -> None:
        try:
            answers[i] = ingestor.accept(_agreement(), _raw(ds))[0]
        except Exception as exc:
            answers[i] = exc

    threads = [threading.Thread(target=accept, args=(i, ds)) for i, ds in enumerate(datasets)]
    with ingestor._lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(ingestor._queue) < len(datasets):
            assert time.monotonic() < deadline, "instances were not queued"
            time.sleep(0.01)
    for t in threads:
        t.join(30)
    return answers


def test_instances_queued_during_a_commit_share_the_next_one(
    edge_db: Database, tmp_path: Path
) -> None:
    ingestor = Ingestor(edge_db, DurableStore(tmp_path))
    woken: list[int] = []
    ingestor.on_stored = lambda: woken.append(1)
    first = make_instance()
    same_series = [
        make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=s) for s in (1, 2)
    ]
    corrected = copy.deepcopy(same_series[1])  # its SOP Instance UID, other bytes
    corrected.StudyDescription = "corrected"
    other_study = make_instance(seed=8)
    commits: list[int] = []
    event.listen(edge_db.engine, "commit", lambda conn: commits.append(1))
    answers = _queued_together(ingestor, [first, *same_series, first, corrected, other_study])
    assert len(commits) == 1  # six instances, two studies, one transaction
    assert sorted(map(str, answers)) == sorted(
        map(
            str,
            [IngestOutcome.STORED] * 4 + [IngestOutcome.DUPLICATE, IngestOutcome.NEW_VERSION],
        )
    )
    assert woken  # a new series woke the forwarder
    assert _study(edge_db, str(first.StudyInstanceUID)).instance_count == 3
    assert _study(edge_db, str(other_study.StudyInstanceUID)).instance_count == 1
    rows = _instances(edge_db)
    assert len(rows) == 4 and {r.version for r in rows} == {1, 2}
    # The ids found in the shared transaction are cached: a late instance only adds its row.
    late = make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=3)
    woken.clear()
    commits.clear()
    assert ingestor.accept(_agreement(), _raw(late))[0] == IngestOutcome.STORED
    assert not woken and len(commits) == 1


def test_one_bad_instance_in_a_shared_commit_fails_alone(
    edge_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingestor = Ingestor(edge_db, DurableStore(tmp_path))
    good = [make_instance(seed=s) for s in (1, 2, 3)]
    bad = make_instance(good[0].StudyInstanceUID, good[0].SeriesInstanceUID, seed=4)
    rows = ingestor._rows

    def failing_rows(conn, entry, new):  # type: ignore[no-untyped-def]
        if entry.header.sop_instance_uid == bad.SOPInstanceUID:
            raise RuntimeError("the index refused this one")
        return rows(conn, entry, new)

    monkeypatch.setattr(ingestor, "_rows", failing_rows)
    answers = _queued_together(ingestor, [*good, bad])
    assert answers[:3] == [IngestOutcome.STORED] * 3
    assert isinstance(answers[3], RuntimeError)  # its own association answers the failure
    assert {str(r.sop_instance_uid) for r in _instances(edge_db)} == {
        str(ds.SOPInstanceUID) for ds in good
    }
    assert _study(edge_db, str(good[0].StudyInstanceUID)).instance_count == 1

"""Retention at the center (serving/retention.py) on SQLite and PostgreSQL with a real store:
images go after images_hours, the rest after reports_hours, counted from the final report
leaving for the hospital; nothing else goes; each purge is audited, finishes after a crash,
and is never done twice."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicom_io.store import DurableStore
from radbridge.agreements import AgreementSet, Retention, load_agreements
from radbridge.audit import AuditTrail, verify
from radbridge.db import Database
from radbridge.db.agreements import sync_agreements
from radbridge.db.tables import (
    AuditRow,
    InstanceRow,
    JobRow,
    ReadRow,
    StudyRow,
    utcnow,
)
from radbridge.errors import PolicyError
from radbridge.lifecycle import CenterStudyState
from serving import retention
from serving.intake import receive_instances
from tests.conftest import REPO
from tests.test_intake_jobs import AGREEMENT, _deid_study
from tests.test_review import _study


@pytest.fixture
def center(center_db: Database, tmp_path: Path):  # type: ignore[no-untyped-def]
    base = load_agreements(REPO / "radbridge/defaults/agreements.yaml")
    demo = base.agreements[0].model_copy(
        update={"retention": Retention(images_hours=24, reports_hours=72)}
    )
    agreements = AgreementSet(agreements=[demo])
    sync_agreements(center_db, agreements)
    store = DurableStore(tmp_path / "store")
    return center_db, store, AuditTrail(center_db, "center"), agreements


def _sent(db: Database, study_id: int, hours_ago: float) -> None:
    """The study's final report left for the hospital ``hours_ago``."""
    with db.session() as s:
        s.add(ReadRow(study_id=study_id, sent_at=utcnow() - timedelta(hours=hours_ago)))


def _files(store: DurableStore) -> set[Path]:
    return {p for p in store.root.rglob("*.dcm")}


def _count(db: Database, table: type) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def test_nothing_is_due_before_the_read_went_home_or_before_its_time(center) -> None:  # type: ignore[no-untyped-def]
    db, store, _, agreements = center
    unread = _study(db, store)
    recent = _study(db, store)
    _sent(db, recent, hours_ago=23)
    assert retention.due(db, agreements) == []
    assert unread and len(_files(store)) == 2 * (2 + 1)  # 2 images + 1 SR per study


def test_images_then_the_study_go_and_each_purge_is_audited(center) -> None:  # type: ignore[no-untyped-def]
    db, store, audit, agreements = center
    kept = _study(db, store)
    kept_files = _files(store)  # its two images and its SR
    old = _study(db, store)
    _sent(db, old, hours_ago=25)
    [item] = retention.run(db, store, audit, agreements, dry_run=True)
    assert (item.study_id, item.what, item.files) == (old, "images", 2)
    assert len(_files(store)) == 6  # a dry run deletes nothing
    assert retention.run(db, store, audit, agreements) == [item]
    with db.session() as s:
        study = s.get(StudyRow, old)
        assert study is not None and study.state == CenterStudyState.IMAGES_PURGED
        assert study.instance_count == 0
    assert len(_files(store)) == 4  # the old study's SR is still there
    assert retention.due(db, agreements) == []  # images gone once, not again

    later = utcnow() + timedelta(hours=48)  # 73 h after the report left
    [item] = retention.run(db, store, audit, agreements, now=later)
    assert (item.study_id, item.what, item.files) == (old, "study", 1)
    with db.session() as s:
        assert s.get(StudyRow, old) is None
        assert s.get(StudyRow, kept) is not None
        deleted = s.scalars(
            select(AuditRow).where(AuditRow.event_id == "110105").order_by(AuditRow.id)
        ).all()
    assert [json.loads(d.details)["what"] for d in deleted] == ["images", "study"]
    assert all(d.study_uid == item.study_uid for d in deleted)
    assert _files(store) == kept_files  # the other study's files, exactly
    assert not list((store.root / AGREEMENT / item.study_uid).glob("*"))  # no empty folders
    assert verify(db)[1] is None  # the chain, with the deletions in it, is intact


def test_an_unfinished_purge_is_finished_and_a_taken_one_is_not_done_twice(center) -> None:  # type: ignore[no-untyped-def]
    db, store, audit, agreements = center
    study_id = _study(db, store)
    _sent(db, study_id, hours_ago=100)
    [item] = retention.due(db, agreements)
    assert item.what == "study"
    with db.session() as s:  # a purge that marked the study, deleted a file, then crashed
        study = s.get(StudyRow, study_id)
        assert study is not None
        study.state = CenterStudyState.PURGING
        first = s.scalars(select(InstanceRow.path)).first()
    assert first is not None
    store.delete(first)
    assert not retention.purge(db, store, audit, item)  # taken (by the crashed worker)
    [again] = retention.due(db, agreements)
    assert again.reason == "unfinished purge"
    assert retention.purge(db, store, audit, again)
    assert _count(db, StudyRow) == 0 and _files(store) == set()


def test_the_edge_may_ask_for_a_purge_and_a_purged_study_takes_no_instance(center) -> None:  # type: ignore[no-untyped-def]
    db, store, audit, _ = center
    parts = _deid_study(2)
    uid = receive_instances(db, store, AGREEMENT, parts).stored[0].study_uid
    assert retention.disk_usage(db)[AGREEMENT] == sum(len(p) for p in parts)
    done = retention.purge_now(db, store, audit, AGREEMENT, uid, reason="consent-withdrawn")
    assert done is not None and done.files == 2
    assert retention.purge_now(db, store, audit, AGREEMENT, uid) is None  # idempotent
    assert retention.disk_usage(db) == {}
    # Images purged but the study kept: a re-post is refused, not stored again.
    again = receive_instances(db, store, AGREEMENT, parts[:1])
    assert len(again.stored) == 1  # the full purge left no row: a re-send is a new study
    with db.session() as s:
        study = s.scalars(select(StudyRow)).one()
        study.state = CenterStudyState.IMAGES_PURGED
    refused = receive_instances(db, store, AGREEMENT, parts[1:])
    assert refused.stored == [] and "purged" in refused.failed[0][3]


def test_a_study_never_completed_goes_whole_after_incomplete_hours(center) -> None:  # type: ignore[no-untyped-def]
    """Instances that came during a quiet period whose study the edge never completed (it
    stopped, blocked or held it): no job, no read. After ``incomplete_hours`` from its last
    instance the study goes whole and is audited; a completed study is not touched by this."""
    db, store, audit, agreements = center
    hours = agreements.agreements[0].retention.incomplete_hours
    parts = _deid_study(2)
    uid = receive_instances(db, store, AGREEMENT, parts).stored[0].study_uid
    completed = _study(db, store)  # has its job (and an SR), no read yet
    with db.session() as s:
        for study in s.scalars(select(StudyRow)).all():
            study.last_received_at = utcnow() - timedelta(hours=hours + 1)
    assert retention.due(db, agreements, utcnow() - timedelta(hours=2)) == []  # not yet
    [item] = retention.run(db, store, audit, agreements)
    assert (item.study_uid, item.what, item.reason, item.files) == (
        uid,
        "study",
        "never completed",
        2,
    )
    with db.session() as s:
        assert [st.id for st in s.scalars(select(StudyRow)).all()] == [completed]
    assert len(_files(store)) == 2 + 1  # the completed study's images and SR
    with db.session() as s:
        (deleted,) = s.scalars(select(AuditRow).where(AuditRow.event_id == "110105")).all()
    record = json.loads(deleted.details)
    assert record["reason"] == "never completed" and record["what"] == "study"
    assert deleted.study_uid == uid
    assert retention.due(db, agreements) == []


def test_a_purge_request_waits_for_the_studys_running_job(center) -> None:  # type: ignore[no-untyped-def]
    db, store, audit, _ = center
    study_id = _study(db, store)
    with db.session() as s:
        study = s.get(StudyRow, study_id)
        assert study is not None
        uid = study.study_uid
        s.add(JobRow(study_id=study_id, state="running", priority="routine", version=2))
    with pytest.raises(PolicyError, match="running"):
        retention.purge_now(db, store, audit, AGREEMENT, uid)
    assert _count(db, StudyRow) == 1 and len(_files(store)) == 3  # nothing touched


def test_retention_must_keep_reports_at_least_as_long_as_images() -> None:
    with pytest.raises(ValueError, match="reports_hours"):
        Retention(images_hours=48, reports_hours=24)


def test_the_purge_command_lists_then_deletes_what_is_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`radbridge center purge --dry-run` and `radbridge center purge` on the local center's
    database and store (the demo agreement's default retention: 720 h / 2160 h)."""
    from typer.testing import CliRunner

    from radbridge.cli import app
    from radbridge.db.migrate import upgrade
    from radbridge.settings import load_settings

    monkeypatch.setenv("RADBRIDGE_DATA_DIR", str(tmp_path / "data"))
    settings = load_settings()
    upgrade(settings.center_db_url, "center")
    db = Database(settings.center_db_url)
    sync_agreements(db, load_agreements(settings.agreements_file))
    store = DurableStore(settings.center_store)
    try:
        due_study = _study(db, store)
        _sent(db, due_study, hours_ago=2161)
        _study(db, store)  # not read yet: kept
        listed = CliRunner().invoke(app, ["center", "purge", "--dry-run"], terminal_width=200)
        assert listed.exit_code == 0, listed.output
        assert "dry run" in listed.output and "retention" in listed.output
        assert len(_files(store)) == 6
        purged = CliRunner().invoke(app, ["center", "purge"], terminal_width=200)
        assert purged.exit_code == 0, purged.output
        assert len(_files(store)) == 3 and _count(db, StudyRow) == 1
    finally:
        db.dispose()

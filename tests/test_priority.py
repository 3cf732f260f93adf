"""A study's priority: from the hospital's Requested Procedure Priority, else the agreement's
default; carried by the edge to the center, capped there, and kept on the center's study (the
reading room's worklist order and SLA clock)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from dicom_io.header import parse_header
from dicom_io.ingest import Ingestor
from dicom_io.store import DurableStore
from radbridge.agreements import Priority, load_agreements
from radbridge.contract import CompleteStudy
from radbridge.db import Database
from radbridge.db.tables import StudyRow
from serving import jobs
from serving.intake import receive_instances
from tests.conftest import REPO, make_instance
from tests.test_intake_jobs import _deid_study

AGREEMENT = "demo-hospital-to-center"


def _raw(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _with_priority(ds: Dataset, value: str | None, nested: bool = False) -> Dataset:
    if value is None:
        return ds
    if nested:
        item = Dataset()
        item.RequestedProcedurePriority = value
        ds.RequestAttributesSequence = [item]
    else:
        ds.RequestedProcedurePriority = value
    return ds


@pytest.mark.parametrize(
    ("value", "nested", "expected"),
    [
        ("STAT", False, "stat"),
        ("HIGH", True, "urgent"),
        ("ROUTINE", False, "routine"),
        ("LOW", True, "routine"),
        ("whenever", False, None),
        (None, False, None),
    ],
)
def test_header_maps_requested_procedure_priority(
    value: str | None, nested: bool, expected: str | None
) -> None:
    header = parse_header(_raw(_with_priority(make_instance(), value, nested)))
    assert header.priority == expected


def test_the_highest_stated_priority_wins() -> None:
    ds = _with_priority(make_instance(), "ROUTINE")
    item = Dataset()
    item.RequestedProcedurePriority = "STAT"
    ds.RequestAttributesSequence = [item]
    assert parse_header(_raw(ds)).priority == "stat"


def test_edge_study_takes_the_stated_priority_or_the_default_and_a_later_stat_raises_it(
    edge_db: Database, tmp_path: Path
) -> None:
    agreements = load_agreements(REPO / "radbridge/defaults/agreements.yaml")
    agreement = agreements.get(AGREEMENT)
    assert agreement is not None
    urgent_default = agreement.model_copy(update={"default_priority": Priority.URGENT})
    ingestor = Ingestor(edge_db, DurableStore(tmp_path))
    first = make_instance()
    ingestor.accept(urgent_default, _raw(first))
    second = make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=2)
    routine = make_instance(seed=3)

    def priority_of(uid: str) -> str:
        with edge_db.session() as s:
            return next(r.priority for r in s.query(StudyRow).all() if r.study_uid == uid)

    assert priority_of(str(first.StudyInstanceUID)) == "urgent"  # nothing stated: the default
    ingestor.accept(urgent_default, _raw(_with_priority(second, "STAT")))
    assert priority_of(str(first.StudyInstanceUID)) == "stat"  # raised by a later instance
    third = make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=4)
    ingestor.accept(urgent_default, _raw(_with_priority(third, "LOW")))
    assert priority_of(str(first.StudyInstanceUID)) == "stat"  # never lowered
    ingestor.accept(agreement, _raw(_with_priority(routine, "ROUTINE")))
    assert priority_of(str(routine.StudyInstanceUID)) == "routine"


def test_center_study_keeps_the_completed_priority(center_db: Database, tmp_path: Path) -> None:
    parts = _deid_study(2)
    outcome = receive_instances(center_db, DurableStore(tmp_path), AGREEMENT, parts)
    uid = outcome.stored[0].study_uid
    req = CompleteStudy(agreement_id=AGREEMENT, priority=Priority.STAT, instance_count=2)
    job, _ = jobs.complete_study(center_db, uid, req)
    with center_db.session() as s:
        study = next(r for r in s.query(StudyRow).all() if r.study_uid == uid)
        assert (study.priority, job.priority) == ("stat", "stat")

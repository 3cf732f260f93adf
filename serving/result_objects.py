"""DICOM result objects of finished jobs (AIR: TID 1500 SR, SEG), kept for the edge to pull.

A job's per-instance findings become one classification SR per model; the objects are written
to the center store and indexed in ``result_objects``, where the edge's deliverer lists them
per agreement (``after`` a cursor) and downloads them. Everything here is pseudonymous: the
edge re-identifies. A later job of the same study (a late instance re-opened it) produces the
next version, which references its predecessor.
"""

from __future__ import annotations

from collections import defaultdict

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from dicom_io.ai_notice import Unread, ai_not_performed_sr
from dicom_io.result_builders import (
    AlgorithmInfo,
    ImageFinding,
    Nodule,
    classification_sr,
    nodule_seg_and_sr,
)
from dicom_io.result_store import Sign, record_objects, save_object
from dicom_io.sr_parts import Coded
from dicom_io.store import DurableStore
from models.manifest import ModelManifest
from radbridge.contract import ResultObject
from radbridge.db.engine import Database
from radbridge.db.tables import (
    InstanceRow,
    JobRow,
    ReadRow,
    ResultObjectRow,
    ResultRow,
    SeriesRow,
    StudyRow,
    utcnow,
)
from radbridge.errors import DatasetError, NoModelError, NotFoundError
from radbridge.lifecycle import JobState
from serving.segmentation import SeriesSegmentation

__all__ = [
    "MANUFACTURER",
    "Sign",
    "build_for_job",
    "build_notice",
    "discard_unlisted",
    "list_objects",
    "object_path",
    "save_segmentation_objects",
    "unread_reasons",
]

MANUFACTURER = "radbridge"
_LOCAL_SCHEME = "99RADBRIDGE"  # private coding scheme for findings without SNOMED/RadLex codes


def build_for_job(
    db: Database,
    store: DurableStore,
    job_id: int,
    manifests: dict[str, ModelManifest],
    sign: Sign | None = None,
) -> list[int]:
    """Write the classification SRs of a job's run; returns their row ids.

    Called once per run; a re-run starts by dropping the previous run's objects
    (``jobs.start_job``), and only finished jobs' objects are ever listed.
    """
    with db.session() as s:
        job, study = _job_and_study(s, job_id)
        rows = s.execute(
            select(ResultRow, InstanceRow)
            .join(InstanceRow, ResultRow.instance_id == InstanceRow.id)
            .where(ResultRow.job_id == job_id)
            .order_by(ResultRow.id)
        ).all()
        previous_path = _previous_sr(s, study, job.version)
        agreement_id, study_uid, version = study.agreement_id, study.study_uid, job.version
    by_model: dict[tuple[str, str], list[tuple[ResultRow, InstanceRow]]] = defaultdict(list)
    for r, inst in rows:
        by_model[(r.model_name, r.model_version)].append((r, inst))
    prior = pydicom.dcmread(store.path(previous_path)) if previous_path else None
    made: list[ResultObjectRow] = []
    for (name, mversion), pairs in sorted(by_model.items()):
        manifest = manifests.get(f"{name}:{mversion}")
        if manifest is None or manifest.task != "multilabel_classification":
            continue
        sources = [
            pydicom.dcmread(store.path(inst.path), stop_before_pixels=True) for _, inst in pairs
        ]
        findings = [
            _finding(inst.sop_instance_uid, f) for r, inst in pairs for f in r.findings["findings"]
        ]
        algo = _algorithm(manifest)
        sr = classification_sr(sources, findings, algo, version=version, previous=prior)
        made.append(save_object(store, sr, "sr", agreement_id, study_uid, version, job_id))
    return record_objects(db, made, sign)


def discard_unlisted(db: Database, store: DurableStore, job_id: int) -> int:
    """Delete what an interrupted run of ``job_id`` wrote (rows, then files: a crash between
    leaves a file nobody points at, never a row without its file); returns the files deleted.
    Nothing of it was ever listed: only finished jobs' objects are."""
    with db.session() as s:
        rows = s.scalars(select(ResultObjectRow).where(ResultObjectRow.job_id == job_id)).all()
        paths = [r.path for r in rows]
        for r in rows:
            s.delete(r)
    for path in paths:
        store.delete(path)
    return len(paths)


def unread_reasons(errors: list[BaseException], modality: str) -> list[Unread]:
    """What a failed job tells the hospital: a closed set of reasons, never an error's text."""
    out: list[Unread] = []
    for exc in errors:
        if isinstance(exc, NoModelError):
            unread = Unread("no_model", exc.modality)
        elif isinstance(exc, DatasetError):
            unread = Unread("unreadable", modality)
        else:
            unread = Unread("failed", modality)
        if unread not in out:
            out.append(unread)
    return out


def build_notice(
    db: Database,
    store: DurableStore,
    job_id: int,
    unread: list[Unread],
    languages: list[str],
    center_name: str,
    sign: Sign | None = None,
) -> list[int]:
    """Write the "AI analysis not performed" SR of a failed job's run; returns its row id.

    Listed to the edge although the job failed (``list_objects``); a re-run of the study drops
    it with the rest of the previous run's objects (``jobs.start_job``).
    """
    with db.session() as s:
        job, study = _job_and_study(s, job_id)
        paths = s.scalars(
            select(InstanceRow.path)
            .join(SeriesRow, InstanceRow.series_id == SeriesRow.id)
            .where(SeriesRow.study_id == study.id)
            .order_by(InstanceRow.id)
        ).all()
        agreement_id, study_uid, version = study.agreement_id, study.study_uid, job.version
    sources = [pydicom.dcmread(store.path(p), stop_before_pixels=True) for p in paths]
    sr = ai_not_performed_sr(
        sources,
        unread,
        languages,
        device_uid=generate_uid(entropy_srcs=["radbridge reading center", center_name]),
        version=version,
    )
    row = save_object(store, sr, "notice", agreement_id, study_uid, version, job_id)
    return record_objects(db, [row], sign)


def list_objects(db: Database, agreement_id: str, after: int, limit: int) -> list[ResultObject]:
    """The agreement's listable objects after ``after``, in id order, stopping before the
    first object of a job not finished yet: the edge's cursor is the highest id it was given,
    so an object listed past one still being finished would make the edge skip that one for
    ever (two jobs finishing in the other order than their objects were written)."""
    unfinished = (
        select(func.min(ResultObjectRow.id))
        .join(JobRow, ResultObjectRow.job_id == JobRow.id)
        .where(
            ResultObjectRow.agreement_id == agreement_id,
            ResultObjectRow.id > after,
            JobRow.state.in_((JobState.QUEUED, JobState.RUNNING)),
            ResultObjectRow.kind.not_in(("report", "notice")),
        )
        .scalar_subquery()
    )
    with db.session() as s:
        rows = s.scalars(
            select(ResultObjectRow)
            .join(JobRow, ResultObjectRow.job_id == JobRow.id)
            .where(
                ResultObjectRow.agreement_id == agreement_id,
                ResultObjectRow.id > after,
                or_(unfinished.is_(None), ResultObjectRow.id < unfinished),
                # never half a job's objects; a failed job's notice, and a signed report
                # (whatever the AI did), stand on their own
                or_(
                    JobRow.state == JobState.DONE,
                    ResultObjectRow.kind.in_(("report", "notice")),
                ),
            )
            .order_by(ResultObjectRow.id)
            .limit(limit)
        ).all()
        return [
            ResultObject(
                id=r.id,
                study_uid=r.study_uid,
                version=r.version,
                kind=r.kind,
                sop_class_uid=r.sop_class_uid,
                sop_instance_uid=r.sop_instance_uid,
                series_instance_uid=r.series_instance_uid,
                sha256=r.sha256,
                size=r.size,
                created_at=r.created_at,
                signature=r.signature,
            )
            for r in rows
        ]


def object_path(db: Database, object_id: int, agreements: frozenset[str] | None = None) -> str:
    """The stored file of a result object; another tenant's answers as a missing one."""
    with db.session() as s:
        row = s.get(ResultObjectRow, object_id)
        if row is None or (agreements is not None and row.agreement_id not in agreements):
            raise NotFoundError("unknown result object")
        if row.kind == "report":  # the read's "sent" clock: the edge has taken the report
            study_id = select(JobRow.study_id).where(JobRow.id == row.job_id).scalar_subquery()
            s.execute(
                update(ReadRow)
                .where(
                    ReadRow.study_id == study_id,
                    ReadRow.final_at.is_not(None),
                    ReadRow.sent_at.is_(None),
                )
                .values(sent_at=utcnow())
            )
        return row.path


def _job_and_study(s: Session, job_id: int) -> tuple[JobRow, StudyRow]:
    job = s.get(JobRow, job_id)
    if job is None:
        raise NotFoundError("unknown job")
    study = s.get(StudyRow, job.study_id)
    assert study is not None
    return job, study


def _algorithm(manifest: ModelManifest) -> AlgorithmInfo:
    return AlgorithmInfo(
        name=manifest.name,
        version=manifest.version,
        manufacturer=MANUFACTURER,
        model_sha256=manifest.sha256,
        intended_use=manifest.intended_use,
    )


def _previous_sr(s: Session, study: StudyRow, version: int) -> str | None:
    """Store path of the study's latest SR of an earlier version (the new one's predecessor)."""
    previous = s.scalars(
        select(ResultObjectRow)
        .where(
            ResultObjectRow.agreement_id == study.agreement_id,
            ResultObjectRow.study_uid == study.study_uid,
            ResultObjectRow.kind == "sr",
            ResultObjectRow.version < version,
        )
        .order_by(ResultObjectRow.version.desc(), ResultObjectRow.id.desc())
    ).first()
    return previous.path if previous else None


def _finding(sop_instance_uid: str, f: dict[str, object]) -> ImageFinding:
    codes = f.get("codes") or {}
    display = dict(f.get("display") or {})  # type: ignore[call-overload]
    assert isinstance(codes, dict)
    meaning = display.get("en") or str(f["label"])
    if codes.get("SCT"):
        coded = Coded(str(codes["SCT"]), "SCT", meaning)
    elif codes.get("RADLEX"):
        coded = Coded(str(codes["RADLEX"]), "RADLEX", meaning)
    else:
        coded = Coded(str(f["label"]), _LOCAL_SCHEME, meaning)
    return ImageFinding(
        sop_instance_uid=sop_instance_uid,
        finding=coded,
        probability=float(f["probability"]),  # type: ignore[arg-type]
        threshold=float(f["threshold"]),  # type: ignore[arg-type]
        present=bool(f["present"]),
        display=display,
    )


def save_segmentation_objects(
    db: Database,
    store: DurableStore,
    job_id: int,
    seg: SeriesSegmentation,
    manifest: ModelManifest,
    sign: Sign | None = None,
) -> list[int]:
    """Write the DICOM SEG and its TID 1500 SR of one segmented series (an SR alone, with
    the finding absent, when nothing was found)."""
    with db.session() as s:
        job = s.get(JobRow, job_id)
        if job is None:
            raise NotFoundError("unknown job")
        study = s.get(StudyRow, job.study_id)
        assert study is not None
        previous_path = _previous_sr(s, study, job.version)
        agreement_id, study_uid, version = study.agreement_id, study.study_uid, job.version
    prior = pydicom.dcmread(store.path(previous_path)) if previous_path else None
    algo = _algorithm(manifest)
    nodules = [
        Nodule(
            centre_mm=tuple(n.centre_mm),  # type: ignore[arg-type]
            diameter_mm=n.diameter_mm,
            volume_mm3=n.volume_mm3,
            segment_number=1,
        )
        for n in seg.nodules
    ]
    if nodules:
        seg_ds, sr_ds = nodule_seg_and_sr(
            seg.sources, seg.mask, nodules, algo, version=version, previous_sr=prior
        )
        made = [
            save_object(store, seg_ds, "seg", agreement_id, study_uid, version, job_id),
            save_object(store, sr_ds, "sr", agreement_id, study_uid, version, job_id),
        ]
    else:
        # Nothing to segment, but the hospital still gets the (negative) result: a TID 1500
        # SR with the finding evaluated as absent, referencing the middle slice of the series.
        label = manifest.labels[0]
        middle = seg.sources[len(seg.sources) // 2]
        absent = _finding(
            str(middle.SOPInstanceUID),
            {
                "label": label.key,
                "display": dict(label.display),
                "codes": label.codes,
                "probability": min(max(seg.max_probability, 0.0), 1.0),
                "threshold": label.threshold,
                "present": False,
            },
        )
        sr_ds = classification_sr([middle], [absent], algo, version=version, previous=prior)
        made = [save_object(store, sr_ds, "sr", agreement_id, study_uid, version, job_id)]
    return record_objects(db, made, sign)

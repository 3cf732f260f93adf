"""What the reading room shows about one study: series, AI findings and nodule markers, the
report as saved, the read's clocks, and the patient's prior studies under the same agreement."""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom
from sqlalchemy import select

from dicom_io.store import DurableStore
from radbridge.agreements import AgreementSet, Priority
from radbridge.db.engine import Database
from radbridge.db.tables import (
    InstanceRow,
    JobRow,
    ReadRow,
    ReportRow,
    ResultObjectRow,
    ResultRow,
    SeriesRow,
    StudyRow,
)
from review.readers import Reader
from review.reports import ai_findings
from review.worklist import study_for

__all__ = ["study_detail"]

_MAX_PRIORS = 20  # the most recent; each costs one header read per view


def study_detail(
    db: Database, store: DurableStore, study_id: int, reader: Reader, agreements: AgreementSet
) -> dict[str, Any]:
    with db.session() as s:
        study = study_for(s, study_id, reader, agreements)
        agreement = agreements.get(study.agreement_id)
        assert agreement is not None
        series = s.execute(
            select(SeriesRow.series_uid, SeriesRow.modality, SeriesRow.body_part, InstanceRow.path)
            .join(InstanceRow, InstanceRow.series_id == SeriesRow.id)
            .where(SeriesRow.study_id == study.id)
            .order_by(SeriesRow.id, InstanceRow.id)
        ).all()
        job = s.scalars(
            select(JobRow).where(JobRow.study_id == study.id).order_by(JobRow.id.desc())
        ).first()
        nodule_rows = (
            s.scalars(select(ResultRow.findings).where(ResultRow.job_id == job.id)).all()
            if job
            else []
        )
        intended = sorted({str(f.get("intended_use", "")) for f in nodule_rows if f})
        seg = (
            s.scalars(
                select(ResultObjectRow).where(
                    ResultObjectRow.job_id == job.id, ResultObjectRow.kind == "seg"
                )
            ).first()
            if job
            else None
        )
        read = s.scalar(select(ReadRow).where(ReadRow.study_id == study.id))
        versions = s.scalars(
            select(ReportRow).where(ReportRow.study_id == study.id).order_by(ReportRow.version)
        ).all()
        # Priors: the same patient's earlier studies under this agreement (one indexed query),
        # each with one image instance whose header gives its date and series. "Earlier" is
        # received in full before this one: the edge sends a large study's first requests
        # during its quiet period (forward_early), so a CT's first slices can reach the center
        # before a radiograph sent ahead of it.
        others = (
            s.execute(
                select(StudyRow.id, StudyRow.study_uid, StudyRow.last_received_at)
                .where(
                    StudyRow.agreement_id == study.agreement_id,
                    StudyRow.patient_key == study.patient_key,
                    StudyRow.id != study.id,
                    StudyRow.last_received_at < study.last_received_at,
                )
                .order_by(StudyRow.last_received_at.desc())
                .limit(_MAX_PRIORS)
            ).all()
            if study.patient_key
            else []
        )
        prior_images = {
            sid: (modality, path)
            for sid, modality, path in s.execute(
                select(SeriesRow.study_id, SeriesRow.modality, InstanceRow.path)
                .join(InstanceRow, InstanceRow.series_id == SeriesRow.id)
                .where(SeriesRow.study_id.in_([o[0] for o in others]))
                .order_by(SeriesRow.id.desc(), InstanceRow.id.desc())
            )
        }  # the last row per study wins: its first series' first instance
        received = (job.first_received_at if job else None) or study.first_received_at
        info = {
            "study_id": study.id,
            "study_uid": study.study_uid,
            "agreement_id": study.agreement_id,
            "hospital": agreement.hospital.name,
            "priority": study.priority,
            "modality": study.modality or (series[0][1] if series else None),
            "received_at": received.isoformat(),
            "sla_minutes": agreement.sla_minutes.get(Priority(study.priority), 1440),
            "report_languages": agreement.report_languages,
            "ai_state": job.state if job else None,
            "seg_sop_instance_uid": seg.sop_instance_uid if seg else None,
            "seg_series_instance_uid": seg.series_instance_uid if seg else None,
            "clocks": {
                k: (getattr(read, k).isoformat() if read and getattr(read, k) else None)
                for k in ("opened_at", "preliminary_at", "final_at", "sent_at")
            },
            "reports": [
                {
                    "version": r.version,
                    "status": r.status,
                    "content": r.content,
                    "signed_at": r.signed_at.isoformat() if r.signed_at else None,
                }
                for r in versions
            ],
            "intended_use": intended,
        }
    by_series: dict[str, dict[str, Any]] = {}
    for uid, modality, body_part, path in series:
        entry = by_series.setdefault(
            uid, {"series_uid": uid, "modality": modality, "body_part": body_part, "paths": []}
        )
        entry["paths"].append(path)
    nodules = [n for f in nodule_rows for n in (f or {}).get("nodules", [])]
    slices = _slices(store, by_series) if nodules else []  # each header read once
    markers = [m for m in (_marker(slices, n) for n in nodules) if m]
    priors = []
    for sid, uid, first in others:
        if sid not in prior_images:
            continue
        modality, path = prior_images[sid]
        ds = pydicom.dcmread(store.path(path), stop_before_pixels=True)
        priors.append(
            {
                "study_id": sid,
                "study_uid": uid,
                "modality": modality,
                "study_date": str(ds.get("StudyDate", "")),
                "series_uid": str(ds.SeriesInstanceUID),  # the one the viewer opens beside
                "received_at": first.isoformat(),
            }
        )
    info["series"] = [
        {k: v for k, v in e.items() if k != "paths"} | {"instances": len(e["paths"])}
        for e in by_series.values()
    ]
    info["markers"] = markers
    info["priors"] = priors
    info["ai_findings"] = (
        [f.__dict__ for f in ai_findings(db, study_id)] if info["ai_state"] else []
    )
    return info


def _slices(store: DurableStore, by_series: dict[str, dict[str, Any]]) -> list[tuple[str, Any]]:
    """(series UID, header) of every slice with a position and orientation."""
    out = []
    for uid, entry in by_series.items():
        for path in entry["paths"]:
            ds = pydicom.dcmread(store.path(path), stop_before_pixels=True)
            if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
                break
            out.append((uid, ds))
    return out


def _marker(slices: list[tuple[str, Any]], nodule: dict[str, Any]) -> dict[str, Any] | None:
    """A nodule's centre (patient mm) as the slice and pixel it falls on, for the viewer."""
    centre = np.asarray(nodule.get("centre_mm", []), dtype=float)
    if centre.shape != (3,):
        return None
    best: tuple[float, Any, str] | None = None
    for uid, ds in slices:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        distance = abs(float(np.dot(normal, centre - np.asarray(ds.ImagePositionPatient, float))))
        if best is None or distance < best[0]:
            best = (distance, ds, uid)
    if best is None:
        return None
    _, ds, uid = best
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    offset = centre - np.asarray(ds.ImagePositionPatient, dtype=float)
    row_mm, col_mm = (float(v) for v in ds.PixelSpacing)
    x = float(np.dot(offset, iop[:3])) / col_mm
    y = float(np.dot(offset, iop[3:])) / row_mm
    diameter = float(nodule.get("diameter_mm", 0.0))
    return {
        "series_uid": uid,
        "sopInstanceUID": str(ds.SOPInstanceUID),
        "x": round(x, 1),
        "y": round(y, 1),
        "radiusPx": round(max(diameter / 2 / col_mm, 3.0), 1),
        "label": f"{diameter:.1f} mm",
    }

"""Result objects on the center's disk and in its index, each signed for the edge.

Every DICOM object that goes back to a hospital (AI SR and SEG, the reader's report SR) is
written to the center's store under ``results/<agreement>/<study>/v<version>/`` and indexed in
``result_objects`` with the center's signature (:mod:`radbridge.signing`), where the edge lists
and downloads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from io import BytesIO

import pydicom
from sqlalchemy.orm import Session

from dicom_io.store import DurableStore
from radbridge.db.engine import Database
from radbridge.db.tables import ResultObjectRow

__all__ = ["Sign", "add_objects", "record_objects", "save_object"]

# Signs one result object row (radbridge.signing.ResultSigner.sign_row, bound by the caller).
Sign = Callable[[ResultObjectRow], str]


def save_object(
    store: DurableStore,
    ds: pydicom.Dataset,
    kind: str,
    agreement_id: str,
    study_uid: str,
    version: int,
    job_id: int,
) -> ResultObjectRow:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    sop = str(ds.SOPInstanceUID)
    stored = store.write(
        f"results/{agreement_id}/{study_uid}/v{version}/{sop}.dcm", data, sha256=digest
    )
    return ResultObjectRow(
        agreement_id=agreement_id,
        job_id=job_id,
        study_uid=study_uid,
        version=version,
        kind=kind,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=sop,
        series_instance_uid=str(ds.SeriesInstanceUID),
        path=stored.relpath,
        size=stored.size,
        sha256=digest,
    )


def record_objects(db: Database, made: list[ResultObjectRow], sign: Sign | None) -> list[int]:
    """Index the written objects, each with the center's signature (``sign``) when given."""
    with db.session() as s:
        return add_objects(s, made, sign)


def add_objects(s: Session, made: list[ResultObjectRow], sign: Sign | None) -> list[int]:
    """:func:`record_objects` inside the caller's transaction (so the objects appear together
    with whatever else that transaction commits, or not at all)."""
    for row in made:
        row.signature = sign(row) if sign is not None else None
    s.add_all(made)
    s.flush()
    return [m.id for m in made]

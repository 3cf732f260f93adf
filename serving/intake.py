"""The center's STOW-RS receive path: only de-identified instances are accepted and stored."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from dicom_io.header import InstanceHeader, parse_header
from dicom_io.store import DurableStore
from dicom_io.stow import store_response
from radbridge.db.engine import Database
from radbridge.db.index import find_instance, record_instance, series_for, study_for
from radbridge.errors import DatasetError, RadbridgeError
from radbridge.lifecycle import CenterStudyState

__all__ = ["StowOutcome", "patient_key", "receive_instances", "stow_response"]

# PS3.18 Table 10.5.3-1 failure reasons; 0x0111 Duplicate SOP Instance (PS3.7 C.4.2): other
# bytes under a SOP Instance UID the center already holds.
_FAILURE_REASON = {
    "not_deidentified": 0xC000,
    "unparseable": 0xC000,
    "missing_uid": 0xC000,
    "conflict": 0x0111,
}


@dataclass
class StowOutcome:
    stored: list[InstanceHeader] = field(default_factory=list)
    failed: list[tuple[str | None, str | None, int, str]] = field(default_factory=list)


_PURGED = frozenset(
    {
        CenterStudyState.PURGING_IMAGES,
        CenterStudyState.IMAGES_PURGED,
        CenterStudyState.PURGING,
    }
)


def patient_key(agreement_id: str, pseudonymous_patient_id: str) -> str:
    """The key the center files a study's patient under (its priors share it)."""
    return hashlib.sha256(f"{agreement_id}\0{pseudonymous_patient_id}".encode()).hexdigest()


def receive_instances(
    db: Database, store: DurableStore, agreement_id: str, parts: list[bytes]
) -> StowOutcome:
    outcome = StowOutcome()
    for part in parts:
        failed_uids: tuple[str | None, str | None] = (None, None)
        try:
            header = parse_header(part)
            failed_uids = (header.sop_class_uid, header.sop_instance_uid)
            if not header.identity_removed:
                raise DatasetError(
                    "not_deidentified",
                    "PatientIdentityRemoved is not YES: the center takes no identity",
                )
            _store(db, store, agreement_id, header, part)
            outcome.stored.append(header)
        except DatasetError as exc:
            reason = _FAILURE_REASON.get(exc.reason, 0xC000)
            outcome.failed.append((*failed_uids, reason, str(exc)))
        except RadbridgeError as exc:
            outcome.failed.append((*failed_uids, 0xA700, str(exc)))
    return outcome


def _store(
    db: Database, store: DurableStore, agreement_id: str, h: InstanceHeader, part: bytes
) -> None:
    relpath = f"{agreement_id}/{h.study_uid}/{h.series_uid}/{h.sop_instance_uid}.dcm"
    with db.session() as s:
        study = study_for(s, agreement_id, h.study_uid, h.modality, CenterStudyState.RECEIVING)
        if study.state in _PURGED:
            raise DatasetError(
                "purged", "the center purged this study (retention or the hospital's request)"
            )
        if study.patient_key is None and h.patient_id:
            study.patient_key = patient_key(agreement_id, h.patient_id)
        series = series_for(s, study, h.series_uid, h.modality, h.body_part)
        row = find_instance(s, series, h.sop_instance_uid)
        if row is not None:
            if row.sha256 == hashlib.sha256(part).hexdigest():
                study.state = CenterStudyState.RECEIVING
                return  # the same bytes again: idempotent, nothing rewritten
            # Never overwrite what a result may already describe: a forged or altered re-post
            # under a known UID would otherwise become a new result version for the hospital.
            raise DatasetError(
                "conflict", "other bytes under a SOP Instance UID the center already holds"
            )
        stored = store.write(relpath, part)
        record_instance(
            s,
            study,
            series,
            row,
            sop_instance_uid=h.sop_instance_uid,
            sop_class_uid=h.sop_class_uid,
            transfer_syntax_uid=h.transfer_syntax_uid,
            relpath=stored.relpath,
            size=stored.size,
            sha256=stored.sha256,
        )
        study.state = CenterStudyState.RECEIVING


def stow_response(outcome: StowOutcome) -> dict[str, object]:
    """The STOW-RS response dataset (PS3.18 10.5.3) in DICOM JSON."""
    return store_response(
        ((h.sop_class_uid, h.sop_instance_uid) for h in outcome.stored),
        ((cls, inst, reason) for cls, inst, reason, _msg in outcome.failed),
    )

"""The center's STOW-RS receive path: only de-identified instances are accepted and stored."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from dicom_io.header import InstanceHeader, parse_header
from dicom_io.store import DurableStore
from dicom_io.stow import store_response
from radbridge.db.engine import Database
from radbridge.db.index import instance_digests, series_for, study_for
from radbridge.db.tables import InstanceRow, SeriesRow, StudyRow, utcnow
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
    """Store and index one STOW-RS request's instances: each is checked on its own (a refused
    instance is answered in the response, the others are kept); the new files are written and
    fsynced first, then every accepted instance of the request is indexed in one transaction
    (one commit per request, not per instance: a CT series arrives in requests of dozens)."""
    outcome = StowOutcome()
    accepted: list[tuple[InstanceHeader, bytes, str]] = []
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
            accepted.append((header, part, hashlib.sha256(part).hexdigest()))
        except DatasetError as exc:
            outcome.failed.append((*failed_uids, _FAILURE_REASON.get(exc.reason, 0xC000), str(exc)))
    if accepted:
        refused = len(outcome.failed)
        written: list[str] = []
        try:
            _store_all(db, store, agreement_id, accepted, outcome, written)
        except RadbridgeError as exc:  # the store or the index failed: none of them is kept
            for relpath in written:  # nor any file of the request (nothing half-written)
                store.delete(relpath)
            outcome.stored.clear()
            del outcome.failed[refused:]
            for h, _part, _digest in accepted:
                outcome.failed.append((h.sop_class_uid, h.sop_instance_uid, 0xA700, str(exc)))
    return outcome


def _store_all(
    db: Database,
    store: DurableStore,
    agreement_id: str,
    accepted: list[tuple[InstanceHeader, bytes, str]],
    outcome: StowOutcome,
    written: list[str],
) -> None:
    """Write the new files, then index them all in one transaction (files before rows: a
    failure leaves unreferenced files, never a row without its file)."""
    with db.session() as s:
        studies: dict[str, StudyRow] = {}
        series: dict[tuple[str, str], SeriesRow] = {}
        new: list[tuple[InstanceHeader, SeriesRow, str, str, int]] = []
        files: list[tuple[str, bytes]] = []
        # Studies are changed only after every file is written, so that (autoflush) no write
        # lock is held while the files are fsynced: other requests index meanwhile.
        added: dict[str, int] = {}  # study UID -> instances this request adds
        patients: dict[str, str] = {}  # study UID -> its pseudonymous Patient ID
        kept: list[tuple[InstanceHeader, bytes, str]] = []
        for h, part, digest in accepted:
            study = studies.get(h.study_uid)
            if study is None:
                study = study_for(
                    s, agreement_id, h.study_uid, h.modality, CenterStudyState.RECEIVING
                )
                studies[h.study_uid] = study
            if study.state in _PURGED:
                outcome.failed.append(
                    (
                        h.sop_class_uid,
                        h.sop_instance_uid,
                        0xC000,
                        "the center purged this study (retention or the hospital's request)",
                    )
                )
                continue
            if h.patient_id:
                patients.setdefault(h.study_uid, h.patient_id)
            key = (h.study_uid, h.series_uid)
            if key not in series:
                series[key] = series_for(s, study, h.series_uid, h.modality, h.body_part)
            kept.append((h, part, digest))
        # One query for the request's instances the center already holds, not one each.
        held = instance_digests(
            s, [row.id for row in series.values()], [h.sop_instance_uid for h, _, _ in kept]
        )
        for h, part, digest in kept:
            series_row = series[(h.study_uid, h.series_uid)]
            row_digest = held.get((series_row.id, h.sop_instance_uid))
            if row_digest is not None:
                if row_digest == digest:
                    added.setdefault(h.study_uid, 0)  # the same bytes again: idempotent
                    outcome.stored.append(h)
                    continue
                # Never overwrite what a result may already describe: a forged or altered
                # re-post under a known UID would otherwise become a new result version.
                outcome.failed.append(
                    (
                        h.sop_class_uid,
                        h.sop_instance_uid,
                        _FAILURE_REASON["conflict"],
                        "other bytes under a SOP Instance UID the center already holds",
                    )
                )
                continue
            relpath = f"{agreement_id}/{h.study_uid}/{h.series_uid}/{h.sop_instance_uid}.dcm"
            files.append((relpath, part))
            new.append((h, series_row, relpath, digest, len(part)))
            held[(series_row.id, h.sop_instance_uid)] = digest  # a repeat in this request
        store.write_many(files)  # all or none of them
        written.extend(relpath for relpath, _ in files)
        now = utcnow()
        for h, series_row, relpath, digest, size in new:
            s.add(
                InstanceRow(
                    series_id=series_row.id,
                    sop_instance_uid=h.sop_instance_uid,
                    sop_class_uid=h.sop_class_uid,
                    transfer_syntax_uid=h.transfer_syntax_uid,
                    path=relpath,
                    size=size,
                    sha256=digest,
                    received_at=now,
                    version=1,
                )
            )
            added[h.study_uid] = added.get(h.study_uid, 0) + 1
            outcome.stored.append(h)
        for uid, n in added.items():
            study = studies[uid]
            study.state = CenterStudyState.RECEIVING
            if study.patient_key is None and uid in patients:
                study.patient_key = patient_key(agreement_id, patients[uid])
            if n:
                study.last_received_at = now
                # In SQL, not in Python: two replicas adding to one study must not lose a count.
                study.instance_count = StudyRow.instance_count + n  # type: ignore[assignment]


def stow_response(outcome: StowOutcome) -> dict[str, object]:
    """The STOW-RS response dataset (PS3.18 10.5.3) in DICOM JSON."""
    return store_response(
        ((h.sop_class_uid, h.sop_instance_uid) for h in outcome.stored),
        ((cls, inst, reason) for cls, inst, reason, _msg in outcome.failed),
    )

"""The edge's receive path: durable write of the original, then its index rows.

Order matters: the file is fsynced and renamed into the store, then the index row is committed;
only then may the SCP answer 0x0000. A failure between the two leaves a file without a row,
which is harmless (it is re-written on the SCU's retry) and never a row without a file.
"""

from __future__ import annotations

import hashlib
import threading

from sqlalchemy.exc import IntegrityError

from dicom_io.header import InstanceHeader, parse_header
from dicom_io.store import DurableStore
from dicom_io.structure import Limits, check_structure
from radbridge.agreements import Agreement
from radbridge.db.engine import Database
from radbridge.db.index import find_instance, record_instance, series_for, study_for
from radbridge.errors import DatasetError
from radbridge.lifecycle import EdgeStudyState

__all__ = ["IngestOutcome", "Ingestor"]

_RANK = {"stat": 0, "urgent": 1, "routine": 2}


class IngestOutcome:
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical re-send: idempotent success
    NEW_VERSION = "new_version"  # same SOP Instance UID, different bytes: kept beside the old


class Ingestor:
    def __init__(
        self,
        db: Database,
        store: DurableStore,
        *,
        max_instance_bytes: int = 2 << 30,
        limits: Limits | None = None,
    ) -> None:
        self.db = db
        self.store = store
        self.max_instance_bytes = max_instance_bytes
        self.limits = limits or Limits()
        self._lock = threading.Lock()  # serialises index updates of one gateway process

    def accept(
        self,
        agreement: Agreement,
        encoded: bytes,
        declared_sop_class: str | None = None,
        header: InstanceHeader | None = None,
    ) -> tuple[str, InstanceHeader]:
        """The one receive path of C-STORE and STOW-RS: validate, check policy, store durably.

        Validation first: the size cap, then the whole element structure and the pixel data
        against the pixel module (:func:`check_structure`), then the header fields the index
        needs. Nothing that does not parse in full is stored or acknowledged.
        ``header`` may be passed when the caller already parsed ``encoded``.
        Raises ``DatasetError`` / ``StorageError``; each protocol maps them through its table.
        """
        if len(encoded) > self.max_instance_bytes:
            raise DatasetError(
                "instance_too_large",
                f"instance of {len(encoded)} bytes is over the limit of {self.max_instance_bytes}",
            )
        check_structure(encoded, self.limits)
        header = header or parse_header(encoded, declared_sop_class)
        if header.modality not in agreement.modalities:
            raise DatasetError(
                "modality_not_allowed",
                f"modality {header.modality or 'none'} is not allowed by agreement {agreement.id}",
            )
        priority = header.priority or agreement.default_priority.value
        return self.ingest(agreement.id, header, encoded, priority), header

    def ingest(
        self, agreement_id: str, header: InstanceHeader, encoded: bytes, priority: str = "routine"
    ) -> str:
        """Store ``encoded`` and index it; ``priority`` is the study's (the highest any of its
        instances asked for, else the agreement's default)."""
        digest = hashlib.sha256(encoded).hexdigest()
        with self._lock:
            for attempt in range(3):
                try:
                    return self._ingest_once(agreement_id, header, encoded, digest, priority)
                except IntegrityError:  # another replica created the same study/series first
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _ingest_once(
        self, agreement_id: str, header: InstanceHeader, encoded: bytes, digest: str, priority: str
    ) -> str:
        with self.db.session() as s:
            study = study_for(
                s, agreement_id, header.study_uid, header.modality, EdgeStudyState.RECEIVING
            )
            if study.instance_count == 0 or _RANK[priority] < _RANK.get(study.priority, 2):
                study.priority = priority  # the first instance's, or raised by a later one
            series = series_for(s, study, header.series_uid, header.modality, header.body_part)
            existing = find_instance(s, series, header.sop_instance_uid)
            if existing is not None and existing.sha256 == digest:
                return IngestOutcome.DUPLICATE
            relpath = (
                f"{agreement_id}/{header.study_uid}/{header.series_uid}/"
                f"{header.sop_instance_uid}.{digest[:12]}.dcm"
            )
            stored = self.store.write(relpath, encoded, sha256=digest)
            created = record_instance(
                s,
                study,
                series,
                existing,  # new bytes for a known SOP UID: old file kept, row re-pointed
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                transfer_syntax_uid=header.transfer_syntax_uid,
                relpath=stored.relpath,
                size=stored.size,
                sha256=stored.sha256,
            )
            outcome = IngestOutcome.STORED if created else IngestOutcome.NEW_VERSION
            if study.state != EdgeStudyState.BLOCKED:
                study.state = EdgeStudyState.RECEIVING
            study.next_attempt_at = None
            if header.expected_study_instances:
                study.expected_instances = header.expected_study_instances
            return outcome

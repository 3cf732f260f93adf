"""The edge's receive path: durable write of the original, then its index rows.

Order matters: the file is fsynced and renamed into the store, then the index row is committed;
only then may the SCP answer 0x0000. A failure between the two leaves a file without a row,
which is harmless (it is re-written on the SCU's retry) and never a row without a file.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, case, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError

from dicom_io.header import InstanceHeader, header_from_walk, parse_header
from dicom_io.store import DurableStore
from dicom_io.structure import Limits, check_structure
from radbridge.agreements import Agreement
from radbridge.db.engine import Database
from radbridge.db.tables import InstanceRow, SeriesRow, StudyRow, UTCDateTime, utcnow
from radbridge.errors import DatasetError, StorageError
from radbridge.lifecycle import EdgeStudyState

__all__ = ["IngestOutcome", "Ingestor", "Pending"]

_RANK = {"stat": 0, "urgent": 1, "routine": 2}
_ID_CACHE = 256  # series whose (study id, series id) the receive path keeps


class IngestOutcome:
    STORED = "stored"
    DUPLICATE = "duplicate"  # identical re-send: idempotent success
    NEW_VERSION = "new_version"  # same SOP Instance UID, different bytes: kept beside the old


class Ingestor:
    """The edge's receive path for one gateway process: checks an instance (its agreement's
    limits and the structure checks), writes it durably, then indexes it (study, series,
    instance rows, ids cached per series), all before the SCP or STOW-RS answers success."""

    def __init__(
        self,
        db: Database | None,
        store: DurableStore,
        *,
        max_instance_bytes: int = 2 << 30,
        limits: Limits | None = None,
        index: Callable[[list[Pending]], None] | None = None,
    ) -> None:
        if db is None and index is None:
            raise ValueError("an Ingestor indexes into a database, or through ``index``")
        self.db = db
        self.store = store
        self.max_instance_bytes = max_instance_bytes
        self.limits = limits or Limits()
        # Serialises this process's index updates (one batch at a time). ``index`` indexes a
        # batch: by default here, in a receiving process the gateway process's index
        # (``dicom_io.index_link``: one process writes the index).
        self._lock = threading.Lock()
        self._index = index or self._index_all
        self._ids: dict[tuple[str, str, str], tuple[int, int]] = {}
        self._queue: list[Pending] = []
        self._queue_lock = threading.Lock()
        # Called after an instance of a series new to this receive path is stored, or the last
        # of the count its sender stated (the gateway wakes its forwarder: a new study's quiet
        # period has started, or the study is complete). Must not block.
        self.on_stored: Callable[[], None] | None = None

    def accept(
        self,
        agreement: Agreement,
        encoded: bytes,
        declared_sop_class: str | None = None,
        header: InstanceHeader | None = None,
        sha256: str | None = None,
    ) -> tuple[str, InstanceHeader]:
        """The one receive path of C-STORE and STOW-RS: validate, check policy, store durably.

        Validation first: the size cap, then the whole element structure and the pixel data
        against the pixel module (:func:`check_structure`), then the header fields the index
        needs. Nothing that does not parse in full is stored or acknowledged.
        ``header`` may be passed when the caller already parsed ``encoded``, ``sha256`` (hex)
        when it already hashed it (the SCP hashes the fragments as they arrive).
        Raises ``DatasetError`` / ``StorageError``; each protocol maps them through its table.
        """
        if len(encoded) > self.max_instance_bytes:
            raise DatasetError(
                "instance_too_large",
                f"instance of {len(encoded)} bytes is over the limit of {self.max_instance_bytes}",
            )
        walked = check_structure(encoded, self.limits)
        header = (
            header
            or header_from_walk(walked, declared_sop_class)
            or parse_header(encoded, declared_sop_class)
        )
        if header.modality not in agreement.modalities:
            raise DatasetError(
                "modality_not_allowed",
                f"modality {header.modality or 'none'} is not allowed by agreement {agreement.id}",
            )
        priority = header.priority or agreement.default_priority.value
        return self.ingest(agreement.id, header, encoded, priority, sha256), header

    def ingest(
        self,
        agreement_id: str,
        header: InstanceHeader,
        encoded: bytes,
        priority: str = "routine",
        sha256: str | None = None,
    ) -> str:
        """Store ``encoded`` and index it; ``priority`` is the study's (the highest any of its
        instances asked for, else the agreement's default); ``sha256``: ``encoded``'s, when
        the caller has it."""
        digest = sha256 or hashlib.sha256(encoded).hexdigest()
        relpath = (
            f"{agreement_id}/{header.study_uid}/{header.series_uid}/"
            f"{header.sop_instance_uid}.{digest[:12]}.dcm"
        )
        # The file first, outside the lock: associations write and fsync side by side, and
        # only the index is serialised. Its name carries the digest, so a re-send of the same
        # bytes (rare) rewrites the same file with the same content.
        self.store.write(relpath, encoded, sha256=digest)
        entry = Pending(agreement_id, header, relpath, len(encoded), digest, priority)
        self.index_entries([entry])
        if entry.error is not None:
            raise entry.error
        assert entry.outcome is not None
        return entry.outcome

    def index_entries(self, entries: list[Pending]) -> None:
        """Index stored files; sets each entry's outcome or error. Group commit: whoever
        holds the index lock indexes every entry queued so far in one transaction (one commit,
        one fsync of the database's log), so associations (and receiving processes) arriving
        while a commit runs share the next one instead of waiting a commit each."""
        with self._queue_lock:
            self._queue.extend(entries)
        with self._lock:
            # Queued together, so taken together: all of them are done, or none.
            if not entries[0].done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                self._index(batch)

    def _index_all(self, batch: list[Pending]) -> None:
        """Index ``batch`` in one transaction; when that fails, each entry alone (with its
        own retries and its own error, which its association answers)."""
        wake = False
        try:
            if len(batch) > 1:
                try:
                    wake = self._commit(batch)
                    return
                except Exception:  # each entry is tried alone below
                    self._ids.clear()
            for entry in batch:
                try:
                    wake = self._commit_alone(entry) or wake
                except Exception as exc:  # raised in the entry's own thread
                    entry.error = exc
        finally:
            for entry in batch:
                if entry.outcome is None and entry.error is None:
                    entry.error = StorageError("indexing was interrupted")
                entry.done = True
            if wake and self.on_stored is not None:
                self.on_stored()  # a new series (or study), or the count the sender stated is in

    def _commit_alone(self, entry: Pending) -> bool:
        for attempt in range(3):
            try:
                return self._commit([entry])
            except (IntegrityError, _StaleIds):
                # Another replica created the same study/series first, or a cached id's row
                # is gone (a purge): forget the ids and look them up again.
                self._ids.clear()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _ids_in(
        self,
        conn: Connection,
        agreement_id: str,
        header: InstanceHeader,
        new: dict[tuple[str, str, str], tuple[int, int]],
    ) -> tuple[int, int]:
        """(study id, series id) of the instance's series, created in this transaction when
        new. Cached after a commit, since a CT series sends hundreds of instances in a row;
        ``new`` holds those this transaction looked up, until it commits."""
        key = (agreement_id, header.study_uid, header.series_uid)
        ids = self._ids.get(key) or new.get(key)
        if ids is not None:
            return ids
        study_id = conn.execute(
            select(StudyRow.id).where(
                StudyRow.agreement_id == agreement_id, StudyRow.study_uid == header.study_uid
            )
        ).scalar()
        if study_id is None:
            now = utcnow()
            study_id = conn.execute(
                insert(StudyRow)
                .values(
                    agreement_id=agreement_id,
                    study_uid=header.study_uid,
                    state=EdgeStudyState.RECEIVING.value,
                    modality=header.modality,
                    instance_count=0,
                    first_received_at=now,
                    last_received_at=now,
                    attempts=0,
                )
                .returning(StudyRow.id)
            ).scalar_one()
        series_id = conn.execute(
            select(SeriesRow.id).where(
                SeriesRow.study_id == study_id, SeriesRow.series_uid == header.series_uid
            )
        ).scalar()
        if series_id is None:
            series_id = conn.execute(
                insert(SeriesRow)
                .values(
                    study_id=study_id,
                    series_uid=header.series_uid,
                    modality=header.modality,
                    body_part=header.body_part,
                )
                .returning(SeriesRow.id)
            ).scalar_one()
        new[key] = (int(study_id), int(series_id))
        return new[key]

    def _commit(self, batch: list[Pending]) -> bool:
        """Index each stored file of ``batch`` in one transaction; sets each entry's outcome
        once it committed. True when the forwarder should wake."""
        new: dict[tuple[str, str, str], tuple[int, int]] = {}
        outcomes: list[tuple[str, bool]] = []
        assert self.db is not None  # ``index`` given: this path is not taken
        with self.db.engine.begin() as conn:
            for entry in batch:
                outcomes.append(self._rows(conn, entry, new))
        if len(self._ids) + len(new) > _ID_CACHE:
            for key in list(self._ids)[: len(self._ids) + len(new) - _ID_CACHE]:
                del self._ids[key]
        self._ids.update(new)
        wake = False
        for entry, (outcome, wakes) in zip(batch, outcomes, strict=True):
            entry.outcome = outcome
            wake = wake or wakes
        return wake

    def _rows(
        self,
        conn: Connection,
        entry: Pending,
        new: dict[tuple[str, str, str], tuple[int, int]],
    ) -> tuple[str, bool]:
        """One stored file's index rows: three indexed statements (the instance looked up,
        inserted or re-pointed, its study updated in SQL). The statements are built once: the
        ORM's unit of work and per-call statement building cost more than the fsyncs here
        (py-spy, ``loadtests.ingest_bench --profile``). Returns the outcome and whether the
        forwarder should wake (a new series or study, or the count its sender stated is in)."""
        header = entry.header
        key = (entry.agreement_id, header.study_uid, header.series_uid)
        cached = key in self._ids or key in new
        study_id, series_id = self._ids_in(conn, entry.agreement_id, header, new)
        existing = conn.execute(
            _FIND_INSTANCE, {"p_series": series_id, "p_sop": header.sop_instance_uid}
        ).first()
        if existing is not None and existing.sha256 == entry.digest:
            return IngestOutcome.DUPLICATE, False
        now = utcnow()
        fields = {
            "p_path": entry.relpath,
            "p_size": entry.size,
            "p_sha256": entry.digest,
            "p_ts": header.transfer_syntax_uid,
            "p_now": now,
        }
        if existing is not None:
            # New bytes for a known SOP UID: the old file stays, the row points at the new.
            conn.execute(_REPOINT_INSTANCE, {"p_id": existing.id, **fields})
        else:
            conn.execute(
                _INSERT_INSTANCE,
                {
                    "p_series": series_id,
                    "p_sop": header.sop_instance_uid,
                    "p_class": header.sop_class_uid,
                    **fields,
                },
            )
        done = conn.execute(
            _TOUCH_STUDY,
            {
                "p_id": study_id,
                "p_agreement": entry.agreement_id,
                "p_study_uid": header.study_uid,
                "p_series": series_id,
                "p_series_uid": header.series_uid,
                "p_now": now,
                "p_added": 0 if existing else 1,
                "p_rank": _RANK[entry.priority],
                "p_priority": entry.priority,
                "p_expected": header.expected_study_instances or None,
            },
        )
        counts = done.first()
        if counts is None:
            raise _StaleIds  # rolls back the instance rows; the files stay, unreferenced
        count, expected = counts
        outcome = IngestOutcome.NEW_VERSION if existing else IngestOutcome.STORED
        return outcome, not cached or bool(expected and count >= expected)


@dataclass(eq=False)
class Pending:
    """A durably written instance waiting for its index rows (group commit)."""

    agreement_id: str
    header: InstanceHeader
    relpath: str
    size: int
    digest: str
    priority: str
    done: bool = False
    outcome: str | None = None
    error: Exception | None = None


_NOW = bindparam("p_now", type_=UTCDateTime())
_FIND_INSTANCE = select(InstanceRow.id, InstanceRow.sha256).where(
    InstanceRow.series_id == bindparam("p_series"),
    InstanceRow.sop_instance_uid == bindparam("p_sop"),
)
_INSTANCE_FIELDS = {
    "path": bindparam("p_path"),
    "size": bindparam("p_size"),
    "sha256": bindparam("p_sha256"),
    "transfer_syntax_uid": bindparam("p_ts"),
    "received_at": _NOW,
}
_INSERT_INSTANCE = insert(InstanceRow).values(
    series_id=bindparam("p_series"),
    sop_instance_uid=bindparam("p_sop"),
    sop_class_uid=bindparam("p_class"),
    version=1,
    **_INSTANCE_FIELDS,
)
_REPOINT_INSTANCE = (
    update(InstanceRow)
    .where(InstanceRow.id == bindparam("p_id"))
    .values(version=InstanceRow.version + 1, **_INSTANCE_FIELDS)
)
_CURRENT_RANK = case({"stat": 0, "urgent": 1}, value=StudyRow.priority, else_=literal(2))
# The cached ids are checked against the instance's own UIDs in the same statement: a purged
# study's id can be handed to another study (SQLite reuses the highest rowid), and an instance
# must never be indexed into someone else's series. No row updated: look the ids up again.
_TOUCH_STUDY = (
    update(StudyRow)
    .where(
        StudyRow.id == bindparam("p_id"),
        StudyRow.agreement_id == bindparam("p_agreement"),
        StudyRow.study_uid == bindparam("p_study_uid"),
        select(SeriesRow.id)
        .where(
            SeriesRow.id == bindparam("p_series"),
            SeriesRow.study_id == StudyRow.id,
            SeriesRow.series_uid == bindparam("p_series_uid"),
        )
        .exists(),
    )
    .values(
        last_received_at=_NOW,
        next_attempt_at=None,
        # In SQL, not in Python: two replicas adding to one study must not lose a count.
        instance_count=StudyRow.instance_count + bindparam("p_added"),
        # The first instance's priority, or raised (never lowered) by a later one.
        priority=case(
            (
                or_(StudyRow.instance_count == 0, bindparam("p_rank") < _CURRENT_RANK),
                bindparam("p_priority"),
            ),
            else_=StudyRow.priority,
        ),
        state=case(
            (StudyRow.state == EdgeStudyState.BLOCKED.value, StudyRow.state),
            else_=literal(EdgeStudyState.RECEIVING.value),
        ),
        expected_instances=func.coalesce(bindparam("p_expected"), StudyRow.expected_instances),
    )
    .returning(StudyRow.instance_count, StudyRow.expected_instances)
)


class _StaleIds(Exception):
    """A cached study or series id no longer names this instance's study and series."""

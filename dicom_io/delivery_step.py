"""One result object from the center to the PACS: listed, downloaded, its signature
verified, re-identified and C-STOREd (``DeliveryStep.deliver``). ``dicom_io.delivery`` keeps
the queue that decides when (claims, retries, maximum age) and calls this for each attempt.

Companions. ``reidentify`` refuses nested references it cannot resolve, except UIDs of other
result objects of the same study (an SR referencing its SEG, a version 2 SR referencing its
predecessor). Those are the SOP Instance and Series Instance UIDs of every object the center
listed for the study. No column holds series UIDs, so each attempt re-reads the listing over
the id window of the study's ``deliveries`` rows (all versions and kinds; usually one short
page) and keeps the objects whose pseudonymous study UID is this one's. The same read gives the
sha256 to check the download against, so nothing of the listing has to be stored.
The center never changes a listing entry (an object's bytes, digest and signature), so the step
remembers the entries its listings returned (``LISTING_MEMORY`` of them): an attempt right after
the listener queued a study's objects finds every companion there and lists nothing (one round
trip to the center less, per object, on every result's way home). A download that does not
match a remembered digest is judged against the center's listing of now, listed again: an
object altered at the center then fails its signature check and is refused for good, as it
would have been without the memory.

Order. The signature is verified before a byte of the download is parsed; nothing reaches the
PACS that the center did not sign for this edge and agreement.

Nothing here logs or stores identity: messages name delivery ids, center object ids, agreement
ids and DIMSE statuses only.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select, update

from dicom_io.identity_map import lookup_original
from dicom_io.reidentify import reidentify
from dicom_io.scu import store_dataset
from dicom_io.store import DurableStore
from radbridge.agreements import Agreement
from radbridge.contract import CenterClient, ResultObject
from radbridge.db.engine import Database
from radbridge.db.tables import DeliveryRow, InstanceRow, SeriesRow, StudyRow
from radbridge.errors import (
    CenterError,
    PeerError,
    RadbridgeError,
    ReidentificationError,
    SignatureError,
)
from radbridge.signing import ResultVerifier

__all__ = [
    "PACS_OK_STATUSES",
    "PAGE_SIZE",
    "AttemptFailed",
    "DeliveryStep",
    "Sent",
    "unknown_study",
]

# C-STORE success (0x0000) and the warnings (PS3.4 B.2.3): coercion of data elements (0xB000),
# elements discarded (0xB006), data set does not match SOP class (0xB007). The PACS stored it.
PACS_OK_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
PAGE_SIZE = 200  # listing page
LISTING_MEMORY = 4096  # listing entries remembered (a few hundred bytes each)


class AttemptFailed(Exception):
    """One attempt failed. ``reason`` is a failure-counter label; the message has no identity."""

    def __init__(self, reason: str, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class Sent:
    status: int
    sha256: str
    priority: str
    first_received_at: datetime
    evidence: str  # the center's signature, verified
    study_uid: str  # pseudonymous, as listed
    destination: str  # the PACS's AE title


class DeliveryStep:
    """What one delivery attempt does, and the two lookups the queue shares with it (the
    center's listing, the edge's study behind a pseudonymous study UID)."""

    def __init__(
        self,
        db: Database,
        store: DurableStore,
        center: CenterClient,
        results: ResultVerifier,
        edge_id: str,
        calling_ae: str,
        timeout_s: float,
    ) -> None:
        """``results`` verifies the center's signature of each object before anything else
        is done with it; ``edge_id`` is this edge as the center's signatures name it."""
        self.db, self.store, self._center = db, store, center
        self._results, self._edge_id = results, edge_id
        self._calling_ae, self._timeout_s = calling_ae, timeout_s
        # (agreement, center object id) -> its listing entry, newest last (listener and
        # delivery threads share it)
        self._listed_before: OrderedDict[tuple[str, int], ResultObject] = OrderedDict()
        self._memory_lock = threading.Lock()

    def deliver(self, d: DeliveryRow, agreement: Agreement) -> Sent:
        """Deliver one claimed object; raises ``AttemptFailed`` (``permanent`` for a result
        that can never be delivered) or ``ReidentificationError``."""
        listed, companions = self._listed(d)
        study = self._study(d, listed)
        original = self._original(study)
        data = self._download(listed)
        if _sha256(data) != listed.sha256.lower() and self._forget(d):
            listed, companions = self._listed(d)  # remembered: what does the center say now?
        if _sha256(data) != listed.sha256.lower():
            raise AttemptFailed(
                "center", f"result object {listed.id} does not match its listed sha256"
            )
        evidence = self._verify(d, listed, data)  # before a byte of it is parsed
        ds = _parse(data, listed)
        out = reidentify(ds, agreement.id, self.db, original, companions).dataset
        buf = BytesIO()
        out.save_as(buf, enforce_file_format=True)
        node = agreement.hospital.return_destination
        try:
            status = store_dataset(
                out, node.host, node.port, node.ae_title, self._calling_ae, self._timeout_s
            )
        except PeerError as exc:
            raise AttemptFailed(exc.reason, str(exc)) from None
        if status not in PACS_OK_STATUSES:
            raise AttemptFailed("pacs_refused", f"the PACS answered C-STORE status 0x{status:04X}")
        return Sent(
            status,
            hashlib.sha256(buf.getvalue()).hexdigest(),
            study.priority,
            study.first_received_at,
            evidence,
            listed.study_uid,
            agreement.hospital.return_destination.ae_title,
        )

    def _listed(self, d: DeliveryRow) -> tuple[ResultObject, frozenset[str]]:
        """This object's listing entry and the UIDs of every object listed for its study."""
        ids = [d.center_object_id]
        if d.study_id is not None:
            with self.db.session() as s:
                ids += s.scalars(
                    select(DeliveryRow.center_object_id).where(
                        DeliveryRow.agreement_id == d.agreement_id,
                        DeliveryRow.study_id == d.study_id,
                    )
                ).all()
        window = self._remembered(d.agreement_id, ids)
        if window is None:
            window = self._list_window(d.agreement_id, min(ids), max(ids))
        listed = window.get(d.center_object_id)
        if listed is None:
            raise AttemptFailed(
                "center",
                f"the center no longer lists result object {d.center_object_id}",
                permanent=True,
            )
        companions = frozenset(
            uid
            for o in window.values()
            if o.study_uid == listed.study_uid
            for uid in (o.sop_instance_uid, o.series_instance_uid)
        )
        return listed, companions

    def _remembered(self, agreement_id: str, ids: list[int]) -> dict[int, ResultObject] | None:
        """The entries of ``ids`` from earlier listings, if every one of them is remembered."""
        with self._memory_lock:
            found = {i: self._listed_before.get((agreement_id, i)) for i in ids}
        if any(o is None for o in found.values()):
            return None
        return {i: o for i, o in found.items() if o is not None}

    def _forget(self, d: DeliveryRow) -> bool:
        """Drop the remembered entry of ``d``'s object; whether there was one."""
        with self._memory_lock:
            return self._listed_before.pop((d.agreement_id, d.center_object_id), None) is not None

    def _list_window(self, agreement_id: str, lo: int, hi: int) -> dict[int, ResultObject]:
        """The center's listing entries with ids from ``lo`` to ``hi``."""
        window: dict[int, ResultObject] = {}
        after = lo - 1
        while True:
            page = self.list(agreement_id, after, PAGE_SIZE)
            window.update((o.id, o) for o in page if lo <= o.id <= hi)
            if len(page) < PAGE_SIZE or page[-1].id >= hi or page[-1].id <= after:
                return window
            after = page[-1].id

    def _study(self, d: DeliveryRow, listed: ResultObject) -> StudyRow:
        study_id = d.study_id
        if study_id is None:  # queued before its study was known here, then resent
            study_id = self.resolve_study(d.agreement_id, listed.study_uid)
        with self.db.session() as s:
            study = s.get(StudyRow, study_id) if study_id is not None else None
            if study is not None and d.study_id is None:
                s.execute(
                    update(DeliveryRow).where(DeliveryRow.id == d.id).values(study_id=study.id)
                )
        if study is None:
            raise ReidentificationError(unknown_study(d.center_object_id))
        return study

    def _original(self, study: StudyRow) -> Dataset:
        """The header of one original instance of the study, from the edge store."""
        with self.db.session() as s:
            relpath = s.scalars(
                select(InstanceRow.path)
                .join(SeriesRow, InstanceRow.series_id == SeriesRow.id)
                .where(SeriesRow.study_id == study.id)
                .order_by(InstanceRow.id)
                .limit(1)
            ).first()
        if relpath is None:
            raise ReidentificationError("the edge holds no original instance of the study")
        try:
            return pydicom.dcmread(self.store.path(relpath), stop_before_pixels=True)
        except (OSError, InvalidDicomError, RadbridgeError) as exc:
            raise ReidentificationError(
                f"the original instance of the study cannot be read ({type(exc).__name__})"
            ) from None

    def _verify(self, d: DeliveryRow, listed: ResultObject, data: bytes) -> str:
        """The center's signature of these bytes, verified; else a permanent failure (the
        delivery is dead with the reason, nothing reaches the PACS)."""
        try:
            self._results.verify(
                listed.signature,
                edge_id=self._edge_id,
                agreement_id=d.agreement_id,
                sha256=_sha256(data),
                expected={
                    "sop_instance_uid": listed.sop_instance_uid,
                    "sop_class_uid": listed.sop_class_uid,
                    "study_uid": listed.study_uid,
                    "kind": listed.kind,
                    "version": listed.version,
                },
            )
        except SignatureError as exc:
            raise AttemptFailed(
                "signature",
                f"result object {listed.id} refused: {exc} ({exc.reason})",
                permanent=True,
            ) from None
        assert listed.signature is not None
        return listed.signature

    def _download(self, listed: ResultObject) -> bytes:
        try:
            data = self._center.result_object(listed.id)
        except CenterError as exc:
            if exc.status == 404:
                raise AttemptFailed(
                    "center", f"the center has no result object {listed.id} (404)", permanent=True
                ) from None
            raise AttemptFailed("center", str(exc)) from None
        return data

    def list(
        self, agreement_id: str, after: int, limit: int, wait_s: float = 0.0
    ) -> list[ResultObject]:
        try:
            page = self._center.result_objects(agreement_id, after, limit, wait_s)
        except CenterError as exc:
            raise AttemptFailed("center", str(exc)) from None
        with self._memory_lock:
            for o in page:
                self._listed_before[(agreement_id, o.id)] = o
                self._listed_before.move_to_end((agreement_id, o.id))
            while len(self._listed_before) > LISTING_MEMORY:
                self._listed_before.popitem(last=False)
        return page

    def resolve_study(self, agreement_id: str, pseudo_study_uid: str) -> int | None:
        """The edge's study row behind a pseudonymous study UID, if this edge sent that study."""
        original = lookup_original(self.db, agreement_id, "uid", pseudo_study_uid)
        if original is None:
            return None
        with self.db.session() as s:
            return s.scalars(
                select(StudyRow.id).where(
                    StudyRow.agreement_id == agreement_id, StudyRow.study_uid == original
                )
            ).first()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parse(data: bytes, listed: ResultObject) -> Dataset:
    try:
        ds = pydicom.dcmread(BytesIO(data))
        matches = (
            str(ds.SOPInstanceUID) == listed.sop_instance_uid
            and str(ds.SOPClassUID) == listed.sop_class_uid
            and "TransferSyntaxUID" in ds.file_meta
        )
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, AttributeError):
        raise AttemptFailed(
            "center", f"result object {listed.id} is not a readable DICOM file", permanent=True
        ) from None
    if not matches:
        raise AttemptFailed(
            "center", f"result object {listed.id} does not match its listing", permanent=True
        )
    return ds


def unknown_study(center_object_id: int) -> str:
    return f"result object {center_object_id} is for a study this edge did not send"

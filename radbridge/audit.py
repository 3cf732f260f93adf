"""The audit trail of a node: append-only, hash-chained, exported as DICOM audit messages.

Each node (the edge in the hospital, the center) keeps its own trail in its own database
(``audit_records``). A record carries the SHA-256 of the record before it; its own hash covers
its sequence number, time, node, event, outcome, agreement, pseudonymous study UID, details and
that previous hash. The chain's head (last sequence number and hash) is rewritten in
``audit_head`` in the same transaction as every append, so :func:`verify` finds a changed byte,
a deleted, inserted or reordered record, and a removed tail, and names the first bad record.

Records hold pseudonymous UIDs only, on both nodes; an edge's records stay in the hospital
anyway. Nothing here logs a record's contents.

On export each record becomes a DICOM audit message (PS3.15 A.5, the RFC 3881 derived XML;
validated against ``radbridge/schemas/dicom-audit-message.rnc`` in the tests), optionally framed
as an RFC 5424 syslog message (the transport of PS3.15 A.5 / IHE ATNA; UDP per RFC 5426).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from xml.etree import ElementTree as ET

from sqlalchemy import select, update

from radbridge.db.engine import Database
from radbridge.db.tables import AuditHeadRow, AuditRow, utcnow
from radbridge.errors import ConfigError

__all__ = [
    "EVENTS",
    "GENESIS",
    "AuditTrail",
    "Broken",
    "records",
    "send_syslog",
    "syslog_message",
    "to_xml",
    "verify",
]

CHAIN = "main"
GENESIS = "0" * 64

# event name -> (DICOM CID 400 code, meaning, EventActionCode, CID 401 type code or None)
EVENTS: dict[str, tuple[str, str, str, tuple[str, str] | None]] = {
    "begin-transferring": ("110102", "Begin Transferring DICOM Instances", "E", None),
    "export": ("110106", "Export", "R", None),
    "import": ("110107", "Import", "C", None),
    "instances-accessed": ("110103", "DICOM Instances Accessed", "R", None),
    "instances-transferred": ("110104", "DICOM Instances Transferred", "C", None),
    "study-deleted": ("110105", "DICOM Study Deleted", "D", None),
    "agreements-changed": ("110113", "Security Alert", "U", ("110129", "Security Configuration")),
    "result-refused": (
        "110113",
        "Security Alert",
        "E",
        ("110135", "Object Security Attributes Changed"),
    ),
    "transfer-ceiling": (
        "110113",
        "Security Alert",
        "E",
        ("110132", "Use of Restricted Function"),
    ),
    "request-refused": ("110113", "Security Alert", "E", ("110126", "Node Authentication")),
    "reader-login": ("110114", "User Authentication", "E", ("110122", "Login")),
    "reader-logout": ("110114", "User Authentication", "E", ("110123", "Logout")),
    "report-signed": ("110110", "Patient Record", "C", None),
    "consent-recorded": ("110110", "Patient Record", "U", None),
    "consent-withdrawn": ("110110", "Patient Record", "U", None),
}
OUTCOMES = frozenset({0, 4, 8, 12})


class AuditTrail:
    """Appends records to one node's trail. Safe across threads and processes sharing the
    database: the head row is locked (PostgreSQL row lock, SQLite write lock) for each append."""

    def __init__(self, db: Database, node: str) -> None:
        self.db, self.node = db, node

    def record(
        self,
        event: str,
        *,
        outcome: int = 0,
        agreement_id: str | None = None,
        study_uid: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> int:
        """Append one record in its own transaction; returns its sequence number."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}")
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome} is not one of {sorted(OUTCOMES)}")
        code, _meaning, action, _type = EVENTS[event]
        self.db.insert_once(AuditHeadRow(chain=CHAIN, seq=0, hash=GENESIS))
        with self.db.session() as s:
            # Take the write lock first (an UPDATE): the read that follows sees the last head.
            s.execute(
                update(AuditHeadRow).where(AuditHeadRow.chain == CHAIN).values(seq=AuditHeadRow.seq)
            )
            head = s.execute(
                select(AuditHeadRow.seq, AuditHeadRow.hash).where(AuditHeadRow.chain == CHAIN)
            ).one()
            row = AuditRow(
                id=head.seq + 1,
                at=utcnow(),
                node=self.node,
                event_id=code,
                action=action,
                outcome=outcome,
                agreement_id=agreement_id,
                study_uid=study_uid,
                details=_canonical({**(details or {}), "event": event}),
                prev_hash=head.hash,
            )
            row.hash = record_hash(row)
            s.add(row)
            s.execute(
                update(AuditHeadRow)
                .where(AuditHeadRow.chain == CHAIN)
                .values(seq=row.id, hash=row.hash)
            )
            return row.id


def record_hash(row: AuditRow) -> str:
    """SHA-256 over the record's canonical form, which includes the previous record's hash."""
    body = {
        "id": row.id,
        "at": _iso(row.at),
        "node": row.node,
        "event_id": row.event_id,
        "action": row.action,
        "outcome": row.outcome,
        "agreement_id": row.agreement_id,
        "study_uid": row.study_uid,
        "details": row.details,
        "prev_hash": row.prev_hash,
    }
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Broken:
    """Where the chain stops proving anything: the record (sequence number) and why."""

    seq: int
    reason: str


def verify(db: Database) -> tuple[int, Broken | None]:
    """Walk the whole trail: (records checked, the first break or None)."""
    prev, expected, count = GENESIS, 1, 0
    with db.session() as s:
        head = s.get(AuditHeadRow, CHAIN)
        for row in s.scalars(select(AuditRow).order_by(AuditRow.id)).yield_per(1000):
            count += 1
            if row.id != expected:
                return count, Broken(expected, f"record {expected} is missing (next is {row.id})")
            if row.prev_hash != prev:
                return count, Broken(row.id, "does not follow the record before it (prev_hash)")
            if record_hash(row) != row.hash:
                return count, Broken(row.id, "altered: its content does not match its hash")
            prev, expected = row.hash, expected + 1
    last = expected - 1
    if head is None:
        return count, Broken(1, "no chain head") if count else None
    if (head.seq, head.hash) != (last, prev):
        return count, Broken(last + 1, f"the head says {head.seq} records, the trail has {last}")
    return count, None


def records(
    db: Database, *, since: datetime | None = None, agreement_id: str | None = None
) -> Iterator[AuditRow]:
    """The trail in order, optionally from ``since`` and for one agreement."""
    q = select(AuditRow).order_by(AuditRow.id)
    if since is not None:
        q = q.where(AuditRow.at >= since)
    if agreement_id is not None:
        q = q.where(AuditRow.agreement_id == agreement_id)
    with db.session() as s:
        yield from s.scalars(q).yield_per(1000)


# -- DICOM audit messages (PS3.15 A.5) --------------------------------------------------------


def to_xml(row: AuditRow, source_id: str) -> str:
    """The record as a DICOM audit message; its chain hash travels as a ParticipantObjectDetail
    of the audit record itself, so a collector can check the chain too."""
    code, meaning, _action, type_code = _event_by_code(row.event_id, row.details)
    msg = ET.Element("AuditMessage")
    ev = ET.SubElement(
        msg,
        "EventIdentification",
        EventActionCode=row.action,
        EventDateTime=_iso(row.at),
        EventOutcomeIndicator=str(row.outcome),
    )
    _coded(ev, "EventID", code, "DCM", meaning)
    if type_code is not None:
        _coded(ev, "EventTypeCode", type_code[0], "DCM", type_code[1])
    details = json.loads(row.details)
    if row.outcome and details.get("reason"):
        ET.SubElement(ev, "EventOutcomeDescription").text = str(details["reason"])
    source, destination = details.get("source") or row.node, details.get("destination")
    ap = ET.SubElement(msg, "ActiveParticipant", UserID=str(source), UserIsRequestor="true")
    _coded(ap, "RoleIDCode", "110153", "DCM", "Source Role ID")
    if destination:
        ap = ET.SubElement(
            msg, "ActiveParticipant", UserID=str(destination), UserIsRequestor="false"
        )
        _coded(ap, "RoleIDCode", "110152", "DCM", "Destination Role ID")
    src = ET.SubElement(msg, "AuditSourceIdentification", AuditSourceID=source_id)
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4"})
    if row.study_uid:
        study = ET.SubElement(
            msg,
            "ParticipantObjectIdentification",
            ParticipantObjectID=row.study_uid,
            ParticipantObjectTypeCode="2",
            ParticipantObjectTypeCodeRole="3",
        )
        _coded(study, "ParticipantObjectIDTypeCode", "110180", "DCM", "Study Instance UID")
        ET.SubElement(study, "ParticipantObjectName").text = "pseudonymous study"
        for key in sorted(details):
            if key in ("source", "destination", "reason", "event"):
                continue
            _detail(study, key, details[key])
        if row.agreement_id:
            _detail(study, "agreement", row.agreement_id)
        description = ET.SubElement(study, "ParticipantObjectDescription")
        ET.SubElement(description, "Anonymized").text = "false"  # pseudonymized: reversible
    trail = ET.SubElement(
        msg,
        "ParticipantObjectIdentification",
        ParticipantObjectID=str(row.id),
        ParticipantObjectTypeCode="2",
        ParticipantObjectTypeCodeRole="13",
    )
    _coded(trail, "ParticipantObjectIDTypeCode", "RB-AUDIT", "99RADBRIDGE", "Audit record")
    ET.SubElement(trail, "ParticipantObjectName").text = "radbridge audit record"
    _detail(trail, "prev_hash", row.prev_hash)
    _detail(trail, "hash", row.hash)
    if row.agreement_id and not row.study_uid:
        _detail(trail, "agreement", row.agreement_id)
    return ET.tostring(msg, encoding="unicode")


def syslog_message(row: AuditRow, source_id: str, hostname: str, app: str = "radbridge") -> bytes:
    """RFC 5424: facility 10 (security/authorization), severity notice (5) for success and
    warning (4) otherwise; MSGID the DICOM event code; the MSG the audit message XML, UTF-8."""
    severity = 5 if row.outcome == 0 else 4
    pri = 10 * 8 + severity
    header = f"<{pri}>1 {_iso(row.at)} {hostname or '-'} {app} - {row.event_id} -"
    return header.encode("ascii") + b" \xef\xbb\xbf" + to_xml(row, source_id).encode("utf-8")


def send_syslog(messages: Iterator[bytes], address: str, timeout_s: float = 5.0) -> int:
    """Send RFC 5424 messages over UDP (RFC 5426) to ``host:port``; returns how many."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"syslog address {address!r}: expected host:port")
    sent = 0
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout_s)
        for m in messages:
            s.sendto(m, (host.strip("[]"), int(port)))
            sent += 1
    return sent


# -- helpers ------------------------------------------------------------------------------------


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _iso(at: datetime) -> str:
    return at.isoformat(timespec="microseconds")


def _event_by_code(code: str, details_json: str) -> tuple[str, str, str, tuple[str, str] | None]:
    kind = json.loads(details_json).get("event")
    if kind in EVENTS:
        return EVENTS[kind]
    for entry in EVENTS.values():
        if entry[0] == code:
            return entry
    return code, code, "E", None


def _coded(parent: ET.Element, tag: str, code: str, system: str, meaning: str) -> None:
    ET.SubElement(
        parent, tag, {"csd-code": code, "codeSystemName": system, "originalText": meaning}
    )


def _detail(parent: ET.Element, key: str, value: Any) -> None:
    text = value if isinstance(value, str) else _canonical(value)
    ET.SubElement(
        parent,
        "ParticipantObjectDetail",
        type=key,
        value=base64.b64encode(text.encode("utf-8")).decode("ascii"),
    )

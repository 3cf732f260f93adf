"""radbridge.audit: the hash chain holds, tampering is named, the export is valid DICOM audit
XML, and syslog carries it. Runs on SQLite and PostgreSQL (the edge_db fixture)."""

from __future__ import annotations

import base64
import socket
import threading
from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import delete, text, update

from radbridge.audit import (
    EVENTS,
    AuditTrail,
    records,
    send_syslog,
    syslog_message,
    to_xml,
    verify,
)
from radbridge.db import Database
from radbridge.db.tables import AuditHeadRow, AuditRow

SCHEMA = etree.RelaxNG.from_rnc_string(
    (Path(__file__).parent.parent / "radbridge/schemas/dicom-audit-message.rnc").read_text()
)
AGREEMENT = "demo-hospital-to-center"


def _story(trail: AuditTrail) -> None:
    trail.record(
        "export",
        agreement_id=AGREEMENT,
        study_uid="2.25.1001",
        details={
            "mechanism": "standard_contract",
            "reference": "DEMO-LOCAL-0000",
            "instances": 3,
            "bytes": 123456,
            "destination": "center",
        },
    )
    trail.record("import", agreement_id=AGREEMENT, study_uid="2.25.1001", details={"instances": 3})
    trail.record(
        "request-refused", outcome=4, details={"reason": "unknown key", "source": "127.0.0.1"}
    )
    trail.record("agreements-changed", agreement_id=AGREEMENT, details={"sha256": "ab" * 32})


def test_a_clean_chain_verifies(edge_db: Database) -> None:
    trail = AuditTrail(edge_db, "edge:local-edge")
    assert verify(edge_db) == (0, None)
    _story(trail)
    assert verify(edge_db) == (4, None)
    assert [r.event_id for r in records(edge_db)] == ["110106", "110107", "110113", "110113"]
    assert [r.id for r in records(edge_db, agreement_id=AGREEMENT)] == [1, 2, 4]


@pytest.mark.parametrize("tamper", ["changed byte", "deleted record", "reordered", "cut tail"])
def test_tampering_is_found_and_the_record_named(edge_db: Database, tamper: str) -> None:
    _story(AuditTrail(edge_db, "center"))
    with edge_db.session() as s:
        if tamper == "changed byte":
            s.execute(update(AuditRow).where(AuditRow.id == 2).values(details='{"instances":4}'))
        elif tamper == "deleted record":
            s.execute(delete(AuditRow).where(AuditRow.id == 2))
        elif tamper == "reordered":  # swap the contents of records 2 and 3, keeping ids
            two, three = s.get(AuditRow, 2), s.get(AuditRow, 3)
            assert two is not None and three is not None
            fields = ("at", "event_id", "action", "outcome", "details", "prev_hash", "hash")
            a = {f: getattr(two, f) for f in fields}
            b = {f: getattr(three, f) for f in fields}
            for f in fields:
                setattr(two, f, b[f])
                setattr(three, f, a[f])
        else:
            s.execute(delete(AuditRow).where(AuditRow.id == 4))
    _, broken = verify(edge_db)
    assert broken is not None
    expected = {"changed byte": 2, "deleted record": 2, "reordered": 2, "cut tail": 4}[tamper]
    assert broken.seq == expected, broken
    if tamper == "cut tail":
        assert "head" in broken.reason


def test_appends_from_threads_keep_one_unbroken_chain(edge_db: Database) -> None:
    trails = [AuditTrail(Database(edge_db.url), "center") for _ in range(4)]

    def work(trail: AuditTrail) -> None:
        for i in range(15):
            trail.record("import", agreement_id=AGREEMENT, details={"i": i})

    threads = [threading.Thread(target=work, args=(t,)) for t in trails]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for t in trails:
        t.db.dispose()
    assert verify(edge_db) == (60, None)
    with edge_db.session() as s:
        head = s.get(AuditHeadRow, "main")
        assert head is not None and head.seq == 60


def test_every_event_exports_as_valid_dicom_audit_xml(edge_db: Database) -> None:
    trail = AuditTrail(edge_db, "edge:local-edge")
    for event in EVENTS:
        trail.record(
            event,
            outcome=0 if "refused" not in event else 8,
            agreement_id=AGREEMENT,
            study_uid="2.25.77" if event != "agreements-changed" else None,
            details={"reason": "signature altered", "destination": "DEMO_PACS", "n": 1},
        )
    exported = list(records(edge_db))
    assert len(exported) == len(EVENTS)
    for row in exported:
        xml = to_xml(row, "radbridge-edge:local-edge")
        doc = etree.fromstring(xml.encode())
        assert SCHEMA.validate(doc), (row.event_id, SCHEMA.error_log.last_error, xml)
        assert doc.find("EventIdentification/EventID").get("csd-code") == row.event_id
        details = {
            d.get("type"): base64.b64decode(d.get("value")).decode()
            for d in doc.iter("ParticipantObjectDetail")
        }
        assert details["hash"] == row.hash and details["agreement"] == AGREEMENT


def test_export_names_the_transfer_basis_and_no_identity(edge_db: Database) -> None:
    _story(AuditTrail(edge_db, "edge:local-edge"))
    (export,) = [r for r in records(edge_db) if r.event_id == "110106"]
    doc = etree.fromstring(to_xml(export, "radbridge-edge:local-edge").encode())
    details = {
        d.get("type"): base64.b64decode(d.get("value")).decode()
        for d in doc.iter("ParticipantObjectDetail")
    }
    assert details["mechanism"] == "standard_contract"
    assert details["reference"] == "DEMO-LOCAL-0000"
    assert details["instances"] == "3" and details["bytes"] == "123456"
    roles = [a.get("UserID") for a in doc.iter("ActiveParticipant")]
    assert roles == ["edge:local-edge", "center"]


def test_syslog_carries_rfc5424_messages_to_a_collector(edge_db: Database) -> None:
    _story(AuditTrail(edge_db, "center"))
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(5)
    port = collector.getsockname()[1]
    try:
        messages = (syslog_message(r, "radbridge-center", "center-1") for r in records(edge_db))
        assert send_syslog(messages, f"127.0.0.1:{port}") == 4
        got = [collector.recvfrom(65535)[0] for _ in range(4)]
    finally:
        collector.close()
    first = got[0]
    assert first.startswith(b"<85>1 ") and b" center-1 radbridge - 110106 - \xef\xbb\xbf<" in first
    refused = got[2]
    assert refused.startswith(b"<84>1 ")  # a failure: severity warning
    xml = refused.split(b"\xef\xbb\xbf", 1)[1]
    assert SCHEMA.validate(etree.fromstring(xml))


def test_the_trail_holds_no_row_that_escaped_the_chain(edge_db: Database) -> None:
    """A row written around AuditTrail (straight SQL, as an intruder with the database
    would) breaks the chain at that row."""
    _story(AuditTrail(edge_db, "center"))
    with edge_db.session() as s:
        s.execute(
            text(
                "insert into audit_records (id, at, node, event_id, action, outcome, details,"
                " prev_hash, hash) values (5, :at, 'center', '110105', 'D', 0, '{}', :p, :h)"
            ),
            {"at": s.get(AuditRow, 4).at, "p": s.get(AuditRow, 4).hash, "h": "f" * 64},  # type: ignore[union-attr]
        )
    _, broken = verify(edge_db)
    assert broken is not None and broken.seq == 5 and "altered" in broken.reason

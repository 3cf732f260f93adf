"""`radbridge audit verify` and `radbridge audit export` on a node's database."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree
from sqlalchemy import update
from typer.testing import CliRunner

from radbridge.audit import AuditTrail
from radbridge.cli import app
from radbridge.db import Database, upgrade
from radbridge.db.tables import AuditRow
from tests.test_audit import SCHEMA


@pytest.fixture
def edge_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Database:
    monkeypatch.setenv("RADBRIDGE_DATA_DIR", str(tmp_path))
    url = f"sqlite:///{tmp_path / 'edge' / 'edge.db'}"
    upgrade(url, "edge")
    db = Database(url)
    trail = AuditTrail(db, "edge:local-edge")
    for i, agreement in enumerate(("a-one", "a-two", "a-one")):
        trail.record("export", agreement_id=agreement, study_uid=f"2.25.{i}", details={"n": i})
    return db


def test_verify_then_a_changed_record_is_named(edge_db: Database) -> None:
    out = CliRunner().invoke(app, ["audit", "verify", "--node", "edge"])
    assert out.exit_code == 0 and "intact" in out.output and "3 records" in out.output
    with edge_db.session() as s:
        s.execute(update(AuditRow).where(AuditRow.id == 2).values(agreement_id="a-three"))
    out = CliRunner().invoke(app, ["audit", "verify", "--node", "edge"])
    assert out.exit_code == 1 and "record 2" in out.output and "altered" in out.output


def test_export_for_one_agreement_is_valid_xml(edge_db: Database, tmp_path: Path) -> None:
    target = tmp_path / "audit.xml"
    out = CliRunner().invoke(
        app, ["audit", "export", "--node", "edge", "--agreement", "a-one", "--out", str(target)]
    )
    assert out.exit_code == 0, out.output
    root = etree.fromstring(target.read_bytes())
    messages = root.findall("AuditMessage")
    assert len(messages) == 2
    assert all(SCHEMA.validate(m) for m in messages)
    out = CliRunner().invoke(app, ["audit", "export", "--node", "edge", "--since", "2999-01-01"])
    assert out.exit_code == 0 and "<AuditMessage>" not in out.output
    out = CliRunner().invoke(app, ["audit", "export", "--node", "moon"])
    assert out.exit_code == 2 and "edge or center" in out.output

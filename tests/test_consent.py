"""The edge's consent register (dicom_io/consent.py) on SQLite and PostgreSQL, and the
`radbridge consent` commands: what holds a study, what lets it go, what a withdrawal does."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from dicom_io.consent import NO_REFERENCE, WITHDRAWN, ConsentRegister, Patient, patient_of
from radbridge.agreements import Agreement, parse_agreements
from radbridge.db import Database
from radbridge.db.agreements import sync_agreements
from radbridge.db.tables import AuditRow, ConsentRow
from radbridge.errors import ConfigError
from tests.conftest import PATIENT, REPO, make_instance

AGREEMENTS = REPO / "radbridge/defaults/agreements.yaml"


def _agreement(db: Database, **consent: object) -> Agreement:
    raw = yaml.safe_load(AGREEMENTS.read_text())
    raw["agreements"][0]["consent"] = consent
    aset = parse_agreements(raw)
    sync_agreements(db, aset)
    return aset.agreements[0]


def test_without_a_requirement_only_a_withdrawal_holds(edge_db: Database) -> None:
    agreement = _agreement(edge_db)
    register = ConsentRegister(edge_db, "secret")
    patient = Patient("", "PID-1", None)
    assert register.hold_reason(agreement, patient) is None
    register.withdraw_person(agreement.id, "", "PID-1")
    hold = register.hold_reason(agreement, patient)
    assert hold is not None and (hold.reason, hold.final) == (WITHDRAWN, True)
    assert register.hold_reason(agreement, Patient("", "PID-2", None)) is None
    # Another issuer's PID-1 is another person.
    assert register.hold_reason(agreement, Patient("OTHER-HOSPITAL", "PID-1", None)) is None


def test_a_required_consent_comes_from_the_register_or_the_study(edge_db: Database) -> None:
    agreement = _agreement(edge_db, required=True, attribute="ClinicalTrialProtocolID")
    register = ConsentRegister(edge_db, "secret")
    hold = register.hold_reason(agreement, Patient("", "PID-1", None))
    assert hold is not None and (hold.reason, hold.final) == (NO_REFERENCE, False)
    assert register.hold_reason(agreement, Patient("", "", None)) is not None  # no Patient ID
    # The study carries its reference: it goes, and the reference is recorded.
    assert register.hold_reason(agreement, Patient("", "PID-1", "IRB-2026-7")) is None
    assert register.hold_reason(agreement, Patient("", "PID-1", None)) is None
    register.record(agreement.id, "", "PID-2", "PAPER-FORM-12", "import")
    assert register.hold_reason(agreement, Patient("", "PID-2", None)) is None
    # A withdrawal wins over any reference, until a new consent is recorded.
    register.withdraw_person(agreement.id, "", "PID-2")
    held = register.hold_reason(agreement, Patient("", "PID-2", "IRB-2026-7"))
    assert held is not None and held.final
    register.record(agreement.id, "", "PID-2", "PAPER-FORM-13", "cli")
    assert register.hold_reason(agreement, Patient("", "PID-2", None)) is None


def test_the_register_holds_no_identifier(edge_db: Database) -> None:
    agreement = _agreement(edge_db, required=True)
    register = ConsentRegister(edge_db, "secret")
    register.record(agreement.id, "ISSUER-9", PATIENT["id"], "REF-1", "cli")
    with edge_db.session() as s:
        row = s.scalars(select(ConsentRow)).one()
    assert PATIENT["id"] not in row.person and len(row.person) == 64
    assert (
        ConsentRegister(edge_db, "other secret").person(agreement.id, "ISSUER-9", PATIENT["id"])
        != row.person
    )  # keyed: the hash cannot be recomputed without the edge's secret
    with pytest.raises(ConfigError):
        register.record(agreement.id, "", "PID-3", "  ", "cli")
    assert "identifying" in repr(Patient("", PATIENT["id"], None))


def test_patient_of_reads_the_header_and_the_named_attribute(edge_db: Database) -> None:
    agreement = _agreement(edge_db, required=True, attribute="ClinicalTrialProtocolID")
    ds = make_instance()
    ds.ClinicalTrialProtocolID = "IRB-2026-7"
    ds.IssuerOfPatientID = "HOSP"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert patient_of(buf.getvalue(), agreement) == Patient("HOSP", PATIENT["id"], "IRB-2026-7")


def test_an_unknown_attribute_fails_at_load_naming_it() -> None:
    raw = yaml.safe_load(AGREEMENTS.read_text())
    raw["agreements"][0]["consent"] = {"required": True, "attribute": "ConsentRefernce"}
    with pytest.raises(Exception, match="ConsentRefernce"):
        parse_agreements(raw)


def test_consent_commands_import_and_withdraw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from radbridge.cli import app
    from radbridge.settings import load_settings

    monkeypatch.setenv("RADBRIDGE_DATA_DIR", str(tmp_path / "data"))
    csv = tmp_path / "consents.csv"
    csv.write_text("patient_id,reference\nPID-1,REF-1\nPID-2,REF-2,ISSUER\n", encoding="utf-8")
    agreement = "demo-hospital-to-center"
    runner = CliRunner()

    def said(out: object) -> str:
        return " ".join(str(out.output).split())  # type: ignore[attr-defined]

    out = runner.invoke(app, ["consent", "import", str(csv), "--agreement", agreement])
    assert out.exit_code == 0 and "2 consents recorded" in said(out), out.output
    bad = tmp_path / "bad.csv"
    bad.write_text("PID-3\n", encoding="utf-8")
    out = runner.invoke(app, ["consent", "import", str(bad), "--agreement", agreement])
    assert out.exit_code != 0 and "row 1" in said(out)
    out = runner.invoke(app, ["consent", "withdraw", "PID-1", "--agreement", agreement])
    assert out.exit_code == 0 and "0 purge requests" in said(out), out.output
    out = runner.invoke(app, ["consent", "withdraw", "PID-1", "--agreement", "nope"])
    assert out.exit_code != 0 and "--agreement" in said(out)
    db = Database(load_settings().edge_db_url)
    try:
        with db.session() as s:
            rows = s.scalars(select(ConsentRow).order_by(ConsentRow.id)).all()
            events = s.scalars(select(AuditRow.event_id)).all()
        assert [r.withdrawn_at is not None for r in rows] == [True, False]
        assert events.count("110110") == 3  # two consents recorded, one withdrawn
    finally:
        db.dispose()

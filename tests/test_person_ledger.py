"""The PIPL person ledger (dicom_io/person_ledger.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime

import pytest
import yaml
from sqlalchemy import insert, update

from dicom_io.person_ledger import PersonLedger
from radbridge.agreements import Agreement, parse_agreements
from radbridge.audit import AuditTrail, records
from radbridge.db import Database
from radbridge.db.tables import PersonRow, PersonYearRow
from radbridge.metrics import EdgeMetrics
from tests.conftest import REPO

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def _agreements(**basis: object) -> list[Agreement]:
    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
    a = raw["agreements"][0]
    a["transfer_basis"].update(basis)
    b = json.loads(json.dumps(a, default=str))
    b["id"] = "demo-hospital-second-agreement"  # the same hospital, another of its PACS
    b["hospital"]["calling_ae_titles"] = ["SECOND_PACS"]
    raw["agreements"].append(b)
    return parse_agreements(raw).agreements


def _prefill(db: Database, hospital: str, persons: int, year: int = 2026) -> None:
    """``persons`` already counted this year (bulk: as 9,998 admissions would leave it)."""
    rows = [
        {
            "hospital": hospital,
            "year": year,
            "person": f"{i:064x}",
            "agreement_id": "demo-hospital-to-center",
            "first_at": NOW,
        }
        for i in range(persons)
    ]
    with db.session() as s:
        s.execute(insert(PersonRow), rows)
        s.add(PersonYearRow(hospital=hospital, year=year, persons=persons))


def test_the_10000th_person_is_refused_and_a_counted_one_still_goes(
    edge_db: Database,
) -> None:
    a, _ = _agreements()
    ledger = PersonLedger(edge_db, "secret", EdgeMetrics())
    _prefill(edge_db, a.hospital.name, 9_998)
    p9999 = ledger.person(a.hospital.name, "", "PID-9999", "2.25.1")
    first = ledger.admit(a, p9999, NOW)
    assert first.admitted and first.new_person and first.persons == 9_999
    p10000 = ledger.person(a.hospital.name, "", "PID-10000", "2.25.2")
    refused = ledger.admit(a, p10000, NOW)
    assert not refused.admitted and refused.persons == 9_999 and refused.ceiling == 10_000
    assert "stay below 10000" in refused.refusal(a) and "standard_contract" in refused.refusal(a)
    again = ledger.admit(a, p9999, NOW)  # the 9,999th person's second study
    assert again.admitted and not again.new_person and again.persons == 9_999


def test_one_count_across_the_hospitals_agreements_and_a_new_year(
    edge_db: Database,
) -> None:
    a, b = _agreements(max_persons_per_year=3)  # fewer than 3: two persons a year
    ledger = PersonLedger(edge_db, "secret")
    people = [ledger.person(a.hospital.name, "", f"P{i}", "2.25.9") for i in range(3)]
    assert ledger.admit(a, people[0], NOW).admitted
    assert ledger.admit(b, people[1], NOW).admitted  # the other agreement: same count
    assert not ledger.admit(b, people[2], NOW).admitted
    assert not ledger.admit(a, people[2], NOW).admitted  # splitting does not help
    next_year = datetime(2027, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert ledger.admit(a, people[2], next_year).admitted  # the count restarts on 1 January


def test_keys_are_keyed_and_a_missing_patient_id_never_merges_persons() -> None:
    one, other = PersonLedger.__new__(PersonLedger), PersonLedger.__new__(PersonLedger)
    PersonLedger.__init__(one, None, "secret-one")  # type: ignore[arg-type]
    PersonLedger.__init__(other, None, "secret-two")  # type: ignore[arg-type]
    assert one.person("H", "", "PID-1", "2.25.1") != other.person("H", "", "PID-1", "2.25.1")
    assert "PID-1" not in one.person("H", "", "PID-1", "2.25.1")
    assert one.person("H", "", "", "2.25.1") != one.person("H", "", "", "2.25.2")
    assert one.person("H", "ISSUER-A", "7", "x") != one.person("H", "ISSUER-B", "7", "x")


def test_crossing_80_percent_is_audited_and_measured(edge_db: Database) -> None:
    a, _ = _agreements()
    metrics = EdgeMetrics()
    ledger = PersonLedger(edge_db, "secret", metrics, AuditTrail(edge_db, "edge:e"))
    _prefill(edge_db, a.hospital.name, 7_999)
    assert ledger.admit(a, ledger.person(a.hospital.name, "", "X", "1"), NOW).persons == 8_000
    assert ledger.admit(a, ledger.person(a.hospital.name, "", "Y", "1"), NOW).persons == 8_001
    warnings = [json.loads(r.details) for r in records(edge_db)]
    assert len(warnings) == 1 and warnings[0]["event"] == "transfer-ceiling"
    assert warnings[0]["persons"] == 8_000 and "80 %" in warnings[0]["reason"]
    sample = metrics.registry.get_sample_value
    assert sample("radbridge_edge_transfer_persons", {"agreement": a.id}) == 8_001
    assert sample("radbridge_edge_transfer_persons_ceiling", {"agreement": a.id}) == 10_000


def test_concurrent_admissions_never_pass_the_ceiling(edge_db: Database) -> None:
    a, _ = _agreements(max_persons_per_year=6)
    ledger = PersonLedger(edge_db, "secret")
    ledger.admit(a, ledger.person(a.hospital.name, "", "seed", "1"), NOW)
    with edge_db.session() as s:
        s.execute(update(PersonYearRow).values(persons=4))  # one more may go
    results: list[bool] = []

    def admit(i: int) -> None:
        mine = PersonLedger(Database(edge_db.url), "secret")
        try:
            person = mine.person(a.hospital.name, "", f"racer-{i}", "1")
            results.append(mine.admit(a, person, NOW).admitted)
        finally:
            mine.db.dispose()

    threads = [threading.Thread(target=admit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [False] * 5 + [True]


def test_more_than_10000_needs_a_security_assessment() -> None:
    with pytest.raises(Exception, match="security assessment"):
        _agreements(max_persons_per_year=50_000)
    (a, _) = _agreements(max_persons_per_year=50_000, mechanism="security_assessment")
    assert a.transfer_basis.max_persons_per_year == 50_000


def test_gateway_status_shows_this_years_count(edge_db: Database, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from dicom_io.gateway_status import gateway_status
    from dicom_io.store import DurableStore
    from radbridge.db.tables import utcnow

    a, _ = _agreements()
    ledger = PersonLedger(edge_db, "secret")
    ledger.admit(a, ledger.person(a.hospital.name, "", "P1", "1"), utcnow())
    st = gateway_status(edge_db, DurableStore(tmp_path / "s"), None)
    assert st.persons_this_year == {a.hospital.name: 1}

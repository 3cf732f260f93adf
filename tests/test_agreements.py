from datetime import date
from pathlib import Path

import pytest
import yaml

from radbridge.agreements import load_agreements, parse_agreements
from radbridge.errors import AgreementError

DEFAULT = Path(__file__).resolve().parent.parent / "radbridge/defaults/agreements.yaml"


def _raw() -> dict:
    return yaml.safe_load(DEFAULT.read_text())


def test_default_file_is_valid_and_active() -> None:
    aset = load_agreements(DEFAULT)
    a = aset.for_calling_ae("DEMO_PACS")
    assert a is not None and a.may_transfer()
    assert a.hospital.allows_ip("127.0.0.1") and not a.hospital.allows_ip("10.1.2.3")
    assert aset.for_calling_ae("NOBODY") is None


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (
            ("hospital", "calling_ae_titles"),
            ["WAY_TOO_LONG_AE_TITLE"],
            "hospital.calling_ae_titles",
        ),
        (("hospital", "allowed_source_ips"), ["not-an-ip"], "hospital.allowed_source_ips"),
        (("modalities",), ["XX"], "modalities"),
        (("report_languages",), ["fr"], "report_languages"),
        (("transfer_basis", "mechanism"), "handshake", "transfer_basis.mechanism"),
        (("id",), "Has Spaces", ".id"),
    ],
)
def test_bad_field_is_named(path: tuple[str, ...], value: object, field: str) -> None:
    raw = _raw()
    node = raw["agreements"][0]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(AgreementError) as err:
        parse_agreements(raw, "x.yaml")
    msg = str(err.value)
    assert "agreements[0] (id=" in msg and field in msg


def test_unknown_key_and_dates() -> None:
    raw = _raw()
    raw["agreements"][0]["surprise"] = 1
    with pytest.raises(AgreementError, match="surprise"):
        parse_agreements(raw)
    raw = _raw()
    raw["agreements"][0]["active_until"] = "2000-01-01"
    with pytest.raises(AgreementError, match="active_until must be after"):
        parse_agreements(raw)


def test_duplicate_calling_ae_across_agreements_is_refused() -> None:
    raw = _raw()
    second = dict(raw["agreements"][0], id="second-agreement")
    raw["agreements"].append(second)
    with pytest.raises(AgreementError, match="calling AE title 'DEMO_PACS' is used by both"):
        parse_agreements(raw)


def test_transfer_basis_suspended_or_expired_stops_transfer() -> None:
    raw = _raw()
    raw["agreements"][0]["transfer_basis"]["suspended"] = True
    a = parse_agreements(raw).agreements[0]
    assert a.is_active() and not a.may_transfer()
    raw = _raw()
    raw["agreements"][0]["transfer_basis"]["valid_until"] = "2025-06-30"
    a = parse_agreements(raw).agreements[0]
    assert a.may_transfer(date(2025, 6, 1)) and not a.may_transfer(date(2025, 7, 1))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(AgreementError, match="file not found"):
        load_agreements(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("agreements: [\n")
    with pytest.raises(AgreementError, match="not valid YAML"):
        load_agreements(bad)


def test_modalities_are_the_standards_defined_terms() -> None:
    """PS3.3 C.7.3.1.1.1: documents, key objects and presentation states are real modalities
    a hospital sends; a typo is refused at load, naming it."""
    raw = _raw()
    raw["agreements"][0]["modalities"] = ["CR", "DX", "DOC", "KO", "PR", "IO", "SC", "DS"]
    parse_agreements(raw, "x.yaml")
    raw["agreements"][0]["modalities"] = ["CR", "DXX"]
    with pytest.raises(AgreementError, match="DXX"):
        parse_agreements(raw, "x.yaml")

"""dicom_io.association_policy: each row of its table, as a pure decision (the same rows over
real associations, with TLS, are tests/integration/test_scp_policy.py)."""

from __future__ import annotations

from typing import Any

import yaml

from dicom_io.association_counts import LocalCounts
from dicom_io.association_policy import Peer, Refusal, admit
from dicom_io.upper_layer import APPLICATION_CONTEXT, AssociateRequest
from radbridge.agreements import Agreement, AgreementSet, parse_agreements
from tests.conftest import REPO

LOOPBACK = Peer("127.0.0.1", tls=False, common_name=None)


def _agreements(**hospital: Any) -> AgreementSet:
    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
    raw["agreements"][0]["hospital"].update(hospital)
    return parse_agreements(raw)


def _request(calling: str = "DEMO_PACS", called: str = "RADBRIDGE") -> AssociateRequest:
    return AssociateRequest(
        called_ae=called, calling_ae=calling, application_context=APPLICATION_CONTEXT
    )


def _fields(outcome: Agreement | Refusal) -> tuple[str, int, int, int]:
    assert isinstance(outcome, Refusal), outcome
    return outcome.reason, outcome.result, outcome.source, outcome.diagnostic


def test_each_refusal_carries_its_rows_reason() -> None:
    default, counts = _agreements(), LocalCounts()
    assert _fields(admit(_request("NOBODY"), LOOPBACK, default, "RADBRIDGE", counts)) == (
        "calling_ae",
        1,
        1,
        3,
    )
    assert _fields(admit(_request(called="OTHER"), LOOPBACK, default, "RADBRIDGE", counts)) == (
        "called_ae",
        1,
        1,
        7,
    )
    away = Peer("192.0.2.7", tls=False, common_name=None)
    assert _fields(admit(_request(), away, default, "RADBRIDGE", counts)) == ("source_ip", 1, 1, 1)
    tls_only = _agreements(require_tls=True)
    assert _fields(admit(_request(), LOOPBACK, tls_only, "RADBRIDGE", counts)) == (
        "tls_required",
        1,
        1,
        1,
    )
    named = _agreements(require_tls=True, tls_client_names=["demo-pacs"])
    stranger = Peer("127.0.0.1", tls=True, common_name="another-device")
    assert _fields(admit(_request(), stranger, named, "RADBRIDGE", counts)) == (
        "client_cert",
        1,
        1,
        1,
    )
    only = default.agreements[0].id
    assert counts.open(only, 1)  # none open before this one: nothing refused was counted


def test_the_hospitals_limit_counts_what_it_admits() -> None:
    limited, counts = _agreements(max_associations=1), LocalCounts()
    first = admit(_request(), LOOPBACK, limited, "RADBRIDGE", counts)
    assert isinstance(first, Agreement)
    assert _fields(admit(_request(), LOOPBACK, limited, "RADBRIDGE", counts)) == (
        "agreement_limit",
        2,
        3,
        2,
    )
    counts.close(first.id)
    assert isinstance(admit(_request(), LOOPBACK, limited, "RADBRIDGE", counts), Agreement)


def test_the_hospitals_own_called_ae_title_and_a_known_certificate_are_admitted() -> None:
    own = _agreements(called_ae_title="HOSP_EDGE", require_tls=True, tls_client_names=["demo-pacs"])
    pacs = Peer("127.0.0.1", tls=True, common_name="demo-pacs")
    admitted = admit(_request(called="HOSP_EDGE"), pacs, own, "RADBRIDGE", LocalCounts())
    assert isinstance(admitted, Agreement)
    assert _fields(admit(_request(), pacs, own, "RADBRIDGE", LocalCounts()))[0] == "called_ae"

"""Per-agreement association policy over real loopback associations: DICOM TLS with client
certificates, the hospital's called AE title and its own association limit."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
from sqlalchemy import select

from dicom_io.ingest import Ingestor
from dicom_io.scp import StorageSCP
from dicom_io.scu import associate
from dicom_io.store import DurableStore
from dicom_io.tls import server_context
from radbridge.agreements import AgreementSet, parse_agreements
from radbridge.db import Database
from radbridge.db.tables import InstanceRow
from radbridge.errors import ConfigError
from radbridge.metrics import EdgeMetrics
from radbridge.settings import EdgeTLS
from tests.certs import Issued, TestCA
from tests.conftest import REPO, free_port, make_instance, write_instance


def _agreements(**hospital: Any) -> AgreementSet:
    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
    raw["agreements"][0]["hospital"].update(hospital)
    return parse_agreements(raw)


class Edge:
    def __init__(self, db: Database, tmp: Path, agreements: AgreementSet) -> None:
        self.store_dir = tmp / "store"
        self.scp = StorageSCP(
            "RADBRIDGE",
            lambda: agreements,
            Ingestor(db, DurableStore(self.store_dir)),
            EdgeMetrics(),
        )
        self.port = free_port()
        self.tls_port = free_port()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = TestCA(tmp_path / "pki")
    rogue = TestCA(tmp_path / "rogue", name="rogue CA")
    return {
        "ca": ca,
        "server": ca.issue("radbridge-edge", server=True),
        "pacs": ca.issue("demo-pacs"),
        "other": ca.issue("another-device"),
        "rogue": rogue.issue("demo-pacs"),
    }


@pytest.fixture
def make_edge(edge_db: Database, tmp_path: Path, pki: dict[str, Any]) -> Iterator[Any]:
    edges: list[Edge] = []

    def start(agreements: AgreementSet) -> Edge:
        edge = Edge(edge_db, tmp_path, agreements)
        tls = EdgeTLS(
            port=edge.tls_port,
            cert_file=pki["server"].cert,
            key_file=pki["server"].key,
            ca_file=pki["ca"].cert,
        )
        edge.scp.start("127.0.0.1", edge.port)
        edge.scp.start("127.0.0.1", edge.tls_port, ssl_context=server_context(tls))
        edges.append(edge)
        return edge

    yield start
    for e in edges:
        e.scp.stop()


def _client_ctx(ca: TestCA, client: Issued | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca.cert))
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    return ctx


def _associate(port: int, *, called: str = "RADBRIDGE", tls: ssl.SSLContext | None = None) -> Any:
    ae = AE(ae_title="DEMO_PACS")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    tls_args = (tls, "localhost") if tls is not None else None
    return associate(ae, "127.0.0.1", port, ae_title=called, tls_args=tls_args)


def _rj(assoc: Any) -> tuple[int, int, int]:
    p = assoc.acceptor.primitive
    return (p.result, p.result_source, p.diagnostic)


def test_tls_store_with_a_client_certificate_the_ca_signed(
    make_edge: Any, pki: dict[str, Any], tmp_path: Path, edge_db: Database
) -> None:
    edge = make_edge(_agreements(require_tls=True, tls_client_names=["demo-pacs"]))
    assoc = _associate(edge.tls_port, tls=_client_ctx(pki["ca"], pki["pacs"]))
    assert assoc.is_established
    path = write_instance(make_instance(), tmp_path / "in.dcm")
    assert assoc.send_c_echo().Status == 0x0000
    assert assoc.send_c_store(path).Status == 0x0000
    assoc.release()
    with edge_db.session() as s:
        assert len(s.scalars(select(InstanceRow)).all()) == 1


def test_tls_required_refuses_the_plain_port(make_edge: Any) -> None:
    edge = make_edge(_agreements(require_tls=True))
    assoc = _associate(edge.port)
    assert assoc.is_rejected and _rj(assoc) == (1, 1, 1)


@pytest.mark.parametrize("client", [None, "rogue"])
def test_tls_without_a_trusted_client_certificate_never_associates(
    make_edge: Any, pki: dict[str, Any], client: str | None
) -> None:
    edge = make_edge(_agreements(require_tls=True))
    assoc = _associate(edge.tls_port, tls=_client_ctx(pki["ca"], pki[client] if client else None))
    assert not assoc.is_established


def test_tls_client_name_not_in_the_agreement_is_rejected(
    make_edge: Any, pki: dict[str, Any]
) -> None:
    edge = make_edge(_agreements(require_tls=True, tls_client_names=["demo-pacs"]))
    assoc = _associate(edge.tls_port, tls=_client_ctx(pki["ca"], pki["other"]))
    assert assoc.is_rejected and _rj(assoc) == (1, 1, 1)


def test_hospital_called_ae_title(make_edge: Any) -> None:
    edge = make_edge(_agreements(called_ae_title="RB_DEMO"))
    wrong = _associate(edge.port, called="RADBRIDGE")
    assert wrong.is_rejected and _rj(wrong) == (1, 1, 7)
    right = _associate(edge.port, called="RB_DEMO")
    assert right.is_established
    right.release()


def test_hospital_association_limit_is_transient_and_frees_on_release(make_edge: Any) -> None:
    edge = make_edge(_agreements(max_associations=1))
    first = _associate(edge.port)
    assert first.is_established
    second = _associate(edge.port)
    assert second.is_rejected and _rj(second) == (2, 3, 2)
    first.release()
    third = _associate(edge.port)
    assert third.is_established
    third.release()


def test_tls_settings_with_a_missing_file_fail_naming_the_field(tmp_path: Path) -> None:
    tls = EdgeTLS(
        cert_file=tmp_path / "nope.crt", key_file=tmp_path / "nope.key", ca_file=tmp_path / "ca"
    )
    with pytest.raises(ConfigError, match=r"edge\.tls\.cert_file"):
        server_context(tls)

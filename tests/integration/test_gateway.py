"""The composed Gateway from settings: plain SCP, DICOM TLS port and STOW-RS port together."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
from sqlalchemy import select

from dicom_io.gateway import Gateway
from dicom_io.stow import encode_multipart
from radbridge.db import upgrade
from radbridge.db.tables import InstanceRow, StudyRow
from radbridge.errors import ConfigError
from radbridge.settings import load_settings
from tests.certs import TestCA
from tests.conftest import REPO, free_port, make_instance, write_instance

PASSWORD_ENV = "RADBRIDGE_TEST_GATEWAY_STOW_PASSWORD"


@pytest.fixture
def gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Gateway, Any]]:
    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
    raw["agreements"][0]["hospital"]["stow"] = {"username": "demo", "password_env": PASSWORD_ENV}
    agreements = tmp_path / "agreements.yaml"
    agreements.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    ca = TestCA(tmp_path / "pki")
    server = ca.issue("radbridge-edge", server=True)
    settings = load_settings(
        data_dir=tmp_path / "data",
        agreements_file=agreements,
        edge={
            "port": free_port(),
            "stow_port": free_port(),
            "metrics_port": 0,
            "center_url": f"http://127.0.0.1:{free_port()}",
            "tls": {
                "port": free_port(),
                "cert_file": server.cert,
                "key_file": server.key,
                "ca_file": ca.cert,
            },
        },
    )
    upgrade(settings.edge_db_url, "edge")
    gw = Gateway(settings)
    gw.start()
    try:
        yield gw, {"ca": ca, "client": ca.issue("demo-pacs")}
    finally:
        gw.stop()


def test_one_gateway_serves_scp_tls_and_stow(gateway: tuple[Gateway, Any], tmp_path: Path) -> None:
    gw, pki = gateway
    e = gw.settings.edge
    ae = AE(ae_title="DEMO_PACS")
    ae.add_requested_context(Verification)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert))
    ctx.load_cert_chain(pki["client"].cert, pki["client"].key)
    assert e.tls is not None
    study = make_instance().StudyInstanceUID
    over_tls = write_instance(make_instance(study), tmp_path / "tls.dcm")
    plain = write_instance(make_instance(study), tmp_path / "plain.dcm")
    assoc = ae.associate("127.0.0.1", e.tls.port, ae_title="RADBRIDGE", tls_args=(ctx, "localhost"))
    assert assoc.is_established
    assert assoc.send_c_store(over_tls).Status == 0x0000
    assoc.release()
    assoc = ae.associate("127.0.0.1", e.port, ae_title="RADBRIDGE")
    assert assoc.send_c_store(plain).Status == 0x0000
    assoc.release()
    body, ctype = encode_multipart([_bytes(study)])
    r = httpx.post(
        f"http://127.0.0.1:{e.stow_port}/dicomweb/studies",
        content=body,
        headers={"Content-Type": ctype},
        auth=("demo", "s3cret"),
    )
    assert r.status_code == 200, r.text
    with gw.db.session() as s:
        assert s.scalars(select(StudyRow)).one().instance_count == 3
        assert len(s.scalars(select(InstanceRow)).all()) == 3


def _bytes(study: str) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    make_instance(study).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_unusable_tls_files_fail_at_start_naming_the_setting(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path,
        edge={
            "metrics_port": 0,
            "tls": {"cert_file": "missing.crt", "key_file": "missing.key", "ca_file": "ca.pem"},
        },
    )
    with pytest.raises(ConfigError, match=r"edge\.tls\.cert_file"):
        Gateway(settings)

"""The edge STOW-RS receiver over real loopback HTTP (dicomweb-client and httpx as the PACS)."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import yaml
from dicomweb_client import DICOMwebClient
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import UID
from sqlalchemy import select

from dicom_io.ingest import Ingestor
from dicom_io.store import DurableStore
from dicom_io.stow import encode_multipart
from dicom_io.stow_server import STUDY_UID_MISMATCH, StowServer, build_stow_app
from radbridge.agreements import AgreementSet, parse_agreements
from radbridge.db import Database
from radbridge.db.tables import InstanceRow
from radbridge.metrics import EdgeMetrics
from radbridge.settings import EdgeTLS
from tests.certs import TestCA
from tests.conftest import REPO, free_port, make_instance

USER, PASSWORD_ENV, PASSWORD = "demo-pacs", "RADBRIDGE_TEST_STOW_PASSWORD", "s3cret-pacs-pw"
AGREEMENT = "demo-hospital-to-center"
MR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
CANNOT_UNDERSTAND, NOT_AUTHORIZED = 0xC000, 0x0124


def _agreements(**hospital: Any) -> AgreementSet:
    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text("utf-8"))
    raw["agreements"][0]["hospital"]["stow"] = {"username": USER, "password_env": PASSWORD_ENV}
    raw["agreements"][0]["hospital"].update(hospital)
    return parse_agreements(raw)


class Edge:
    def __init__(self, url: str, db: Database, store: Path, metrics: EdgeMetrics) -> None:
        self.url, self.db, self.store, self.metrics = url, db, store, metrics

    def rows(self) -> list[InstanceRow]:
        with self.db.session() as s:
            return list(s.scalars(select(InstanceRow)).all())

    def files(self) -> list[Path]:
        return list(self.store.rglob("*.dcm"))

    def count(self, outcome: str) -> float:
        labels = {"agreement": AGREEMENT, "outcome": outcome}
        return self.metrics.registry.get_sample_value("radbridge_edge_instances_total", labels) or 0


Serve = Callable[..., Edge]


@pytest.fixture
def serve(edge_db: Database, tmp_path: Path) -> Iterator[Serve]:
    """Start a StowServer on loopback; keyword arguments go to build_stow_app."""
    servers: list[StowServer] = []

    def start(agreements: AgreementSet | None = None, **kw: Any) -> Edge:
        aset = agreements or _agreements()
        kw.setdefault("environ", {PASSWORD_ENV: PASSWORD})
        store = tmp_path / f"store{len(servers)}"
        metrics = EdgeMetrics()
        app = build_stow_app(lambda: aset, Ingestor(edge_db, DurableStore(store)), metrics, **kw)
        port = free_port()
        server = StowServer(app, "127.0.0.1", port)
        server.start()
        servers.append(server)
        return Edge(f"http://127.0.0.1:{port}/dicomweb", edge_db, store, metrics)

    yield start
    for server in servers:
        server.stop()


@contextmanager
def _http(auth: tuple[str, str] | None = (USER, PASSWORD)) -> Iterator[httpx.Client]:
    with httpx.Client(auth=auth, timeout=30) as client:
        yield client


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _dataset_bytes(raw: bytes) -> bytes:
    """The encoded dataset after the Part 10 preamble and file meta group.

    Walks the group 0002 elements (explicit VR little endian): dicomweb-client writes no
    File Meta Information Group Length, so it cannot be trusted to be there.
    """
    assert raw[128:132] == b"DICM"
    pos = 132
    while int.from_bytes(raw[pos : pos + 2], "little") == 0x0002:
        if raw[pos + 4 : pos + 6] in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            pos += 12 + int.from_bytes(raw[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(raw[pos + 6 : pos + 8], "little")
    return raw[pos:]


def _ct() -> Dataset:
    ds = make_instance(modality="MR")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_STORAGE
    return ds


def _post(client: httpx.Client, url: str, parts: list[bytes]) -> httpx.Response:
    body, content_type = encode_multipart(parts)
    return client.post(url, content=body, headers={"Content-Type": content_type})


def _uid(item: dict[str, Any], tag: str) -> str | None:
    return item[tag]["Value"][0] if tag in item else None


def test_dicomweb_client_stores_two_instances(serve: Serve) -> None:
    edge = serve()
    study = make_instance().StudyInstanceUID
    sent = [make_instance(study, seed=1), make_instance(study, seed=2)]
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    client = DICOMwebClient(url=edge.url, session=session)
    response = client.store_instances(sent)
    assert "FailedSOPSequence" not in response
    assert sorted(i.ReferencedSOPInstanceUID for i in response.ReferencedSOPSequence) == sorted(
        ds.SOPInstanceUID for ds in sent
    )
    rows = {r.sop_instance_uid: r for r in edge.rows()}
    assert set(rows) == {ds.SOPInstanceUID for ds in sent}
    for ds in sent:
        stored = (edge.store / rows[ds.SOPInstanceUID].path).read_bytes()
        assert _dataset_bytes(stored) == _dataset_bytes(_encode(ds))  # stored exactly as sent
        assert len(_dataset_bytes(stored)) > len(ds.PixelData)
    assert edge.count("stored") == 2
    assert httpx.get(edge.url.removesuffix("/dicomweb") + "/healthz").json() == {"status": "ok"}


def test_mixed_request_is_202_with_per_part_reasons(serve: Serve) -> None:
    edge = serve()
    good, ct = make_instance(), _ct()
    with _http() as c:
        r = _post(c, f"{edge.url}/studies", [_encode(good), b"not dicom", _encode(ct)])
    assert r.status_code == 202
    assert r.headers["content-type"] == "application/dicom+json"
    body = r.json()
    (ref,) = body["00081199"]["Value"]
    assert _uid(ref, "00081155") == good.SOPInstanceUID
    assert _uid(ref, "00081150") == good.SOPClassUID
    failed = body["00081198"]["Value"]
    assert len(failed) == 2
    unparseable = next(i for i in failed if "00081155" not in i)
    assert unparseable == {"00081197": {"vr": "US", "Value": [CANNOT_UNDERSTAND]}}
    refused = next(i for i in failed if _uid(i, "00081155") == ct.SOPInstanceUID)
    assert _uid(refused, "00081150") == MR_STORAGE
    assert refused["00081197"] == {"vr": "US", "Value": [NOT_AUTHORIZED]}
    assert [r.sop_instance_uid for r in edge.rows()] == [good.SOPInstanceUID]
    assert len(edge.files()) == 1
    assert (edge.count("stored"), edge.count("unparseable")) == (1, 1)
    assert edge.count("modality_not_allowed") == 1


def test_all_parts_failing_is_409(serve: Serve) -> None:
    edge = serve()
    with _http() as c:
        r = _post(c, f"{edge.url}/studies", [b"not dicom", _encode(_ct())])
    assert r.status_code == 409
    body = r.json()
    assert "00081199" not in body
    reasons = sorted(i["00081197"]["Value"][0] for i in body["00081198"]["Value"])
    assert reasons == [NOT_AUTHORIZED, CANNOT_UNDERSTAND]
    assert edge.rows() == [] and edge.files() == []


@pytest.mark.parametrize(
    "auth",
    [(USER, "wrong-password"), None, ("intruder", PASSWORD), (USER, "")],
    ids=["wrong-password", "no-auth", "unknown-user", "empty-password"],
)
def test_bad_credentials_are_401(serve: Serve, auth: tuple[str, str] | None) -> None:
    edge = serve()
    with _http(auth) as c:
        r = _post(c, f"{edge.url}/studies", [_encode(make_instance())])
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'Basic realm="radbridge"'
    assert "password" not in r.text and "user" not in r.text  # never says which part was wrong
    assert edge.rows() == [] and edge.files() == []


def test_unset_password_env_and_foreign_source_are_the_same_401(serve: Serve) -> None:
    no_env = serve(environ={})
    with _http() as c:
        r = _post(c, f"{no_env.url}/studies", [_encode(make_instance())])
    assert r.status_code == 401 and "www-authenticate" in r.headers
    # The source address is checked before the credentials, and answers the same 401.
    elsewhere = serve(_agreements(allowed_source_ips=["10.0.0.0/8"]))
    with _http() as c:
        r = _post(c, f"{elsewhere.url}/studies", [_encode(make_instance())])
    assert r.status_code == 401 and "www-authenticate" in r.headers
    assert no_env.rows() == [] and no_env.files() == [] and elsewhere.files() == []


def test_an_agreement_requiring_tls_takes_stow_only_over_https(
    edge_db: Database, tmp_path: Path
) -> None:
    ca = TestCA(tmp_path / "pki")
    server_cert, client_cert = ca.issue("radbridge-edge", server=True), ca.issue("demo-pacs")
    tls = EdgeTLS(cert_file=server_cert.cert, key_file=server_cert.key, ca_file=ca.cert)
    aset = _agreements(require_tls=True)
    servers = []
    try:
        for scheme, options in (("http", None), ("https", tls)):
            app = build_stow_app(
                lambda: aset,
                Ingestor(edge_db, DurableStore(tmp_path / scheme)),
                EdgeMetrics(),
                environ={PASSWORD_ENV: PASSWORD},
            )
            port = free_port()
            server = StowServer(app, "127.0.0.1", port, options)
            server.start()
            servers.append(server)
            body, ctype = encode_multipart([_encode(make_instance())])
            verify: Any = False
            cert: Any = None
            if scheme == "https":
                verify = ssl.create_default_context(cafile=str(ca.cert))
                verify.load_cert_chain(client_cert.cert, client_cert.key)
            with httpx.Client(auth=(USER, PASSWORD), timeout=30, verify=verify, cert=cert) as c:
                r = c.post(
                    f"{scheme}://127.0.0.1:{port}/dicomweb/studies",
                    content=body,
                    headers={"Content-Type": ctype},
                )
            assert r.status_code == (401 if scheme == "http" else 200), (scheme, r.text)
    finally:
        for server in servers:
            server.stop()
    assert not list((tmp_path / "http").rglob("*.dcm"))
    assert len(list((tmp_path / "https").rglob("*.dcm"))) == 1


def test_envelope_errors_are_4xx_naming_the_problem(serve: Serve) -> None:
    edge = serve()
    part = _encode(make_instance())
    body, content_type = encode_multipart([part])
    url = f"{edge.url}/studies"
    with _http() as c:
        r = c.post(url, content=b"{}", headers={"Content-Type": "application/json"})
        assert r.status_code == 415 and "multipart/related" in r.json()["error"]
        r = c.post(url, content=body, headers={"Content-Type": content_type + "; x=1"})
        assert r.status_code == 200  # control: the envelope itself is fine
        other_type = body.replace(b"Content-Type: application/dicom", b"Content-Type: image/png")
        r = c.post(url, content=other_type, headers={"Content-Type": content_type})
        assert r.status_code == 415 and "application/dicom" in r.json()["error"]
        r = c.post(url, content=body[: len(body) // 2], headers={"Content-Type": content_type})
        assert r.status_code == 400 and "boundary" in r.json()["error"]
    assert len(edge.rows()) == 1  # only the control request stored anything


def test_oversized_body_is_413(serve: Serve) -> None:
    edge = serve(max_body_bytes=4096)
    body, content_type = encode_multipart([_encode(make_instance())])
    assert len(body) > 4096
    url = f"{edge.url}/studies"

    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to check first
        for i in range(0, len(body), 1024):
            yield body[i : i + 1024]

    with _http() as c:
        r = c.post(url, content=body, headers={"Content-Type": content_type})
        assert r.status_code == 413 and "4096" in r.json()["error"]
        r = c.post(url, content=chunks(), headers={"Content-Type": content_type})
        assert r.status_code == 413
        assert "content-length" not in r.request.headers
    assert edge.rows() == [] and edge.files() == []


def test_study_resource_fails_parts_of_another_study(serve: Serve) -> None:
    edge = serve()
    ours, theirs = make_instance(), make_instance()
    with _http() as c:
        url = f"{edge.url}/studies/{ours.StudyInstanceUID}"
        r = _post(c, url, [_encode(ours), _encode(theirs)])
    assert r.status_code == 202
    body = r.json()
    assert [_uid(i, "00081155") for i in body["00081199"]["Value"]] == [ours.SOPInstanceUID]
    (failed,) = body["00081198"]["Value"]
    assert _uid(failed, "00081155") == theirs.SOPInstanceUID
    assert failed["00081197"]["Value"] == [STUDY_UID_MISMATCH]
    assert [r.sop_instance_uid for r in edge.rows()] == [ours.SOPInstanceUID]
    assert len(edge.files()) == 1


def test_identical_resend_is_200_and_one_row(serve: Serve) -> None:
    edge = serve()
    ds = make_instance()
    part = _encode(ds)
    with _http() as c:
        for _ in range(2):
            r = _post(c, f"{edge.url}/studies", [part])
            assert r.status_code == 200
            assert [_uid(i, "00081155") for i in r.json()["00081199"]["Value"]] == [
                ds.SOPInstanceUID
            ]
    assert len(edge.rows()) == 1 and len(edge.files()) == 1
    assert (edge.count("stored"), edge.count("duplicate")) == (1, 1)

"""radbridge.contract: the edge's client of the center, its TLS check, Retry-After and backoff;
radbridge.pki: the local CA and the center's certificate it checks."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Response

from radbridge.contract import (
    AGREEMENT_RESULT_OBJECTS,
    CenterClient,
    backoff_s,
    retry_after_s,
    tls_verify,
)
from radbridge.db.tables import utcnow
from radbridge.errors import CenterError, ConfigError
from radbridge.pki import certificate_expiry, check_server_files, ensure_local_tls
from tests.certs import TestCA
from tests.conftest import free_port


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = utcnow()

    def answer(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after_s(answer("7"), now) == 7.0
    later = (now + timedelta(seconds=90)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 88.0 <= retry_after_s(answer(later), now) <= 90.0
    earlier = (now - timedelta(seconds=90)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert retry_after_s(answer(earlier), now) == 0.0
    assert retry_after_s(answer("soon"), now) == 60.0
    assert retry_after_s(httpx.Response(503), now) == 0.0


def test_backoff_grows_is_capped_jittered_and_honours_retry_after() -> None:
    delays = [backoff_s(n, 2.0, 300.0) for n in range(1, 12) for _ in range(20)]
    assert all(0 < d <= 300.0 for d in delays)
    first = [backoff_s(1, 2.0, 300.0) for _ in range(200)]
    assert min(first) >= 1.0 and max(first) <= 2.0
    assert len({round(d, 6) for d in first}) > 100  # jittered: edges do not retry in step
    assert min(backoff_s(20, 2.0, 300.0) for _ in range(200)) >= 150.0
    assert backoff_s(1, 2.0, 300.0, retry_after=60.0) == 60.0
    assert backoff_s(1, 2.0, 300.0, retry_after=9999.0) == 300.0
    assert backoff_s(3, 2.0, 300.0, jitter=0.0) == 8.0


# -- TLS: a real handshake against a uvicorn server with the local PKI's certificate ----------


@pytest.fixture
def local_tls(tmp_path: Path) -> tuple[Path, Path, Path]:
    keys = tmp_path / "keys"
    ca, cert, key = keys / "local-ca.pem", keys / "center-tls.pem", keys / "center-tls.key"
    ensure_local_tls(ca, cert, key)
    return ca, cert, key


@pytest.fixture
def https_center(local_tls: tuple[Path, Path, Path]) -> Iterator[str]:
    _, cert, key = local_tls
    app = FastAPI()

    @app.get(AGREEMENT_RESULT_OBJECTS)
    def listing(agreement_id: str) -> Response:
        return Response('{"objects": []}', media_type="application/json")

    @app.get("/busy")
    def busy() -> Response:
        return Response("busy", status_code=503, headers={"Retry-After": "12"})

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            ssl_certfile=str(cert),
            ssl_keyfile=str(key),
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"https://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


def test_local_pki_files_and_modes(local_tls: tuple[Path, Path, Path]) -> None:
    ca, cert, key = local_tls
    assert key.stat().st_mode & 0o077 == 0
    check_server_files(cert, key)
    before = cert.read_bytes()
    ensure_local_tls(ca, cert, key)
    assert cert.read_bytes() == before  # kept across restarts
    # The expiry the *_certificate_expiry_timestamp_seconds gauges export: a year from now.
    days = (certificate_expiry(cert) - time.time()) / 86400
    assert 364 < days <= 365
    with pytest.raises(ConfigError, match="PEM"):
        certificate_expiry(key)


def test_edge_trusts_the_local_ca_over_a_real_handshake(
    local_tls: tuple[Path, Path, Path], https_center: str
) -> None:
    ca, _, _ = local_tls
    client = CenterClient(https_center, verify=tls_verify(ca), timeout_s=5)
    try:
        assert client.result_objects("demo-agreement", 0, 10) == []
        with pytest.raises(CenterError) as busy:
            client._call("GET", "/busy", "busy")
        assert busy.value.status == 503 and busy.value.retry_after_s == 12.0
    finally:
        client.close()


def test_a_foreign_ca_or_the_system_store_refuses_the_center(
    tmp_path: Path, https_center: str
) -> None:
    foreign = TestCA(tmp_path / "foreign", name="someone else")
    for verify in (tls_verify(foreign.cert), tls_verify(None)):
        client = CenterClient(https_center, verify=verify, timeout_s=5)
        try:
            with pytest.raises(CenterError, match="unreachable: ConnectError"):
                client.result_objects("demo-agreement", 0, 10)
        finally:
            client.close()


def test_the_context_checks_the_host_name_and_refuses_old_tls(
    local_tls: tuple[Path, Path, Path],
) -> None:
    ctx = tls_verify(local_tls[0])
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_unusable_files_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"edge\.center_ca_file"):
        tls_verify(tmp_path / "missing.pem")
    (tmp_path / "cert.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"center\.tls\.cert_file/key_file"):
        check_server_files(tmp_path / "cert.pem", tmp_path / "key.pem")

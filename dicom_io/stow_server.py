"""The edge's DICOMweb STOW-RS receiver (PS3.18 10.5): hospital PACS that push over HTTP.

``POST /dicomweb/studies[/{study}]`` takes a multipart/related; type="application/dicom" body.
HTTP Basic credentials select the agreement (``hospital.stow``; the password lives in the
environment variable the agreement names) and the client address must be one that agreement
allows. Every part then goes through the same ``Ingestor.accept`` as a C-STORE, and per-part
errors become FailureReason (0008,1197) values through the same ``status_for`` table.

The response is the Store Instances Response Module in DICOM JSON: 200 when every instance was
stored (an identical re-send counts as stored), 202 when some failed, 409 when all failed.
The edge serves no WADO-RS, so RetrieveURL (0008,1190) is omitted.

Logs name the agreement, counts and reason codes only, never a UID or any dataset value; the
uvicorn access log is off because request paths carry Study Instance UIDs.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from dicom_io.dimse_statuses import PROCESSING_FAILURE, status_for
from dicom_io.header import InstanceHeader, parse_header
from dicom_io.ingest import Ingestor
from dicom_io.stow import DICOM_MEDIA_TYPE, decode_multipart, store_response, store_status
from radbridge.agreements import Agreement, AgreementSet
from radbridge.errors import DatasetError, RadbridgeError
from radbridge.metrics import EdgeMetrics, safe_label
from radbridge.settings import EdgeTLS

__all__ = ["DEFAULT_MAX_BODY_BYTES", "STUDY_UID_MISMATCH", "StowServer", "build_stow_app"]

log = logging.getLogger("radbridge.edge.stow")

DEFAULT_MAX_BODY_BYTES = 512 * 1024**2
# PS3.18 Table I.2-2 defines no dedicated Failure Reason for "instance is not of the study in
# the target URL" (10.5.3 only lists "Study Instance UID mismatch" as a cause of 409) and lets
# implementations use further codes. C409 is in the table's Cxxx range and is the value
# dcm4chee-arc returns for the same condition, so PACS already know it.
STUDY_UID_MISMATCH = 0xC409
DICOM_JSON = "application/dicom+json"
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Basic realm="radbridge"'}
_NO_PASSWORD = b"\x00radbridge-no-such-user\x00"  # compared for unknown users: same timing


@dataclass
class _Result:
    stored: list[InstanceHeader] = field(default_factory=list)
    # (header when the part could be parsed, FailureReason, reason code for logs and metrics)
    failed: list[tuple[InstanceHeader | None, int, str]] = field(default_factory=list)


def build_stow_app(
    agreements: Callable[[], AgreementSet],
    ingestor: Ingestor,
    metrics: EdgeMetrics,
    environ: Mapping[str, str] = os.environ,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The STOW-RS ASGI app; ``agreements`` is called per request so reloads take effect."""
    app = FastAPI(title="radbridge edge STOW-RS", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/dicomweb/studies")
    async def store(request: Request) -> JSONResponse:
        return await _store(request, None)

    @app.post("/dicomweb/studies/{study_uid}")
    async def store_study(request: Request, study_uid: str) -> JSONResponse:
        return await _store(request, study_uid)

    async def _store(request: Request, study_uid: str | None) -> JSONResponse:
        # Source address first (no credential is even read from an address no agreement
        # allows), then the credentials, then the agreement's own source and TLS rules: one
        # 401 for every refusal, so a caller cannot tell which check it failed.
        client = request.client.host if request.client else ""
        current = agreements()
        agreement = None
        if any(a.hospital.stow and a.hospital.allows_ip(client) for a in current.agreements):
            agreement = _authenticate(request.headers.get("authorization"), current, environ)
        tls = request.url.scheme == "https"
        if (
            agreement is None
            or not agreement.hospital.allows_ip(client)
            or (agreement.hospital.require_tls and not tls)
        ):
            why = "credentials" if agreement is None else "source address or TLS"
            log.warning("STOW-RS refused from %s: %s", client or "?", why)
            return _error(401, "authentication required", _UNAUTHORIZED_HEADERS)
        content_type = request.headers.get("content-type", "")
        problem = _media_type_problem(content_type)
        if problem:
            return _error(415, problem)
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return _error(400, "Content-Length is not a number")
            if int(declared) > max_body_bytes:
                return _error(413, f"body exceeds {max_body_bytes} bytes")
        body = await _read_body(request, max_body_bytes)
        if body is None:
            return _error(413, f"body exceeds {max_body_bytes} bytes")
        try:
            parts = await run_in_threadpool(decode_multipart, body, content_type)
        except DatasetError as exc:
            return _error(415 if exc.reason == "unsupported_media_type" else 400, str(exc))
        del body
        result = await run_in_threadpool(
            _accept_all, ingestor, metrics, agreement, parts, study_uid
        )
        reasons = sorted({r for _, _, r in result.failed})
        log.info(
            "STOW-RS agreement %s: %d stored, %d failed%s",
            agreement.id,
            len(result.stored),
            len(result.failed),
            f" ({', '.join(reasons)})" if reasons else "",
        )
        answer = store_response(
            ((h.sop_class_uid, h.sop_instance_uid) for h in result.stored),
            (
                (h.sop_class_uid if h else None, h.sop_instance_uid if h else None, status)
                for h, status, _reason in result.failed
            ),
        )
        code = store_status(len(result.stored), len(result.failed))
        return JSONResponse(answer, status_code=code, media_type=DICOM_JSON)

    return app


def _authenticate(
    authorization: str | None, agreements: AgreementSet, environ: Mapping[str, str]
) -> Agreement | None:
    """The agreement whose STOW-RS credentials ``authorization`` carries, else None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
        user, sep, password = decoded.partition(b":")
        username = user.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    if not sep:
        return None
    agreement = agreements.for_stow_user(username)
    expected = b""
    if agreement is not None and agreement.hospital.stow is not None:
        expected = environ.get(agreement.hospital.stow.password_env, "").encode("utf-8")
    matches = hmac.compare_digest(password, expected or _NO_PASSWORD)
    return agreement if matches and expected else None


def _media_type_problem(content_type: str) -> str | None:
    media, *params = (p.strip() for p in content_type.split(";"))
    if media.lower() != "multipart/related":
        return "Content-Type must be multipart/related"
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "type" and value.strip().strip('"').lower() != DICOM_MEDIA_TYPE:
            return f'multipart/related type must be "{DICOM_MEDIA_TYPE}"'
    return None


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it grows past ``limit`` (chunked or lying clients)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _accept_all(
    ingestor: Ingestor,
    metrics: EdgeMetrics,
    agreement: Agreement,
    parts: list[bytes],
    study_uid: str | None,
) -> _Result:
    """Store each part through the shared receive path (blocking: runs in a worker thread)."""
    result = _Result()
    for part in parts:
        t0 = time.perf_counter()
        header: InstanceHeader | None = None
        try:
            if study_uid is not None:
                header = parse_header(part)
                if header.study_uid != study_uid:
                    _fail(metrics, agreement, result, header, STUDY_UID_MISMATCH, "study_mismatch")
                    continue
            outcome, header = ingestor.accept(agreement, part, header=header)
        except RadbridgeError as exc:
            reason = str(getattr(exc, "reason", type(exc).__name__))
            _fail(metrics, agreement, result, header or _try_header(part), status_for(exc), reason)
            continue
        except Exception as exc:  # an unexpected failure of one part must not lose the others
            # No traceback: driver messages (e.g. IntegrityError) quote the UIDs bound.
            log.error("STOW-RS agreement %s: part failed: %s", agreement.id, type(exc).__name__)
            _fail(metrics, agreement, result, header, PROCESSING_FAILURE, "processing_failure")
            continue
        metrics.instance_receive.labels(agreement.id, safe_label(header.modality)).observe(
            time.perf_counter() - t0
        )
        metrics.instances.labels(agreement.id, outcome).inc()
        result.stored.append(header)
    return result


def _try_header(part: bytes) -> InstanceHeader | None:
    try:
        return parse_header(part)
    except RadbridgeError:
        return None


def _fail(
    metrics: EdgeMetrics,
    agreement: Agreement,
    result: _Result,
    header: InstanceHeader | None,
    status: int,
    reason: str,
) -> None:
    metrics.instances.labels(agreement.id, safe_label(reason)).inc()
    result.failed.append((header, status, reason))


def _error(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": detail}, status_code=status, headers=dict(headers or {}))


class StowServer:
    """uvicorn serving the STOW-RS app on a daemon thread."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: EdgeTLS | None = None) -> None:
        """With ``tls`` the port speaks HTTPS with the DICOM TLS listener's certificate and
        client-certificate rule (agreements with ``require_tls`` are served only so)."""
        ssl_options: dict[str, Any] = {}
        if tls is not None:
            ssl_options = {
                "ssl_certfile": str(tls.cert_file),
                "ssl_keyfile": str(tls.key_file),
                "ssl_ca_certs": str(tls.ca_file),
                "ssl_cert_reqs": ssl.CERT_REQUIRED
                if tls.require_client_cert
                else ssl.CERT_OPTIONAL,
            }
        config = uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False, **ssl_options
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="radbridge-stow", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start serving; returns once the socket listens, raises if it could not."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("STOW-RS server did not start (address in use?)")
            time.sleep(0.01)

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)

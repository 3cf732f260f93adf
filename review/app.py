"""The reading room as a Ray Serve application under ``/read`` (beside the center's Api).

One FastAPI app, served by the ``ReadingRoom`` deployment: the pages (``/read/``, a small
JavaScript front end in ``review/static`` and the Cornerstone3D viewer bundle built from npm),
the reader's JSON API (``/read/api/...``), DICOMweb for the viewer (``/read/dicomweb/...``), and
``/read/metrics`` for Prometheus (an operator's bearer secret, as at the center's ``/metrics``).

Who may call what: ``/read/healthz``, the sign-in page and its static files are open; every
other route wants a reader's session cookie (HttpOnly, Secure, SameSite=Strict, Path=/read) —
also the DICOMweb routes and every ``/frames`` request — and answers only about the agreements
the reader's center serves (404 for another agreement's study, as for a missing one). A
state-changing request must come from this origin (its Origin header, when sent, is checked).
The Content-Security-Policy lets the page talk to its own origin only.
"""

# No "from __future__ import annotations": Serve's class-based ingress re-reads the handlers'
# signatures, and FastAPI must see real types (Request, not the string "Request"). Helpers live
# in the imported modules, not here: Serve ships this class to its replicas by value.
import asyncio
import logging
import time
from collections import deque
from importlib import resources
from typing import Any

from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from dicom_io.store import DurableStore
from radbridge.agreements import load_agreements
from radbridge.audit import AuditTrail
from radbridge.auth import Role, Verifier, edges_by_agreement, load_trust
from radbridge.contract import UID
from radbridge.db.engine import Database
from radbridge.errors import AuthError, ConfigError, ForbiddenError, RadbridgeError
from radbridge.http_errors import radbridge_error_handler
from radbridge.settings import Settings
from radbridge.signing import load_signer
from review import dicomweb, reports, worklist
from review.i18n import LANG_TAGS, messages, plural, template_for, template_json
from review.metrics import ReviewMetrics
from review.readers import Reader, check_password
from review.sessions import ABSOLUTE, COOKIE, end_session, resolve_session, start_session
from review.study import study_detail

__all__ = ["ROUTE_PREFIX", "ReadingRoom", "build", "room"]

log = logging.getLogger("ray.serve")
ROUTE_PREFIX = "/read"
room = FastAPI(title="radbridge reading room", version="0.1.0", docs_url=None, redoc_url=None)
room.add_exception_handler(RadbridgeError, radbridge_error_handler)
_STATIC = resources.files("review").joinpath("static")
room.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")

# 'unsafe-eval': the SEG overlay's ndarray (inside dcmjs / Cornerstone's adapters) compiles
# functions with new Function; 'wasm-unsafe-eval': the image codecs are WebAssembly. Nothing
# may be fetched from another origin (connect-src, script-src, img-src, font-src 'self').
_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-eval' 'wasm-unsafe-eval'; "
    "worker-src 'self' blob:; "
    "img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; font-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_MAX_BODY = 256 * 1024
_LOGIN_FAILURES = 5
_LOCKOUT_S = 300.0


@room.middleware("http")
async def _security_headers(request: Request, call_next: Any) -> Response:
    # Bodies are small JSON (a report is a few KiB): refuse a large or unsized one before
    # anything reads it into memory.
    if request.method in ("POST", "PUT", "PATCH"):
        declared = request.headers.get("content-length")
        if declared is None and "chunked" in request.headers.get("transfer-encoding", ""):
            return JSONResponse(
                {"error": "DatasetError", "detail": "send a Content-Length"}, status_code=411
            )
        if declared is not None and (not declared.isdigit() or int(declared) > _MAX_BODY):
            return JSONResponse(
                {"error": "DatasetError", "detail": f"request body over {_MAX_BODY} bytes"},
                status_code=413,
            )
    response: Response = await call_next(request)
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


class Login(BaseModel):
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=256)


def build(args: dict[str, Any]) -> Application:
    """Application builder for the Serve config (``import_path: review.app:build``)."""
    raw = (args or {}).get("settings")
    try:
        settings = Settings.model_validate(raw) if raw is not None else Settings()
    except Exception as exc:
        raise ConfigError(f"reading room args.settings: {exc}") from None
    return ReadingRoom.bind(settings)  # type: ignore[attr-defined,no-any-return]


@serve.deployment(name="ReadingRoom", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(room)
class ReadingRoom:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.agreements = load_agreements(settings.agreements_file)
        # The center's Api syncs the agreements table (and audits each change) at its start;
        # syncing here too would take those changes first and leave them unaudited.
        self.db = Database(settings.center_db_url)
        self.audit = AuditTrail(self.db, "center")
        self.store = DurableStore(settings.center_store)
        trust = load_trust(settings.center_trust_file)
        self.verifier = Verifier(trust, max_failures=settings.center.auth_max_failures)
        self.signer = load_signer(settings.center_signing_key_file)
        self.edges = edges_by_agreement(trust)
        self.metrics = ReviewMetrics(self.db, self.agreements)
        self._failures: dict[str, deque[float]] = {}

    # -- sessions -------------------------------------------------------------------------

    def _reader(self, request: Request) -> Reader:
        reader = resolve_session(self.db, request.cookies.get(COOKIE))
        if reader is None:
            raise AuthError("sign in first")
        return reader

    def _same_origin(self, request: Request) -> None:
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin.split("://", 1)[-1] != host:
            raise ForbiddenError("cross-origin request refused")

    def _visible(self, reader: Reader) -> frozenset[str]:
        return reader.visible(self.agreements)

    @room.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @room.get("/", response_class=HTMLResponse)
    async def index(self, request: Request) -> Response:
        if await asyncio.to_thread(resolve_session, self.db, request.cookies.get(COOKIE)) is None:
            return RedirectResponse(f"{ROUTE_PREFIX}/login", status_code=303)
        return FileResponse(str(_STATIC.joinpath("index.html")), media_type="text/html")

    @room.get("/login", response_class=HTMLResponse)
    async def login_page(self) -> Response:
        return FileResponse(str(_STATIC.joinpath("login.html")), media_type="text/html")

    @room.post("/api/login", status_code=204)
    async def login(self, request: Request, body: Login) -> Response:
        self._same_origin(request)
        now = time.monotonic()
        recent = self._failures.setdefault(body.username, deque(maxlen=_LOGIN_FAILURES))
        if len(recent) == _LOGIN_FAILURES and now - recent[0] < _LOCKOUT_S:
            raise AuthError("too many failed sign-ins: wait five minutes")
        try:
            reader = await asyncio.to_thread(check_password, self.db, body.username, body.password)
        except AuthError:
            recent.append(now)
            await asyncio.to_thread(
                self.audit.record, "reader-login", outcome=4, details={"user": body.username}
            )
            raise
        recent.clear()
        token = await asyncio.to_thread(start_session, self.db, reader)
        await asyncio.to_thread(
            self.audit.record, "reader-login", details={"user": reader.username}
        )
        response = Response(status_code=204)
        response.set_cookie(
            COOKIE,
            token,
            max_age=int(ABSOLUTE.total_seconds()),
            path=ROUTE_PREFIX,
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response

    @room.post("/api/logout", status_code=204)
    async def logout(self, request: Request) -> Response:
        self._same_origin(request)
        reader = await asyncio.to_thread(resolve_session, self.db, request.cookies.get(COOKIE))
        await asyncio.to_thread(end_session, self.db, request.cookies.get(COOKIE))
        if reader is not None:
            await asyncio.to_thread(
                self.audit.record, "reader-logout", details={"user": reader.username}
            )
        response = Response(status_code=204)
        response.delete_cookie(COOKIE, path=ROUTE_PREFIX, secure=True, httponly=True)
        return response

    @room.get("/api/me")
    async def me(self, request: Request) -> dict[str, Any]:
        reader = await asyncio.to_thread(self._reader, request)
        visible = self._visible(reader)
        return {
            "username": reader.username,
            "observer_id": reader.observer_id,
            "locale": reader.locale,
            "lang_tag": LANG_TAGS[reader.locale],
            "messages": messages(reader.locale),
            "agreements": [
                {"id": a.id, "hospital": a.hospital.name}
                for a in self.agreements.agreements
                if a.id in visible
            ],
        }

    # -- worklist -------------------------------------------------------------------------

    @room.get("/api/worklist")
    async def get_worklist(
        self,
        request: Request,
        agreement: str | None = Query(None, max_length=63),
        modality: str | None = Query(None, pattern=r"^[A-Z]{2,8}$"),
        priority: str | None = Query(None, pattern=r"^(stat|urgent|routine)$"),
    ) -> Response:
        reader = await asyncio.to_thread(self._reader, request)
        filters = worklist.WorklistFilter(agreement, modality, priority)
        rows = await asyncio.to_thread(worklist.worklist, self.db, self.agreements, reader, filters)
        tag = worklist.etag(rows)
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers={"ETag": tag})
        body = {
            "rows": [r.__dict__ for r in rows],
            "count": plural(reader.locale, "studies", len(rows)),
        }
        return JSONResponse(body, headers={"ETag": tag})

    @room.post("/api/studies/{study_id}/claim")
    async def claim(self, request: Request, study_id: int = Path(ge=1)) -> dict[str, Any]:
        self._same_origin(request)
        reader = await asyncio.to_thread(self._reader, request)
        first = await asyncio.to_thread(worklist.claim, self.db, study_id, reader, self.agreements)
        return {"claimed": True, "opened_first": first}

    @room.post("/api/studies/{study_id}/release", status_code=204)
    async def release(self, request: Request, study_id: int = Path(ge=1)) -> Response:
        self._same_origin(request)
        reader = await asyncio.to_thread(self._reader, request)
        await asyncio.to_thread(worklist.release, self.db, study_id, reader, self.agreements)
        return Response(status_code=204)

    @room.get("/api/studies/{study_id}")
    async def study(self, request: Request, study_id: int = Path(ge=1)) -> dict[str, Any]:
        reader = await asyncio.to_thread(self._reader, request)
        detail = await asyncio.to_thread(
            study_detail, self.db, self.store, study_id, reader, self.agreements
        )
        await asyncio.to_thread(
            self.audit.record,
            "instances-accessed",
            agreement_id=detail["agreement_id"],
            study_uid=detail["study_uid"],
            details={"reader": reader.observer_id, "destination": "reading-room"},
        )
        detail["template"] = template_json(template_for(detail["modality"]), reader.locale)
        return detail

    @room.put("/api/studies/{study_id}/report")
    async def save_report(
        self, request: Request, body: dict[str, Any], study_id: int = Path(ge=1)
    ) -> dict[str, Any]:
        self._same_origin(request)
        reader = await asyncio.to_thread(self._reader, request)
        row = await asyncio.to_thread(
            reports.save_draft, self.db, study_id, reader, self.agreements, body
        )
        return {"version": row.version, "status": row.status}

    @room.post("/api/studies/{study_id}/sign")
    async def sign(
        self,
        request: Request,
        study_id: int = Path(ge=1),
        status: str = Query(pattern=r"^(preliminary|final)$"),
    ) -> dict[str, Any]:
        self._same_origin(request)
        reader = await asyncio.to_thread(self._reader, request)
        return await asyncio.to_thread(self._sign, study_id, reader, status == "final")

    def _sign(self, study_id: int, reader: Reader, final: bool) -> dict[str, Any]:
        """Sign, audit and count in one worker-thread call, which runs to its end even when the
        browser goes away mid-request (Serve then cancels the request's coroutine, not the
        thread): a signed report never lacks its audit record."""
        agreement_id, organization, study_uid = self._agreement_of(study_id, reader)
        outcome = reports.sign_report(
            self.db,
            self.store,
            study_id,
            reader,
            self.agreements,
            final=final,
            organization=organization,
            sign=lambda row: self.signer.sign_row(row, self.edges),
        )
        self.audit.record(
            "report-signed",
            agreement_id=agreement_id,
            study_uid=study_uid,
            details={
                "reader": reader.observer_id,
                "status": outcome.status,
                "version": outcome.version,
                "objects": outcome.object_ids,
            },
        )
        if outcome.turnaround_s is not None:
            self.metrics.turnaround.labels(agreement_id, outcome.priority).observe(
                outcome.turnaround_s
            )
        self.metrics.signed.labels(agreement_id, outcome.status).inc()
        return {"status": outcome.status, "version": outcome.version, "objects": outcome.object_ids}

    def _agreement_of(self, study_id: int, reader: Reader) -> tuple[str, str, str]:
        with self.db.session() as s:
            study = worklist.study_for(s, study_id, reader, self.agreements)
            agreement = self.agreements.get(study.agreement_id)
            assert agreement is not None
            return study.agreement_id, agreement.reading_center.name, study.study_uid

    # -- DICOMweb -------------------------------------------------------------------------

    @room.get("/dicomweb/studies")
    async def qido_studies(
        self,
        request: Request,
        StudyInstanceUID: str | None = Query(None, pattern=UID),
        PatientID: str | None = Query(None, max_length=64),
        includefield: list[str] = Query([]),
    ) -> Response:
        reader = await asyncio.to_thread(self._reader, request)
        found = await asyncio.to_thread(
            dicomweb.search_studies,
            self.db,
            self.store,
            self._visible(reader),
            study_uid=StudyInstanceUID,
            patient_id=PatientID,
            includefield=includefield,
        )
        return dicomweb.json_response(found)

    @room.get("/dicomweb/studies/{study}/series")
    async def qido_series(
        self,
        request: Request,
        study: str = Path(pattern=UID),
        includefield: list[str] = Query([]),
    ) -> Response:
        reader = await asyncio.to_thread(self._reader, request)
        found = await asyncio.to_thread(
            dicomweb.search_series, self.db, self.store, self._visible(reader), study, includefield
        )
        return dicomweb.json_response(found)

    @room.get("/dicomweb/studies/{study}/series/{series}/instances")
    async def qido_instances(
        self,
        request: Request,
        study: str = Path(pattern=UID),
        series: str = Path(pattern=UID),
        includefield: list[str] = Query([]),
    ) -> Response:
        located = await self._locate(request, study, series)
        found = await asyncio.to_thread(dicomweb.instances, self.store, located, includefield)
        return dicomweb.json_response(found)

    @room.get("/dicomweb/studies/{study}/metadata")
    async def study_metadata(self, request: Request, study: str = Path(pattern=UID)) -> Response:
        located = await self._locate(request, study)
        return dicomweb.json_response(
            await asyncio.to_thread(dicomweb.metadata, self.store, located)
        )

    @room.get("/dicomweb/studies/{study}/series/{series}/metadata")
    async def series_metadata(
        self, request: Request, study: str = Path(pattern=UID), series: str = Path(pattern=UID)
    ) -> Response:
        located = await self._locate(request, study, series)
        return dicomweb.json_response(
            await asyncio.to_thread(dicomweb.metadata, self.store, located)
        )

    @room.get("/dicomweb/studies/{study}/series/{series}/instances/{sop}")
    async def retrieve_instance(
        self,
        request: Request,
        study: str = Path(pattern=UID),
        series: str = Path(pattern=UID),
        sop: str = Path(pattern=UID),
    ) -> Response:
        located = await self._locate(request, study, series, sop)
        data = await asyncio.to_thread(self.store.read, located[0].path)
        body, ctype = dicomweb.multipart([data], "application/dicom")
        return Response(body, media_type=ctype)

    @room.get("/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
    async def retrieve_frames(
        self,
        request: Request,
        study: str = Path(pattern=UID),
        series: str = Path(pattern=UID),
        sop: str = Path(pattern=UID),
        frames: str = Path(pattern=r"^[1-9][0-9]{0,5}(,[1-9][0-9]{0,5}){0,63}$"),
    ) -> Response:
        located = await self._locate(request, study, series, sop)
        numbers = [int(n) for n in frames.split(",")]
        parts = await asyncio.to_thread(dicomweb.frame_bytes, self.store, located[0], numbers)
        body, ctype = dicomweb.multipart(
            parts, "application/octet-stream", f"; transfer-syntax={dicomweb.EXPLICIT_LE}"
        )
        return Response(body, media_type=ctype + f"; transfer-syntax={dicomweb.EXPLICIT_LE}")

    @room.get("/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/{n}/rendered")
    async def rendered(
        self,
        request: Request,
        study: str = Path(pattern=UID),
        series: str = Path(pattern=UID),
        sop: str = Path(pattern=UID),
        n: int = Path(ge=1, le=100_000),
    ) -> Response:
        located = await self._locate(request, study, series, sop)
        png = await asyncio.to_thread(dicomweb.rendered_png, self.store, located[0], n)
        return Response(png, media_type="image/png")

    async def _locate(
        self, request: Request, study: str, series: str | None = None, sop: str | None = None
    ) -> list[dicomweb.Located]:
        reader = await asyncio.to_thread(self._reader, request)
        return await asyncio.to_thread(
            dicomweb.locate, self.db, self._visible(reader), study, series, sop
        )

    # -- operations -----------------------------------------------------------------------

    @room.get("/metrics")
    async def prometheus(self, request: Request) -> Response:
        address = request.client.host if request.client else "?"
        caller = self.verifier.authenticate(
            request.headers.get("authorization"), request.method, request.url.path, address
        )
        if caller.role != Role.OPERATOR:
            raise ForbiddenError(f"a {caller.role.value} may not use this route")
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

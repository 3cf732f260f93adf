"""Api ingress deployment (FastAPI): STOW-RS intake, study completion, results, sync inference.

Handlers are thin: they authenticate the caller's role and agreement, validate, call one
function, answer. A completed study is handed to the job engine (serving/pipeline.py), which
runs it on this replica's event loop. STOW-RS answers 503 + Retry-After while the backlog is
over its bound (the edge's outbox retries; nothing acknowledged is dropped). ``user_config``
(:class:`ApiConfig`) pins model versions and shadows and is hot-reloaded.
"""

import asyncio
import contextlib
import io
import json
import logging
import time
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicom_io.header import parse_header
from dicom_io.result_warm_up import warm_up as warm_up_result_builders
from dicom_io.store import DurableStore
from dicom_io.stow import decode_multipart, store_status
from models.manifest import ModelManifest
from radbridge.agreements import Priority, load_agreements
from radbridge.audit import AuditTrail
from radbridge.auth import Caller, Role, Verifier, edges_by_agreement, load_trust
from radbridge.contract import (
    AGREEMENT_HEADER,
    AGREEMENT_ID,
    AGREEMENT_RESULT_OBJECTS,
    MAX_ID,
    MAX_LISTING,
    MAX_LISTING_WAIT_S,
    PRIORITY_HEADER,
    RESULT_OBJECT,
    STUDIES,
    STUDY_COMPLETE,
    STUDY_PREPARE,
    STUDY_PURGE,
    STUDY_RESULTS,
    UID,
    CompleteStudy,
    PrepareOut,
    PrepareStudy,
    PurgeOut,
    PurgeStudy,
    ResultObjectList,
)
from radbridge.db.agreements import sync_agreements
from radbridge.db.engine import Database
from radbridge.db.tables import JobRow
from radbridge.errors import (
    DatasetError,
    ForbiddenError,
    NotFoundError,
    OverloadedError,
    PolicyError,
    RadbridgeError,
    StorageError,
)
from radbridge.http_errors import http_exception_handler, radbridge_error_handler
from radbridge.metrics import CenterMetrics, safe_label
from radbridge.pki import certificate_expiry
from radbridge.settings import Settings
from radbridge.signing import load_signer
from serving import boundary, jobs, result_objects, retention
from serving.config import ApiConfig
from serving.inference import Inference
from serving.intake import receive_instances, stow_response
from serving.pipeline import Pipeline, model_ref
from serving.schemas import (
    InferBatchResponse,
    InferItem,
    InferResponse,
    JobOut,
    StudyResults,
)

__all__ = ["Api", "api"]

log = logging.getLogger("ray.serve")
api = FastAPI(title="radbridge center", version="0.1.0")
api.add_exception_handler(RadbridgeError, radbridge_error_handler)
api.add_exception_handler(StarletteHTTPException, http_exception_handler)


_NPY = ("application/x-npy", "application/octet-stream")


def _answers(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route besides its success: what each code means here."""
    meaning = {
        400: "The body or a header cannot be understood; the reason names the problem.",
        401: "No valid credential (radbridge.auth); the same answer whatever was wrong.",
        403: "The caller's role may not use this route.",
        404: "Unknown, or another agreement's (never told apart).",
        409: "Refused by policy: an inactive agreement, an incomplete study, every STOW-RS "
        "instance refused (0x0111: other bytes under a SOP Instance UID the center holds).",
        413: "The body is over center.max_body_bytes.",
        415: "The media type is not one this route takes.",
        503: "A bounded queue is full or a model is not ready: retry after Retry-After.",
        507: "The center's store is below its free-space watermark: nothing was kept; retry "
        "later (the edge's outbox does, with backoff).",
    }
    body = {
        "type": "object",
        "properties": {
            "error": {"type": "string", "description": "The radbridge error class."},
            "detail": {"type": "string"},
            "reason": {"type": "string", "description": "A stable code, for DatasetError."},
        },
        "required": ["error", "detail"],
    }
    error = {"application/json": {"schema": body}}
    return {c: {"description": meaning[c], "content": error} for c in (401, *codes)}


_EDGE = (403, 404)
_STOW_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            'multipart/related; type="application/dicom"': {
                "schema": {"type": "string", "format": "binary"},
            }
        },
        "description": "De-identified Part 10 instances, one per part (PS3.18 10.5).",
    }
}
_BACKLOG_TTL_S = 1.0
# A waiting listing looks at the database this often for objects built elsewhere (another Api
# replica's job, a report signed in the reading room).
LISTING_RECHECK_S = 0.5


def _image_shape(manifest: ModelManifest) -> tuple[int | str, ...]:
    """The model's input shape without its batch axis. A named (dynamic) axis there matches
    no tensor: the runner stacks a batch, so every image must have the same, fixed shape."""
    return tuple(manifest.input.shape[1:])


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _npy(body: bytes) -> np.ndarray:
    """A .npy body → its numeric array (no pickles, ever)."""
    try:
        arr = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError("unparseable", f"not a .npy array: {exc}") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise DatasetError("wrong_dtype", f"tensor dtype {arr.dtype} is not numeric")
    return arr


def _tensor(body: bytes, shape: tuple[int | str, ...]) -> np.ndarray:
    """A .npy body → a float32 array of the model's input shape."""
    arr = _npy(body)
    if tuple(arr.shape) != shape:
        raise DatasetError("wrong_shape", f"tensor shape {tuple(arr.shape)}, model takes {shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _tensors(body: bytes, shape: tuple[int | str, ...], most: int) -> np.ndarray:
    """A .npy body → float32 images of the model's input shape stacked on axis 0 (1..most)."""
    arr = _npy(body)
    if arr.ndim == 0 or tuple(arr.shape[1:]) != shape:
        raise DatasetError(
            "wrong_shape", f"tensor shape {tuple(arr.shape)}, model takes (N, *{shape})"
        )
    if not 1 <= len(arr) <= most:
        raise DatasetError("wrong_count", f"{len(arr)} images: send 1 to {most} per request")
    return np.ascontiguousarray(arr, dtype=np.float32)


api.add_middleware(boundary.Boundary)


@serve.deployment(name="Api", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=512)
@serve.ingress(api)
class Api:
    """The center's HTTP front: the edges' routes (STOW-RS, complete, purge, result listing
    and download), the RIS's sync inference, health and metrics. It owns the job engine
    (:class:`Pipeline`) and the retention pass, and admits new studies by the backlog."""

    def __init__(
        self,
        settings: Settings,
        preprocessor: DeploymentHandle,
        runner: DeploymentHandle,
    ) -> None:
        self.settings = settings
        trust = load_trust(settings.center_trust_file)
        self.verifier = Verifier(trust, max_failures=settings.center.auth_max_failures)
        self.signer = load_signer(settings.center_signing_key_file)
        self._edges = edges_by_agreement(trust)
        self.agreements = load_agreements(settings.agreements_file)
        self.db = Database(settings.center_db_url)
        self.audit = AuditTrail(self.db, "center")
        for agreement_id, digest in sync_agreements(self.db, self.agreements):
            self.audit.record(
                "agreements-changed", agreement_id=agreement_id, details={"sha256": digest}
            )
        self.store = DurableStore(settings.center_store, settings.center.min_free_bytes)
        # In a Serve replica every metric is mirrored to Ray's metrics: the node's metrics
        # agent then exports the sum of all Api replicas (radbridge.metrics.RayMirrored).
        self.metrics = CenterMetrics(mirror_to_ray=ray.is_initialized())
        self.metrics.backlog.set(0)  # reported from the start (RadbridgeCenterDown: absent)
        self.metrics.store_free.set_function(self.store.free_bytes)
        if settings.center.tls is not None:
            self.metrics.certificate_expiry.set(certificate_expiry(settings.center.tls.cert_file))
        boundary.install(self.verifier, self.metrics, open_docs=settings.mode == "local")
        self.inference = Inference(
            settings.models_dir, preprocessor, runner, self.metrics, self.store
        )
        self.pipeline = Pipeline(
            self.db, self.store, self.inference, self.metrics, self.agreements, self._sign
        )
        self.config = ApiConfig()
        self._backlog = (0, 0.0)  # (instances, monotonic time counted)
        self._tasks: set[asyncio.Task[None]] = set()
        self._retention_due = time.monotonic() + 60.0  # first pass a minute after start
        self.reconfigure({})
        # The first SEG + SR a process builds pays for highdicom's first use (0.25 s on a
        # CT): paid here, before Serve marks the replica ready, not by the first study.
        try:
            log.info("result object builders warmed up in %.2f s", warm_up_result_builders())
        except Exception as exc:  # a job's own build reports any real fault; start anyway
            log.warning("result object warm-up failed (%s)", type(exc).__name__)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's user_config, also on a live redeploy."""
        cfg = ApiConfig.model_validate(user_config or {})
        self.inference.reload(cfg)  # ConfigError for a pin to a version not installed
        self.config = cfg
        self.pipeline.configure(
            cfg.dispatch_concurrency,
            {str(p): s for p, s in cfg.max_wait_s.items()},
            cfg.prepare_ahead,
        )

    @property
    def manifests(self) -> dict[str, Any]:
        return self.inference.manifests

    def _answered(self, manifest: ModelManifest, priority: str, t0: float) -> float:
        """Seconds since ``t0``, recorded as one sync request of ``manifest``."""
        seconds = time.perf_counter() - t0
        labels = (manifest.name, manifest.version, priority, "sync")
        self.metrics.request.labels(*labels).observe(seconds)
        return seconds

    def _classifier(self, name: str, version: str | None) -> tuple[str, ModelManifest]:
        """The version that answers for ``name`` on the sync endpoints (not a segmenter)."""
        key = self.inference.key_for(name, version)
        manifest = self.manifests[key]
        if manifest.task == "segmentation":
            raise PolicyError(f"{name} is a {manifest.task} model: send the study (STOW-RS)")
        return key, manifest

    # -- routes ---------------------------------------------------------------------------

    @api.post(
        STUDIES,
        responses={
            200: {"description": "Every instance stored (STOW-RS response, DICOM JSON)."},
            202: {"description": "Some instances stored, the others in FailedSOPSequence."},
            **_answers(400, *_EDGE, 409, 413, 415, 503, 507),
        },
        openapi_extra=_STOW_BODY,
    )
    async def stow(
        self,
        request: Request,
        x_radbridge_agreement: str = Header(..., alias=AGREEMENT_HEADER, pattern=AGREEMENT_ID),
        x_radbridge_priority: Priority = Header(Priority.ROUTINE, alias=PRIORITY_HEADER),
    ) -> Response:
        caller = self._caller(request, Role.EDGE)
        agreement = self._agreement(caller, x_radbridge_agreement)
        await self._admit(x_radbridge_priority)
        declared = request.headers.get("content-length", "")
        if not self.store.has_room(int(declared) if declared.isdigit() else 0):
            raise StorageError("the center's store is below its free-space watermark")
        body = await self._body(request)
        parts = decode_multipart(body, request.headers.get("content-type", ""))
        outcome = await asyncio.to_thread(receive_instances, self.db, self.store, agreement, parts)
        for h in outcome.stored:
            self.metrics.instances_received.labels(agreement, safe_label(h.modality)).inc()
        code = store_status(len(outcome.stored), len(outcome.failed))
        return Response(
            json.dumps(stow_response(outcome)),
            status_code=code,
            media_type="application/dicom+json",
        )

    @api.post(
        STUDY_COMPLETE,
        status_code=202,
        responses=_answers(400, *_EDGE, 409),
    )
    async def complete(
        self, request: Request, body: CompleteStudy, study_uid: str = Path(pattern=UID)
    ) -> JobOut:
        caller = self._caller(request, Role.EDGE)
        self._agreement(caller, body.agreement_id)
        body = body.model_copy(update={"priority": caller.capped(body.priority)})
        source = f"edge:{caller.id}"

        def record(job: JobRow) -> None:
            self.audit.record(
                "import",
                agreement_id=body.agreement_id,
                study_uid=study_uid,
                details={
                    "instances": body.instance_count,
                    "version": job.version,
                    "source": source,
                    "destination": "center",
                },
            )

        job, _created = await self.pipeline.complete(study_uid, body, record)
        return JobOut(
            job_id=job.id,
            study_uid=study_uid,
            version=job.version,
            state=job.state,
            created_at=job.created_at,
        )

    @api.post(STUDY_PREPARE, status_code=202, responses=_answers(400, *_EDGE, 409))
    async def prepare(
        self, request: Request, body: PrepareStudy, study_uid: str = Path(pattern=UID)
    ) -> PrepareOut:
        """The edge's hint that the study is probably whole (its quiet period still runs):
        its volumes may be segmented ahead of its job. Starts no job, releases nothing."""
        caller = self._caller(request, Role.EDGE)
        agreement = self._agreement(caller, body.agreement_id)
        priority = caller.capped(body.priority).value
        began = await self.pipeline.prepare(agreement, study_uid, body.instance_count, priority)
        return PrepareOut(preparing=began)

    @api.post(STUDY_PURGE, responses=_answers(400, *_EDGE, 409))
    async def purge(
        self, request: Request, body: PurgeStudy, study_uid: str = Path(pattern=UID)
    ) -> PurgeOut:
        """Delete the study now (the hospital asked: a withdrawn consent). Idempotent; 409
        while its job is queued or running (retry later). Audited as 110105 by the purge."""
        caller = self._caller(request, Role.EDGE)
        self._agreement(caller, body.agreement_id)
        item = await asyncio.to_thread(
            retention.purge_now,
            self.db,
            self.store,
            self.audit,
            body.agreement_id,
            study_uid,
            body.reason,
        )
        return PurgeOut(purged=item is not None, files=item.files if item else 0)

    @api.get(STUDY_RESULTS, responses=_answers(*_EDGE))
    async def results(self, request: Request, study_uid: str = Path(pattern=UID)) -> StudyResults:
        caller = self._caller(request, Role.EDGE)
        return await asyncio.to_thread(jobs.study_results, self.db, study_uid, caller.agreements)

    @api.get(AGREEMENT_RESULT_OBJECTS, responses=_answers(*_EDGE, 409))
    async def list_result_objects(
        self,
        request: Request,
        agreement_id: str = Path(pattern=AGREEMENT_ID),
        after: int = Query(0, ge=0, le=MAX_ID),
        limit: int = Query(100, ge=1, le=MAX_LISTING),
        wait_s: float = Query(0.0, ge=0, le=MAX_LISTING_WAIT_S),
    ) -> ResultObjectList:
        """Result objects (SR, SEG) after a cursor; the edge pulls them (it opens the link).

        With ``wait_s`` the answer waits for the first object after the cursor (a long poll):
        a job finishing on this replica wakes it at once, one on another replica (or a report
        signed in the reading room) within ``LISTING_RECHECK_S``.
        """
        self._agreement(self._caller(request, Role.EDGE), agreement_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            built = self.pipeline.objects_built  # taken before the query: no wake-up falls between
            objects = await asyncio.to_thread(
                result_objects.list_objects, self.db, agreement_id, after, limit
            )
            remaining = deadline - loop.time()
            if objects or remaining <= 0:
                return ResultObjectList(objects=objects)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(built.wait(), min(remaining, LISTING_RECHECK_S))

    @api.get(
        RESULT_OBJECT,
        response_class=FileResponse,
        responses={
            200: {"content": {"application/dicom": {}}, "description": "The Part 10 object."},
            **_answers(*_EDGE),
        },
    )
    async def get_result_object(
        self, request: Request, object_id: int = Path(ge=1, le=MAX_ID)
    ) -> FileResponse:
        caller = self._caller(request, Role.EDGE)
        path = await asyncio.to_thread(
            result_objects.object_path, self.db, object_id, caller.agreements
        )
        return FileResponse(self.store.path(path), media_type="application/dicom")

    @api.post("/v1/models/{name}/infer", responses=_answers(400, 403, 404, 409, 413, 415, 503))
    async def infer(
        self,
        request: Request,
        name: str = Path(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$"),
        version: str | None = Query(None, pattern=r"^[A-Za-z0-9._-]{1,32}$"),
        x_radbridge_agreement: str = Header(..., alias=AGREEMENT_HEADER, pattern=AGREEMENT_ID),
        x_radbridge_priority: Priority = Header(Priority.ROUTINE, alias=PRIORITY_HEADER),
    ) -> InferResponse:
        """One DICOM instance (application/dicom) or one input tensor (application/x-npy, the
        model's input shape without the batch axis) → the model's findings. Sheddable: 503 +
        Retry-After when the runner's queue is full. Integrations only; the priority is capped
        at the caller's ``max_priority``."""
        caller = self._caller(request, Role.INTEGRATION)
        self._agreement(caller, x_radbridge_agreement)
        t0 = time.perf_counter()
        key, manifest = self._classifier(name, version)
        body = await self._body(request)
        ctype = _media_type(request)
        priority = caller.capped(x_radbridge_priority)
        prio = priority.value
        try:
            if ctype == "application/dicom":
                if not (await asyncio.to_thread(parse_header, body)).identity_removed:
                    raise DatasetError(
                        "not_deidentified", "PatientIdentityRemoved is not YES: no identity here"
                    )
                out = await self.inference.classify_encoded(key, body, prio, shed=True)
            elif ctype in _NPY:
                tensor = _tensor(body, _image_shape(manifest))
                out = await self.inference.classify_tensor(key, tensor, prio, shed=True)
            else:
                raise DatasetError(
                    "unsupported_media_type",
                    "send application/dicom (one instance) or application/x-npy (one tensor)",
                )
        except OverloadedError:
            self.metrics.rejected.labels("infer", prio).inc()
            raise
        seconds = self._answered(manifest, prio, t0)
        return InferResponse(
            model=model_ref(manifest),
            provider=out.provider,
            priority=priority,
            findings=out.findings,
            timings_ms={**out.timings_ms, "total": round(seconds * 1000, 3)},
            intended_use=manifest.intended_use,
        )

    @api.post(
        "/v1/models/{name}/infer-batch", responses=_answers(400, 403, 404, 409, 413, 415, 503)
    )
    async def infer_batch(
        self,
        request: Request,
        name: str = Path(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$"),
        version: str | None = Query(None, pattern=r"^[A-Za-z0-9._-]{1,32}$"),
        x_radbridge_agreement: str = Header(..., alias=AGREEMENT_HEADER, pattern=AGREEMENT_ID),
        x_radbridge_priority: Priority = Header(Priority.ROUTINE, alias=PRIORITY_HEADER),
    ) -> InferBatchResponse:
        """Input tensors stacked on a first axis (application/x-npy, shape (N, *input shape),
        N up to ``max_batch_images``) → each one's findings, in order. One HTTP request and one
        runner call for N images. Sheddable, whole: 503 + Retry-After, nothing computed, when
        the runner's queue cannot take all N."""
        caller = self._caller(request, Role.INTEGRATION)
        self._agreement(caller, x_radbridge_agreement)
        t0 = time.perf_counter()
        key, manifest = self._classifier(name, version)
        ctype = _media_type(request)
        if ctype not in _NPY:
            raise DatasetError(
                "unsupported_media_type", "send application/x-npy: tensors stacked on axis 0"
            )
        most = self.config.max_batch_images
        tensors = _tensors(await self._body(request), _image_shape(manifest), most)
        priority = caller.capped(x_radbridge_priority)
        prio = priority.value
        try:
            outs = await self.inference.classify_tensors(key, tensors, prio, shed=True)
        except OverloadedError:
            self.metrics.rejected.labels("infer", prio).inc()
            raise
        seconds = self._answered(manifest, prio, t0)
        return InferBatchResponse(
            model=model_ref(manifest),
            provider=outs[0].provider,
            priority=priority,
            results=[InferItem(findings=o.findings, timings_ms=o.timings_ms) for o in outs],
            timings_ms={"total": round(seconds * 1000, 3)},
            intended_use=manifest.intended_use,
        )

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": sorted(self.manifests)}

    @api.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {}}, "description": "Prometheus exposition."},
            **_answers(403),
        },
    )
    async def prometheus(self, request: Request) -> Response:
        self._caller(request, Role.OPERATOR)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def check_health(self) -> None:
        await self.pipeline.resume()
        self.metrics.refresh()
        if time.monotonic() >= self._retention_due:  # Serve calls this every few seconds
            self._retention_due = time.monotonic() + self.config.retention_interval_s
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(self._retention))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _retention(self) -> None:
        """One retention pass (purges due under the agreements), then the disk usage gauge."""
        try:
            retention.run(self.db, self.store, self.audit, self.agreements)
            usage = retention.disk_usage(self.db)
            for agreement in self.agreements.agreements:
                self.metrics.store_bytes.labels(agreement.id).set(usage.get(agreement.id, 0))
        except Exception:
            log.exception("retention pass failed; the next one retries")

    # -- helpers --------------------------------------------------------------------------

    async def _admit(self, priority: Priority) -> None:
        """Refuse new studies with 503 + Retry-After while the backlog is over its bound
        (STAT up to twice the bound); acknowledged work is never refused, only queued."""
        count, at = self._backlog
        if time.monotonic() - at > _BACKLOG_TTL_S:
            count = await asyncio.to_thread(jobs.backlog, self.db)
            self._backlog = (count, time.monotonic())
            self.metrics.backlog.set(count)
        bound = self.config.max_queued_instances * (2 if priority == Priority.STAT else 1)
        if count >= bound:
            self.metrics.rejected.labels("stow", priority.value).inc()
            raise OverloadedError(
                f"{count} instances waiting for inference (bound {bound})",
                retry_after_s=self.config.retry_after_s,
            )

    def _sign(self, row: Any) -> str:
        """The center's signature of a result object row, for the edges of its agreement."""
        return self.signer.sign_row(row, self._edges)

    def _caller(self, request: Request, *roles: Role) -> Caller:
        """The caller :func:`authenticate` established, if in one of ``roles`` (else 403)."""
        caller: Caller = request.state.caller
        if caller.role not in roles:
            self.metrics.refused.labels("forbidden").inc()
            raise ForbiddenError(f"a {caller.role.value} may not use this route")
        return caller

    def _agreement(self, caller: Caller, agreement_id: str) -> str:
        """The agreement, if the caller may act for it (else 404, as a missing one)."""
        a = self.agreements.get(agreement_id)
        if a is None or not caller.may_act_for(a.id):
            self.metrics.refused.labels("other_agreement").inc()
            raise NotFoundError("no agreement with that id")
        if not a.is_active():
            raise PolicyError("the agreement is not active")
        return a.id

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) past ``center.max_body_bytes`` before it is read."""
        limit = self.settings.center.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise DatasetError("body_too_large", f"request body over {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise DatasetError("body_too_large", f"request body over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

"""Api ingress deployment (FastAPI): STOW-RS intake, study completion, results, metrics.

Handlers are thin: they validate, call one function, answer. A completed study becomes a job
that runs on this replica's event loop: preprocessing and inference go through the other
deployments' handles, so concurrent instances form batches in the ModelRunner.
"""

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np
from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.responses import FileResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from ray import serve
from ray.serve.handle import DeploymentHandle

from dicom_io.store import DurableStore
from dicom_io.stow import decode_multipart, store_status
from models.manifest import ModelManifest
from radbridge.agreements import load_agreements
from radbridge.db.agreements import sync_agreements
from radbridge.db.engine import Database
from radbridge.db.tables import utcnow
from radbridge.errors import NotFoundError, PolicyError, RadbridgeError
from radbridge.metrics import CenterMetrics, batch_bucket, safe_label
from radbridge.settings import Settings
from serving import jobs, result_objects
from serving.errors import radbridge_error_handler
from serving.intake import receive_instances, stow_response
from serving.postprocess import findings_from_logits
from serving.routing import route
from serving.schemas import (
    CompleteRequest,
    Finding,
    InstanceResult,
    JobOut,
    ResultObjectList,
    StudyResults,
)
from serving.segmentation import segment_series

__all__ = ["Api", "api"]

log = logging.getLogger("ray.serve")
api = FastAPI(title="radbridge center", version="0.1.0")
api.add_exception_handler(RadbridgeError, radbridge_error_handler)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(api)
class Api:
    def __init__(
        self,
        settings: Settings,
        manifests: dict[str, dict[str, Any]],
        preprocessor: DeploymentHandle,
        runners: dict[str, DeploymentHandle],
    ) -> None:
        self.settings = settings
        self.agreements = load_agreements(settings.agreements_file)
        self.db = Database(settings.center_db_url)
        sync_agreements(self.db, self.agreements)
        self.store = DurableStore(settings.center_store)
        self.manifests = {k: ModelManifest.model_validate(m) for k, m in manifests.items()}
        self.preprocessor = preprocessor
        self.runners = runners
        self.metrics = CenterMetrics()
        self._tasks: set[asyncio.Task[None]] = set()
        self._resumed = False

    # -- routes ---------------------------------------------------------------------------

    @api.post("/v1/studies")
    async def stow(self, request: Request, x_radbridge_agreement: str = Header(...)) -> Response:
        agreement = self._agreement(x_radbridge_agreement)
        parts = decode_multipart(await request.body(), request.headers.get("content-type", ""))
        outcome = await asyncio.to_thread(receive_instances, self.db, self.store, agreement, parts)
        for h in outcome.stored:
            self.metrics.instances_received.labels(agreement, safe_label(h.modality)).inc()
        code = store_status(len(outcome.stored), len(outcome.failed))
        return Response(
            json.dumps(stow_response(outcome)),
            status_code=code,
            media_type="application/dicom+json",
        )

    @api.post("/v1/studies/{study_uid}/complete", status_code=202)
    async def complete(self, study_uid: str, body: CompleteRequest) -> JobOut:
        self._agreement(body.agreement_id)
        job, created = await asyncio.to_thread(jobs.complete_study, self.db, study_uid, body)
        if created:
            self._spawn(job.id)
        return JobOut(
            job_id=job.id,
            study_uid=study_uid,
            version=job.version,
            state=job.state,
            created_at=job.created_at,
        )

    @api.get("/v1/studies/{study_uid}/results")
    async def results(self, study_uid: str) -> StudyResults:
        return await asyncio.to_thread(jobs.study_results, self.db, study_uid)

    @api.get("/v1/agreements/{agreement_id}/result-objects")
    async def list_result_objects(
        self,
        agreement_id: str,
        after: int = Query(0, ge=0),
        limit: int = Query(100, ge=1, le=1000),
    ) -> ResultObjectList:
        """Result objects (SR, SEG) after a cursor; the edge pulls them (it opens the link)."""
        self._agreement(agreement_id)
        objects = await asyncio.to_thread(
            result_objects.list_objects, self.db, agreement_id, after, limit
        )
        return ResultObjectList(objects=objects)

    @api.get("/v1/result-objects/{object_id}")
    async def get_result_object(self, object_id: int) -> FileResponse:
        path = await asyncio.to_thread(result_objects.object_path, self.db, object_id)
        return FileResponse(self.store.path(path), media_type="application/dicom")

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        self._resume()
        return {"status": "ok", "models": sorted(self.manifests)}

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def check_health(self) -> None:
        self._resume()

    # -- jobs -----------------------------------------------------------------------------

    def _agreement(self, agreement_id: str) -> str:
        a = self.agreements.get(agreement_id)
        if a is None or not a.is_active():
            raise PolicyError("no active agreement with that id")
        return a.id

    def _resume(self) -> None:
        if self._resumed:
            return
        self._resumed = True
        for job_id in jobs.pending_jobs(self.db):
            self._spawn(job_id)

    def _spawn(self, job_id: int) -> None:
        task = asyncio.get_running_loop().create_task(self._run_job(job_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, job_id: int) -> None:
        t0 = time.perf_counter()
        agreement, modality, priority, first_received = await asyncio.to_thread(
            jobs.start_job, self.db, job_id
        )
        instances = await asyncio.to_thread(jobs.job_instances, self.db, job_id)
        outcomes = await asyncio.gather(*self._work(job_id, instances), return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        error = None
        if errors:
            error = "; ".join(sorted({f"{type(e).__name__}: {e}" for e in errors}))[:2000]
            log.error("job %d failed for %d of %d instances", job_id, len(errors), len(instances))
        else:
            try:
                await asyncio.to_thread(
                    result_objects.build_for_job, self.db, self.store, job_id, self.manifests
                )
            except Exception as exc:  # the job's findings stay; no object leaves unfinished
                error = f"result objects: {type(exc).__name__}: {exc}"[:2000]
                log.error("job %d: building result objects failed (%s)", job_id, type(exc).__name__)
        await asyncio.to_thread(jobs.finish_job, self.db, job_id, error)
        mod = safe_label(modality)
        self.metrics.jobs.labels(agreement, "failed" if error else "done").inc()
        self.metrics.job.labels(agreement, mod).observe(time.perf_counter() - t0)
        if first_received is not None and not error:
            self.metrics.end_to_end.labels(agreement, mod, safe_label(priority)).observe(
                (utcnow() - first_received).total_seconds()
            )

    def _work(
        self, job_id: int, instances: list[jobs.JobInstance]
    ) -> list[Coroutine[Any, Any, None]]:
        """Per series: a classifier runs per instance, a segmenter once on the whole volume."""
        by_series: dict[int, list[jobs.JobInstance]] = {}
        for inst in instances:
            by_series.setdefault(inst.series_id, []).append(inst)
        work: list[Coroutine[Any, Any, None]] = []
        for series in by_series.values():
            key = route(self.manifests, series[0].modality, series[0].body_part)
            if key is None:
                work.append(self._unrouted(series[0].modality))
            elif self.manifests[key].task == "segmentation":
                work.append(self._segment_series(job_id, key, series))
            else:
                work.extend(self._infer_instance(job_id, key, inst) for inst in series)
        return work

    @staticmethod
    async def _unrouted(modality: str | None) -> None:
        raise NotFoundError(f"no model serves modality {safe_label(modality)}")

    async def _segment_series(self, job_id: int, key: str, series: list[jobs.JobInstance]) -> None:
        """Sliding-window inference on the series' volume; its windows go through the runner."""
        manifest = self.manifests[key]
        runner, loop = self.runners[key], asyncio.get_running_loop()
        encoded = await asyncio.to_thread(lambda: [self.store.read(i.path) for i in series])
        stats: dict[str, Any] = {"windows": 0, "seconds": 0.0, "provider": "", "batch": 0}

        async def windows(batch: np.ndarray) -> np.ndarray:
            outs = await asyncio.gather(*(runner.remote(batch[i]) for i in range(len(batch))))
            stats["windows"] += len(outs)
            stats["seconds"] += max(o["seconds"] for o in outs)
            stats["provider"] = outs[0]["provider"]
            stats["batch"] = max(stats["batch"], *(o["batch_size"] for o in outs))
            return np.stack([o["logits"] for o in outs])

        def predict(batch: np.ndarray) -> np.ndarray:  # called from the worker thread
            return asyncio.run_coroutine_threadsafe(windows(batch), loop).result()

        t0 = time.perf_counter()
        seg = await asyncio.to_thread(segment_series, encoded, manifest, predict)
        total = time.perf_counter() - t0
        self.metrics.inference.labels(
            manifest.name, manifest.version, batch_bucket(stats["batch"]), stats["provider"]
        ).observe(stats["seconds"])
        label = manifest.labels[0]
        finding = Finding(
            label=label.key,
            display=dict(label.display),
            codes={k: v for k, v in (("SCT", label.snomed), ("RADLEX", label.radlex)) if v},
            probability=round(seg.max_probability, 6),
            threshold=label.threshold,
            present=bool(seg.nodules),
        )
        first = min(series, key=lambda i: i.instance_id)
        result = InstanceResult(
            sop_instance_uid=first.sop_instance_uid,
            model={"name": manifest.name, "version": manifest.version, "sha256": manifest.sha256},
            input_sha256=hashlib.sha256(b"".join(sorted(encoded))).hexdigest(),
            provider=stats["provider"],
            findings=[finding],
            timings_ms={
                "total": round(total * 1000, 3),
                "inference": round(stats["seconds"] * 1000, 3),
                "windows": stats["windows"],
            },
            intended_use=manifest.intended_use,
            nodules=[n.as_dict() for n in seg.nodules],
        )
        await asyncio.to_thread(jobs.save_result, self.db, job_id, first.instance_id, result)
        await asyncio.to_thread(
            result_objects.save_segmentation_objects, self.db, self.store, job_id, seg, manifest
        )

    async def _infer_instance(self, job_id: int, key: str, inst: jobs.JobInstance) -> None:
        manifest = self.manifests[key]
        data = await asyncio.to_thread(self.store.read, inst.path)
        pre = await self.preprocessor.remote(data, key)
        out = await self.runners[key].remote(pre["tensor"])
        t0 = time.perf_counter()
        findings = findings_from_logits(out["logits"], manifest)
        post_s = time.perf_counter() - t0
        mod = safe_label(pre["modality"])
        self.metrics.preprocess.labels(key, mod).observe(pre["seconds"])
        self.metrics.inference.labels(
            manifest.name, manifest.version, batch_bucket(out["batch_size"]), out["provider"]
        ).observe(out["seconds"])
        self.metrics.postprocess.labels(key).observe(post_s)
        result = InstanceResult(
            sop_instance_uid=inst.sop_instance_uid,
            model={"name": manifest.name, "version": manifest.version, "sha256": manifest.sha256},
            input_sha256=hashlib.sha256(data).hexdigest(),
            provider=out["provider"],
            findings=findings,
            timings_ms={
                "preprocess": round(pre["seconds"] * 1000, 3),
                "inference": round(out["seconds"] * 1000, 3),
                "postprocess": round(post_s * 1000, 3),
                "batch_size": out["batch_size"],
            },
            intended_use=manifest.intended_use,
        )
        await asyncio.to_thread(jobs.save_result, self.db, job_id, inst.instance_id, result)

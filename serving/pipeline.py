"""The center's job engine: a completed study becomes a job, run on the Api replica's event loop.

A job reads its instances, groups them by series and routes each series to a model: a
classifier runs per instance, a segmenter once on the series' volume (decoded, resampled and
mapped back in the Preprocessor, its sliding windows inside the ModelRunner beside the session,
one round trip for the volume; the Api replica only reads the bytes and builds the SEG). Work
units wait for a :class:`PriorityGate` slot, so STAT studies go first and a routine one waits
at most its cap. A job that finishes builds its result objects (SEG, SR; signed for the edges
of its agreement) and wakes the edges' waiting listings; a job the AI cannot read sends the
hospital a not-read notice; a run the infrastructure broke (the database, the store, a runner
replica) runs again after a backoff instead of failing the study.

The Api (serving/ingress.py) owns the routes and calls :meth:`Pipeline.complete` when an edge
completes a study; nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from ray.exceptions import RayActorError
from sqlalchemy.exc import DBAPIError

from dicom_io.store import DurableStore
from models.manifest import ModelManifest
from radbridge.agreements import AgreementSet
from radbridge.contract import CompleteStudy, backoff_s
from radbridge.db.engine import Database
from radbridge.db.tables import JobRow, utcnow
from radbridge.errors import NoModelError, StorageError, redacted
from radbridge.metrics import CenterMetrics, safe_label
from serving import jobs, result_objects
from serving.inference import Inference
from serving.result_objects import unread_reasons
from serving.scheduling import PriorityGate
from serving.schemas import Finding, InstanceResult
from serving.segmentation import SeriesSegmentation

__all__ = ["Pipeline", "model_ref"]

log = logging.getLogger("ray.serve")
_T = TypeVar("_T")

_JOB_RETRY_BASE_S, _JOB_RETRY_MAX_S = 2.0, 60.0  # a job whose run broke (database, store)
# How long a replica holds a job it runs without renewing (every health check renews, about
# every 10 s): past it, another replica resumes the job (its replica is taken to be dead).
JOB_LEASE_S = 30.0
# Series segmented ahead and kept for their jobs (a CT's probabilities are gone by then: a
# segmentation holds its mask, some MB); the oldest is dropped unused beyond this.
PREPARED_MAX = 4


@dataclass(frozen=True)
class _Segmented:
    """One series' segmentation, and what its result records of how it was made."""

    seg: SeriesSegmentation
    stats: dict[str, Any]  # windows, seconds in the runner, provider
    seconds: float
    input_sha256: str


def _by_series(instances: list[jobs.JobInstance]) -> dict[int, list[jobs.JobInstance]]:
    by_series: dict[int, list[jobs.JobInstance]] = {}
    for inst in instances:
        by_series.setdefault(inst.series_id, []).append(inst)
    return by_series


def _retrieved(task: asyncio.Task[_Segmented]) -> None:
    """A prepared segmentation nobody awaits (dropped unused) must not log "never retrieved"."""
    if not task.cancelled():
        task.exception()


def _transient(exc: BaseException) -> bool:
    """A failure of the infrastructure (the database, the store, a ModelRunner replica that
    died), not of the study or the model: the job runs again instead of failing. A study the
    AI cannot read fails the job and the hospital is told; a database that restarts must not
    tell it that."""
    return isinstance(exc, DBAPIError | StorageError | OSError | RayActorError)


def model_ref(manifest: ModelManifest) -> dict[str, str]:
    """The model a result names: name, version and the weights' digest."""
    return {"name": manifest.name, "version": manifest.version, "sha256": manifest.sha256}


class Pipeline:
    """Runs the center's jobs on the running event loop: per series inference, result
    objects, the not-read notice, and the retry of a run the infrastructure broke."""

    def __init__(
        self,
        db: Database,
        store: DurableStore,
        inference: Inference,
        metrics: CenterMetrics,
        agreements: AgreementSet,
        sign: Callable[[Any], str],
    ) -> None:
        self.db = db
        self.store = store
        self.inference = inference
        self.metrics = metrics
        self.agreements = agreements
        self.sign = sign
        self.dispatch = PriorityGate(capacity=64, max_waiting=0)
        # Set (and replaced) whenever a job's result objects become listable: wakes the
        # edges' waiting listings.
        self.objects_built = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        # Every segmentation begun ahead, until it ends: the event loop keeps only a weak
        # reference to a task, and one dropped from _prepared (over PREPARED_MAX) still runs.
        self._running_ahead: set[asyncio.Task[_Segmented]] = set()
        # This replica, as the owner of the jobs it runs (jobs.owner), and the jobs it runs.
        self.owner = uuid.uuid4().hex
        self._running: set[int] = set()
        self.prepare_ahead = True
        # (model key, instance ids) -> the series' segmentation, computed or computing
        self._prepared: OrderedDict[tuple[str, tuple[int, ...]], asyncio.Task[_Segmented]] = (
            OrderedDict()
        )

    @property
    def manifests(self) -> dict[str, ModelManifest]:
        return self.inference.manifests

    def configure(
        self, concurrency: int, max_wait_s: dict[str, float], prepare_ahead: bool = True
    ) -> None:
        """How many work units run at once, how long each priority may wait for one, and
        whether a study's volumes may be segmented ahead (:meth:`prepare`)."""
        self.dispatch.capacity = concurrency
        self.dispatch.max_wait_s = dict(max_wait_s)
        self.prepare_ahead = prepare_ahead

    async def resume(self) -> None:
        """Renew this replica's hold on its jobs, then run the queued or running jobs no live
        replica holds: a replica that died mid-job, or one that died before starting a job it
        had created. Called on every health check, so another replica takes a dead one's jobs
        over within ``JOB_LEASE_S``, while a job a live replica runs is never run twice. A
        database that does not answer is logged, not raised: the health check stays green
        and the next one tries again."""
        try:
            await asyncio.to_thread(jobs.renew_leases, self.db, self.owner, JOB_LEASE_S)
            for job_id in await asyncio.to_thread(jobs.pending_jobs, self.db, self.owner):
                if job_id in self._running:
                    continue
                if await asyncio.to_thread(
                    jobs.claim_job, self.db, job_id, self.owner, JOB_LEASE_S
                ):
                    log.info("job %d resumed (no live replica held it)", job_id)
                    self.spawn(job_id)
        except Exception as exc:
            log.error("resuming jobs failed (%s); the next health check tries again", redacted(exc))

    def spawn(self, job_id: int, attempt: int = 0) -> None:
        """Run job ``job_id`` on this event loop (a task the pipeline keeps until it ends);
        nothing when it already runs here (``attempt`` 0)."""
        if attempt == 0 and job_id in self._running:
            return
        self._running.add(job_id)
        self._keep(self._run_job(job_id, attempt))

    def _keep(self, unit: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """``unit`` as a task the pipeline holds until it ends (the loop holds tasks weakly)."""
        task = asyncio.get_running_loop().create_task(unit)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def complete(
        self, study_uid: str, body: CompleteStudy, record: Callable[[JobRow], None]
    ) -> tuple[JobRow, bool]:
        """Create the study's job (idempotent: an earlier job that sees every instance is
        returned) and start it; ``record`` (the audit's import) is called, in a worker thread,
        for a job created. Returns (job, created).

        It runs to its end even when the caller is cancelled: Serve cancels a request whose
        client went away (an edge killed while completing), and a job committed but never
        started would wait, queued, until the replica restarts, while the edge's repeated
        ``complete`` finds it queued and starts nothing."""
        return await asyncio.shield(self._keep(self._complete(study_uid, body, record)))

    async def _complete(
        self, study_uid: str, body: CompleteStudy, record: Callable[[JobRow], None]
    ) -> tuple[JobRow, bool]:
        job, created = await asyncio.to_thread(
            jobs.complete_study, self.db, study_uid, body, self.owner, JOB_LEASE_S
        )
        if created:
            try:
                await asyncio.to_thread(record, job)
            finally:
                self.spawn(job.id)  # whatever the audit did: a committed job runs
        return job, created

    async def _run_job(self, job_id: int, attempt: int = 0) -> None:
        """Run the job; when the run itself breaks (the database or the store went away: a
        failing model or study fails the job instead, inside), run it again after a backoff,
        so that no job is left queued or running until the replica restarts."""
        try:
            await self._run_job_once(job_id)
        except Exception as exc:
            delay = backoff_s(attempt + 1, _JOB_RETRY_BASE_S, _JOB_RETRY_MAX_S)
            log.error(
                "job %d: the run broke (%s); run again in %.0f s",
                job_id,
                type(exc).__name__,
                delay,
            )
            await asyncio.sleep(delay)
            self.spawn(job_id, attempt + 1)  # still this replica's (its lease is renewed)
            return
        self._running.discard(job_id)

    async def _run_job_once(self, job_id: int) -> None:
        t0 = time.perf_counter()
        # A run cut short (the center killed mid-job, resumed now) may have written objects.
        await asyncio.to_thread(result_objects.discard_unlisted, self.db, self.store, job_id)
        agreement, modality, priority, first_received = await asyncio.to_thread(
            jobs.start_job, self.db, job_id
        )
        instances = await asyncio.to_thread(jobs.job_instances, self.db, job_id)
        work = self._work(job_id, instances, priority)
        outcomes = await asyncio.gather(*work, return_exceptions=True)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        broken = next((e for e in errors if _transient(e)), None)
        if broken is not None:  # not the study's fault: the whole run goes again, later
            raise broken
        error = None
        if errors:
            error = "; ".join(sorted({f"{type(e).__name__}: {e}" for e in errors}))[:2000]
            log.error("job %d failed for %d of %d instances", job_id, len(errors), len(instances))
            await self._tell_the_hospital(job_id, agreement, modality, errors)
        else:
            try:
                await asyncio.to_thread(
                    result_objects.build_for_job,
                    self.db,
                    self.store,
                    job_id,
                    self.manifests,
                    self.sign,
                )
            except Exception as exc:  # the job's findings stay; no object leaves unfinished
                error = f"result objects: {type(exc).__name__}: {exc}"[:2000]
                log.error("job %d: building result objects failed (%s)", job_id, type(exc).__name__)
        await asyncio.to_thread(jobs.finish_job, self.db, job_id, error)
        self.objects_built.set()
        self.objects_built = asyncio.Event()
        mod = safe_label(modality)
        self.metrics.jobs.labels(agreement, "failed" if error else "done").inc()
        self.metrics.job.labels(agreement, mod).observe(time.perf_counter() - t0)
        if first_received is not None and not error:
            self.metrics.end_to_end.labels(agreement, mod, safe_label(priority)).observe(
                (utcnow() - first_received).total_seconds()
            )

    async def _tell_the_hospital(
        self, job_id: int, agreement_id: str, modality: str | None, errors: list[BaseException]
    ) -> None:
        """A failed job still answers the hospital: an SR saying the AI did not read the
        study, why (a closed set of reasons) and that the radiologist's report follows."""
        a = self.agreements.get(agreement_id)
        languages = a.report_languages if a is not None else ["en"]
        center = a.reading_center.name if a is not None else "radbridge"
        try:
            await asyncio.to_thread(
                result_objects.build_notice,
                self.db,
                self.store,
                job_id,
                unread_reasons(errors, safe_label(modality)),
                languages,
                center,
                self.sign,
            )
        except Exception as exc:  # the job stays failed and on the worklist; logged, counted
            log.error("job %d: the not-read notice failed (%s)", job_id, type(exc).__name__)

    def _work(
        self, job_id: int, instances: list[jobs.JobInstance], priority: str
    ) -> list[Coroutine[Any, Any, None]]:
        """Per series: a classifier runs per instance, a segmenter once on the whole volume.
        Each unit waits for a dispatch slot: STAT jobs' units go first."""
        work: list[Coroutine[Any, Any, None]] = []
        for series in _by_series(instances).values():
            key = self.inference.route(series[0].modality, series[0].body_part)
            if key is None:
                work.append(self._unrouted(series[0].modality))
            elif self.manifests[key].task == "segmentation":
                work.append(
                    self._dispatched(priority, self._segment_series(job_id, key, series, priority))
                )
            else:
                work.extend(
                    self._dispatched(priority, self._infer_instance(job_id, key, inst, priority))
                    for inst in series
                )
        return work

    async def _dispatched(self, priority: str, unit: Coroutine[Any, Any, None]) -> None:
        try:
            async with self.dispatch.slot(priority):
                await unit
        finally:
            unit.close()  # never started when the wait was cancelled: no "never awaited"

    @staticmethod
    async def _unrouted(modality: str | None) -> None:
        code = safe_label(modality)
        raise NoModelError(code, f"no model serves modality {code}")

    async def prepare(self, agreement_id: str, study_uid: str, count: int, priority: str) -> bool:
        """Segment the study's volumes ahead of its job, if this replica has no job work and
        the study holds exactly ``count`` instances (the edge's hint, during the quiet
        period). The job that ``complete`` starts awaits or takes the result if its series
        have the same instances; otherwise it is dropped unused. Returns whether it began."""
        if not self.prepare_ahead or self.dispatch.running or self.dispatch.waiting:
            self.metrics.prepared.labels("skipped").inc()
            return False
        instances = await asyncio.to_thread(
            jobs.study_instances, self.db, agreement_id, study_uid, count
        )
        began = False
        for key, series in self._segmented_series(instances or []):
            ids = (key, tuple(i.instance_id for i in series))
            if ids in self._prepared:
                continue
            task = asyncio.get_running_loop().create_task(self._segmentation(key, series, priority))
            task.add_done_callback(_retrieved)
            self._running_ahead.add(task)
            task.add_done_callback(self._running_ahead.discard)
            self._prepared[ids] = task
            self.metrics.prepared.labels("started").inc()
            while len(self._prepared) > PREPARED_MAX:
                self._prepared.popitem(last=False)
                self.metrics.prepared.labels("unused").inc()
            began = True
        return began

    def _segmented_series(
        self, instances: list[jobs.JobInstance]
    ) -> list[tuple[str, list[jobs.JobInstance]]]:
        """The study's series that a segmentation model reads, with its model's key."""
        found = []
        for series in _by_series(instances).values():
            key = self.inference.route(series[0].modality, series[0].body_part)
            if key is not None and self.manifests[key].task == "segmentation":
                found.append((key, series))
        return found

    async def _segmentation(
        self, key: str, series: list[jobs.JobInstance], priority: str
    ) -> _Segmented:
        """The series' segmentation: its bytes read here, its volume decoded and resampled in
        the Preprocessor, its windows run in the ModelRunner (``Inference.segment_series``)."""
        encoded = await asyncio.to_thread(lambda: [self.store.read(i.path) for i in series])
        t0 = time.perf_counter()
        seg, stats = await self.inference.segment_series(key, encoded, priority)
        digest = hashlib.sha256(b"".join(sorted(encoded))).hexdigest()
        return _Segmented(seg, stats, time.perf_counter() - t0, digest)

    async def _segment_series(
        self, job_id: int, key: str, series: list[jobs.JobInstance], priority: str
    ) -> None:
        """The series' segmentation (prepared ahead, or computed now), then its result and
        its SEG."""
        manifest = self.manifests[key]
        ahead = self._prepared.pop((key, tuple(i.instance_id for i in series)), None)
        done: _Segmented | None = None
        if ahead is not None:
            try:
                done = await ahead
                self.metrics.prepared.labels("used").inc()
            except Exception as exc:  # computed again below: the job reports its own fault
                log.warning(
                    "job %d: the segmentation prepared ahead failed (%s)",
                    job_id,
                    type(exc).__name__,
                )
        if done is None:
            done = await self._segmentation(key, series, priority)
        seg, stats, total = done.seg, done.stats, done.seconds
        self.metrics.request.labels(manifest.name, manifest.version, priority, "study").observe(
            total
        )
        label = manifest.labels[0]
        finding = Finding(
            label=label.key,
            display=dict(label.display),
            codes=label.codes,
            probability=round(seg.max_probability, 6),
            threshold=label.threshold,
            present=bool(seg.nodules),
        )
        first = min(series, key=lambda i: i.instance_id)
        result = InstanceResult(
            sop_instance_uid=first.sop_instance_uid,
            model=model_ref(manifest),
            input_sha256=done.input_sha256,
            provider=stats["provider"],
            findings=[finding],
            timings_ms={
                "total": round(total * 1000, 3),
                "inference": round(stats["seconds"] * 1000, 3),
                "windows": stats["windows"],
                **{stage: round(sec * 1000, 3) for stage, sec in seg.seconds.items()},
            },
            intended_use=manifest.intended_use,
            nodules=[n.as_dict() for n in seg.nodules],
        )
        await asyncio.to_thread(jobs.save_result, self.db, job_id, first.instance_id, result)
        await asyncio.to_thread(
            result_objects.save_segmentation_objects,
            self.db,
            self.store,
            job_id,
            seg,
            manifest,
            self.sign,
        )

    async def _infer_instance(
        self, job_id: int, key: str, inst: jobs.JobInstance, priority: str
    ) -> None:
        t0 = time.perf_counter()
        data = await asyncio.to_thread(self.store.read, inst.path)
        out = await self.inference.classify_encoded(key, data, priority, shed=False)
        m = out.manifest
        result = InstanceResult(
            sop_instance_uid=inst.sop_instance_uid,
            model=model_ref(m),
            input_sha256=hashlib.sha256(data).hexdigest(),
            provider=out.provider,
            findings=out.findings,
            timings_ms=out.timings_ms,
            intended_use=m.intended_use,
        )
        await asyncio.to_thread(jobs.save_result, self.db, job_id, inst.instance_id, result)
        self.metrics.request.labels(m.name, m.version, priority, "study").observe(
            time.perf_counter() - t0
        )

"""serving.pipeline: the job engine, on real intake, the real shipped CT model (raw ONNX Runtime
in this process instead of the Ray handles) and a migrated database.

What is checked: a CT series segmented ahead on the edge's hint (``Pipeline.prepare``) is what
the study's job uses, with the same findings and objects as a job that computes it itself; a
hint whose count is not what the center holds, or one while job work runs, prepares nothing;
a study that changed after the hint is computed again by its job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pydicom
import pytest
from sqlalchemy import select

from dicom_io.store import DurableStore
from models.ct_dicom import write_ct_series
from models.ct_phantoms import chest_ct
from models.nodules import onnx_predictor, sliding_window_probabilities
from models.repository import ModelRepository
from radbridge.agreements import load_agreements
from radbridge.contract import CompleteStudy
from radbridge.db import Database, upgrade
from radbridge.db.agreements import sync_agreements
from radbridge.db.tables import JobRow, ResultObjectRow, ResultRow, utcnow
from radbridge.metrics import CenterMetrics
from serving import jobs
from serving.intake import receive_instances
from serving.pipeline import Pipeline
from serving.segmentation import SeriesSegmentation, segment_series
from tests.conftest import REPO

AGREEMENT = "demo-hospital-to-center"
MODEL = "ct-lung-nodule-demo"
SHIPPED = REPO / "models" / "shipped"


class RawInference:
    """What a Pipeline asks of ``serving.inference.Inference``, on raw ONNX Runtime here."""

    def __init__(self) -> None:
        loaded = ModelRepository(SHIPPED).get(MODEL)
        self.key = f"{MODEL}:{loaded.manifest.version}"
        self.manifests = {self.key: loaded.manifest}
        self._session = ort.InferenceSession(
            str(loaded.onnx_path), providers=["CPUExecutionProvider"]
        )
        self.segmented = 0  # volumes through the model

    def route(self, modality: str | None, body_part: str | None) -> str | None:
        return self.key if modality == "CT" else None

    async def segment_series(
        self, key: str, encoded: list[bytes], priority: str
    ) -> tuple[SeriesSegmentation, dict[str, Any]]:
        self.segmented += 1
        manifest = self.manifests[key]
        seg = manifest.segmentation
        assert seg is not None
        name = self._session.get_inputs()[0].name

        def probabilities(image: np.ndarray) -> np.ndarray:
            return sliding_window_probabilities(onnx_predictor(self._session, name), image, seg)

        done = await asyncio.to_thread(segment_series, encoded, manifest, probabilities)
        return done, {"windows": 1, "seconds": 0.01, "provider": "cpu", "queue_wait": 0.0}


def _center(where: Path) -> tuple[Database, DurableStore]:
    url = f"sqlite:///{where / 'center.db'}"
    upgrade(url, "center")
    db = Database(url)
    sync_agreements(db, load_agreements(REPO / "radbridge/defaults/agreements.yaml"))
    return db, DurableStore(where / "store")


@pytest.fixture
def center(tmp_path: Path) -> Iterator[tuple[Database, DurableStore]]:
    db, store = _center(tmp_path)
    yield db, store
    db.dispose()


@pytest.fixture(scope="module")
def ct_parts(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """A de-identified demo chest CT with one nodule, as the edge sends it (Part 10)."""
    phantom = chest_ct(np.random.default_rng([20261206, 7]), n_nodules=1)
    files = write_ct_series(
        tmp_path_factory.mktemp("ct"),
        phantom,
        seed=7,
        patient_name="",
        patient_id="PSEUDO-7",
        birth_date="",
    )
    parts = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientIdentityRemoved = "YES"
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        parts.append(buf.getvalue())
    return parts


def _pipeline(db: Database, store: DurableStore, inference: RawInference) -> Pipeline:
    return Pipeline(
        db,
        store,
        inference,  # type: ignore[arg-type]
        CenterMetrics(),
        load_agreements(REPO / "radbridge/defaults/agreements.yaml"),
        lambda row: "signed",
    )


def _study_uid(parts: list[bytes]) -> str:
    return str(pydicom.dcmread(BytesIO(parts[0]), stop_before_pixels=True).StudyInstanceUID)


async def _run_job(p: Pipeline, db: Database, study_uid: str, count: int) -> dict[str, Any]:
    """Complete the study, run its job to the end; its finding and its objects' kinds."""
    job, created = jobs.complete_study(
        db, study_uid, CompleteStudy(agreement_id=AGREEMENT, instance_count=count)
    )
    assert created
    p.spawn(job.id)
    while p._tasks:
        await asyncio.sleep(0.01)
    with db.session() as s:
        state = s.get(JobRow, job.id).state  # type: ignore[union-attr]
        (result,) = s.scalars(select(ResultRow).where(ResultRow.job_id == job.id)).all()
        kinds = sorted(
            s.scalars(select(ResultObjectRow.kind).where(ResultObjectRow.job_id == job.id))
        )
    body = result.findings
    return {
        "state": state,
        "findings": body["findings"],
        "nodules": body["nodules"],
        "input_sha256": result.input_sha256,
        "kinds": kinds,
    }


def _used(p: Pipeline, outcome: str) -> float:
    value = p.metrics.registry.get_sample_value(
        "radbridge_center_prepared_series_total", {"outcome": outcome}
    )
    return value or 0.0


def test_a_volume_prepared_on_the_hint_is_what_the_job_uses(
    center: tuple[Database, DurableStore], ct_parts: list[bytes], tmp_path: Path
) -> None:
    db, store = center
    assert not receive_instances(db, store, AGREEMENT, ct_parts).failed
    (tmp_path / "other").mkdir()
    other_db, other_store = _center(tmp_path / "other")  # a center that gets no hint
    assert not receive_instances(other_db, other_store, AGREEMENT, ct_parts).failed
    uid, n = _study_uid(ct_parts), len(ct_parts)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        inference = RawInference()
        p = _pipeline(db, store, inference)
        assert not await p.prepare(AGREEMENT, uid, n - 1, "routine")  # not what it holds
        assert not await p.prepare(AGREEMENT, "2.25.1", n, "routine")  # no such study
        assert inference.segmented == 0
        assert await p.prepare(AGREEMENT, uid, n, "routine")
        assert not await p.prepare(AGREEMENT, uid, n, "routine")  # under way already
        ahead = await _run_job(p, db, uid, n)
        assert inference.segmented == 1  # the job took the prepared volume
        assert (_used(p, "started"), _used(p, "used")) == (1.0, 1.0)

        computed_here = RawInference()  # the same study, no hint: its job computes it
        again = await _run_job(_pipeline(other_db, other_store, computed_here), other_db, uid, n)
        assert computed_here.segmented == 1
        return ahead, again

    try:
        with_hint, without = asyncio.run(scenario())
    finally:
        other_db.dispose()
    assert with_hint["state"] == "done" and with_hint["kinds"] == ["seg", "sr"]
    assert with_hint["findings"] == without["findings"]
    assert with_hint["nodules"] == without["nodules"] and with_hint["nodules"]
    assert with_hint["input_sha256"] == without["input_sha256"]


def test_no_preparing_while_job_work_runs_nor_for_a_study_that_changed(
    center: tuple[Database, DurableStore], ct_parts: list[bytes]
) -> None:
    db, store = center
    first, last = ct_parts[:-1], ct_parts[-1:]
    assert not receive_instances(db, store, AGREEMENT, first).failed
    uid = _study_uid(ct_parts)

    async def scenario() -> None:
        inference = RawInference()
        p = _pipeline(db, store, inference)
        async with p.dispatch.slot("routine"):  # another study's job unit runs
            assert not await p.prepare(AGREEMENT, uid, len(first), "routine")
        assert _used(p, "skipped") == 1.0
        assert await p.prepare(AGREEMENT, uid, len(first), "routine")
        while inference.segmented == 0 or any(not t.done() for t in p._prepared.values()):
            await asyncio.sleep(0.01)
        assert not receive_instances(db, store, AGREEMENT, last).failed  # a late slice
        result = await _run_job(p, db, uid, len(ct_parts))
        assert result["state"] == "done"
        assert inference.segmented == 2  # its series changed: computed again, all slices
        assert _used(p, "used") == 0.0

    asyncio.run(scenario())


def test_a_completion_whose_caller_went_away_still_starts_its_job(
    center: tuple[Database, DurableStore], ct_parts: list[bytes]
) -> None:
    """Serve cancels a request whose client disconnected (an edge killed while completing):
    the job it committed must still run, or it stays queued and the edge's repeated
    ``complete`` finds it queued and starts nothing."""
    db, store = center
    assert not receive_instances(db, store, AGREEMENT, ct_parts).failed
    uid, n = _study_uid(ct_parts), len(ct_parts)
    body = CompleteStudy(agreement_id=AGREEMENT, instance_count=n)
    recorded: list[int] = []

    async def scenario() -> None:
        inference = RawInference()
        p = _pipeline(db, store, inference)
        caller = asyncio.create_task(p.complete(uid, body, lambda job: recorded.append(job.id)))
        await asyncio.sleep(0)  # the request has begun: its job is being committed
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        while p._tasks:
            await asyncio.sleep(0.01)
        job, created = await p.complete(uid, body, lambda job: recorded.append(job.id))
        assert not created  # the edge's repeat: the same job, nothing started again
        while p._tasks:
            await asyncio.sleep(0.01)
        with db.session() as s:
            assert s.get(JobRow, job.id).state == "done"  # type: ignore[union-attr]
        assert recorded == [job.id]  # audited once
        assert inference.segmented == 1

    asyncio.run(scenario())


def test_a_replica_resumes_only_the_jobs_no_live_replica_holds(
    center: tuple[Database, DurableStore], ct_parts: list[bytes]
) -> None:
    """An Api replica starting (or health-checking) beside a live one does not run that one's
    job again; a job whose replica died (its lease ran out) it takes over and runs."""
    db, store = center
    assert not receive_instances(db, store, AGREEMENT, ct_parts).failed
    uid, n = _study_uid(ct_parts), len(ct_parts)

    async def scenario() -> None:
        inference_a, inference_b = RawInference(), RawInference()
        a, b = _pipeline(db, store, inference_a), _pipeline(db, store, inference_b)
        body = CompleteStudy(agreement_id=AGREEMENT, instance_count=n)
        job, created = await a.complete(uid, body, lambda job: None)
        assert created
        await b.resume()  # while a runs it
        assert not b._running
        while a._tasks:
            await asyncio.sleep(0.01)
        assert (inference_a.segmented, inference_b.segmented) == (1, 0)

        # The same job as a replica that died would leave it: queued, its lease run out.
        with db.session() as s:
            row = s.get(JobRow, job.id)
            assert row is not None
            row.state, row.owner = "queued", "dead"
            row.lease_until = utcnow() - timedelta(seconds=1)
        await b.resume()
        assert b._running == {job.id}
        while b._tasks:
            await asyncio.sleep(0.01)
        with db.session() as s:
            row = s.get(JobRow, job.id)
            assert row is not None and (row.state, row.owner) == ("done", b.owner)
        assert inference_b.segmented == 1

    asyncio.run(scenario())

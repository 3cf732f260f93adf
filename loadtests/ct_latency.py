"""CT read-back latency: the last slice acknowledged by the edge -> the SEG and SR stored in the
hospital's PACS, against the pure model path on the same volume.

    .venv/bin/python -m loadtests.ct_latency [--runs 3] [--prepare-ahead both|on|off]

Stack: `radbridge up` (edge + local center, its defaults) with Orthanc as the hospital PACS
(tests/e2e/stack.stack_with_pacs; every dcmtk peer with TCP_NODELAY=1). The demo agreement's
quiet period (2 s) is part of the path by design: the edge cannot know a study is complete
before it. The agreement's quiet period is subtracted from the ratio (the edge's own delay in
noticing that it passed is not); the measured wait is shown as its own stage.

Per run, a fresh 64-slice demo chest CT (new UIDs, real patient identity) is pushed with dcmtk
``storescu``; the clock starts when storescu has its last C-STORE response (it exits right
after) and stops when Orthanc holds the SEG and the SR of the study (polled every 50 ms).
The stages come from the timestamps each node records anyway (edge study: last received,
stable, forwarded; center job: created, started, finished, with its own stage clocks
decoded/windows/objects; result objects: created; edge deliveries: listed, delivered).

With ``edge.forward_early`` (the default) every slice reaches the center during the quiet
period: full requests as they come, the rest once the study has been idle for a quarter of
the period; "stable -> first instance at the center" is then negative, and "stable ->
forwarded" is "complete". The edge then tells the center the study is probably whole, and an
idle center segments the volume ahead (the Api's ``prepare_ahead``, on by default): the job
that "complete" starts takes that segmentation, and its decode/window/map stages were spent
during the quiet period. The benchmark runs the stack twice, with ``prepare_ahead`` on and off
(``--prepare-ahead on|off|both``), so both figures are printed side by side.

The pure model path runs in this process on the same files: read the series, resample, MONAI
sliding-window on raw ONNX Runtime (CPU provider, the runner's thread settings), nodules and the
probability map back on the source slices (``serving.segmentation.segment_series``) — the
minimum any serving path must spend. Ratio = (read-back - quiet period) / model path: for the
first run after the stack starts (cold) and the median of the others.

Loopback only; every wait is bounded; the work folder is deleted at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pydicom
from sqlalchemy import select

from dicom_io.identity_map import lookup_pseudonym
from models.ct_dicom import write_ct_series
from models.ct_phantoms import chest_ct
from models.nodules import onnx_predictor, sliding_window_probabilities
from models.repository import ModelRepository
from radbridge.db import Database
from radbridge.db.tables import DeliveryRow, JobRow, ResultObjectRow, ResultRow, StudyRow
from serving.segmentation import segment_series
from tests.e2e.stack import AGREEMENT, serve_config_with, stack_with_pacs, storescu

MODEL = "ct-lung-nodule-demo"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RESULT_TIMEOUT_S = 300.0
QUIET_PERIOD_S = 2.0  # the demo agreement's quiet_period_s (radbridge/defaults/agreements.yaml)
POLL_S = 0.05  # how often the PACS is asked; its CPU counts against the stack


def model_path_seconds(files: list[Path], models: Path, repeats: int = 3) -> dict[str, float]:
    """Median seconds of the pure model path on ``files`` (raw ONNX Runtime, CPU): in all
    (``total``) and per stage (decode, sliding_window, map)."""
    loaded = ModelRepository(models).get(MODEL)
    opts = ort.SessionOptions()
    session = ort.InferenceSession(str(loaded.onnx_path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    encoded = [f.read_bytes() for f in files]

    seg_spec = loaded.manifest.segmentation
    assert seg_spec is not None

    def probabilities(image: np.ndarray) -> np.ndarray:
        return sliding_window_probabilities(onnx_predictor(session, name), image, seg_spec)

    segment_series(encoded, loaded.manifest, probabilities)  # warm-up: first-call allocations
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        seg = segment_series(encoded, loaded.manifest, probabilities)
        runs.append({"total": time.perf_counter() - t0, **seg.seconds})
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return (b - a).total_seconds()


def _stages(data: Path, study_uid: str, acked_at: datetime) -> dict[str, float | None]:
    """Stage durations from the nodes' own records, in path order."""
    edge_db = Database(f"sqlite:///{data / 'edge' / 'edge.db'}")
    center_db = Database(f"sqlite:///{next((data / 'center').glob('*.db'))}")
    try:
        pseudo = lookup_pseudonym(edge_db, AGREEMENT, "uid", study_uid)
        # The PACS holds both objects a moment before the edge records their delivery.
        deadline = time.monotonic() + 10
        while True:
            with edge_db.session() as s:
                edge = s.scalars(select(StudyRow).where(StudyRow.study_uid == study_uid)).one()
                deliveries = list(
                    s.scalars(select(DeliveryRow).where(DeliveryRow.study_id == edge.id))
                )
            recorded = len(deliveries) >= 2 and all(d.delivered_at for d in deliveries)
            if recorded or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        with center_db.session() as s:
            study = s.scalars(select(StudyRow).where(StudyRow.study_uid == pseudo)).one()
            job = s.scalars(
                select(JobRow).where(JobRow.study_id == study.id).order_by(JobRow.id.desc())
            ).first()
            assert job is not None, "the center has no job for the study"
            objects = list(
                s.scalars(select(ResultObjectRow).where(ResultObjectRow.job_id == job.id))
            )
            result = s.scalars(select(ResultRow).where(ResultRow.job_id == job.id)).first()
    finally:
        edge_db.dispose()
        center_db.dispose()
    assert job is not None and result is not None and objects and deliveries
    made = max(o.created_at for o in objects)
    listed = min(d.created_at for d in deliveries)
    delivered = max(d.delivered_at for d in deliveries if d.delivered_at is not None)
    clocks = {k: float(v) / 1000 for k, v in result.timings_ms.items()}
    return {
        "acked -> stable (quiet period)": _seconds(acked_at, edge.stable_at),
        "stable -> forwarded (de-identify, send)": _seconds(edge.stable_at, edge.forwarded_at),
        "  stable -> first instance at the center": _seconds(
            edge.stable_at, study.first_received_at
        ),
        "  first -> last instance at the center": _seconds(
            study.first_received_at, study.last_received_at
        ),
        "forwarded -> job started": _seconds(edge.forwarded_at, job.started_at),
        "  job: series read + decoded": clocks.get("decode"),
        "  job: resample + sliding window + nodules": clocks.get("sliding_window"),
        "    of which ONNX Runtime in the runner": clocks.get("inference"),
        "  job: map onto the source slices": clocks.get("map"),
        "  job: SEG + SR built, signed, stored": _seconds(result.created_at, made),
        "job started -> finished": _seconds(job.started_at, job.finished_at),
        "finished -> listed at the edge": _seconds(made, listed),
        "listed -> stored at the PACS": _seconds(listed, delivered),
    }


def one_run(pacs: Any, stack: dict[str, Any], workdir: Path, seed: int) -> dict[str, Any]:
    phantom = chest_ct(np.random.default_rng([20261206, seed]), n_nodules=1)
    files = write_ct_series(
        workdir / f"ct-{seed}",
        phantom,
        seed=seed,
        patient_name="Latency^Bench",
        patient_id=f"LAT-{seed:04d}",
        birth_date="19700101",
    )
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    out = storescu(stack["ports"]["edge"], files)
    t_acked = time.monotonic()
    acked_at = datetime.now().astimezone()
    if out.returncode != 0:
        raise RuntimeError(f"storescu failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    deadline = t_acked + RESULT_TIMEOUT_S
    while time.monotonic() < deadline:
        kinds = _stored_kinds(pacs, study_uid)
        if {"SEG", "SR"} <= kinds:
            break
        time.sleep(POLL_S)
    else:
        raise RuntimeError(f"no SEG + SR at the PACS within {RESULT_TIMEOUT_S:.0f} s")
    readback = time.monotonic() - t_acked
    return {
        "files": files,
        "readback": readback,
        "stages": _stages(stack["data"], study_uid, acked_at),
    }


def _stored_kinds(pacs: Any, study_uid: str) -> set[str]:
    found = pacs.client.post(
        "/tools/find",
        json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
    )
    if found.status_code != 200:
        return set()
    return {s["MainDicomTags"].get("Modality", "") for s in found.json()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, choices=range(1, 10), metavar="1..9")
    parser.add_argument("--prepare-ahead", choices=("both", "on", "off"), default="both")
    args = parser.parse_args(argv)
    settings = {"both": (True, False), "on": (True,), "off": (False,)}[args.prepare_ahead]
    for prepare_ahead in settings:
        workdir = Path(tempfile.mkdtemp(prefix="radbridge-ct-latency-"))
        try:
            report(workdir, args.runs, prepare_ahead)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(workdir: Path, n_runs: int, prepare_ahead: bool) -> None:
    """One stack, ``n_runs`` CTs through it, then the stage table and the ratios."""
    print(f"\nprepare_ahead {'on' if prepare_ahead else 'off'}:")
    runs = []
    serve_config = serve_config_with(workdir, prepare_ahead=prepare_ahead)
    with stack_with_pacs(
        workdir, _default_delivery_poll, RADBRIDGE_CENTER__SERVE_CONFIG=str(serve_config)
    ) as (pacs, stack):
        for i in range(n_runs):
            run = one_run(pacs, stack, workdir, seed=i + 1)
            print(f"  run {i + 1}/{n_runs}: read back in {run['readback']:.2f} s")
            runs.append(run)
        models = Path(str(stack["env"]["RADBRIDGE_MODEL_REPOSITORY"]))  # type: ignore[index]
    # The model path after the stack stopped, so it has the machine to itself.
    model_s = model_path_seconds(runs[0]["files"], models)
    # The first read-back after the stack starts is shown apart: a median would hide it.
    first, warm = runs[0], runs[1:] or runs
    readback = statistics.median(r["readback"] for r in warm)
    slices = len(runs[0]["files"])
    alone = {
        "  job: series read + decoded": model_s["decode"],
        "  job: resample + sliding window + nodules": model_s["sliding_window"],
        "  job: map onto the source slices": model_s["map"],
    }
    print(f"\nCT read-back: {slices} slices, {n_runs} runs, 2 CPUs")
    print(f"  {'stage':<42} {'first run':>9} {'median of the rest':>18} {'model path alone':>18}")
    for stage in runs[0]["stages"]:
        values = [r["stages"][stage] for r in warm if r["stages"][stage] is not None]
        shown = f"{statistics.median(values):7.2f} s" if values else "      - "
        cold = first["stages"][stage]
        cold_shown = f"{cold:7.2f} s" if cold is not None else "      - "
        by_itself = f"{alone[stage]:7.2f} s" if stage in alone else ""
        print(f"  {stage:<42} {cold_shown:>9} {shown:>18} {by_itself:>18}")
    total = "last ack -> SEG + SR stored at the PACS"
    print(f"  {total:<42} {first['readback']:7.2f} s {readback:16.2f} s")
    print(f"  {'pure model path (raw ONNX Runtime)':<42} {'':>9} {model_s['total']:16.2f} s")
    if prepare_ahead:
        print(
            "  (the job's decode, window and map stages ran during the quiet period, on the "
            "edge's hint, where the job found them prepared)"
        )
    for label, value in (("first run", first["readback"]), ("the rest", readback)):
        ratio = (value - QUIET_PERIOD_S) / model_s["total"]
        print(
            f"  ratio, {label} (read-back - the agreement's quiet period "
            f"{QUIET_PERIOD_S:.0f} s) / model path: {ratio:.2f}x"
        )


def _default_delivery_poll(raw: dict[str, Any]) -> None:
    """The agreements as shipped (stack_with_pacs points the return at Orthanc)."""


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark: raw ONNX Runtime vs the Serve app (handle, HTTP), same model, one run.

    .venv/bin/python -m loadtests.bench_serving [--model densenet121|demo] [--rounds 3]
        [--requests 400] [--seconds 60] [--concurrency 32] [--images-per-request 16]
        [--max-batch-size N] [--batch-wait-ms MS] [--intra-op-threads N] [--allow-spinning 0|1]
        [--raw-spinning on|off|both] [--ray-num-cpus N] [--out DIR]

(``python loadtests/bench_serving.py ...`` works too; ``--help`` lists every option.)

Model: by default a MONAI ``DenseNet121(spatial_dims=2, in_channels=1, out_channels=4)`` with
random weights (seed 0) at 1x224x224, exported here with ``torch.onnx.export`` (opset 17,
dynamic batch axis, ``dynamo=False``) and installed with ``models.importer.import_model`` into a
temporary model repository, with the demo chest model's manifest as the template (name, input
shape, resize and sha256 changed). ``--model demo`` installs the demo chest-xray model
(var/models/chest-xray-demo/1, 1x128x128) instead. Every path gets the same inputs: 64 fixed
random tensors (seed 0), cycled.

Paths, measured on that model in one run, interleaved round by round (a, b, c, a, b, c, ...):

- (a) raw ONNX Runtime in this process (CUDA when a GPU is present, else CPU; one intra-op
  thread per usable CPU, the ModelRunner's default, unless ``--raw-threads``) at the batch
  sizes ``--raw-batches`` (1, 4, 8, 16), with ORT's thread spin-waiting on (its default; rows
  ``raw ORT b=N``) and/or off (rows ``raw ORT b=N nospin``) per ``--raw-spinning`` (default
  both); the best row (highest median img/s) is the baseline.
- (b) the Serve app through a DeploymentHandle to the ModelRunner
  (``multiplexed_model_id=name:version``), ``--handle-in-flight`` requests in flight
  (default: ``--concurrency``).
- (c) HTTP ``POST /v1/models/{name}/infer`` (application/x-npy, one tensor) through Serve's
  proxy and the Api, from an httpx async client with ``--concurrency`` requests in flight.
- (d) HTTP ``POST /v1/models/{name}/infer-batch`` with ``--images-per-request`` N tensors
  stacked in one .npy (default 16; 0 skips it), ``--concurrency`` / N requests in flight (the
  same images in flight as (c)); row ``serve HTTP xN``.

Each phase is preceded by an untimed warm-up and bounded by ``--requests`` (images; for (a)
``--raw-images`` per batch size) or ``--seconds``, whichever comes first. The center runs as
``radbridge center`` runs it (``serving.center.start_center``: the app deployed from the Serve
config) with a temporary data dir (center DB migrated first) and model repository, a free
loopback port, and a temporary copy of serving/serve.yaml: the ModelRunner ``user_config``
is serve.yaml's (the local CPU default) except for the knobs given (``--max-batch-size``,
``--batch-wait-ms``, ``--intra-op-threads``, ``--capacity``, ``--allow-spinning``, ``--hold``;
``max_ongoing_requests`` raised to capacity + max_queued when needed). Ray is initialised here
with start_center's own arguments (loopback, ``num_cpus`` = ``--ray-num-cpus`` or radbridge's
default) and environment (``serving.center.SERVE_ENV_DEFAULTS``, but the workers' niceness)
except that it is always a new local instance and the replicas' per-request log lines
stay in Ray's log files (``--ray-logs`` prints them). ``--ray-env NAME=VALUE`` sets environment
variables for Ray and Serve (e.g. ``RAY_SERVE_...``, ``RAY_worker_niceness``) before Ray starts;
``--no-access-log`` turns Serve's access log off in the config copy.

Fairness: Ray runs its workers (replicas, proxy, controller) at niceness 15
(``RAY_worker_niceness``); once the center is up this process (the client and raw ORT) takes the
same niceness (``--driver-nice``), so on a shared machine the raw baseline and the replicas
compete alike with everything else. The client runs on the same machine as the server: its CPU
is counted (column ``driver``).

Prints, per path: median img/s over the rounds, pooled p50/p99 latency (per request; per batch
call for (a)), the ratio of medians to (a) and the median of per-round (paired) ratios; how busy
the ModelRunner's ONNX Runtime was (sum of its batch times / wall time) and its img/s while
busy; the CPU cores each process role used (driver = client + raw ORT), CPU ms per image over
every process of the run, and the cores the rest of the machine used meanwhile (``others``,
from /proc/stat); the batch sizes @serve.batch formed; the load average at start and end.
Saves ``bench_serving.png`` (matplotlib, when installed; otherwise a note) and
``bench_serving.json`` to ``--out`` (default: a new temporary folder; printed at the end).

Loopback only; Serve and Ray are shut down at the end (also on error or Ctrl-C), and the
temporary model repository and data dir are deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

# Before Ray is imported anywhere: never treat the host's interfaces as a cluster.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
if not __package__:  # run as a file (python loadtests/bench_serving.py): the repo's packages
    sys.path.insert(0, str(REPO))
from loadtests.cpu_roles import cpu_delta, cpu_snapshot, loadavg, renice_driver  # noqa: E402
from loadtests.serving_report import Phase, pct, plot, print_report, summarize  # noqa: E402
from serving.center import SERVE_ENV_DEFAULTS  # noqa: E402

DEMO_MODEL = REPO / "var" / "models" / "chest-xray-demo" / "1"
APP_NAME = "radbridge-center"
AGREEMENT = "demo-hospital-to-center"
BENCH_MODEL = "densenet121-bench"
N_INPUTS = 64  # distinct input tensors, cycled (the largest raw batch size)
SEED = 0
REQUEST_TIMEOUT_S = 120.0
START_TIMEOUT_S = 300.0


# -- model ------------------------------------------------------------------------------------


def export_densenet121(path: Path, size: int) -> dict[str, Any]:
    """MONAI DenseNet121 (2D, 1 channel, 4 outputs), random weights, to ONNX at ``path``."""
    import torch
    from monai.networks.nets import DenseNet121

    from models.onnx_export import export_onnx

    torch.manual_seed(SEED)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=4).eval()
    t0 = time.perf_counter()
    export_onnx(net, torch.zeros(1, 1, size, size), path)
    return {
        "network": {
            "class": "monai.networks.nets.DenseNet121",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 4,
        },
        "weights": f"random (torch.manual_seed({SEED})), untrained",
        "torch": str(torch.__version__),
        "opset": 17,
        "export_seconds": round(time.perf_counter() - t0, 1),
    }


def bench_manifest(path: Path, onnx_file: Path, size: int, provenance: dict[str, Any]) -> None:
    """The demo chest model's manifest with this model's name, shape, resize and sha256."""
    from models.repository import file_sha256

    raw = yaml.safe_load((DEMO_MODEL / "manifest.yaml").read_text(encoding="utf-8"))
    raw.update(
        name=BENCH_MODEL,
        version="1",
        sha256=file_sha256(onnx_file),
        provenance={"source": "loadtests/bench_serving.py", **provenance},
        metrics={},
    )
    raw["input"]["shape"] = ["batch", 1, size, size]
    for step in raw["preprocessing"]:
        if step["name"] == "Resize":
            step["args"]["spatial_size"] = [size, size]
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")


def install_model(which: str, repo: Path, work: Path) -> tuple[str, tuple[int, ...], Path]:
    """Install the benchmark's model into ``repo``; returns (name:version, input shape, onnx)."""
    from models.importer import import_model

    if which == "demo":
        if not (DEMO_MODEL / "model.onnx").is_file():
            raise SystemExit(f"{DEMO_MODEL}: no demo model; run `radbridge models build` first")
        onnx_file, manifest_file = DEMO_MODEL / "model.onnx", DEMO_MODEL / "manifest.yaml"
    else:
        work.mkdir(parents=True, exist_ok=True)
        onnx_file, manifest_file = work / "model.onnx", work / "manifest.yaml"
        provenance = export_densenet121(onnx_file, 224)
        bench_manifest(manifest_file, onnx_file, 224, provenance)
    model = import_model(repo, onnx_file, manifest_file)
    shape = tuple(int(d) for d in model.manifest.input.shape[1:])
    return model.key, shape, model.onnx_path


def make_inputs(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return rng.random((N_INPUTS, *shape), dtype=np.float32)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# -- measurement ------------------------------------------------------------------------------


@contextlib.contextmanager
def measured(phase: Phase) -> Iterator[Phase]:
    before = cpu_snapshot()
    yield phase
    phase.cpu_s, phase.others_cores = cpu_delta(before, cpu_snapshot())
    phase.loadavg = loadavg()[0]


def raw_ort_session(onnx_path: Path, threads: int, spinning: bool = True) -> Any:
    """Plain ORT session; ``spinning`` False turns the thread pools' spin-waiting off."""
    import onnxruntime as ort

    from serving.providers import resolve_providers
    from serving.runner import usable_cpus

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or usable_cpus()  # as the ModelRunner's session
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(
        str(onnx_path), opts, providers=[resolve_providers(["cuda", "cpu"])[0]]
    )


def run_raw(
    session: Any,
    inputs: np.ndarray,
    batch: int,
    images: int,
    seconds: float,
    rnd: int,
    suffix: str = "",
) -> Phase:
    """(a): ``session.run`` on batches of ``batch`` until ``images`` or ``seconds``."""
    name = session.get_inputs()[0].name
    batches = [inputs[i : i + batch] for i in range(0, len(inputs) - batch + 1, batch)]
    for b in batches[:2]:  # warm-up (first call allocates, a new batch shape plans)
        session.run(None, {name: b})
    phase = Phase(f"raw ORT b={batch}{suffix}", rnd, 0, 0.0, [])
    with measured(phase):
        t0 = time.perf_counter()
        deadline = t0 + seconds
        i = 0
        while phase.images < images and time.perf_counter() < deadline:
            s = time.perf_counter()
            session.run(None, {name: batches[i % len(batches)]})
            phase.latencies_ms.append(1000 * (time.perf_counter() - s))
            phase.images += batch
            i += 1
        phase.seconds = time.perf_counter() - t0
    return phase


Call = Callable[[int], Awaitable[list[dict[str, Any]]]]  # one request → each image's info


async def closed_loop(
    call: Call, n: int, seconds: float, concurrency: int, phase: Phase | None
) -> None:
    """``concurrency`` workers send requests ``0..n-1`` (or until ``seconds``), each awaiting
    its answer before sending the next; fills ``phase`` when given (else a warm-up). Latency
    is per request; images, batch sizes and busy time per image of the answers."""
    next_i = 0
    batch_sizes: collections.Counter[int] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker() -> None:
        nonlocal next_i
        while next_i < n and time.perf_counter() < deadline:
            i, next_i = next_i, next_i + 1
            s = time.perf_counter()
            try:
                infos = await asyncio.wait_for(call(i), REQUEST_TIMEOUT_S)
            except Exception as exc:
                errors[_error_name(exc)] += 1
                continue
            if phase is not None:
                phase.latencies_ms.append(1000 * (time.perf_counter() - s))
                for info in infos:
                    phase.images += 1
                    bs = int(info["batch_size"])
                    batch_sizes[bs] += 1
                    phase.busy_s += float(info["seconds"]) / bs

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if phase is not None:
        phase.seconds = time.perf_counter() - t0
        phase.batch_sizes = dict(batch_sizes)
        phase.errors = dict(errors)
    elif errors:
        print(f"    warm-up errors: {dict(errors)}", flush=True)


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, HttpStatusError):
        return f"HTTP {exc.status}"
    return type(exc).__name__


class HttpStatusError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status


async def run_serve_path(
    path: str,
    call: Call,
    args: argparse.Namespace,
    in_flight: int,
    rnd: int,
    per_request: int = 1,
) -> Phase:
    """One Serve path: a warm-up, then ``--requests`` images (``per_request`` per request)."""
    await closed_loop(call, in_flight, args.seconds, in_flight, None)  # warm-up
    phase = Phase(path, rnd, 0, 0.0, [])
    with measured(phase):
        n = max(1, args.requests // per_request)
        await closed_loop(call, n, args.seconds, in_flight, phase)
    return phase


def handle_call(handle: Any, inputs: np.ndarray) -> Call:
    async def call(i: int) -> list[dict[str, Any]]:
        out: dict[str, Any] = await handle.remote(inputs[i % len(inputs)], "routine", False)
        return [out]

    return call


def http_call(client: Any, url: str, bodies: list[bytes]) -> Call:
    headers = {"Content-Type": "application/x-npy", "X-Radbridge-Agreement": AGREEMENT}

    async def call(i: int) -> list[dict[str, Any]]:
        r = await client.post(url, content=bodies[i % len(bodies)], headers=headers)
        if r.status_code != 200:
            raise HttpStatusError(r.status_code, r.text)
        body = r.json()
        # /infer answers one image's timings; /infer-batch one entry per image
        return [_timing(x["timings_ms"]) for x in body.get("results", [body])]

    return call


def _timing(t: dict[str, float]) -> dict[str, Any]:
    return {"batch_size": t["batch_size"], "seconds": t["inference"] / 1000}


# -- the center -------------------------------------------------------------------------------


def write_serve_config(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """A copy of serving/serve.yaml with the knobs in the ModelRunner's user_config."""
    from serving.config import DEFAULT_SERVE_CONFIG, RunnerConfig, load_serve_config

    raw = yaml.safe_load(DEFAULT_SERVE_CONFIG.read_text(encoding="utf-8"))
    (app,) = [a for a in raw["applications"] if a.get("import_path") == "serving.app:build"]
    (runner,) = [d for d in app["deployments"] if d["name"] == "ModelRunner"]
    user = runner.setdefault("user_config", {})
    for knob, value in (
        ("max_batch_size", args.max_batch_size),
        ("batch_wait_timeout_s", None if args.batch_wait_ms is None else args.batch_wait_ms / 1000),
        ("intra_op_threads", args.intra_op_threads),
        ("capacity", args.capacity),
        ("allow_spinning", None if args.allow_spinning is None else bool(args.allow_spinning)),
        ("hold_while_computing", None if args.hold is None else bool(args.hold)),
    ):
        if value is not None:  # else serve.yaml's value (or RunnerConfig's default)
            user[knob] = value
    cfg = RunnerConfig.model_validate(user)
    user.update(
        cfg.model_dump(
            mode="json",
            include={
                "max_batch_size",
                "batch_wait_timeout_s",
                "intra_op_threads",
                "capacity",
                "allow_spinning",
                "hold_while_computing",
            },
        )
    )
    user["admitted"] = cfg.admitted  # reported only; removed from the file below
    runner["max_ongoing_requests"] = max(
        int(runner.get("max_ongoing_requests", 0)), cfg.admitted + cfg.max_queued
    )
    if args.runner_replicas:
        scaling = runner.setdefault("autoscaling_config", {})
        scaling["min_replicas"] = scaling["max_replicas"] = args.runner_replicas
        scaling.pop("initial_replicas", None)
    if args.no_access_log:
        app["logging_config"] = {"enable_access_log": False}
    admitted = user.pop("admitted")
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    load_serve_config(path)  # fails here, naming the field, if a knob is out of range
    return dict(
        user,
        admitted=admitted,
        max_ongoing_requests=runner["max_ongoing_requests"],
        replicas=args.runner_replicas or runner.get("autoscaling_config", {}).get("max_replicas"),
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def center(args: argparse.Namespace, root: Path, serve_yaml: Path) -> Iterator[Any]:
    """The center on a free loopback port with a temp data dir; always shut down after."""
    from radbridge.db.migrate import upgrade
    from radbridge.settings import Settings

    center_cfg: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "serve_config": str(serve_yaml),
    }
    if args.ray_num_cpus:
        center_cfg["ray_num_cpus"] = args.ray_num_cpus
    settings = Settings(
        data_dir=root / "data",
        model_repository=root / "models",
        log_level="WARNING",
        center=center_cfg,
    )
    upgrade(settings.center_db_url, "center")
    try:
        import ray

        from serving.center import start_center

        # start_center's own ray.init, with two differences: always a new local Ray (never a
        # cluster someone else started here), and replica logs (a line per request) stay in
        # Ray's log files instead of this terminal unless --ray-logs.
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            num_cpus=settings.center.ray_num_cpus or max(4, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=args.ray_logs,
        )
        start_center(settings, timeout_s=START_TIMEOUT_S)
        yield settings
    finally:
        shutdown_ray()


def shutdown_ray() -> None:
    """serve.shutdown + ray.shutdown, then make sure no process of ours is left behind."""
    if "ray" in sys.modules:
        import ray
        from ray import serve

        if ray.is_initialized():
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    kids = psutil.Process().children(recursive=True)
    _gone, alive = psutil.wait_procs(kids, timeout=15)
    for proc in alive:  # only our own descendants, by pid
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _gone, alive = psutil.wait_procs(alive, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if alive:
        print(f"killed {len(alive)} leftover process(es) of this run", flush=True)


# -- main -------------------------------------------------------------------------------------


async def run_rounds(
    args: argparse.Namespace,
    key: str,
    inputs: np.ndarray,
    sessions: dict[str, Any],
    base_url: str,
    phases: list[Phase],
    headers: dict[str, str],
    verify: Any = True,
) -> None:
    """``headers``: the integration credential the sync endpoints want (radbridge.auth);
    ``verify``: the TLS check of the center's certificate (the local CA: radbridge.pki)."""
    import httpx
    from ray import serve

    handle = serve.get_deployment_handle("ModelRunner", app_name=APP_NAME).options(
        multiplexed_model_id=key
    )
    name, _, version = key.partition(":")
    url = f"{base_url}/v1/models/{name}/infer?version={version}"
    batch_url = f"{base_url}/v1/models/{name}/infer-batch?version={version}"
    bodies = [npy_bytes(x) for x in inputs]
    per = args.images_per_request
    stacked = [npy_bytes(np.roll(inputs, -i * per, axis=0)[:per]) for i in range(4)] if per else []
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=None)
    in_flight = args.handle_in_flight or args.concurrency

    def report(p: Phase) -> None:
        phases.append(p)
        errs = f"  errors {p.errors}" if p.errors else ""
        print(
            f"  round {p.round + 1}/{args.rounds} {p.path:19s} {p.images:4d} img in "
            f"{p.seconds:5.1f} s = {p.rate:6.1f} img/s  p50 {pct(p.latencies_ms, 50):7.1f} ms  "
            f"load {p.loadavg:.2f}{errs}",
            flush=True,
        )

    # First requests load the model version in the replica (multiplexing): not timed.
    async with httpx.AsyncClient(
        timeout=REQUEST_TIMEOUT_S, headers=headers, verify=verify
    ) as client:
        await closed_loop(http_call(client, url, bodies), 2, START_TIMEOUT_S, 1, None)
    await closed_loop(handle_call(handle, inputs), 2, START_TIMEOUT_S, 1, None)

    for rnd in range(args.rounds):
        for suffix, session in sessions.items():
            for b in args.raw_batches:
                report(run_raw(session, inputs, b, args.raw_images, args.seconds, rnd, suffix))
        report(
            await run_serve_path("serve handle", handle_call(handle, inputs), args, in_flight, rnd)
        )
        async with httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT_S, limits=limits, headers=headers, verify=verify
        ) as client:
            call = http_call(client, url, bodies)
            report(await run_serve_path("serve HTTP", call, args, args.concurrency, rnd))
            if per:
                call = http_call(client, batch_url, stacked)
                batches_in_flight = max(1, args.concurrency // per)  # same images in flight
                path = f"serve HTTP x{per}"
                report(await run_serve_path(path, call, args, batches_in_flight, rnd, per))


def parse_args() -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", choices=("densenet121", "demo"), default="densenet121")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (1..9)")
    ap.add_argument("--requests", type=int, default=400, help="images per Serve phase")
    ap.add_argument("--raw-images", type=int, default=192, help="images per raw batch size")
    ap.add_argument("--seconds", type=float, default=60.0, help="time bound of each phase")
    ap.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight")
    ap.add_argument("--handle-in-flight", type=int, default=0, help="0: --concurrency")
    ap.add_argument(
        "--images-per-request",
        type=int,
        default=16,
        choices=range(0, 65),
        metavar="N",
        help="path (d): POST /v1/models/{name}/infer-batch with N images per request, "
        "--concurrency/N requests in flight (0: skip it)",
    )
    ap.add_argument(
        "--max-batch-size", type=int, default=None, help="ModelRunner user_config; serve.yaml's"
    )
    ap.add_argument(
        "--batch-wait-ms", type=float, default=None, help="ModelRunner user_config; serve.yaml's"
    )
    ap.add_argument(
        "--intra-op-threads",
        type=int,
        default=None,
        help="0: one per usable CPU (serving.runner.usable_cpus); serve.yaml's",
    )
    ap.add_argument(
        "--capacity",
        type=int,
        default=None,
        help="ModelRunner user_config: requests admitted to the batcher (0: its default); "
        "serve.yaml's",
    )
    ap.add_argument(
        "--allow-spinning",
        type=int,
        choices=(0, 1),
        default=None,
        help="ModelRunner's ORT threads spin-wait (1) or not (0); serve.yaml's",
    )
    ap.add_argument(
        "--hold",
        type=int,
        choices=(0, 1),
        default=None,
        help="ModelRunner hold_while_computing (1: the next batch forms when one ends); "
        "serve.yaml's",
    )
    ap.add_argument(
        "--raw-spinning",
        choices=("on", "off", "both"),
        default="both",
        help="raw ORT with spin-waiting on (ORT's default), off, or both (rows '... nospin')",
    )
    ap.add_argument(
        "--raw-batches", default="1,4,8,16", help="raw ORT batch sizes, comma-separated"
    )
    ap.add_argument(
        "--runner-replicas", type=int, default=0, help="ModelRunner replicas; 0: serve.yaml's"
    )
    ap.add_argument(
        "--raw-threads", type=int, default=0, help="raw ORT threads; 0: as the runner's default"
    )
    ap.add_argument("--ray-num-cpus", type=int, default=0, help="0: radbridge's default")
    ap.add_argument(
        "--no-access-log", action="store_true", help="Serve logging_config without access log"
    )
    ap.add_argument(
        "--ray-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for Ray and Serve processes (e.g. RAY_SERVE_...); repeatable",
    )
    ap.add_argument(
        "--driver-nice",
        default="workers",
        help="niceness of this process (client + raw ORT) once the center is up: 'workers' "
        "(the replicas', RAY_worker_niceness), 'keep', or a number",
    )
    ap.add_argument("--ray-logs", action="store_true", help="print the replicas' logs here")
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNG and JSON")
    args = ap.parse_args()
    args.rounds = max(1, min(args.rounds, 9))
    try:
        args.raw_batches = sorted({int(b) for b in args.raw_batches.split(",") if b.strip()})
    except ValueError:
        raise SystemExit("--raw-batches: comma-separated integers, e.g. 1,4,8,16") from None
    if not args.raw_batches or not 1 <= min(args.raw_batches) <= max(args.raw_batches) <= 64:
        raise SystemExit(f"--raw-batches: batch sizes 1..{N_INPUTS}")
    if args.driver_nice not in ("workers", "keep") and not args.driver_nice.lstrip("-").isdigit():
        raise SystemExit("--driver-nice: 'workers', 'keep' or a number")
    for opt in ("requests", "raw_images", "concurrency", "max_batch_size"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            raise SystemExit(f"--{opt.replace('_', '-')} must be >= 1")
    return args


def main() -> None:
    from radbridge.contract import tls_verify

    args = parse_args()
    for item in args.ray_env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise SystemExit(f"--ray-env {item!r}: expected NAME=VALUE")
        os.environ[k] = v
    for k in [k for k in os.environ if k.startswith("RADBRIDGE_")]:
        del os.environ[k]  # the benchmark's settings only
    # What start_center sets before its own ray.init (this benchmark starts Ray first), but the
    # workers' niceness: they stay at Ray's 15, like this process once the center is up.
    for k, v in SERVE_ENV_DEFAULTS.items():
        if k != "RAY_worker_niceness":
            os.environ.setdefault(k, v)
    os.environ.pop("RAY_ADDRESS", None)  # it would override ray.init(address="local")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-serving-"))
    out.mkdir(parents=True, exist_ok=True)
    load_start = loadavg()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}", flush=True)
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-work-") as tmp:
        root = Path(tmp)
        t0 = time.monotonic()
        key, shape, onnx_path = install_model(args.model, root / "models", root / "export")
        print(f"model {key} {list(shape)} installed in {time.monotonic() - t0:.1f} s", flush=True)
        inputs = make_inputs(shape)
        spin = {"on": [True], "off": [False], "both": [True, False]}[args.raw_spinning]
        sessions = {
            "" if s else " nospin": raw_ort_session(onnx_path, args.raw_threads, s) for s in spin
        }
        provider = next(iter(sessions.values())).get_providers()[0]
        runner_cfg = write_serve_config(args, root / "serve.yaml")
        t0 = time.monotonic()
        with center(args, root, root / "serve.yaml") as settings:
            import ray

            print(f"center up in {time.monotonic() - t0:.1f} s", flush=True)
            base_url = settings.center_url  # HTTPS in local mode, as the edge sees it
            meta = {
                "model": key,
                "shape": list(shape),
                "provider": provider,
                "rounds": args.rounds,
                "runner": runner_cfg,
                "handle_in_flight": args.handle_in_flight or args.concurrency,
                "concurrency": args.concurrency,
                "requests": args.requests,
                "raw_images": args.raw_images,
                "seconds": args.seconds,
                "raw_threads": args.raw_threads,
                "raw_spinning": args.raw_spinning,
                "ray_num_cpus": int(ray.cluster_resources().get("CPU", 0)),
                "ray_env": args.ray_env,
                "no_access_log": args.no_access_log,
            }
            meta["nice"] = renice_driver(args.driver_nice)
            token = (settings.center_trust_file.parent / "integration.token").read_text()
            auth = {"Authorization": f"Bearer {token}"}
            verify = tls_verify(settings.edge.center_ca_file)
            asyncio.run(run_rounds(args, key, inputs, sessions, base_url, phases, auth, verify))
    load_end = loadavg()
    rows, best = summarize(phases)
    print_report(rows, best, phases, meta)
    print()
    print(
        f"load average at start: {' '.join(f'{x:.2f}' for x in load_start)}; "
        f"at end: {' '.join(f'{x:.2f}' for x in load_end)}"
    )
    title = (
        f"{key} {list(shape)} {provider}; batch {runner_cfg['max_batch_size']}, wait "
        f"{1000 * runner_cfg['batch_wait_timeout_s']:g} ms, intra_op "
        f"{runner_cfg['intra_op_threads']}, spin {int(runner_cfg['allow_spinning'])}, "
        f"concurrency {args.concurrency}; load {load_start[0]:.2f}->{load_end[0]:.2f}"
    )
    png = plot(rows, best, phases, out, title)
    result = {
        "meta": meta,
        "loadavg": {"start": load_start, "end": load_end},
        "baseline": best,
        "rows": [dict(asdict(r), rate=r.rate) for r in rows],
        "phases": [dict(asdict(p), latencies_ms=None, rate=p.rate) for p in phases],
    }
    (out / "bench_serving.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"results in {out}" + (f" (plot {png.name})" if png else ""))


if __name__ == "__main__":
    try:
        main()
    finally:
        shutdown_ray()

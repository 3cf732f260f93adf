"""Soak: mixed load on `radbridge up` for minutes; loss, memory and latency per stage.

    .venv/bin/python -m loadtests.soak [--minutes 10] [--out var/soak]

The stack is the one a user runs (edge + local center, Orthanc as the hospital PACS, every
dcmtk peer with TCP_NODELAY=1; tests/e2e/stack.stack_with_pacs) with the edge's STOW-RS
receiver on. For ``--minutes`` three loads run side by side, each at a constant rate:

- ``--associations`` DICOM associations (pynetdicom, in this process), each sending one
  single-image chest X-ray study every ``--study-interval-s``;
- Locust (headless, its own process: ``loadtests/soak_locust.py``): ``--stow-users`` hospital
  PACS pushing one study per STOW-RS request at ``--stow-rate`` requests/s each, and
  ``--infer-users`` integrations calling the center's synchronous inference at
  ``--infer-rate`` requests/s each.

Then it waits (at most ``--drain-minutes``) until every study the edge acknowledged (C-STORE
0x0000, STOW-RS 200) has its result at the PACS. Recorded: acknowledged vs delivered (a study
acknowledged whose result never came is lost; one still queued when the drain ends is counted
apart, with its edge state); the RSS of every process of the stack, Orthanc and Locust every
5 s; the PACS's study count every 5 s; p50/p99 of every latency histogram the stack exports
(edge and center /metrics, scraped at the end); 503s and other failures (Locust) and the
edge's forward and delivery retries (its counters). Written to ``--out``: a PNG per series
and ``summary.md``, one page.

What the rates mean. End to end, this stack's bottleneck for studies is the edge's forwarder:
one study at a time, each ~0.4 s (OCR of the radiograph's pixels, de-identification, STOW-RS
to the center, completion). Measured with this script on 2 cores: at 1 study/s offered the
turnaround holds (p99 5.0 s over a minute); at 4 studies/s the forward queue grows (forward
p99 58 s after one minute). So the nominal study rate is ~2 studies/s, and the defaults offer
twice that: 2 associations x 1 study/s + 2 STOW-RS users x 1 study/s, beside 2 integrations
asking 10 inferences/s each (more than the center answers while it also reads the studies:
offered and achieved are both in the summary). The ingest benchmark's rate (~60 instances/s
on one association) is the C-STORE receiver's alone; offered for ten minutes it would only
grow the forward queue. The drain then shows whether what piled up is delivered, all of it.
Every wait is bounded; loopback only; the work folder is deleted at the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pydicom
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from dicom_io.scu import _nodelay
from models.cxr_dicom import write_cxr_study
from models.repository import ModelRepository
from tests.e2e.stack import AGREEMENT, stack_with_pacs

SAMPLE_S = 5.0
STOW_USER = "soak-pacs"
STOW_PASSWORD_ENV = "RADBRIDGE_SOAK_STOW_PASSWORD"
MODEL = "chest-xray-demo"


@dataclass
class Tally:
    """Studies the edge acknowledged, by front door; failures by kind."""

    acked: dict[str, str] = field(default_factory=dict)  # study UID -> "dicom" | "stow"
    refused: int = 0  # C-STORE answered with a non-success status
    broken: int = 0  # association lost / not established
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Samples:
    t: list[float] = field(default_factory=list)
    rss_mb: dict[str, list[float]] = field(default_factory=dict)  # process group -> MB
    pacs_studies: list[int] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--drain-minutes", type=float, default=15.0)
    parser.add_argument("--associations", type=int, default=2)
    parser.add_argument("--study-interval-s", type=float, default=1.0)
    parser.add_argument("--stow-users", type=int, default=2)
    parser.add_argument("--stow-rate", type=float, default=1.0, help="requests/s per user")
    parser.add_argument("--infer-users", type=int, default=2)
    parser.add_argument("--infer-rate", type=float, default=10.0, help="requests/s per user")
    parser.add_argument("--out", type=Path, default=Path("var/soak"))
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 60 or not 0 < args.drain_minutes <= 60:
        parser.error("--minutes and --drain-minutes: more than 0, at most 60")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="radbridge-soak-"))
    try:
        return _run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, workdir: Path) -> int:
    template = _template(workdir)
    tally, samples = Tally(), Samples()
    stow_port = _free_port()
    password = "soak-" + os.urandom(8).hex()
    os.environ[STOW_PASSWORD_ENV] = password  # `radbridge up` inherits it

    def enable_stow(raw: dict[str, Any]) -> None:
        raw["agreements"][0]["hospital"]["stow"] = {
            "username": STOW_USER,
            "password_env": STOW_PASSWORD_ENV,
        }

    os.environ["RADBRIDGE_EDGE__STOW_PORT"] = str(stow_port)
    with stack_with_pacs(workdir, enable_stow) as (pacs, stack):
        ports = stack["ports"]  # type: ignore[index]
        print(f"stack up; load for {args.minutes:g} min", flush=True)
        stop = threading.Event()
        end = time.monotonic() + args.minutes * 60
        sampler = threading.Thread(
            target=_sample, args=(stack, pacs, tally, samples, stop), daemon=True
        )
        sampler.start()
        senders = [
            threading.Thread(
                target=_dicom_sender,
                args=(ports["edge"], template, args.study_interval_s, end, tally, i),
                daemon=True,
            )
            for i in range(args.associations)
        ]
        for s in senders:
            s.start()
        with _locust(args, stack, stow_port, password, template, workdir) as locust:
            for s in senders:
                s.join(timeout=args.minutes * 60 + 120)
            locust.wait(timeout=max(60.0, args.minutes * 60))
        _read_stow_acked(workdir / "stow-acked.txt", tally)
        print(f"load done: {len(tally.acked)} studies acknowledged; draining", flush=True)
        delivered = _drain(pacs, tally, args.drain_minutes * 60)
        metrics = _scrape(stack)
        stop.set()
        sampler.join(timeout=30)
        pending = _edge_states(stack, set(tally.acked) - delivered)
    _report(args, tally, samples, delivered, pending, metrics, workdir)
    lost = len(set(tally.acked) - delivered)
    return 0 if lost == 0 else 1


# -- load -------------------------------------------------------------------------------------


def _template(workdir: Path) -> pydicom.Dataset:
    (path,) = write_cxr_study(
        workdir / "template",
        seed=20261206,
        findings={"cardiomegaly"},
        patient_name="Soak^Template",
        patient_id="SOAK-0",
        birth_date="19700101",
    )
    return pydicom.dcmread(path)


def _fresh(template: pydicom.Dataset, label: str, n: int) -> pydicom.Dataset:
    ds = copy.deepcopy(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = f"SOAK-{label}-{n}", "Soak^Dicom"
    ds.AccessionNumber = f"D{n:07d}"
    return ds


def _dicom_sender(
    port: int, template: pydicom.Dataset, interval_s: float, end: float, tally: Tally, i: int
) -> None:
    """One association, one study per ``interval_s``, until ``end``; a lost association is
    counted and opened again."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(template.SOPClassUID, [ExplicitVRLittleEndian])
    n = 0
    assoc = None
    next_at = time.monotonic()
    while time.monotonic() < end:
        if assoc is None or not assoc.is_established:
            assoc = ae.associate(
                "127.0.0.1",
                port,
                ae_title="RADBRIDGE",
                evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
            )
            if not assoc.is_established:
                with tally.lock:
                    tally.broken += 1
                time.sleep(1)
                continue
        n += 1
        ds = _fresh(template, f"A{i}", n)
        rsp = assoc.send_c_store(ds)
        status = rsp.get("Status") if rsp else None
        with tally.lock:
            if status == 0x0000:
                tally.acked[str(ds.StudyInstanceUID)] = "dicom"
            elif status is None:
                tally.broken += 1
            else:
                tally.refused += 1
        next_at += interval_s
        time.sleep(max(0.0, next_at - time.monotonic()))
    if assoc is not None and assoc.is_established:
        assoc.release()


@contextmanager
def _locust(
    args: argparse.Namespace,
    stack: dict[str, Any],
    stow_port: int,
    password: str,
    template: pydicom.Dataset,
    workdir: Path,
) -> Iterator[subprocess.Popen[bytes]]:
    template_file = workdir / "template.dcm"
    template.save_as(template_file, enforce_file_format=True)
    tensor_file = workdir / "tensor.npy"
    models = Path(str(stack["env"]["RADBRIDGE_MODEL_REPOSITORY"]))
    shape = ModelRepository(models).get(MODEL).manifest.input.shape[1:]
    rng = np.random.default_rng(20261206)
    np.save(tensor_file, rng.random(tuple(int(d) for d in shape), dtype=np.float32))
    keys = Path(str(stack["data"])) / "keys"
    env = dict(
        os.environ,
        SOAK_TEMPLATE=str(template_file),
        SOAK_ACKED_FILE=str(workdir / "stow-acked.txt"),
        SOAK_STOW_BASE=f"http://127.0.0.1:{stow_port}",
        SOAK_STOW_USER=STOW_USER,
        SOAK_STOW_PASSWORD=password,
        SOAK_STOW_USERS=str(args.stow_users),
        SOAK_STOW_RATE=str(args.stow_rate),
        SOAK_CENTER_BASE=str(stack["base"]),
        SOAK_CA_FILE=str(stack["ca"]),
        SOAK_INTEGRATION_TOKEN=(keys / "integration.token").read_text().strip(),
        SOAK_AGREEMENT=AGREEMENT,
        SOAK_TENSOR=str(tensor_file),
        SOAK_INFER_USERS=str(args.infer_users),
        SOAK_INFER_RATE=str(args.infer_rate),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    users = args.stow_users + args.infer_users
    command = [
        str(Path(sys.executable).parent / "locust"),
        "-f",
        str(Path(__file__).with_name("soak_locust.py")),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{int(args.minutes * 60)}s",
        "--csv",
        str(workdir / "locust"),
        "--csv-full-history",
        "--only-summary",
        "--stop-timeout",
        "30",
    ]
    log = (workdir / "locust.log").open("wb")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def _read_stow_acked(path: Path, tally: Tally) -> None:
    if path.exists():
        for line in path.read_text().split():
            tally.acked.setdefault(line, "stow")


# -- observation ------------------------------------------------------------------------------


def _sample(
    stack: dict[str, Any], pacs: Any, tally: Tally, samples: Samples, stop: threading.Event
) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        rss: dict[str, float] = {}
        for proc in _stack_processes(stack, pacs):
            try:
                name = _group(proc)
                rss[name] = rss.get(name, 0.0) + proc.memory_info().rss / 2**20
            except psutil.Error:
                continue
        try:
            studies = int(pacs.client.get("/statistics").json()["CountStudies"])
        except (httpx.HTTPError, ValueError, KeyError):
            studies = samples.pacs_studies[-1] if samples.pacs_studies else 0
        samples.t.append(time.monotonic() - t0)
        for name in set(rss) | set(samples.rss_mb):
            series = samples.rss_mb.setdefault(name, [float("nan")] * (len(samples.t) - 1))
            series.append(rss.get(name, float("nan")))
        samples.pacs_studies.append(studies)
        with tally.lock:
            samples.acked.append(len(tally.acked))
        stop.wait(SAMPLE_S)


def _stack_processes(stack: dict[str, Any], pacs: Any) -> list[psutil.Process]:
    data = str(stack["data"])
    roots = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd = proc.info.get("cmdline") or []
        if (
            cmd[-2:] == [str(Path(sys.executable).parent / "radbridge"), "up"]
            and (proc.info.get("cwd") == data)
        ) or any(part.endswith("soak_locust.py") for part in cmd):
            roots.append(proc)
    roots.append(psutil.Process(pacs.process.pid))
    out: list[psutil.Process] = []
    for root in roots:
        try:
            out += [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
    return out


def _group(proc: psutil.Process) -> str:
    """A readable, stable name for a process of the stack (Ray retitles a worker with the
    method it runs: ``ray::ServeReplica:app:Api.handle_request`` counts as ``...:Api``)."""
    cmd = proc.cmdline()
    text = " ".join(cmd)
    if text.endswith("radbridge up"):
        return "radbridge up (edge, driver)"
    if "soak_locust" in text:
        return "locust"
    title = cmd[0] if cmd else proc.name()
    if title.startswith("ray::"):
        actor = title.removeprefix("ray::")
        head, colon, last = actor.rpartition(":")
        actor = head + colon + last.split(".")[0] if colon else actor.split(".")[0]
        return "ray workers (idle)" if actor.startswith("IDLE") else f"ray {actor}"
    name = proc.name()
    if name == "Orthanc":
        return "orthanc (PACS)"
    return f"ray {name}" if "ray" in text else name


def _drain(pacs: Any, tally: Tally, timeout_s: float) -> set[str]:
    """Study UIDs the PACS holds a result of, once all acknowledged are there or at timeout."""
    deadline = time.monotonic() + timeout_s
    delivered: set[str] = set()
    while True:
        found = pacs.client.post(
            "/tools/find", json={"Level": "Study", "Query": {}, "Expand": True}
        )
        if found.status_code == 200:
            delivered = {s["MainDicomTags"]["StudyInstanceUID"] for s in found.json()}
        if set(tally.acked) <= delivered or time.monotonic() > deadline:
            return delivered
        time.sleep(5)


def _scrape(stack: dict[str, Any]) -> dict[str, str]:
    ports = stack["ports"]
    out = {}
    with httpx.Client(timeout=10) as client:
        out["edge"] = client.get(f"http://127.0.0.1:{ports['metrics']}/metrics").text
    out["center"] = stack["http"].get(f"{stack['base']}/metrics", headers=stack["operator"]).text
    return out


def _edge_states(stack: dict[str, Any], missing: set[str]) -> dict[str, int]:
    """Edge states of the acknowledged studies with no result at the PACS (none: {})."""
    if not missing:
        return {}
    from sqlalchemy import select

    from radbridge.db import Database
    from radbridge.db.tables import StudyRow

    db = Database(f"sqlite:///{Path(str(stack['data'])) / 'edge' / 'edge.db'}")
    try:
        with db.session() as s:
            rows = s.execute(
                select(StudyRow.study_uid, StudyRow.state).where(StudyRow.study_uid.in_(missing))
            ).all()
    finally:
        db.dispose()
    states: dict[str, int] = {}
    for _, state in rows:
        states[state] = states.get(state, 0) + 1
    unknown = len(missing) - len(rows)
    if unknown:
        states["not at the edge"] = unknown
    return states


# -- report -----------------------------------------------------------------------------------


def quantiles(text: str) -> dict[str, tuple[float, float, int]]:
    """(p50, p99, count) of every histogram in a Prometheus exposition, all label sets
    summed; interpolated linearly inside the bucket as Prometheus' histogram_quantile does."""
    out: dict[str, tuple[float, float, int]] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        buckets: dict[float, float] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
        if not buckets:
            continue
        bounds = sorted(buckets)
        total = buckets[bounds[-1]]
        if total <= 0:
            continue
        out[family.name] = (
            _quantile(0.5, bounds, buckets, total),
            _quantile(0.99, bounds, buckets, total),
            int(total),
        )
    return out


def _quantile(q: float, bounds: list[float], buckets: dict[float, float], total: float) -> float:
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower_bound  # above the last finite bound: Prometheus answers it too
            if count == lower_count:
                return le
            return lower_bound + (le - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = le, count
    return bounds[-1]


def rss_growth(series: list[float]) -> float | None:
    """Growth over the second half: (mean of the last tenth - mean at the half) / the latter."""
    values = [v for v in series if v == v]  # not NaN
    if len(values) < 10:
        return None
    half = len(values) // 2
    tenth = max(1, len(values) // 10)
    at_half = sum(values[half : half + tenth]) / tenth
    at_end = sum(values[-tenth:]) / tenth
    return (at_end - at_half) / at_half if at_half else None


def _report(
    args: argparse.Namespace,
    tally: Tally,
    samples: Samples,
    delivered: set[str],
    pending: dict[str, int],
    metrics: dict[str, str],
    workdir: Path,
) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: Path = args.out
    acked = set(tally.acked)
    by_door = {
        door: sum(1 for d in tally.acked.values() if d == door) for door in ("dicom", "stow")
    }
    lost = acked - delivered
    lines = [
        f"# radbridge soak: {args.minutes:g} min of load, {os.cpu_count()} CPUs",
        "",
        "## Load offered",
        f"- DICOM: {args.associations} associations, one single-image DX study every "
        f"{args.study_interval_s:g} s each ({args.associations / args.study_interval_s:.2f} "
        "studies/s)",
        f"- STOW-RS (Locust): {args.stow_users} users x {args.stow_rate:g} requests/s, one "
        "study each",
        f"- Sync inference (Locust): {args.infer_users} users x {args.infer_rate:g} requests/s",
        "",
        "## Loss",
        f"- studies acknowledged by the edge: {len(acked)} (C-STORE {by_door['dicom']}, "
        f"STOW-RS {by_door['stow']}); C-STORE refused {tally.refused}, associations broken "
        f"{tally.broken}",
        f"- results at the PACS for them: {len(acked & delivered)}",
        f"- **lost (acknowledged, no result after a {args.drain_minutes:g}-min drain): "
        f"{len(lost)}**" + (f"; their edge states: {pending}" if pending else ""),
    ]
    # Locust's view: requests, failures (503s among them), latency.
    stats = workdir / "locust_stats.csv"
    if stats.exists():
        lines += ["", "## HTTP (Locust)", ""]
        lines += ["| request | count | achieved /s | failures | p50 ms | p99 ms |"]
        lines.append("|---|---|---|---|---|---|")
        with stats.open() as f:
            for row in csv.DictReader(f):
                rate = float(row["Request Count"]) / (args.minutes * 60)
                lines.append(
                    f"| {row['Name']} | {row['Request Count']} | {rate:.1f} | "
                    f"{row['Failure Count']} | {row['50%']} | {row['99%']} |"
                )
    failures = workdir / "locust_failures.csv"
    if failures.exists():
        with failures.open() as f:
            rows = list(csv.DictReader(f))
        if rows:
            lines += [
                "",
                "Failures by kind: "
                + "; ".join(f"{r['Name']}: {r['Error']} x{r['Occurrences']}" for r in rows),
            ]
    # The stack's own histograms.
    lines += ["", "## Latency per stage (the stack's Prometheus histograms)", ""]
    lines += ["| node | histogram | count | p50 | p99 |", "|---|---|---|---|---|"]
    for node, text in metrics.items():
        for name, (p50, p99, count) in sorted(quantiles(text).items()):
            unit = " s" if name.endswith("_seconds") else ""
            lines.append(f"| {node} | {name} | {count} | {p50:.3f}{unit} | {p99:.3f}{unit} |")
    retries = _counters(
        metrics.get("edge", ""),
        ("radbridge_edge_forward_failures", "radbridge_edge_delivery_failures"),
    )
    lines += ["", f"Edge retries: {retries or 'none'}"]
    # Memory.
    lines += ["", "## Memory (RSS)", "", "| process | start MB | end MB | growth in 2nd half |"]
    lines.append("|---|---|---|---|")
    for name, series in sorted(samples.rss_mb.items(), key=lambda kv: -max(_finite(kv[1]))):
        values = _finite(series)
        growth = rss_growth(series)
        shown = f"{100 * growth:+.1f} %" if growth is not None else "-"
        lines.append(f"| {name} | {values[0]:.0f} | {values[-1]:.0f} | {shown} |")
    total = [sum(v for v in vals if v == v) for vals in zip(*samples.rss_mb.values(), strict=True)]
    growth = rss_growth(total)
    if growth is not None:
        lines.append(f"| **all** | {total[0]:.0f} | {total[-1]:.0f} | {100 * growth:+.1f} % |")
    # Plots.
    fig, ax = plt.subplots(figsize=(10, 6))
    for name, series in sorted(samples.rss_mb.items()):
        ax.plot(samples.t, series, label=name)
    ax.set(xlabel="s", ylabel="RSS (MB)", title="RSS per process")
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(out / "rss.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(samples.t, samples.acked, label="studies acknowledged by the edge (C-STORE)")
    ax.plot(samples.t, samples.pacs_studies, label="studies with a result at the PACS")
    ax.set(xlabel="s", ylabel="studies", title="Acknowledged vs delivered")
    ax.legend()
    fig.savefig(out / "studies.png", dpi=100)
    plt.close(fig)
    history = workdir / "locust_stats_history.csv"
    if history.exists():
        _plot_locust(history, out, plt)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    for name in ("locust_stats.csv", "locust_failures.csv", "locust_stats_history.csv"):
        if (workdir / name).exists():
            shutil.copy(workdir / name, out / name)
    print("\n".join(lines))
    print(f"\nplots and summary in {out}")


def _plot_locust(history: Path, out: Path, plt: Any) -> None:
    import csv

    series: dict[str, dict[str, list[float]]] = {}
    with history.open() as f:
        t0 = None
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated" or row["50%"] in ("", "N/A"):
                continue
            t = float(row["Timestamp"])
            t0 = t if t0 is None else t0
            s = series.setdefault(
                row["Name"], {"t": [], "p50": [], "p99": [], "rps": [], "fps": []}
            )
            s["t"].append(t - t0)
            s["p50"].append(float(row["50%"]))
            s["p99"].append(float(row["99%"]) if row["99%"] not in ("", "N/A") else float("nan"))
            s["rps"].append(float(row["Requests/s"]))
            s["fps"].append(float(row["Failures/s"]))
    fig, (lat, rate) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, s in series.items():
        lat.plot(s["t"], s["p50"], label=f"{name} p50")
        lat.plot(s["t"], s["p99"], linestyle="--", label=f"{name} p99")
        rate.plot(s["t"], s["rps"], label=f"{name} requests/s")
        rate.plot(s["t"], s["fps"], linestyle=":", label=f"{name} failures/s")
    lat.set(ylabel="ms", title="HTTP latency (Locust, running percentiles)")
    lat.set_yscale("log")
    rate.set(xlabel="s", ylabel="per s")
    lat.legend(fontsize=7)
    rate.legend(fontsize=7)
    fig.savefig(out / "http.png", dpi=100)
    plt.close(fig)


def _counters(text: str, names: tuple[str, ...]) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in names:
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value:
                    key = f"{family.name}{{{sample.labels.get('reason', '')}}}"
                    found[key] = found.get(key, 0.0) + sample.value
    return found


def _finite(series: list[float]) -> list[float]:
    return [v for v in series if v == v] or [0.0]


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


if __name__ == "__main__":
    sys.exit(main())

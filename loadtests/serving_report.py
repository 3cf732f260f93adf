"""The serving benchmark's records and report: per-phase measurements, the table of rates and
ratios against the best raw ONNX Runtime row, CPU per process role, batch-size histograms and
the PNG plot (``loadtests/bench_serving.py`` measures, this module presents)."""

from __future__ import annotations

import collections
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Phase", "Row", "pct", "plot", "print_report", "summarize"]


@dataclass
class Phase:
    """One timed phase of one path in one round."""

    path: str
    round: int
    images: int
    seconds: float
    latencies_ms: list[float]
    batch_sizes: dict[int, int] = field(default_factory=dict)  # requests per Serve batch size
    busy_s: float = 0.0  # sum of the ModelRunner's batch compute times (Serve paths)
    errors: dict[str, int] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds per process role
    others_cores: float = 0.0  # CPU the rest of the machine used meanwhile, in cores
    loadavg: float = 0.0

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@dataclass
class Row:
    path: str
    rates: list[float]
    p50: float
    p99: float
    ratio: float
    paired: float
    busy: float  # ModelRunner ORT busy fraction (Serve paths)
    busy_rate: float  # img/s while ORT was busy
    cores: dict[str, float]  # CPU cores used per process role (CPU s / wall s)
    cpu_ms: float  # CPU ms per image, all processes of this run
    others: float
    errors: dict[str, int]

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def summarize(phases: list[Phase]) -> tuple[list[Row], str]:
    by_path: dict[str, list[Phase]] = collections.defaultdict(list)
    for p in phases:
        by_path[p.path].append(p)
    raw = {k: v for k, v in by_path.items() if k.startswith("raw")}
    best = max(raw, key=lambda k: statistics.median(p.rate for p in raw[k]))
    base = statistics.median(p.rate for p in raw[best])
    base_by_round = {p.round: p.rate for p in raw[best]}
    rows = []
    for path, ps in by_path.items():
        lat = [x for p in ps for x in p.latencies_ms]
        images = sum(p.images for p in ps) or 1
        roles: dict[str, float] = collections.defaultdict(float)
        errors: collections.Counter[str] = collections.Counter()
        for p in ps:
            for role, s in p.cpu_s.items():
                roles[role] += s
            errors.update(p.errors)
        busy = sum(p.busy_s for p in ps)
        wall = sum(p.seconds for p in ps) or 1.0
        rows.append(
            Row(
                path=path,
                rates=[p.rate for p in ps],
                p50=pct(lat, 50),
                p99=pct(lat, 99),
                ratio=statistics.median(p.rate for p in ps) / base,
                paired=statistics.median(p.rate / base_by_round[p.round] for p in ps),
                busy=busy / wall if busy else float("nan"),
                busy_rate=images / busy if busy else float("nan"),
                cores={r: s / wall for r, s in roles.items()},
                cpu_ms=1000 * sum(roles.values()) / images,
                others=statistics.median(p.others_cores for p in ps),
                errors=dict(errors),
            )
        )
    return rows, best


ROLES = ("driver", "ModelRunner", "Api", "proxy", "controller", "raylet", "gcs", "other Ray")
ROLE_HEAD = ("driver", "Runner", "Api", "proxy", "control", "raylet", "gcs", "Ray etc")


def print_report(rows: list[Row], best: str, phases: list[Phase], meta: dict[str, Any]) -> None:
    print()
    print(
        f"Serving benchmark: {meta['model']} input {meta['shape']}, {meta['provider']}; "
        f"{meta['rounds']} interleaved rounds, medians"
    )
    print(
        f"  ModelRunner user_config: {json.dumps(meta['runner'], sort_keys=True)}\n"
        f"  handle in flight {meta['handle_in_flight']}, HTTP concurrency {meta['concurrency']}, "
        f"requests {meta['requests']} or {meta['seconds']:.0f} s per phase; raw ORT threads "
        f"{meta['raw_threads'] or 'ORT default'}, spinning {meta['raw_spinning']}; "
        f"Ray num_cpus {meta['ray_num_cpus']}; "
        f"{os.cpu_count()} CPUs\n"
        f"  niceness: {', '.join(f'{k} {v}' for k, v in meta['nice'].items())}"
    )
    print()
    head = (
        f"  {'path':21s} {'img/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'vs (a)':>7s} "
        f"{'paired':>7s} {'ORT busy':>8s} {'busy img/s':>10s}   per round"
    )
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in rows:
        mark = " *" if r.path == best else ""
        busy = f"{100 * r.busy:7.0f}%" if r.busy == r.busy else f"{'':8s}"
        busy_rate = f"{r.busy_rate:10.1f}" if r.busy_rate == r.busy_rate else f"{'':10s}"
        print(
            f"  {r.path + mark:21s} {r.rate:7.1f} {r.p50:8.1f} {r.p99:8.1f} {r.ratio:6.2f}x "
            f"{r.paired:6.2f}x {busy} {busy_rate}   "
            + " ".join(f"{x:.1f}" for x in r.rates)
            + (f"   errors {r.errors}" if r.errors else "")
        )
    print(
        "  * baseline (a). p50/p99: per request (Serve), per batch call (raw). paired: median of\n"
        "  per-round ratios. ORT busy: ModelRunner batch compute time / wall time; busy img/s:\n"
        "  images / that compute time."
    )
    print()
    print("  CPU cores used per process during each path (driver = client + raw ORT):")
    print(
        "  "
        + f"{'path':21s}"
        + "".join(f"{h:>8s}" for h in ROLE_HEAD)
        + f"{'total':>8s}{'others':>8s}{'ms/img':>8s}"
    )
    for r in rows:
        cells = "".join(f"{r.cores.get(role, 0.0):8.2f}" for role in ROLES)
        total = sum(r.cores.values())
        print(f"  {r.path:21s}{cells}{total:8.2f}{r.others:8.2f}{r.cpu_ms:8.1f}")
    print("  ms/img: CPU of every process of this run per image; others: the rest of the machine")
    print()
    for r in rows:
        if r.path.startswith("raw"):
            continue
        hist: collections.Counter[int] = collections.Counter()
        for p in phases:
            if p.path == r.path:
                hist.update(p.batch_sizes)
        total = sum(hist.values()) or 1
        mean = sum(b * n for b, n in hist.items()) / total
        print(f"  batch sizes Serve formed, {r.path} (requests per size; mean {mean:.1f}):")
        for b in sorted(hist):
            share = hist[b] / total
            print(
                f"    {b:4d} {hist[b]:6d} {100 * share:5.1f}% ≈{hist[b] / b:5.0f} batches "
                + "#" * round(40 * share)
            )


def plot(rows: list[Row], best: str, phases: list[Phase], out: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (the table above has every figure)")
        return None
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5))
    names = [r.path for r in rows]
    colors = [
        "tab:green" if n == best else "tab:gray" if n.startswith("raw") else "tab:blue"
        for n in names
    ]
    ax1.bar(names, [r.rate for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax1.scatter([i] * len(r.rates), r.rates, color="black", s=10, zorder=3)
        ax1.annotate(f"{r.ratio:.2f}x", (i, r.rate), ha="center", va="bottom", fontsize=9)
    ax1.set_ylabel("images/s (median; dots: rounds)")
    ax1.set_title("throughput, ratio vs best raw ORT")
    ax1.tick_params(axis="x", rotation=30)
    x = np.arange(len(rows))
    ax2.bar(x - 0.2, [r.p50 for r in rows], 0.4, label="p50")
    ax2.bar(x + 0.2, [r.p99 for r in rows], 0.4, label="p99")
    ax2.set_xticks(x, names, rotation=30)
    ax2.set_ylabel("ms (per request; raw: per batch call)")
    ax2.set_title("latency")
    ax2.legend()
    serve_rows = [r for r in rows if not r.path.startswith("raw")]
    width = 0.8 / max(1, len(serve_rows))
    sizes = sorted({b for p in phases for b in p.batch_sizes})
    for k, r in enumerate(serve_rows):
        hist: collections.Counter[int] = collections.Counter()
        for p in phases:
            if p.path == r.path:
                hist.update(p.batch_sizes)
        total = sum(hist.values()) or 1
        xs = np.arange(len(sizes)) + (k - (len(serve_rows) - 1) / 2) * width
        ax3.bar(xs, [hist[b] / total for b in sizes], width, label=r.path)
    ax3.set_xticks(np.arange(len(sizes)), [str(b) for b in sizes])
    ax3.set_xlabel("batch size formed by @serve.batch")
    ax3.set_ylabel("share of requests")
    ax3.set_title("Serve batch sizes")
    ax3.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = out / "bench_serving.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png

"""CPU use per process role of a Ray Serve app, read from /proc (Linux), for the benchmarks.

The benchmark process and every process it started (Ray's raylet, gcs, Serve's controller,
proxy and replicas) are snapshotted; the difference of two snapshots is the CPU seconds each role
used, plus what the rest of the machine used meanwhile (so a noisy neighbour shows). Roles are
recognised by the process title Ray gives its workers (``ray::ModelRunner``...).
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["CpuSnapshot", "cpu_delta", "cpu_snapshot", "loadavg", "niceness", "renice_driver"]


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = Path("/proc/loadavg").read_text().split()[:3]
    return float(one), float(five), float(fifteen)


def _role(proc: psutil.Process, me: int) -> str:
    if proc.pid == me:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    for key, role in (
        ("ModelRunner", "ModelRunner"),
        (":Api", "Api"),
        ("Preprocessor", "Preprocessor"),
        ("ProxyActor", "proxy"),
        ("ServeController", "controller"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs"),
    ):
        if key in cmd:
            return role
    return "other Ray"


def niceness() -> dict[str, int]:
    """Scheduling niceness per process role (Ray starts its workers at RAY_worker_niceness)."""
    me = psutil.Process()
    out: dict[str, int] = {}
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            out.setdefault(_role(proc, me.pid), proc.nice())
    return out


def renice_driver(how: str) -> dict[str, int]:
    """Give every thread of this process (client, raw ORT) the niceness ``how`` asks for:
    ``workers`` (the ModelRunner replica's, i.e. RAY_worker_niceness), ``keep``, or a number.
    Returns the niceness per process role afterwards."""
    nice = niceness()
    if how != "keep":
        target = nice.get("ModelRunner", 0) if how == "workers" else int(how)
        for tid in os.listdir("/proc/self/task"):  # setpriority(2) is per thread on Linux
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, int(tid), target)
        nice = niceness()
    return nice


def _busy_jiffies() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal


@dataclass
class CpuSnapshot:
    per_pid: dict[int, tuple[str, float]]
    busy: int
    at: float


def cpu_snapshot() -> CpuSnapshot:
    """CPU seconds of this process and every descendant (Ray's processes), by role."""
    me = psutil.Process()
    per_pid: dict[int, tuple[str, float]] = {}
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            per_pid[proc.pid] = (_role(proc, me.pid), float(t.user + t.system))
    return CpuSnapshot(per_pid, _busy_jiffies(), time.monotonic())


def cpu_delta(a: CpuSnapshot, b: CpuSnapshot) -> tuple[dict[str, float], float]:
    """CPU seconds per role between two snapshots, and other processes' use in cores."""
    roles: dict[str, float] = collections.defaultdict(float)
    for pid, (role, cpu) in b.per_pid.items():
        before = a.per_pid.get(pid, (role, 0.0))[1]
        roles[role] += max(0.0, cpu - before)
    elapsed = max(b.at - a.at, 1e-9)
    busy = (b.busy - a.busy) / os.sysconf("SC_CLK_TCK")
    return dict(roles), max(0.0, busy - sum(roles.values())) / elapsed

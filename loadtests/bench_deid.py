"""De-identification benchmark: radbridge's ``deidentify`` against dicognito, one run.

    .venv/bin/python -m loadtests.bench_deid [--count 500] [--rounds 3] [--png PATH] [--profile]

Corpus: one CT series of ``--count`` 512x512 16-bit instances written by the repository's
phantom writer (``models.ct_dicom.write_ct_series``: explicit VR little endian, the patient's
name, ID, birth date and accession number, a referring physician, an institution, study, series,
frame-of-reference and instance UIDs, a private block holding the name). Its pixels are the
synthetic chest phantom of ``models.ct_phantoms`` (128x128 in-plane) upsampled to 512x512 and
stretched along z to ``--count`` slices. The files are read into memory before timing.

Tools (bytes in, Part 10 bytes out, for every instance):

- radbridge, pydicom I/O: bytes -> ``pydicom.dcmread`` -> ``dicom_io.deid.deidentify`` (one
  ``Pseudonymizer`` for the series, the basic profile; ``--options all`` selects every option
  except Retain UIDs) -> ``save_as``: the engine alone, with exactly dicognito's I/O;
- radbridge, gateway path: the same, written by ``dicom_io.part10.to_part10`` instead of
  ``save_as`` (byte-identical output), which is what the edge's forwarder does;
- dicognito: bytes -> ``dcmread`` -> one ``Anonymizer`` for the series (in place, as its
  documentation shows) -> ``save_as``;
- pydicom I/O only: the same parse and write with nothing in between, the floor the pydicom-I/O
  tools share (with it, the best ratio any de-identifier could reach with that I/O is known).

Rounds are interleaved (the tools' order alternates each round) and the first output of each
tool is checked (patient ID and SOP Instance UID replaced). Prints instances/s per tool (median
of the rounds, each round's figure) and two ratios against dicognito, the engine's (same I/O)
and the gateway path's; ``--png`` also draws
them (needs matplotlib). ``--profile`` adds one radbridge pass under cProfile and prints where
the time goes (functions by own time, and the share of the engine's modules).

Bounded: at most 2000 instances, 9 rounds, and ``--max-seconds`` per pass (the rate is then
taken over the instances done); the work folder is deleted at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom

from dicom_io.deid import deidentify
from dicom_io.part10 import to_part10
from dicom_io.pseudonyms import Pseudonymizer
from loadtests import deid_tools
from loadtests.deid_tools import Step
from models.ct_dicom import write_ct_series
from models.ct_phantoms import CTPhantom, chest_ct
from radbridge.agreements import DeidOption

KEY = b"bench-deid-key-0123456789abcdef!"
PATIENT = {
    "patient_name": "Zhang^Wei=张^伟=",
    "patient_id": "110105194912310021",
    "birth_date": "19491231",
    "accession": "ACC20261123",
}
SIZE = 512
FLOOR = "pydicom I/O only"  # dcmread + save_as with nothing in between: the shared floor

Run = Callable[[bytes], bytes]  # one instance, file bytes in, Part 10 bytes out


# -- corpus -------------------------------------------------------------------------------------


def make_series(folder: Path, count: int) -> list[Path]:
    """``count`` 512x512 CT slices: the chest phantom upsampled in-plane, stretched along z."""
    small = chest_ct(np.random.default_rng(7), n_nodules=2)
    nz, _, nx = small.hu.shape
    scale = SIZE // nx
    z = (np.arange(count) * nz) // count
    hu = np.repeat(np.repeat(small.hu[z], scale, axis=1), scale, axis=2)
    sz, sy, sx = small.spacing
    phantom = dataclasses.replace(
        small,
        hu=hu,
        label=np.zeros((1, 1, 1), np.uint8),  # not written
        spacing=(sz * nz / count, sy / scale, sx / scale),
    )
    assert isinstance(phantom, CTPhantom) and phantom.hu.shape == (count, SIZE, SIZE)
    return write_ct_series(folder, phantom, seed=11, **PATIENT)


# -- tools --------------------------------------------------------------------------------------


def process(blob: bytes, step: Step) -> bytes:
    """pydicom's I/O around a de-identifier: parse, de-identify, write Part 10 to memory."""
    out = step(pydicom.dcmread(BytesIO(blob)))
    buf = BytesIO()
    out.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def pydicom_io(make_step: Callable[[], Step]) -> Callable[[], Run]:
    def make() -> Run:
        step = make_step()
        return lambda blob: process(blob, step)

    return make


def gateway_path(options: tuple[DeidOption, ...]) -> Callable[[], Run]:
    """What ``dicom_io.forwarder`` does with each stored instance."""

    def make() -> Run:
        pseudo = Pseudonymizer(KEY)
        return lambda blob: to_part10(
            deidentify(pydicom.dcmread(BytesIO(blob)), pseudo, options).dataset
        )

    return make


@dataclasses.dataclass
class Pass:
    instances: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        return self.instances / self.seconds


def one_pass(blobs: list[bytes], make: Callable[[], Run], max_seconds: float) -> Pass:
    run = make()
    t0, c0 = time.perf_counter(), time.process_time()
    done = 0
    for blob in blobs:
        run(blob)
        done += 1
        if time.perf_counter() - t0 > max_seconds:
            break
    return Pass(done, time.perf_counter() - t0, time.process_time() - c0)


def check(blob: bytes, make: Callable[[], Run], name: str) -> None:
    """The tool really replaced the identity of the first instance."""
    src = pydicom.dcmread(BytesIO(blob))
    out = pydicom.dcmread(BytesIO(make()(blob)))
    if out.PatientID == src.PatientID or out.SOPInstanceUID == src.SOPInstanceUID:
        raise SystemExit(f"{name}: the output keeps the patient ID or the SOP Instance UID")


# -- profile ------------------------------------------------------------------------------------


def profile(blobs: list[bytes], make: Callable[[], Run], top: int = 15) -> str:
    """One pass under cProfile: functions by own time, and time per module group."""
    run = make()
    prof = cProfile.Profile()
    prof.enable()
    for blob in blobs:
        run(blob)
    prof.disable()
    stats = pstats.Stats(prof)
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())  # own time of every function
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    lines = [f"cProfile, radbridge, {len(blobs)} instances: {total:.2f} s own time in all"]
    lines.append(f"  {'own %':>6s} {'cum %':>6s} {'calls':>9s}  function")
    for (path, _, func), (_, ncalls, tt, ct, _) in rows:
        lines.append(
            f"  {100 * tt / total:6.1f} {100 * ct / total:6.1f} {ncalls:9d}  {_where(path, func)}"
        )
    groups: dict[str, float] = {}
    for (path, _, _), (_, _, tt, _, _) in raw.items():
        group = _group(path)
        groups[group] = groups.get(group, 0.0) + tt
    lines.append("  own time by module group:")
    for group, tt in sorted(groups.items(), key=lambda kv: kv[1], reverse=True)[:8]:
        lines.append(f"  {100 * tt / total:6.1f}%  {group}")
    ours = sorted(
        ((k, v) for k, v in raw.items() if "/dicom_io/" in k[0]),
        key=lambda kv: kv[1][3],
        reverse=True,
    )[:8]
    lines.append("  engine functions by cumulative time:")
    for (path, _, func), (_, ncalls, _, ct, _) in ours:
        lines.append(f"  {100 * ct / total:6.1f}% {ncalls:9d}  {_where(path, func)}")
    return "\n".join(lines)


def _where(path: str, func: str) -> str:
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{func}"


def _group(path: str) -> str:
    if "/dicom_io/" in path:
        return "dicom_io/" + Path(path).name
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1].split("/", 1)[0]
    return "python stdlib / builtins"


# -- main ---------------------------------------------------------------------------------------


def _png(path: Path, results: dict[str, list[Pass]]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG: matplotlib is not installed"
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(results)
    medians = [statistics.median(p.rate for p in results[n]) for n in names]
    ax.bar(names, medians, color=["#2a6f97", "#61a5c2", "#c44536", "#999999"][: len(names)])
    for i, n in enumerate(names):
        ax.scatter([i] * len(results[n]), [p.rate for p in results[n]], color="black", s=12)
    ax.set_ylabel("instances / s (median, dots: rounds)")
    ax.set_title("De-identification of 512x512 CT instances")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"PNG: {path}"


def main() -> None:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=500, help="CT instances (1..2000)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (1..9)")
    ap.add_argument("--options", choices=["basic", "all"], default="basic")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="per pass (bound)")
    ap.add_argument("--png", type=Path, help="also draw the figures into this PNG")
    ap.add_argument("--profile", action="store_true", help="one radbridge pass under cProfile")
    args = ap.parse_args()
    count, rounds = max(1, min(args.count, 2000)), max(1, min(args.rounds, 9))
    options = (
        ()
        if args.options == "basic"
        else tuple(o for o in DeidOption if o is not DeidOption.RETAIN_UIDS)
    )
    from dicognito import __version__ as dicognito_version

    ours, gateway, theirs = (
        f"radbridge ({args.options})",
        f"radbridge ({args.options}), gateway",
        f"dicognito {dicognito_version}",
    )
    tools: dict[str, Callable[[], Run]] = {
        ours: pydicom_io(deid_tools.radbridge(options, KEY)),
        gateway: gateway_path(options),
        theirs: pydicom_io(deid_tools.dicognito("bench-deid")),
        FLOOR: pydicom_io(lambda: lambda ds: ds),
    }
    with tempfile.TemporaryDirectory(prefix="deid-bench-") as tmp:
        t0 = time.monotonic()
        paths = make_series(Path(tmp), count)
        blobs = [p.read_bytes() for p in paths]
        mb = sum(map(len, blobs)) / 1e6
        took = time.monotonic() - t0
        print(f"corpus: {count} CT {SIZE}x{SIZE}x16 files, {mb:.1f} MB, written in {took:.1f} s")
    for name, make in tools.items():
        if name != FLOOR:
            check(blobs[0], make, name)
    results: dict[str, list[Pass]] = {name: [] for name in tools}
    names = list(tools)
    for rnd in range(rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        order = order if rnd % 2 == 0 else order[::-1]
        for name in order:
            run = one_pass(blobs, tools[name], args.max_seconds)
            results[name].append(run)
            print(
                f"  round {rnd + 1}/{rounds} {name:30s} {run.rate:8.1f} inst/s "
                f"({run.instances} in {run.seconds:.1f} s, CPU {100 * run.cpu / run.seconds:.0f}%)",
                flush=True,
            )
    print()
    print(
        f"De-identification, {count} CT instances {SIZE}x{SIZE}x16 ({mb / count:.3f} MB each), "
        f"bytes -> dcmread -> de-identify -> save_as (gateway: to_part10); median of {rounds} "
        "interleaved rounds; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    med, cpu = {}, {}
    for name, runs in results.items():
        med[name] = statistics.median(r.rate for r in runs)
        cpu[name] = statistics.median(1000 * r.cpu / r.instances for r in runs)
        each = " ".join(f"{r.rate:.0f}" for r in runs)
        print(
            f"  {name:30s} {med[name]:8.1f} inst/s {1000 / med[name]:7.2f} ms/instance "
            f"(CPU {cpu[name]:6.2f} ms/instance)   rounds: {each}"
        )
    print(
        f"  ratio radbridge/dicognito, same pydicom I/O (the engines): "
        f"{med[ours] / med[theirs]:.2f}x by wall clock, {cpu[theirs] / cpu[ours]:.2f}x by CPU time"
    )
    print(
        f"  ratio radbridge/dicognito, each as it runs (gateway path): "
        f"{med[gateway] / med[theirs]:.2f}x by wall clock, "
        f"{cpu[theirs] / cpu[gateway]:.2f}x by CPU time (goal >= 2x)"
    )
    floor = cpu[FLOOR]
    print(
        f"  CPU beyond the I/O floor ({floor:.2f} ms): radbridge {cpu[ours] - floor:.2f} ms, "
        f"dicognito {cpu[theirs] - floor:.2f} ms per instance; with the same I/O the ratio "
        f"cannot exceed {cpu[theirs] / floor:.2f}x"
    )
    if args.png:
        print(_png(args.png, results))
    if args.profile:
        print()
        print(profile(blobs[: min(count, 200)], tools[gateway]))


if __name__ == "__main__":
    main()

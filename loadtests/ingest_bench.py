"""Ingest benchmark: the radbridge edge gateway against dcmtk storescp and Orthanc, one run.

    .venv/bin/python -m loadtests.ingest_bench [--count 500] [--runs 3] [--associations 1]
        [--profile]

Corpora: ``--count`` generated 512x512 16-bit CT instances (CT Image Storage, one study,
explicit VR little endian) and, in a row of its own, every storage instance of the PyPI package
pydicom-data that the gateway accepts (mixed modalities and transfer syntaxes, several of them
compressed). Receivers, each on a free loopback port and started afresh for every run:

- dcmtk ``storescp``: single process, bit-preserving (``+B``), every transfer syntax (``+xa``),
  max PDU 128 KiB; writes files, no fsync, no index.
- Orthanc (tests/peers.py): its own config, max PDU 128 KiB, ``SyncStorageArea`` and its
  SQLite index. Counted with strace, it fdatasyncs each stored file and syncs neither its index
  nor its storage folders before it answers (one sync per instance to the gateway's four).
- the radbridge gateway as a subprocess (``radbridge gateway``: SCP + outbox + forwarder) with
  its full durable path (an unnamed file, fdatasync, its name, folder fsync, SQLite index
  commit) and an agreements file written here (calling AE STORESCU from 127.0.0.0/8, the
  corpora's modalities, quiet period 24 h so nothing is forwarded during the run).

Sender: dcmtk ``storescu`` (one association, ``-aet STORESCU``, only the presentation contexts
the files need, each file's own transfer syntax proposed; TCP_NODELAY=1); with
``--associations N``, N storescu at once, each sending every N-th file on its own association
(storescp then runs with ``--fork``, a process per association; Orthanc serves them with its
own threads, the gateway with a thread per association in each of ``--gateway-receivers``
processes, 1 by default: on this 2-core machine kind, 2 measured slower than 1). Receiver CPU
includes storescp's forked children and the gateway's receiving processes. Runs are interleaved
(receiver order rotates each round); every run is checked (storescu exit status, instance
count at the receiver). Prints the median instances/s and MB/s per receiver, the receiver's CPU
use, and the ratios gateway/storescp and gateway/Orthanc.

``--profile`` adds one gateway run on the CT corpus under ``py-spy record`` (idle samples
included, per thread) and writes the collapsed stacks to ``var/bench/`` (open them in
https://speedscope.app or with flamegraph.pl), then prints where the gateway's threads spend
their time: fsync, SQLite, pydicom parsing, the structure check, PDU/DIMSE handling, waiting.

Before the timed runs, each receiver takes ``SYNC_SAMPLE`` instances with ``strace -f -c``
attached, and the header prints its sync calls per instance: the durability beside each
figure, measured, not assumed ("not counted" without strace).

Loopback only; every subprocess runs under a timeout; the work folders are deleted at the end.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import linecache
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_io.header import parse_header
from radbridge.agreements import KNOWN_MODALITIES
from radbridge.errors import DatasetError
from tests.conftest import REPO, free_port
from tests.peers import OrthancPeer, orthanc_binary

ENV = dict(os.environ, TCP_NODELAY="1")
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SENDER_AE = "STORESCU"
DCMTK_PDU = 131_072  # the largest PDU storescp and Orthanc accept
MIN_BUSY = 0.30  # below it the pace-setting receiver is waiting: no ratio is printed
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
BENCH_DIR = REPO / "var" / "bench"
PROFILE_RATE = 200  # py-spy samples per second


# -- corpora ----------------------------------------------------------------------------------


@dataclass
class Corpus:
    name: str
    files: list[Path]
    modalities: set[str]
    unique_instances: int  # distinct SOP Instance UIDs (a file may repeat one in another TS)
    contexts: set[tuple[str, str]]  # (SOP Class UID, transfer syntax UID) of the files
    note: str = ""
    nbytes: int = 0

    def __post_init__(self) -> None:
        self.nbytes = sum(f.stat().st_size for f in self.files)

    def write_storescu_profile(self, path: Path) -> Path:
        """A storescu association profile: one presentation context per (SOP class, transfer
        syntax) of the corpus, so each file travels in its own transfer syntax, unconverted
        (storescu's -x options propose at most one compressed syntax per association)."""
        syntaxes = sorted({ts for _, ts in self.contexts})
        lines = ["[[TransferSyntaxes]]"]
        for i, ts in enumerate(syntaxes):
            lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
        lines += ["[[PresentationContexts]]", "[Bench]"]
        for n, (sop, ts) in enumerate(sorted(self.contexts), 1):
            lines.append(f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}")
        lines += ["[[Profiles]]", "[Bench]", "PresentationContexts = Bench", ""]
        if len(self.contexts) > 128:
            raise SystemExit(f"{self.name}: {len(self.contexts)} presentation contexts (> 128)")
        path.write_text("\n".join(lines))
        return path


def make_ct_corpus(folder: Path, count: int, size: int = 512) -> Corpus:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    files = []
    for i in range(count):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CT_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
            "Bench^Patient",
            "BENCH",
            "19700101",
            "O",
        )
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", "BENCH1"
        ds.ReferringPhysicianName, ds.StudyID = "", "1"
        ds.Modality, ds.BodyPartExamined = "CT", "CHEST"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.KVP, ds.RescaleIntercept, ds.RescaleSlope = 120, -1024, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"CT{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    contexts = {(CT_STORAGE, str(ExplicitVRLittleEndian))}
    return Corpus(f"CT {size}x{size}x16", files, {"CT"}, count, contexts, "explicit VR LE")


def pydicom_data_files() -> list[Path]:
    """Every file shipped by the pydicom-data package (import name ``data_store``)."""
    try:
        import data_store  # type: ignore[import-not-found]
    except ImportError:
        return []
    root = Path(data_store.__file__).parent
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc"))


def make_mixed_corpus() -> tuple[Corpus | None, str]:
    """pydicom-data's storage instances the gateway would accept, or None and why not."""
    storage = {cx.abstract_syntax for cx in AllStoragePresentationContexts}
    kept: list[Path] = []
    modalities: set[str] = set()
    syntaxes: collections.Counter[str] = collections.Counter()
    uids: set[str] = set()
    contexts: set[tuple[str, str]] = set()
    skipped: collections.Counter[str] = collections.Counter()
    candidates = pydicom_data_files()
    for path in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom-data has deliberately odd values
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            meta_ts = ds.file_meta.get("TransferSyntaxUID")
        except Exception:
            skipped["not readable by pydicom"] += 1
            continue
        if not meta_ts or any(
            k not in ds
            for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        ):
            skipped["no file meta or UIDs"] += 1
            continue
        if str(ds.SOPClassUID) not in storage:
            skipped["not a storage SOP class the SCP offers"] += 1
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = parse_header(path.read_bytes())
        except DatasetError as exc:
            skipped[f"gateway refuses it ({exc.reason})"] += 1
            continue
        if header.modality not in KNOWN_MODALITIES:
            skipped["modality an agreement cannot name"] += 1
            continue
        # storescu must read the file and its SOP UIDs as UI (a truncated file, or UIDs stored
        # with VR UN, make it halt).
        dump = subprocess.run(
            ["dcmdump", "-q", "+P", "0008,0016", "+P", "0008,0018", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if dump.returncode != 0 or dump.stdout.count(") UI ") != 2:
            skipped["dcmtk cannot read it or its SOP UIDs"] += 1
            continue
        kept.append(path)
        modalities.add(str(header.modality))
        syntaxes[pydicom.uid.UID(header.transfer_syntax_uid).name] += 1
        uids.add(header.sop_instance_uid)
        contexts.add((header.sop_class_uid, header.transfer_syntax_uid))
    why = ", ".join(f"{n} {k}" for k, n in skipped.items()) or "none"
    if not candidates:
        return None, "pydicom-data is not installed"
    if len(modalities) < 2:
        return None, f"pydicom-data modalities not varied ({sorted(modalities)})"
    ts = ", ".join(f"{n} {name}" for name, n in syntaxes.most_common())
    note = f"{len(kept)} of {len(candidates)} files (skipped: {why}); transfer syntaxes: {ts}"
    return Corpus("pydicom-data mixed", kept, modalities, len(uids), contexts, note), note


# -- receivers --------------------------------------------------------------------------------


def _wait_echo(port: int, called_ae: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Block until the receiver answers C-ECHO (bounded), or fail with its log."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"receiver exited with {proc.returncode}:\n{_tail(log)}")
        r = subprocess.run(
            [
                *("echoscu", "-aet", SENDER_AE, "-aec", called_ae, "-to", "2", "-ta", "5"),
                *("127.0.0.1", str(port)),
            ],
            env=ENV,
            capture_output=True,
            timeout=15,
        )
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit(f"receiver did not answer C-ECHO within {START_TIMEOUT_S:.0f} s")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Receiver:
    name = ""
    ae = ""
    durable = ""

    def start(self, work: Path) -> int:
        raise NotImplementedError

    def pid(self) -> int:
        raise NotImplementedError

    def stored(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class Storescp(Receiver):
    name, ae, durable = "dcmtk storescp", "STORESCP", "files, no fsync"

    def __init__(self, fork: bool = False) -> None:
        self.fork = fork  # a process per association, as storescp serves several at once

    def start(self, work: Path) -> int:
        self.out = work / "out"
        self.out.mkdir(parents=True)
        port = free_port()
        log = work / "storescp.log"
        mode = "--fork" if self.fork else "--single-process"
        with log.open("wb") as fh:
            self.proc = subprocess.Popen(
                [
                    *("storescp", mode, "-aet", self.ae, "-od", str(self.out)),
                    *("+B", "+xa", "-pdu", str(DCMTK_PDU), "-dhl", "-ts", "60", "-ta", "30"),
                    str(port),
                ],
                env=ENV,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        _wait_echo(port, self.ae, self.proc, log)
        return port

    def pid(self) -> int:
        return self.proc.pid

    def stored(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file())

    def stop(self) -> None:
        _stop(self.proc)


class Orthanc(Receiver):
    # Measured (sync_counts, strace): Orthanc fdatasyncs each stored file and nothing else,
    # neither its SQLite index nor its storage folders, before it answers.
    name, ae, durable = "Orthanc", "ORTHANC", "fdatasync of each file, SQLite index unsynced"

    def start(self, work: Path) -> int:
        self.peer = OrthancPeer(
            aet=self.ae,
            workdir=work / "orthanc",
            extra_config={"MaximumPduLength": DCMTK_PDU, "SyncStorageArea": True},
            start_timeout_s=START_TIMEOUT_S,
        )
        self.peer.__enter__()
        _wait_echo(self.peer.dicom_port, self.ae, self.peer.process, self.peer.log_path)
        return self.peer.dicom_port

    def pid(self) -> int:
        return self.peer.pid

    def stored(self) -> int:
        return int(self.peer.statistics()["CountInstances"])

    def stop(self) -> None:
        self.peer.close()


AGREEMENTS = """\
agreements:
  - id: ingest-bench
    hospital:
      name: Bench Hospital (local)
      country: CN
      calling_ae_titles: [{sender}]
      allowed_source_ips: [127.0.0.0/8]
      return_destination: {{ae_title: {sender}, host: 127.0.0.1, port: 11113}}
    reading_center: {{name: Bench Center (local), country: RU}}
    modalities: [{modalities}]
    deidentification: {{profile: basic, options: []}}
    transfer_basis:
      mechanism: standard_contract
      reference: BENCH-LOCAL-0000
      valid_from: 2025-01-01
      valid_until: 2099-12-31
    quiet_period_s: 86400
    active_from: 2025-01-01
    active_until: 2099-12-31
"""


def gateway_command() -> list[str]:
    script = Path(sys.executable).parent / "radbridge"
    if script.exists():
        return [str(script), "gateway"]
    return [sys.executable, "-c", "from radbridge.cli import app; app()", "gateway"]


class Gateway(Receiver):
    name, ae, durable = (
        "radbridge gateway",
        "RADBRIDGE",
        "file fdatasync before its name, folder fsync after it (the file's too where the file "
        "system keeps no journal), SQLite commit synced",
    )

    def __init__(
        self, modalities: set[str], profile_to: Path | None = None, receivers: int = 1
    ) -> None:
        self.modalities = sorted(modalities)
        self.profile_to = profile_to
        self.receivers = receivers

    def start(self, work: Path) -> int:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        agreements = work / "agreements.yaml"
        agreements.write_text(
            AGREEMENTS.format(sender=SENDER_AE, modalities=", ".join(self.modalities))
        )
        port = free_port()
        env = dict(
            ENV,
            RADBRIDGE_MODE="local",
            RADBRIDGE_DATA_DIR=str(work / "data"),
            RADBRIDGE_AGREEMENTS_FILE=str(agreements),
            RADBRIDGE_LOG_LEVEL="WARNING",
            RADBRIDGE_EDGE__HOST="127.0.0.1",
            RADBRIDGE_EDGE__PORT=str(port),
            RADBRIDGE_EDGE__AE_TITLE=self.ae,
            RADBRIDGE_EDGE__METRICS_PORT="0",
            RADBRIDGE_EDGE__STOW_PORT="0",
            RADBRIDGE_EDGE__CENTER_URL="http://127.0.0.1:9",  # never reached: 24 h quiet period
            RADBRIDGE_EDGE__FORWARD_EARLY="false",  # nor during it: the run measures receiving
            RADBRIDGE_EDGE__MAX_PDU=str(DCMTK_PDU),  # the same PDU as storescp and Orthanc
            RADBRIDGE_EDGE__RECEIVERS=str(self.receivers),
        )
        env.pop("RADBRIDGE_CONFIG", None)
        cmd = gateway_command()
        if self.profile_to is not None:
            cmd = [
                str(_py_spy()),
                "record",
                "--idle",
                "--threads",
                "--nonblocking",
                *(["--subprocesses"] if self.receivers > 1 else []),
                "--rate",
                str(PROFILE_RATE),
                "--format",
                "raw",
                "--output",
                str(self.profile_to),
                "--",
                *cmd,
            ]
        self.log = work / "gateway.log"
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT
            )
        _wait_echo(port, self.ae, self.proc, self.log)
        return port

    def _python(self) -> psutil.Process:
        me = psutil.Process(self.proc.pid)
        if self.profile_to is None:
            return me
        kids = me.children(recursive=True)
        if not kids:
            raise SystemExit(f"py-spy has no child process:\n{_tail(self.log)}")
        return kids[0]

    def pid(self) -> int:
        return self._python().pid

    def stored(self) -> int:
        with contextlib.closing(sqlite3.connect(self.work / "data" / "edge" / "edge.db")) as c:
            return int(c.execute("SELECT count(*) FROM instances").fetchone()[0])

    def stop(self) -> None:
        if self.profile_to is not None and self.proc.poll() is None:
            # SIGINT makes py-spy write its file and exit (waiting for the child to exit
            # instead sometimes hangs py-spy); then the gateway itself is stopped.
            gateway = self._python()
            _stop(self.proc, signal.SIGINT)
            with contextlib.suppress(psutil.Error):
                gateway.terminate()
                try:
                    gateway.wait(STOP_TIMEOUT_S)
                except psutil.TimeoutExpired:
                    gateway.kill()
        _stop(self.proc)


def _py_spy() -> Path:
    found = Path(sys.executable).parent / "py-spy"
    if found.exists():
        return found
    which = shutil.which("py-spy")
    if which is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy; it is a dev dependency)")
    return Path(which)


# -- one run ----------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    cpu_s: float


def push(port: int, called_ae: str, corpus: Corpus, profile: Path, associations: int = 1) -> float:
    """Seconds until ``associations`` storescu processes, each sending every n-th file on its
    own association at the same time, have all finished."""
    t0 = time.perf_counter()
    senders = []
    for i in range(associations):
        files = corpus.files[i::associations]
        log = profile.with_name(f"storescu-{i}.log")
        with log.open("wb") as fh:
            senders.append(
                (
                    subprocess.Popen(
                        [
                            *("storescu", "-aet", SENDER_AE, "-aec", called_ae),
                            *("-xf", str(profile), "Bench"),
                            *("-ta", "30", "-td", "120", "-ts", "120", "127.0.0.1", str(port)),
                            *map(str, files),
                        ],
                        env=ENV,
                        stdin=subprocess.DEVNULL,
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                    ),
                    log,
                )
            )
    deadline = 60 + 2 * len(corpus.files)
    failed = []
    for proc, log in senders:
        try:
            code = proc.wait(max(1.0, deadline - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(5)
        if code != 0:
            failed.append(f"storescu to {called_ae} failed ({code}): {_tail(log, 800)}")
    elapsed = time.perf_counter() - t0
    if failed:
        raise SystemExit("\n".join(failed))
    return elapsed


def fsync_latency_ms(folder: Path, size: int = 524_288, rounds: int = 20) -> float:
    """Median time to write and fsync a new file of ``size`` bytes in ``folder``: the floor
    under every receiver that syncs each instance (Orthanc, the gateway)."""
    data = os.urandom(size)
    times = []
    for i in range(rounds):
        path = folder / f"fsync-probe-{i}"
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        times.append(time.perf_counter() - t0)
        path.unlink()
    return 1000 * statistics.median(times)


SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync")
SYNC_SAMPLE = 20  # instances sent while strace counts a receiver's sync calls


def parse_strace_counts(text: str) -> dict[str, int]:
    """Calls per system call from ``strace -c``'s summary table."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        cols = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(cols) in (5, 6) and cols[-1] in SYNC_CALLS and cols[3].isdigit():
            counts[cols[-1]] = int(cols[3])
    return counts


def sync_counts(receiver: Receiver, corpus: Corpus, work: Path) -> str:
    """What the receiver syncs per instance, counted with ``strace -f -c`` over
    ``SYNC_SAMPLE`` instances on one association: the durability beside its figure, measured
    rather than assumed (e.g. "fdatasync 2.0 fsync 1.0")."""
    strace = shutil.which("strace")
    if strace is None:
        return "not counted (no strace)"
    sample = dataclasses.replace(
        corpus, files=corpus.files[:SYNC_SAMPLE], unique_instances=SYNC_SAMPLE
    )
    work.mkdir(parents=True)
    out = work / "strace.txt"
    port = receiver.start(work)
    try:
        trace = ("-f", "-c", "-e", "trace=" + ",".join(SYNC_CALLS), "-o", str(out))
        tracer = subprocess.Popen(
            [strace, *trace, "-p", str(receiver.pid())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            assert tracer.stderr is not None
            attached = tracer.stderr.readline().decode(errors="replace").strip()
            if "attached" not in attached:  # "Process N attached": counting from here
                return f"not counted (strace: {attached or 'no output'})"
            push(port, receiver.ae, sample, sample.write_storescu_profile(work / "scu.cfg"))
        finally:
            _stop(tracer, signal.SIGINT)
    finally:
        receiver.stop()
    counts = parse_strace_counts(out.read_text() if out.exists() else "")
    shutil.rmtree(work, ignore_errors=True)
    if not counts:
        return "no sync call"
    return " ".join(f"{name} {n / SYNC_SAMPLE:.1f}" for name, n in sorted(counts.items()))


def cpu_seconds(pid: int) -> float:
    """CPU of the process, of its children it has waited for (storescp --fork's) and of its
    live descendants (the gateway's receiving processes)."""
    try:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        kids = proc.children(recursive=True)
    except psutil.Error:
        return 0.0
    total = t.user + t.system + t.children_user + t.children_system
    for kid in kids:
        try:
            k = kid.cpu_times()
        except psutil.Error:
            continue
        total += k.user + k.system
    return float(total)


def one_run(
    receiver: Receiver, corpus: Corpus, work: Path, *, keep: bool = False, associations: int = 1
) -> Run:
    work.mkdir(parents=True)
    # Write back every dirty page first: storescp does not fsync, and the 150+ MB it leaves
    # in the page cache would otherwise be flushed during the next receiver's run, slowing
    # that receiver's own fsyncs (seen: the gateway's fdatasync 0.4 ms alone, 1.8 ms after
    # storescp). Every receiver starts on a clean page cache.
    os.sync()
    port = receiver.start(work)
    try:
        pid = receiver.pid()
        cpu0 = cpu_seconds(pid)
        profile = corpus.write_storescu_profile(work / "scu.cfg")
        seconds = push(port, receiver.ae, corpus, profile, associations)
        cpu = cpu_seconds(pid) - cpu0
        stored = receiver.stored()
    finally:
        receiver.stop()
    if not corpus.unique_instances <= stored <= len(corpus.files):
        raise SystemExit(
            f"{receiver.name} holds {stored} instances after the {corpus.name} run; "
            f"expected {corpus.unique_instances}..{len(corpus.files)}"
        )
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return Run(seconds, cpu)


# -- profile analysis -------------------------------------------------------------------------


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")

# (category, test on the leaf frame's source line) then (category, regex over the stack).
LEAF_RULES = [
    ("waiting: sleep/poll/lock", re.compile(r"\b(sleep|wait|select|poll|acquire)\(")),
    ("fsync (file + directory)", re.compile(r"\b(fsync|fdatasync)\(")),
    ("file write + rename", re.compile(r"\bos\.(write|replace|open|close)\(|\bmkdir\(")),
    ("sha256", re.compile(r"\bsha256\(")),
]
STACK_RULES = [
    ("SQLite commit", re.compile(r"\b(commit|_commit_impl|do_commit) \([^;]*sqlalchemy")),
    ("SQL queries + flush", re.compile(r"sqlalchemy/")),
    ("pydicom header parse", re.compile(r"\bparse_header \(")),
    ("structure check", re.compile(r"\bcheck_structure \(")),
    ("socket recv", re.compile(r"\brecv_exact \(")),
    ("PDU/DIMSE (upper_layer, dimse_commands)", re.compile(r"upper_layer\.py|dimse_commands")),
    ("other ingest (in the handler)", re.compile(r"\b_store \(")),
]


def _leaf_source(leaf: str) -> str:
    m = _FRAME.match(leaf)
    if m is None:
        return ""
    return linecache.getline(m["file"], int(m["line"])).strip()


def _category(stack: str) -> str:
    leaf = stack.rsplit(";", 1)[-1]
    source = _leaf_source(leaf)
    for cat, rx in LEAF_RULES:
        if rx.search(source):
            return cat
    for cat, rx in STACK_RULES:
        if rx.search(stack):
            return cat
    return "other"


def _role(stacks: collections.Counter[str]) -> str | None:
    """What a thread does, from its stacks (py-spy's thread names can be stale)."""
    joined = "\n".join(stacks)
    if "StorageSCP._serve" in joined:
        return "association thread: PDUs, DIMSE and the C-STORE handler"
    if "Forwarder.run (" in joined:
        return "outbox forwarder"
    return None


def analyse_profile(path: Path, instances: int, rate: int, top: int = 12) -> str:
    """Per busy thread of the gateway: share of samples per category and top leaf frames."""
    stacks: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            thread, _, rest = stack.partition(";")
            stacks[thread][rest] += int(count)
    out = [f"py-spy samples ({rate} Hz, idle included) per thread; {path}"]
    rows = []
    for thread, counter in stacks.items():
        role, total = _role(counter), sum(counter.values())
        if role is not None and total >= 20:
            rows.append((role, thread, total, counter))
    for role, thread, total, counter in sorted(rows, key=lambda r: -r[2]):
        cats: collections.Counter[str] = collections.Counter()
        leaves: collections.Counter[str] = collections.Counter()
        for stack, n in counter.items():
            cats[_category(stack)] += n
            leaves[stack.rsplit(";", 1)[-1]] += n
        out.append(f"  {role} -- {thread.split(':')[0]}: {total} samples")
        per_instance = "forwarder" not in role  # the others live only for the association
        for cat, n in cats.most_common():
            ms = f"{1000 * n / rate / instances:6.2f} ms/inst  " if per_instance else ""
            out.append(f"    {100 * n / total:5.1f}%  {ms}{cat}")
        out.append("    top leaf frames:")
        for leaf, n in leaves.most_common(top):
            out.append(f"    {100 * n / total:5.1f}%  {_short(leaf)}  | {_leaf_source(leaf)[:60]}")
    return "\n".join(out)


def _short(frame: str) -> str:
    return re.sub(r"\(/[^)]*/(site-packages|main)/", "(", frame)


# -- main -------------------------------------------------------------------------------------


def _table(corpus: Corpus, results: dict[str, list[Run]], runs: int) -> str:
    mb = corpus.nbytes / 1e6
    n = len(corpus.files)
    rows = []
    med: dict[str, float] = {}
    busy: dict[str, float] = {}
    for name, vals in results.items():
        secs = statistics.median(r.seconds for r in vals)
        med[name] = n / secs
        busy[name] = cpu = statistics.median(r.cpu_s / r.seconds for r in vals)
        each = " ".join(f"{n / r.seconds:.0f}" for r in vals)
        rows.append(
            f"  {name:18s} {n / secs:8.1f} inst/s {mb / secs:7.1f} MB/s  "
            f"receiver CPU {100 * cpu:4.0f}%   runs: {each}"
        )
    head = (
        f"{corpus.name}: {n} files, {mb:.1f} MB ({mb / n:.3f} MB each), "
        f"modalities {','.join(sorted(corpus.modalities))}; median of {runs} interleaved runs"
    )
    gw = med.get(Gateway.name)
    ratios = []
    for other in (Storescp.name, Orthanc.name):
        if gw and other in med:
            label = f"gateway/{other.split()[-1]}"
            slower = min((Gateway.name, other), key=lambda k: med[k])
            if busy[slower] < MIN_BUSY:
                # The slower receiver sets the pace; if it idles, it waits (Nagle, a lock,
                # a timer) instead of working, and the ratio would measure the wait.
                ratios.append(
                    f"{label} withheld: {slower} was {100 * busy[slower]:.0f}% busy "
                    f"(< {100 * MIN_BUSY:.0f}%), waiting, not working"
                )
            else:
                ratios.append(f"{label} {gw / med[other]:.2f}x")
    return "\n".join([head, *rows, "  " + "   ".join(ratios)])


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        yield Path(tmp)


def main() -> None:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=500, help="CT instances (1..5000)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds (1..9)")
    ap.add_argument("--profile", action="store_true", help="one extra gateway run under py-spy")
    ap.add_argument("--no-mixed", action="store_true", help="skip the pydicom-data corpus")
    ap.add_argument(
        "--associations",
        type=int,
        default=1,
        help="parallel storescu associations per run (1..8; storescp then runs with --fork)",
    )
    ap.add_argument(
        "--gateway-receivers",
        type=int,
        default=0,
        help="the gateway's edge.receivers (1..8, default 1: on 2 cores, 2 processes measured "
        "slower with 4 associations than one)",
    )
    args = ap.parse_args()
    count, runs = max(1, min(args.count, 5000)), max(1, min(args.runs, 9))
    associations = max(1, min(args.associations, 8))
    gateway_receivers = max(1, min(args.gateway_receivers or 1, 8))
    for tool in ("storescu", "storescp", "echoscu", "dcmdump"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs dcmtk ({tool})")
    orthanc_binary()
    with _workdir() as root:
        t0 = time.monotonic()
        corpora = [make_ct_corpus(root / "corpus-ct", count)]
        if not args.no_mixed:
            mixed, note = make_mixed_corpus()
            if mixed is not None:
                corpora.append(mixed)
            print(f"mixed corpus: {note}")
        print(f"corpus ready in {time.monotonic() - t0:.1f} s")
        fsync_ms = fsync_latency_ms(root)
        modalities = set().union(*(c.modalities for c in corpora))
        receivers: list[Receiver] = [
            Storescp(fork=associations > 1),
            Orthanc(),
            Gateway(modalities, receivers=gateway_receivers),
        ]
        syncs = {r.name: sync_counts(r, corpora[0], root / f"syncs-{r.ae}") for r in receivers}
        results: dict[str, dict[str, list[Run]]] = {
            c.name: {r.name: [] for r in receivers} for c in corpora
        }
        for rnd in range(runs):
            order = receivers[rnd % 3 :] + receivers[: rnd % 3]
            for corpus in corpora:
                for rec in order:
                    work = root / f"r{rnd}-{id(corpus)}-{rec.ae}"
                    run = one_run(rec, corpus, work, associations=associations)
                    results[corpus.name][rec.name].append(run)
                    print(
                        f"  round {rnd + 1}/{runs} {corpus.name:20s} {rec.name:18s} "
                        f"{len(corpus.files) / run.seconds:8.1f} inst/s",
                        flush=True,
                    )
        print()
        fork = " --fork" if associations > 1 else ""
        print(
            f"Ingest benchmark: storescu -> receiver over loopback, {associations} "
            "association(s) at once per run.\n"
            f"  storescp{fork}: +B +xa, max PDU {DCMTK_PDU}; "
            f"Orthanc {Orthanc.durable}, max PDU {DCMTK_PDU}\n"
            f"  gateway: {Gateway.durable}, max PDU {DCMTK_PDU}, "
            f"{gateway_receivers} receiving process(es)\n"
            f"  sync calls per instance (strace, {SYNC_SAMPLE} instances): "
            + "; ".join(f"{name} {text}" for name, text in syncs.items())
            + f"\n  new 512 KiB file write+fsync: {fsync_ms:.2f} ms (median); "
            f"{os.cpu_count()} CPUs"
        )
        for corpus in corpora:
            print()
            print(_table(corpus, results[corpus.name], runs))
            if corpus.note and corpus.name != corpora[0].name:
                print(textwrap.fill(corpus.note, 100, initial_indent="  ", subsequent_indent="  "))
        if args.profile:
            print(flush=True)
            profile(corpora[0], modalities, root / "profile")


def profile(corpus: Corpus, modalities: set[str], work: Path) -> None:
    """One more gateway run under py-spy; prints where its threads spend their time."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    out = BENCH_DIR / f"ingest-gateway-{datetime.now():%Y%m%d-%H%M%S}.folded"
    gw = Gateway(modalities, profile_to=out)
    run = one_run(gw, corpus, work, keep=True)
    print(f"profiled gateway run ({corpus.name}): {len(corpus.files) / run.seconds:.1f} inst/s")
    if not out.exists():
        raise SystemExit(f"py-spy wrote no profile; gateway log:\n{_tail(work / 'gateway.log')}")
    print(analyse_profile(out, len(corpus.files), PROFILE_RATE))


if __name__ == "__main__":
    main()

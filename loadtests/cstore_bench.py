"""C-STORE receive benchmark: the radbridge edge SCP against dcmtk's storescp, side by side.

Both receivers get the same files from the same sender (dcmtk storescu, one association,
TCP_NODELAY=1), in interleaved runs; the edge does its full receive path (header parse,
staging file, fsync, rename, directory fsync, SQLite index commit). Prints instances/s and the
ratio to storescp. Loopback only; bounded by --count and --runs.

    .venv/bin/python -m loadtests.cstore_bench --count 200 --runs 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_io.ingest import Ingestor
from dicom_io.scp import StorageSCP
from dicom_io.store import DurableStore
from radbridge.agreements import load_agreements
from radbridge.db import Database, upgrade
from radbridge.db.agreements import sync_agreements
from radbridge.metrics import EdgeMetrics
from radbridge.settings import DEFAULT_AGREEMENTS

ENV = dict(os.environ, TCP_NODELAY="1")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_study(folder: Path, count: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Patient", "BENCH", "DX"
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        p = folder / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def push(port: int, files: list[Path]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            "RADBRIDGE",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"storescu failed: {out.stderr[-500:]}")
    return len(files) / (time.perf_counter() - t0)


def run_storescp(out_dir: Path, files: list[Path]) -> float:
    port = _port()
    out_dir.mkdir()
    proc = subprocess.Popen(
        ["storescp", "-aet", "RADBRIDGE", "-od", str(out_dir), str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        return push(port, files)
    finally:
        proc.terminate()
        proc.wait(10)


def run_edge(work: Path, files: list[Path]) -> float:
    url = f"sqlite:///{work / 'edge.db'}"
    upgrade(url)
    db = Database(url)
    agreements = load_agreements(DEFAULT_AGREEMENTS)
    sync_agreements(db, agreements)
    scp = StorageSCP(
        "RADBRIDGE", lambda: agreements, Ingestor(db, DurableStore(work / "store")), EdgeMetrics()
    )
    port = _port()
    scp.start("127.0.0.1", port)
    try:
        return push(port, files)
    finally:
        scp.stop()
        db.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=200, help="instances per run (max 2000)")
    ap.add_argument("--size", type=int, default=512, help="image rows/columns")
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs per receiver (max 7)")
    args = ap.parse_args()
    count, runs = min(args.count, 2000), min(args.runs, 7)
    if shutil.which("storescu") is None:
        raise SystemExit("needs dcmtk (storescu, storescp)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        files = make_study(root / "in", count, args.size)
        mb = sum(f.stat().st_size for f in files) / count / 1e6
        results: dict[str, list[float]] = {"dcmtk storescp": [], "radbridge edge": []}
        for r in range(runs):
            results["dcmtk storescp"].append(run_storescp(root / f"scp{r}", files))
            results["radbridge edge"].append(run_edge(root / f"edge{r}", files))
    base = statistics.median(results["dcmtk storescp"])
    print(f"C-STORE {count} instances of {mb:.2f} MB, {runs} interleaved runs, medians:")
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f"  {name:16s} {med:7.1f} inst/s  {med * mb:6.1f} MB/s  ratio {med / base:.2f}x")


if __name__ == "__main__":
    main()

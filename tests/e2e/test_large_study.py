"""A 1,000-instance CT series streams to disk: the gateway never holds the study in memory.

dcmtk storescu sends 1,000 CT slices of 512x512x16 bits (about 500 MiB) on one association to
a `radbridge gateway` process; its resident memory is sampled throughout. Holding the study
would add ~500 MiB; streaming keeps the growth to buffers of a few instances.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from radbridge.db import Database
from radbridge.db.tables import StudyRow
from tests.conftest import REPO, free_port
from tests.e2e.gateway_process import start_gateway

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BIN = Path(sys.executable).parent
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
COUNT, SIZE = 1000, 512
SLICE_BYTES = SIZE * SIZE * 2
GROWTH_LIMIT = 150 << 20  # well under the 500 MiB a study held in memory would add


def _write_series(folder: Path) -> list[Path]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = np.random.default_rng(0).integers(0, 4096, (SIZE, SIZE), dtype=np.uint16).tobytes()
    paths = []
    for i in range(COUNT):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality = "Large^Study", "LARGE-1", "CT"
        ds.InstanceNumber, ds.ImagePositionPatient = i + 1, [0, 0, float(i)]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = SIZE
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_STORAGE
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_thousand_slice_ct_series_streams_to_disk(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
    raw["agreements"][0]["modalities"] = ["CT"]
    agreements = tmp_path / "agreements.yaml"
    agreements.write_text(yaml.safe_dump(raw))
    series = tmp_path / "series"
    series.mkdir()
    files = _write_series(series)
    port, data = free_port(), tmp_path / "data"
    env = dict(
        os.environ,
        RADBRIDGE_DATA_DIR=str(data),
        RADBRIDGE_AGREEMENTS_FILE=str(agreements),
        RADBRIDGE_EDGE__PORT=str(port),
        RADBRIDGE_EDGE__METRICS_PORT="0",
        RADBRIDGE_EDGE__CENTER_URL=f"http://127.0.0.1:{free_port()}",
        RADBRIDGE_EDGE__MIN_FREE_BYTES="0",
        TCP_NODELAY="1",
    )
    gw = start_gateway(env, tmp_path / "gateway.log", port)
    proc = psutil.Process(gw.pid)
    baseline = proc.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        t0 = time.monotonic()
        out = subprocess.run(
            ["storescu", "-aet", "STORESCU", "-aec", "RADBRIDGE", "127.0.0.1", str(port)]
            + [str(f) for f in files],
            env=env,
            capture_output=True,
            timeout=600,
        )
        elapsed = time.monotonic() - t0
        assert out.returncode == 0, out.stderr.decode()[-2000:]
    finally:
        done.set()
        sampler.join()
        gw.terminate()
        gw.wait(timeout=60)
    db = Database(f"sqlite:///{data / 'edge' / 'edge.db'}")
    with db.session() as s:
        study = s.scalars(select(StudyRow)).one()
        assert study.instance_count == COUNT
    db.dispose()
    stored = sum(f.stat().st_size for f in (data / "edge" / "store").rglob("*.dcm"))
    assert stored >= COUNT * SLICE_BYTES
    growth = peak - baseline
    print(
        f"{COUNT} x {SIZE}x{SIZE} CT: {stored / 2**20:.0f} MiB in {elapsed:.1f} s "
        f"({COUNT / elapsed:.0f} inst/s); gateway RSS {baseline / 2**20:.0f} MiB at start, "
        f"peak {peak / 2**20:.0f} MiB (+{growth / 2**20:.0f} MiB)"
    )
    assert growth < GROWTH_LIMIT

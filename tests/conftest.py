"""Shared fixtures: settings in a temp dir, databases (SQLite and PostgreSQL), DICOM builders."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import create_engine, text

if TYPE_CHECKING:
    from radbridge.db import Database
    from radbridge.db.tables import Node

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# The retraining test's training starts in the background when the run begins (its hooks).
from tests.retraining import (
    pytest_collection_modifyitems,  # noqa: F401
    pytest_unconfigure,  # noqa: F401
)

REPO = Path(__file__).resolve().parent.parent
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
PATIENT = {"name": "Wang^XiaoDong=王^小东", "id": "PID-7788123", "birth": "19650412"}


# Ports for the services tests start, outside both the kernel's ephemeral range (32768-60999
# here: every bind to port 0 and every outgoing connection takes one) and Ray's worker ports
# (10002-19999). A port taken from the ephemeral range could be handed to one of Ray's own
# processes before the test's service binds it (seen: the edge's /metrics port taken while
# `radbridge up` started Ray).
_TEST_PORTS = range(20000, 32000)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now, from the range above (random, checked), and
    not handed out before in this process: a test takes several ports before anything binds
    them (the stack's three, then Orthanc's two), and two of them must never be the same."""
    for _ in range(200):
        port = random.choice(_TEST_PORTS)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port in 20000-31999")


def make_instance(
    study_uid: str | None = None,
    series_uid: str | None = None,
    *,
    modality: str = "DX",
    patient: dict[str, str] = PATIENT,
    rows: int = 64,
    seed: int = 0,
) -> Dataset:
    """A small, valid DX instance carrying identity everywhere de-identification must look."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.PatientBirthDate = patient["birth"]
    ds.PatientSex = "M"
    ds.StudyDate, ds.StudyTime = "20261120", "101010"
    ds.ContentDate, ds.ContentTime = "20261120", "101011"
    ds.AccessionNumber = "ACC99812"
    ds.ReferringPhysicianName = "Ivanov^Petr"
    ds.InstitutionName = "First People's Hospital"
    ds.StudyDescription = f"CHEST PA for {patient['name']}"
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ref = Dataset()
    ref.ReferencedSOPClassUID = DX_STORAGE
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.SourceImageSequence = [ref]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (rows, rows), dtype=np.uint16).tobytes()
    block = ds.private_block(0x0009, "ACME PACS", create=True)
    block.add_new(0x01, "LO", patient["id"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def write_instance(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def identity_needles(ds: Dataset) -> list[bytes]:
    """Byte strings that must never appear outside the edge."""
    values = [PATIENT["id"], PATIENT["birth"], "XiaoDong", "王", "小东", "ACC99812"]
    values += [str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)]
    values += [str(ds.FrameOfReferenceUID), str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)]
    out = []
    for v in values:
        out.append(v.encode("utf-8"))
    return out


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database per test (RADBRIDGE_TEST_POSTGRES_URL; ./run test sets it)."""
    with fresh_postgres_database() as url:
        yield url


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped after (skipped without its server URL)."""
    base = os.environ.get("RADBRIDGE_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("RADBRIDGE_TEST_POSTGRES_URL not set (./run test sets it)")
    base = base.replace("postgresql://", "postgresql+psycopg://", 1)
    name = f"rb_test_{uuid.uuid4().hex[:12]}"
    # pre-ping: a test may restart the server (tests/e2e/test_faults.py) before the drop
    admin = create_engine(base, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = base.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each database test runs on SQLite and on PostgreSQL."""
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest) -> str:
    fixture = "sqlite_url" if backend == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


def _migrated(url: str, node: Node) -> Database:
    """A database migrated to ``node``'s branch, the demo agreements synced."""
    from radbridge.agreements import load_agreements
    from radbridge.db import Database, upgrade
    from radbridge.db.agreements import sync_agreements

    upgrade(url, node)
    db = Database(url)
    sync_agreements(db, load_agreements(REPO / "radbridge/defaults/agreements.yaml"))
    return db


@pytest.fixture
def edge_db(db_url: str) -> Iterator[Database]:
    """The edge's database (its migration branch: no center tables)."""
    db = _migrated(db_url, "edge")
    yield db
    db.dispose()


@pytest.fixture
def center_db(backend: str, tmp_path: Path) -> Iterator[Database]:
    """The center's database (its migration branch: no edge tables), on the same backend as
    ``db_url`` but a database of its own, so a test may hold both nodes' databases."""
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'center.db'}"
        else:
            url = stack.enter_context(fresh_postgres_database())
        db = _migrated(url, "center")
        yield db
        db.dispose()

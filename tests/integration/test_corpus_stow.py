"""The same pydicom-data corpus as test_corpus.py, pushed over DICOMweb STOW-RS to the edge.

Each file goes in a request of its own (Part 10 bytes as on disk), so the HTTP answer maps to
it: 200 when stored, 409 with the FailureReason otherwise. The reason must be the status
``tests.corpus.expected_status`` predicts (the same table as C-STORE), an accepted file must be
stored byte for byte, and a refused one must leave nothing behind.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import select

from dicom_io.ingest import Ingestor
from dicom_io.store import DurableStore
from dicom_io.stow import encode_multipart
from dicom_io.stow_server import StowServer, build_stow_app
from radbridge.agreements import parse_agreements
from radbridge.db import Database, upgrade
from radbridge.db.agreements import sync_agreements
from radbridge.db.tables import InstanceRow
from radbridge.metrics import EdgeMetrics
from tests.conftest import free_port
from tests.corpus import all_modalities_agreements, corpus_id, expected_status, storage_instances

CORPUS = storage_instances()
USER, PASSWORD_ENV, PASSWORD = "corpus-pacs", "RADBRIDGE_TEST_CORPUS_STOW", "corpus-secret"


@dataclass(frozen=True)
class StowRun:
    status: dict[Path, int]
    stored_sha: dict[str, str]  # sha256 of the whole stored file -> relpath
    rows: set[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StowRun]:
    root = tmp_path_factory.mktemp("corpus-stow")
    raw = all_modalities_agreements().model_dump(mode="json")
    raw["agreements"][0]["hospital"]["stow"] = {"username": USER, "password_env": PASSWORD_ENV}
    agreements = parse_agreements(raw)
    url = f"sqlite:///{root / 'edge.db'}"
    upgrade(url, "edge")
    db = Database(url)
    sync_agreements(db, agreements)
    store = root / "store"
    app = build_stow_app(
        lambda: agreements,
        Ingestor(db, DurableStore(store)),
        EdgeMetrics(),
        environ={PASSWORD_ENV: PASSWORD},
    )
    port = free_port()
    server = StowServer(app, "127.0.0.1", port)
    server.start()
    status: dict[Path, int] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=(USER, PASSWORD)) as http:
            for path in CORPUS:
                body, ctype = encode_multipart([path.read_bytes()])
                r = http.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
                if r.status_code == 200:
                    status[path] = 0x0000
                else:
                    assert r.status_code == 409, f"{corpus_id(path)}: HTTP {r.status_code}"
                    failed = r.json()["00081198"]["Value"]
                    status[path] = int(failed[0]["00081197"]["Value"][0])
        with db.session() as s:
            rows = {r.sop_instance_uid for r in s.scalars(select(InstanceRow))}
    finally:
        server.stop()
        db.dispose()
    stored = {
        hashlib.sha256(f.read_bytes()).hexdigest(): f.relative_to(store).as_posix()
        for f in store.rglob("*.dcm")
        if ".staging" not in f.parts
    }
    yield StowRun(status, stored, rows)


@pytest.mark.parametrize("path", CORPUS, ids=[corpus_id(p) for p in CORPUS])
def test_corpus_instance_over_stow(run: StowRun, path: Path) -> None:
    expected = expected_status(path)
    if expected == 0xA900:  # needs a declared SOP class, which STOW-RS does not have
        expected = 0x0000
    assert run.status[path] == expected, f"expected 0x{expected:04X}, got 0x{run.status[path]:04X}"
    sent = hashlib.sha256(path.read_bytes()).hexdigest()
    if expected == 0x0000:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert sent in run.stored_sha  # the part, byte for byte
        assert run.stored_sha[sent].split("/")[-1].startswith(f"{uid}.")
        assert uid in run.rows
    else:
        assert sent not in run.stored_sha

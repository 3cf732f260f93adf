"""Orthanc as the hospital PACS: it C-STOREs to the edge SCP over a real loopback association.

The edge runs in-process as in test_scp.py (StorageSCP + Ingestor + DurableStore, default
agreements: calling AE ORTHANC allowed, modalities CR and DX) on a migrated SQLite database.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import UID, generate_uid
from sqlalchemy import select

from dicom_io.ingest import Ingestor
from dicom_io.scp import StorageSCP
from dicom_io.store import DurableStore
from radbridge.agreements import load_agreements
from radbridge.db import Database, upgrade
from radbridge.db.agreements import sync_agreements
from radbridge.db.tables import InstanceRow, StudyRow
from radbridge.metrics import EdgeMetrics
from tests.conftest import REPO, free_port, make_instance, write_instance
from tests.peers import OrthancError, OrthancPeer

pytestmark = pytest.mark.slow

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
AGREEMENTS = REPO / "radbridge/defaults/agreements.yaml"


def _dataset_bytes(raw: bytes) -> bytes:
    """The encoded dataset after the Part 10 preamble and file meta group."""
    assert raw[128:132] == b"DICM"
    group_length = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_length :]


@pytest.fixture
def edge_db(sqlite_url: str) -> Iterator[Database]:
    upgrade(sqlite_url, "edge")
    db = Database(sqlite_url)
    sync_agreements(db, load_agreements(AGREEMENTS))
    yield db
    db.dispose()


@pytest.fixture
def edge(edge_db: Database, tmp_path: Path) -> Iterator[tuple[int, Database, Path]]:
    agreements = load_agreements(AGREEMENTS)
    store_dir = tmp_path / "store"
    server = StorageSCP(
        "RADBRIDGE", lambda: agreements, Ingestor(edge_db, DurableStore(store_dir)), EdgeMetrics()
    )
    port = free_port()
    server.start("127.0.0.1", port)
    yield port, edge_db, store_dir
    server.stop()


@pytest.fixture
def pacs(edge: tuple[int, Database, Path], tmp_path: Path) -> Iterator[OrthancPeer]:
    port, _, _ = edge
    peer = OrthancPeer(
        modalities={"radbridge": ("RADBRIDGE", "127.0.0.1", port)}, workdir=tmp_path / "orthanc"
    )
    with peer:
        yield peer


def _study(folder: Path, count: int, *, modality: str = "DX") -> list[Path]:
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = make_instance(study, series, modality=modality, seed=i)
        ds.InstanceNumber = i + 1
        if modality == "MR":
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(MR_STORAGE)
        paths.append(write_instance(ds, folder / f"{modality}{i:03d}.dcm"))
    return paths


def _upload(pacs: OrthancPeer, paths: list[Path]) -> tuple[str, list[str]]:
    ids = [pacs.upload(p) for p in paths]
    studies = {pacs.study_of(i) for i in ids}
    assert len(studies) == 1
    return studies.pop(), ids


def test_echo_from_orthanc(pacs: OrthancPeer) -> None:
    pacs.echo("radbridge")


def test_dx_study_from_orthanc_is_indexed_and_byte_identical(
    edge: tuple[int, Database, Path], pacs: OrthancPeer, tmp_path: Path
) -> None:
    _, db, store = edge
    paths = _study(tmp_path / "in", 5)
    study_id, instance_ids = _upload(pacs, paths)
    answer = pacs.send_study_to("radbridge", study_id)
    assert answer["InstancesCount"] == 5, answer  # Orthanc counts what the edge took

    held = {}  # SOP Instance UID -> dataset bytes as Orthanc holds them
    for oid in instance_ids:
        sop_uid = pacs.instance_tags(oid)["SOPInstanceUID"]
        held[sop_uid] = _dataset_bytes(pacs.instance_file(oid))
    with db.session() as s:
        rows = s.scalars(select(InstanceRow)).all()
        study = s.scalars(select(StudyRow)).one()
        assert study.instance_count == 5 and study.modality == "DX"
        stored = {r.sop_instance_uid: (store / r.path) for r in rows}
    assert set(stored) == set(held)
    for sop_uid, path in stored.items():
        assert _dataset_bytes(path.read_bytes()) == held[sop_uid], sop_uid
    assert list((store / ".staging").iterdir()) == []


def test_ct_study_outside_the_agreement_fails_in_orthanc_and_nothing_is_indexed(
    edge: tuple[int, Database, Path], pacs: OrthancPeer, tmp_path: Path
) -> None:
    _, db, store = edge
    study_id, _ = _upload(pacs, _study(tmp_path / "ct", 2, modality="MR"))
    with pytest.raises(OrthancError) as failed:
        pacs.send_study_to("radbridge", study_id)
    assert "0x0124" in str(failed.value)  # the gateway's "refused: not authorized" status
    with db.session() as s:
        assert s.scalars(select(InstanceRow)).all() == []
        assert s.scalars(select(StudyRow)).all() == []
    assert [p for p in store.rglob("*.dcm")] == []

"""Each transfer syntax over a real association: stored as received, decodable from the store.

The SCU proposes exactly the file's transfer syntax and sends the file's encoded dataset
unchanged (pynetdicom's STORE_SEND_CHUNKED_DATASET: no decoding, no re-encoding), so "stored as
received" can be checked against the file itself, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from dicom_io.pixels import decode_frame
from radbridge.db.tables import InstanceRow
from tests.corpus import (
    Edge,
    SyntaxCase,
    c_store_files,
    dataset_bytes,
    network_cases,
    running_edge,
)


@pytest.fixture
def edge(sqlite_url: str, tmp_path: Path) -> Iterator[Edge]:
    with running_edge(sqlite_url, tmp_path / "store") as e:
        yield e


@pytest.mark.parametrize("case", network_cases(), ids=lambda c: c.id)
def test_stored_as_received_and_decodable(edge: Edge, case: SyntaxCase, tmp_path: Path) -> None:
    path = case.sample(tmp_path / "sample")
    sent = pydicom.dcmread(path, stop_before_pixels=True)
    assert sent.file_meta.TransferSyntaxUID == case.syntax

    assert c_store_files(edge.port, [path]) == {path: 0x0000}

    with edge.db.session() as s:
        (row,) = s.scalars(select(InstanceRow)).all()
    assert row.sop_instance_uid == sent.SOPInstanceUID
    assert row.transfer_syntax_uid == case.syntax
    stored = edge.store / row.path
    assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == (
        case.syntax
    )
    assert dataset_bytes(stored) == dataset_bytes(path)  # no transcoding

    out, modality = decode_frame(stored.read_bytes())
    expected, _ = decode_frame(path.read_bytes())
    assert out.shape == (sent.Rows, sent.Columns) and modality == sent.Modality
    np.testing.assert_array_equal(out, expected)

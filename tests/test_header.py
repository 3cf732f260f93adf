"""The index's header read two ways: from the raw values the structure walk keeps
(``header_from_walk``, the receive path's) and by pydicom (``parse_header``). Wherever the
walk's path gives a header it must be pydicom's; where it cannot be sure it says so (None)."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_io.header import header_from_walk, parse_header
from dicom_io.structure import check_structure
from radbridge.errors import DatasetError, RadbridgeError
from tests.conftest import make_instance
from tests.corpus import _candidate_files


def _raw(ds: Dataset, syntax: str | None = None) -> bytes:
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    buf = BytesIO()
    ds.save_as(
        buf,
        enforce_file_format=True,
        implicit_vr=syntax == ImplicitVRLittleEndian,
        little_endian=syntax != ExplicitVRBigEndian,
    )
    return buf.getvalue()


def _both(encoded: bytes, declared: str | None = None) -> tuple[object, object]:
    """(walk's header or its error, pydicom's header or its error)."""
    walked = check_structure(encoded)
    try:
        fast: object = header_from_walk(walked, declared)
    except DatasetError as exc:
        fast = ("error", exc.reason)
    try:
        slow: object = parse_header(encoded, declared)
    except DatasetError as exc:
        slow = ("error", exc.reason)
    return fast, slow


def test_the_walk_gives_pydicoms_header_over_the_corpus() -> None:
    fast_path = compared = 0
    for path in _candidate_files():
        encoded = path.read_bytes()
        try:
            check_structure(encoded)
        except RadbridgeError:
            continue  # refused before any header is read, on both paths
        compared += 1
        fast, slow = _both(encoded)
        if fast is None:
            continue
        fast_path += 1
        assert fast == slow, path.name
    assert compared > 150
    assert fast_path > 0.8 * compared  # the fast path is the common one


@pytest.mark.parametrize(
    "syntax", [None, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
@pytest.mark.parametrize(
    ("top", "nested", "count"),
    [
        ("STAT", None, "12"),
        (None, ["LOW", "HIGH"], " 7 "),
        ("ROUTINE", ["STAT"], "0"),
        ("whenever", None, "1.0"),
        (None, None, None),
    ],
)
def test_transfer_syntaxes_priorities_and_counts_agree(
    syntax: str | None, top: str | None, nested: list[str] | None, count: str | None
) -> None:
    ds = make_instance()
    ds.BodyPartExamined = "CHEST"
    ds.PatientIdentityRemoved = "NO"
    if top is not None:
        ds.RequestedProcedurePriority = top
    if nested is not None:
        items = []
        for value in nested:
            item = Dataset()
            item.RequestedProcedurePriority = value
            inner = Dataset()
            inner.RequestedProcedurePriority = "STAT"  # deeper: not the request's own
            item.ReferencedStudySequence = [inner]
            items.append(item)
        ds.RequestAttributesSequence = items
    if count is not None:
        ds.NumberOfStudyRelatedInstances = count
    fast, slow = _both(_raw(ds, syntax))
    assert fast is not None and fast == slow


def test_only_pydicom_can_say_then_the_walk_declines() -> None:
    several = make_instance()
    several.Modality = ["CT", "PT"]
    assert header_from_walk(check_structure(_raw(several))) is None
    named = make_instance()
    named.SpecificCharacterSet = "ISO_IR 192"
    named.PatientID = "王小东-7788"
    assert header_from_walk(check_structure(_raw(named))) is None
    assert parse_header(_raw(named)).patient_id == "王小东-7788"


def test_missing_or_mismatched_uids_give_the_same_reasons() -> None:
    ds = make_instance()
    del ds.SeriesInstanceUID
    assert _both(_raw(ds)) == (("error", "missing_uid"),) * 2
    bad = make_instance()
    bad.StudyInstanceUID = "1.2.03"
    assert _both(_raw(bad)) == (("error", "invalid_uid"),) * 2
    ok = make_instance()
    assert _both(_raw(ok), declared="1.2.3") == (("error", "sop_class_mismatch"),) * 2
    assert pydicom.dcmread(BytesIO(_raw(ok))).SOPInstanceUID == ok.SOPInstanceUID

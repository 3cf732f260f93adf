"""dicom_io.part10 writes exactly the bytes pydicom's writer would, for every de-identified
instance of the corpus (pydicom's and pydicom-data's test files: every transfer syntax,
character sets, sequences, encapsulated pixel data), and reads back as the same dataset."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from dicom_io.deid import BurnedInAnnotationError, deidentify
from dicom_io.part10 import to_part10
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption
from radbridge.errors import DeidentificationError
from tests.conftest import make_instance
from tests.corpus import corpus_id, storage_instances

INSTANCES = storage_instances()
ALL_BUT_UIDS = tuple(o for o in DeidOption if o is not DeidOption.RETAIN_UIDS)


def _pydicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _deidentified(path: Path, options: tuple[DeidOption, ...]) -> pydicom.Dataset | None:
    """The de-identified instance; ``None`` for one the gateway keeps (never written)."""
    ds = pydicom.dcmread(path)
    try:
        return deidentify(ds, Pseudonymizer(b"part10-test-key"), options, burned_in="mask").dataset
    except (BurnedInAnnotationError, DeidentificationError):
        return None


CASES = [
    pytest.param(path, options, id=f"{corpus_id(path)}-{name}")
    for path in INSTANCES
    for name, options in (("basic", ()), ("all-options", ALL_BUT_UIDS))
    if _deidentified(path, options) is not None
]


def test_most_of_the_corpus_is_written() -> None:
    assert len(CASES) > len(INSTANCES)  # of 2 cases per instance, the quarantined are left out


@pytest.mark.parametrize(("path", "options"), CASES)
def test_same_bytes_as_pydicom(path: Path, options: tuple[DeidOption, ...]) -> None:
    out = _deidentified(path, options)
    assert out is not None
    written = to_part10(out)
    assert written == _pydicom_bytes(out)
    back = pydicom.dcmread(BytesIO(written))
    assert back.SOPInstanceUID == out.SOPInstanceUID
    if back.file_meta.TransferSyntaxUID.is_encapsulated and "PixelData" in back:
        assert back["PixelData"].is_undefined_length  # PS3.5 A.4: encapsulated, undefined


def test_corpus_covers_the_encodings() -> None:
    syntaxes = {
        pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in INSTANCES
    }
    assert pydicom.uid.ImplicitVRLittleEndian in syntaxes
    assert pydicom.uid.ExplicitVRLittleEndian in syntaxes
    assert pydicom.uid.ExplicitVRBigEndian in syntaxes  # written by pydicom's dcmwrite
    assert any(s.is_compressed for s in syntaxes)  # encapsulated pixel data, undefined length


def test_reads_back_equal_with_sequences_and_chinese_text() -> None:
    ds = make_instance()
    ds.SpecificCharacterSet = "GB18030"
    ds.StudyDescription = "胸部 CT 平扫"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    src = pydicom.dcmread(BytesIO(buf.getvalue()))
    out = deidentify(src, Pseudonymizer(b"k"), (DeidOption.CLEAN_DESCRIPTORS,)).dataset
    written = to_part10(out)
    assert written == _pydicom_bytes(out)
    back = pydicom.dcmread(BytesIO(written))
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert back.StudyDescription == "胸部 CT 平扫"
    assert back.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID

from io import BytesIO

import pydicom
import pytest

from dicom_io.deid import DEID_METHOD, deidentify
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption
from radbridge.errors import DeidentificationError
from tests.conftest import identity_needles, make_instance


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_no_identity_in_any_byte_of_the_output() -> None:
    ds = make_instance()
    needles = identity_needles(ds)
    out = deidentify(ds, Pseudonymizer(b"k" * 32)).dataset
    raw = _encode(out)
    for needle in [*needles, b"Ivanov", b"First People", b"ACME PACS", b"20261120"]:
        assert needle not in raw, needle
    back = pydicom.dcmread(BytesIO(raw))
    assert back.PatientIdentityRemoved == "YES"
    assert back.DeidentificationMethod == DEID_METHOD
    assert back.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert back.PatientBirthDate == "" and back.StudyDate == ""
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert not any(e.tag.is_private for e in back)
    assert back.PixelData == ds.PixelData and back.SOPClassUID == ds.SOPClassUID


def test_uids_are_keyed_consistent_and_references_follow() -> None:
    a = make_instance()
    b = make_instance(study_uid=a.StudyInstanceUID, series_uid=a.SeriesInstanceUID, seed=1)
    p = Pseudonymizer(b"k" * 32)
    oa, ob = deidentify(a, p).dataset, deidentify(b, p).dataset
    assert oa.StudyInstanceUID == ob.StudyInstanceUID != a.StudyInstanceUID
    assert oa.SOPInstanceUID != ob.SOPInstanceUID
    assert oa.StudyInstanceUID.startswith("2.25.") and len(oa.StudyInstanceUID) <= 64
    assert oa.file_meta.MediaStorageSOPInstanceUID == oa.SOPInstanceUID
    ref = oa.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert ref == p.uid(str(a.SourceImageSequence[0].ReferencedSOPInstanceUID))
    assert oa.PatientID == ob.PatientID == oa.PatientName
    other_key = deidentify(make_instance(study_uid=a.StudyInstanceUID), Pseudonymizer(b"j" * 32))
    assert other_key.dataset.StudyInstanceUID != oa.StudyInstanceUID
    assert p.issued[("uid", str(a.StudyInstanceUID))] == oa.StudyInstanceUID


def test_retain_patient_characteristics_option() -> None:
    ds = make_instance()
    plain = deidentify(ds, Pseudonymizer(b"k" * 32)).dataset
    kept = deidentify(ds, Pseudonymizer(b"k" * 32), [DeidOption.RETAIN_PATIENT_CHARACTERISTICS])
    assert plain.PatientSex == "" and kept.dataset.PatientSex == "M"
    codes = [i.CodeValue for i in kept.dataset.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113108"]


def test_burned_in_annotation_is_refused() -> None:
    ds = make_instance()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentificationError, match="BurnedInAnnotation"):
        deidentify(ds, Pseudonymizer(b"k" * 32))


def test_leak_guard_catches_identity_in_a_kept_attribute() -> None:
    ds = make_instance()
    ds.BodyPartExamined = "PID-7788123"  # identity smuggled into an allowlisted CS attribute
    with pytest.raises(DeidentificationError, match="BodyPartExamined"):
        deidentify(ds, Pseudonymizer(b"k" * 32))

from io import BytesIO

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_io.deid import deidentify
from dicom_io.deid.values import date_offset_days, shift_dates
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption
from radbridge.errors import DeidentificationError
from tests.conftest import make_instance

KEY = b"k" * 32


def _roundtrip(ds: Dataset) -> tuple[bytes, Dataset]:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    return raw, pydicom.dcmread(BytesIO(raw))


def _codes(ds: Dataset) -> list[str]:
    return [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]


def test_each_action_code_in_the_output() -> None:
    ds = make_instance()
    ds.OperatorsName = "Sidorov^Ivan"
    ds.PatientAddress = "Beijing, Xicheng"
    ds.ScheduledProcedureStepStartDate = "20261119"
    out = deidentify(ds, Pseudonymizer(KEY)).dataset
    assert out.InstitutionName == "REMOVED"  # X/Z/D -> D, dummy of the VR
    assert out.PatientSex == "" and out.ReferringPhysicianName == ""  # Z
    assert str(out.OperatorsName) == "REMOVED"  # X/Z/D -> D on a PN
    assert "StudyDescription" not in out and "PatientAddress" not in out  # X
    assert "ScheduledProcedureStepStartDate" not in out
    assert out.StudyInstanceUID == Pseudonymizer(KEY).uid(str(ds.StudyInstanceUID))  # U
    assert out.BodyPartExamined == "CHEST"  # unlisted, allowlisted: kept
    assert _codes(out) == ["113100"]
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


def test_retain_and_clean_options() -> None:
    ds = make_instance()
    ds.PatientAge = "061Y"
    ds.DeviceSerialNumber = "SN-4411"
    opts = [o for o in DeidOption if o is not DeidOption.RETAIN_UIDS]  # UIDs: test_deid_options
    out = deidentify(ds, Pseudonymizer(KEY), opts).dataset
    assert out.PatientSex == "M" and out.PatientAge == "061Y"  # K (characteristics)
    assert out.DeviceSerialNumber == "SN-4411"  # K (device identity)
    assert out.InstitutionName == "First People's Hospital"  # K (institution identity)
    assert out.StudyDescription == "CHEST PA for"  # C (clean descriptors)
    assert out.StudyDate != ds.StudyDate and len(out.StudyDate) == 8  # C (modified dates)
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert _codes(out) == [
        *("113100", "113107", "113108", "113109", "113112", "113105"),
        *("113111", "113104", "113103"),  # safe private, structured content, graphics
    ]
    raw, _ = _roundtrip(out)
    for needle in ("XiaoDong", "王", "小东", "PID-7788123", "20261120", "19650412"):
        assert needle.encode() not in raw, needle


def test_uncleanable_descriptor_falls_back_to_the_basic_action() -> None:
    ds = make_instance()
    ds.SeriesDescription = "Seen by Anna Smirnova"
    out = deidentify(ds, Pseudonymizer(KEY), [DeidOption.CLEAN_DESCRIPTORS]).dataset
    assert "SeriesDescription" not in out


def test_nested_unknown_sequences_are_walked() -> None:
    ds = make_instance()
    inner = Dataset()
    inner.PatientName = "Wang^XiaoDong"
    inner.ContentCreatorName = "Petrova^Anna"
    inner.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7.8"
    inner.ContentDate = "20261120"
    inner.TextValue = "Petrova Anna, tel 13800138000"
    inner.AcquisitionDate = "20261120"
    middle = Dataset()
    middle.ViewModifierCodeSequence = [inner]  # unlisted sequence
    middle.CodeValue = "R-10206"
    ds.ViewCodeSequence = [middle]  # unlisted sequence
    p = Pseudonymizer(KEY)
    out = deidentify(ds, p).dataset
    deep = out.ViewCodeSequence[0].ViewModifierCodeSequence[0]
    assert out.ViewCodeSequence[0].CodeValue == "R-10206"
    assert deep.ReferencedSOPInstanceUID == p.uid("1.2.3.4.5.6.7.8")
    assert str(deep.PatientName) == "" and str(deep.ContentCreatorName) == "REMOVED"
    assert "TextValue" not in deep and deep.AcquisitionDate == ""  # X, X/Z -> Z
    raw, _ = _roundtrip(out)
    assert b"Petrova" not in raw and b"1.2.3.4.5.6.7.8" not in raw


def test_removed_groups_and_sequences() -> None:
    ds = make_instance()
    ds.add_new(0x60000010, "US", 64)
    ds.add_new(0x60003000, "OW", b"\x00" * 8)
    ds.add_new(0x50000005, "US", 2)
    orig = Dataset()
    orig.PatientID = "PID-7788123"
    ds.OriginalAttributesSequence = [Dataset()]
    ds.OriginalAttributesSequence[0].ModifiedAttributesSequence = [orig]
    ds.IconImageSequence = [Dataset()]
    block = ds.private_block(0x7FE1, "ACME AFTER PIXELS", create=True)
    block.add_new(0x01, "LO", "PID-7788123")
    out = deidentify(ds, Pseudonymizer(KEY)).dataset
    assert not any(0x5000 <= e.tag.group <= 0x60FF for e in out)
    assert "OriginalAttributesSequence" not in out and "IconImageSequence" not in out
    assert not any(e.tag.is_private for e in out.iterall())
    assert out.PixelData == ds.PixelData


def test_date_offset_is_keyed_consistent_and_keeps_order() -> None:
    p, q = Pseudonymizer(KEY), Pseudonymizer(b"j" * 32)
    offsets = {date_offset_days(Pseudonymizer(k * 32), "PID-1") for k in (b"a", b"b", b"c")}
    assert len(offsets) > 1  # the offset depends on the key
    assert date_offset_days(p, "PID-1") == date_offset_days(p, "PID-1")
    assert date_offset_days(p, "PID-1") != date_offset_days(q, "PID-1")
    assert -3650 <= date_offset_days(p, "PID-1") <= -1
    days = date_offset_days(p, "PID-1")
    early, late = shift_dates("DA", "20200101", days), shift_dates("DA", "20210101", days)
    assert early < late < "20210101"
    assert shift_dates("DT", "20200101101010-0500", days).endswith("101010-0500")
    assert shift_dates("DA", "20200101-20200105", days).count("-") == 1


def test_two_studies_of_one_patient_shift_alike() -> None:
    opts = [DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES]
    a, b = make_instance(), make_instance(seed=1)
    b.StudyDate = "20261125"
    p = Pseudonymizer(KEY)
    oa, ob = deidentify(a, p, opts).dataset, deidentify(b, p, opts).dataset
    assert oa.StudyDate < ob.StudyDate
    assert oa.StudyTime == a.StudyTime  # times are kept, dates shifted by whole days


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
@pytest.mark.parametrize("opts", [(), tuple(o for o in DeidOption if o != "retain_uids")])
def test_pydicom_test_files(name: str, opts: tuple[DeidOption, ...]) -> None:
    ds = pydicom.dcmread(str(get_testdata_file(name)))
    uids = [str(e.value) for e in ds.iterall() if e.VR == "UI" and e.value]
    uids = [u for u in uids if UID(u).name == u]
    out = deidentify(ds, Pseudonymizer(KEY), opts).dataset
    raw, back = _roundtrip(out)
    assert back.PatientIdentityRemoved == "YES"
    for needle in [str(ds.PatientName), str(ds.PatientID), *uids]:
        assert needle.encode() not in raw, needle
    assert back.PixelData == ds.PixelData


def test_burned_in_annotation_still_refused_with_options() -> None:
    ds = make_instance()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentificationError, match="BurnedInAnnotation"):
        deidentify(ds, Pseudonymizer(KEY, retain_uids=True), list(DeidOption))
    with pytest.raises(DeidentificationError, match="BurnedInAnnotation"):
        deidentify(ds, Pseudonymizer(KEY), [], burned_in="mask")  # a DX cannot be masked


@pytest.mark.parametrize(
    ("charset", "name", "desc", "kept"),
    [
        ("GB18030", "Wang^XiaoDong=王^小东", "胸部 王小东", "胸部"),
        ("ISO_IR 144", "Ivanov^Ivan=Иванов^Иван", "ОГК Иванов", "ОГК"),
    ],
)
def test_legacy_charsets_are_cleaned_and_written_as_utf8(
    charset: str, name: str, desc: str, kept: str
) -> None:
    ds = make_instance(patient={"name": name, "id": "P1", "birth": "19650412"})
    ds.SpecificCharacterSet = charset
    ds.StudyDescription = desc
    _, src = _roundtrip(ds)
    out = deidentify(src, Pseudonymizer(KEY), [DeidOption.CLEAN_DESCRIPTORS]).dataset
    raw, back = _roundtrip(out)
    assert back.SpecificCharacterSet == "ISO_IR 192" and back.StudyDescription == kept
    for part in name.replace("=", "^").split("^"):
        assert part.encode("utf-8") not in raw

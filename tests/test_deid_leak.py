"""The leak guard: precise (a short value does not trip on unrelated text or numbers) and never
blind to a real leak (whole tokens, case-insensitive, glued, nested, numeric)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_io.deid import deidentify
from dicom_io.deid.leak import compile_needles, find_leak, identifying_values
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption
from radbridge.errors import DeidentificationError
from tests.conftest import make_instance

KEY = b"k" * 32


def _hit(needles: list[str], **values: object) -> str | None:
    ds = Dataset()
    for k, v in values.items():
        setattr(ds, k, v)
    elem = find_leak(ds, compile_needles(needles))
    return None if elem is None else elem.keyword


# -- false positives that must not trip ------------------------------------------------------


def test_short_identifying_values_do_not_trip_on_unrelated_text_and_numbers() -> None:
    """PatientID "12", sex "M", a 2-letter name part: the old substring guard refused all."""
    ds = make_instance(patient={"name": "Li^Annabel=李^安娜", "id": "12", "birth": "19650412"})
    ds.Rows = ds.Columns = 512  # "12" inside 512
    ds.PixelData = b"\x00\x00" * 512 * 512
    ds.InstanceNumber, ds.SeriesNumber = 12, 112
    ds.BodyPartExamined = "T12 SPINE"  # a kept code with "12" as a whole token
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LINEAR"]  # "Li" inside LINEAR
    ds.StudyDescription = "LI-RADS Annabelle protocol"  # cleaned text, "Li" as a token
    opts = [DeidOption.RETAIN_PATIENT_CHARACTERISTICS, DeidOption.CLEAN_DESCRIPTORS]
    out = deidentify(ds, Pseudonymizer(KEY), opts).dataset  # must not raise
    assert out.PatientSex == "M" and out.BodyPartExamined == "T12 SPINE" and out.Rows == 512


@pytest.mark.parametrize(
    ("needles", "values"),
    [
        (["Ann"], {"ImageComments": "Annotated by CAD"}),  # 3-5 chars: whole tokens only
        (["Ann"], {"InstanceNumber": 4}),
        (["123"], {"SliceLocation": "123.0", "Rows": 123}),  # short numbers: never in numbers
        (["7788123"], {"SliceLocation": "-97788123.5"}),  # long: a number containing it is not it
        (["12", "M", "王"], {"ImageComments": "M 12 王府井"}),  # too short: ignored
        (["1.2.826.0.1.3680043.8.498.1"], {"SOPInstanceUID": "1.2.826.0.1.3680043.8.498.12"}),
    ],
)
def test_matching_rule_does_not_trip(needles: list[str], values: dict[str, object]) -> None:
    assert _hit(needles, **values) is None


# -- real leaks that must trip ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("needles", "values", "where"),
    [
        (["Ann"], {"ImageComments": "seen by ANN today"}, "ImageComments"),
        (["PID-7788123"], {"ImageComments": "refXPID-7788123Y"}, "ImageComments"),  # glued
        (["XiaoDong"], {"BodyPartExamined": "XIAODONG"}, "BodyPartExamined"),  # upper-cased
        (["Wang^XiaoDong"], {"ImageComments": "wang  xiaodong"}, "ImageComments"),  # folded
        (["小东"], {"ImageComments": "胸片王小东复查"}, "ImageComments"),  # CJK has no word breaks
        (["7788123"], {"SeriesNumber": 7788123}, "SeriesNumber"),  # an ID as a whole number
        (["19650412"], {"ContentDate": "19650412"}, "ContentDate"),
        (
            ["1.2.826.0.1.3680043.8.498.1"],
            {"SOPInstanceUID": "1.2.826.0.1.3680043.8.498.1"},
            "SOPInstanceUID",
        ),
        (
            ["1.2.826.0.1.3680043.8.498.1"],
            {"ImageComments": "uid 1.2.826.0.1.3680043.8.498.1"},
            "ImageComments",
        ),
    ],
)
def test_matching_rule_trips(needles: list[str], values: dict[str, object], where: str) -> None:
    assert _hit(needles, **values) == where


def test_a_leak_deep_in_a_nested_sequence_trips() -> None:
    inner = Dataset()
    inner.CodeMeaning = "patient xiaodong"
    outer = Dataset()
    outer.ConceptNameCodeSequence = [inner]
    ds = Dataset()
    ds.ContentSequence = [outer]
    assert find_leak(ds, compile_needles(["XiaoDong"])) is not None


def test_a_planted_leak_through_the_engine_raises_naming_the_element_only() -> None:
    ds = make_instance()
    ds.BodyPartExamined = "XIAODONG"  # a kept code; the old case-sensitive guard missed this
    with pytest.raises(DeidentificationError, match="BodyPartExamined") as err:
        deidentify(ds, Pseudonymizer(KEY))
    assert "XIAODONG" not in str(err.value).upper().replace("BODYPARTEXAMINED", "")
    ds = make_instance(patient={"name": "Li^Na", "id": "7788123", "birth": "19650412"})
    ds.SeriesNumber = 7788123  # the patient ID copied into a kept number
    with pytest.raises(DeidentificationError, match="SeriesNumber"):
        deidentify(ds, Pseudonymizer(KEY))


def test_needles_are_taken_from_every_identifying_value() -> None:
    ds = make_instance()
    ds.OtherPatientIDs = ["OTHER-5544332", "OTHER-6655443"]
    needles = identifying_values(ds).values
    assert {"PID-7788123", "ACC99812", "19650412", "1965-04-12", "12.04.1965"} <= needles
    assert {"Wang XiaoDong", "Wang", "XiaoDong", "王 小东", "小东"} <= needles
    assert {"OTHER-5544332", "OTHER-6655443"} <= needles  # each value, not the list's repr
    assert str(ds.StudyInstanceUID) in needles
    assert "王" not in needles  # one ideograph: too short to tell from other text
    assert str(ds.StudyInstanceUID) not in identifying_values(ds, retain_uids=True).values


@pytest.mark.parametrize(
    "planted",
    [
        b"desc\x00\x00\x00\x0eWang^XiaoDong\x00",  # a name in an ICC profile's description
        "患者 王^小东".encode(),  # UTF-8 ideographs
        b"\x01\x02PID-7788123\xff\xfe",  # the patient ID between binary bytes
    ],
)
def test_a_name_in_an_unlisted_binary_element_never_crosses(planted: bytes) -> None:
    ds = make_instance()
    ds.ICCProfile = b"\x00\x00\x02\x0cacsp" + bytes(range(256)) + planted + b"\x00" * 64
    with pytest.raises(DeidentificationError, match="ICCProfile"):
        deidentify(ds, Pseudonymizer(KEY))


def test_binary_elements_without_identity_and_pixel_data_do_not_trip() -> None:
    rng = np.random.default_rng(7)
    ds = make_instance()
    ds.ICCProfile = b"\x00\x00\x02\x0cacsp" + rng.bytes(64 << 10)  # noise: no false alarm
    out = deidentify(ds, Pseudonymizer(KEY)).dataset
    assert out.ICCProfile == ds.ICCProfile
    ds = make_instance()
    ds.PixelData = b"PID-7788123 " * 512  # text in pixels is deid_burned_in's job, not this one
    deidentify(ds, Pseudonymizer(KEY))

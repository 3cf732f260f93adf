"""Burned-in annotation: quarantine by default; with 'mask', ultrasound outside its regions."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_io.deid import BurnedInAnnotationError, deidentify
from dicom_io.deid.burned_in import (
    FLAGGED,
    SECONDARY_CAPTURE,
    ULTRASOUND,
    burned_in_risk,
)
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import Deidentification
from radbridge.errors import DeidentificationError
from tests.conftest import PATIENT, make_instance

KEY = b"k" * 32


def _testfile(name: str) -> str:
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return path


US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
REGION = (10, 20, 49, 59)  # x0, y0, x1, y1 (inclusive)


def make_us(
    *,
    photometric: str = "RGB",
    frames: int = 1,
    planar: int = 0,
    regions: tuple[tuple[int, int, int, int], ...] = (REGION,),
    rows: int = 80,
    columns: int = 64,
) -> Dataset:
    """A small valid US Image (or US Multi-frame) instance with identity burned into row 0..9."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    multi = frames > 1
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1" if multi else US_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = PATIENT["name"], PATIENT["id"]
    ds.PatientBirthDate, ds.PatientSex = PATIENT["birth"], "F"
    ds.StudyDate, ds.StudyTime = "20261120", "101010"
    ds.ContentDate, ds.ContentTime = "20261120", "101011"
    ds.AccessionNumber, ds.StudyID = "ACC99812", "S1"
    ds.ReferringPhysicianName = "Ivanov^Petr"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "US", 1, 1
    ds.Laterality = ""
    ds.PatientOrientation = ""
    ds.Manufacturer = "ACME"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL"]
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "YES"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = photometric
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    ds.SamplesPerPixel = samples
    if samples == 3:
        ds.PlanarConfiguration = planar
    if multi:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063
        ds.FrameTime = 33.3
    items = []
    for x0, y0, x1, y1 in regions:
        r = Dataset()
        r.RegionSpatialFormat, r.RegionDataType, r.RegionFlags = 1, 1, 0
        r.RegionLocationMinX0, r.RegionLocationMinY0 = x0, y0
        r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x1, y1
        r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = 3
        r.PhysicalDeltaX = r.PhysicalDeltaY = 0.01
        items.append(r)
    if items:
        ds.SequenceOfUltrasoundRegions = items
    ds.PixelData = _pixels(frames, rows, columns, samples, planar).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        ds.SOPClassUID,
        ds.SOPInstanceUID,
    )
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def _pixels(frames: int, rows: int, columns: int, samples: int, planar: int) -> np.ndarray:
    """Bright everywhere (so a mask shows), stored in the layout the header describes."""
    rng = np.random.default_rng(7)
    arr = rng.integers(100, 256, (frames, rows, columns, samples), dtype=np.uint8)
    if samples == 3 and planar == 1:
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    return arr


def _frames(ds: Dataset) -> np.ndarray:
    """(frames, rows, columns, samples) from native PixelData, whatever the planar layout."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.SamplesPerPixel)
    arr = np.frombuffer(ds.PixelData, dtype=np.uint8)
    if samples == 3 and int(ds.get("PlanarConfiguration", 0)) == 1:
        return arr.reshape(frames, samples, ds.Rows, ds.Columns).transpose(0, 2, 3, 1)
    return arr.reshape(frames, ds.Rows, ds.Columns, samples)


def _reread(ds: Dataset) -> Dataset:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(BytesIO(buf.getvalue()))


def _codes(ds: Dataset) -> list[str]:
    return [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]


# -- which instances are at risk ----------------------------------------------------------


def test_risk_by_flag_modality_and_sop_class() -> None:
    dx = make_instance()
    assert burned_in_risk(dx) is None
    dx.BurnedInAnnotation = "YES"
    assert burned_in_risk(dx) == FLAGGED
    assert burned_in_risk(make_us()) == ULTRASOUND
    no_modality = make_us()
    del no_modality.Modality
    assert burned_in_risk(no_modality) == ULTRASOUND  # the SOP class alone says ultrasound
    flagged_no = make_us()
    flagged_no.BurnedInAnnotation = "NO"  # often wrong on ultrasound: still at risk
    assert burned_in_risk(flagged_no) == ULTRASOUND
    sc = make_instance(modality="OT")
    sc.SOPClassUID = SC_IMAGE
    assert burned_in_risk(sc) == SECONDARY_CAPTURE
    for multi_frame_sc in ("1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.4"):
        sc.SOPClassUID = multi_frame_sc
        assert burned_in_risk(sc) == SECONDARY_CAPTURE
    dose_screen = make_instance(modality="SC")  # a CT dose screen sent as modality SC
    assert burned_in_risk(dose_screen) == SECONDARY_CAPTURE
    vl = make_instance(modality="ES")
    vl.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.1"  # starts like .7 but is VL Endoscopic
    assert burned_in_risk(vl) is None
    no_pixels = make_us()
    del no_pixels.PixelData
    assert burned_in_risk(no_pixels) is None


# -- quarantine (the default) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (make_us, ULTRASOUND),
        (lambda: _with(make_instance(modality="OT"), SOPClassUID=SC_IMAGE), SECONDARY_CAPTURE),
        (lambda: _with(make_instance(), BurnedInAnnotation="YES"), FLAGGED),
    ],
)
def test_quarantine_is_the_default_and_issues_nothing(build, reason: str) -> None:  # type: ignore[no-untyped-def]
    pseudo = Pseudonymizer(KEY)
    with pytest.raises(BurnedInAnnotationError) as err:
        deidentify(build(), pseudo)
    assert err.value.reason == reason
    assert isinstance(err.value, DeidentificationError)
    assert "quarantine" in str(err.value)
    for secret in (PATIENT["id"], "XiaoDong", PATIENT["birth"]):
        assert secret not in str(err.value)
    assert pseudo.issued == {}  # nothing was pseudonymised for an instance that stays


def _with(ds: Dataset, **values: object) -> Dataset:
    for k, v in values.items():
        setattr(ds, k, v)
    return ds


def test_agreement_setting_defaults_to_quarantine() -> None:
    d = Deidentification()  # type: ignore[call-arg]
    assert d.burned_in == "quarantine" and d.burned_in_top_band_rows == 0
    assert Deidentification(burned_in="mask", burned_in_top_band_rows=40).burned_in == "mask"  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        Deidentification(burned_in="ignore")  # type: ignore[arg-type,call-arg]


# -- mask ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("photometric", "frames", "planar", "black"),
    [
        ("RGB", 1, 0, (0, 0, 0)),
        ("RGB", 3, 1, (0, 0, 0)),
        ("YBR_FULL", 1, 0, (0, 128, 128)),
        ("MONOCHROME2", 2, 0, (0,)),
    ],
)
def test_mask_blacks_out_everything_outside_the_regions(
    photometric: str, frames: int, planar: int, black: tuple[int, ...]
) -> None:
    src = make_us(photometric=photometric, frames=frames, planar=planar)
    out = _reread(deidentify(src, Pseudonymizer(KEY), burned_in="mask").dataset)
    before, after = _frames(src), _frames(out)
    x0, y0, x1, y1 = REGION
    inside = np.zeros((src.Rows, src.Columns), dtype=bool)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    assert np.array_equal(after[:, inside], before[:, inside])  # the image itself is untouched
    assert (after[:, ~inside] == np.array(black, dtype=np.uint8)).all()  # the rest is black
    assert out.BurnedInAnnotation == "NO"
    assert _codes(out) == ["113100", "113101"]  # Clean Pixel Data declared
    assert out.SequenceOfUltrasoundRegions[0].RegionLocationMaxX1 == x1


def test_mask_uses_the_union_of_all_regions() -> None:
    second = (0, 70, 9, 79)
    src = make_us(regions=(REGION, second))
    after = _frames(deidentify(src, Pseudonymizer(KEY), burned_in="mask").dataset)
    assert (after[0, 70:80, 0:10] == _frames(src)[0, 70:80, 0:10]).all()
    assert (after[0, 0:10, :] == 0).all()


def test_mask_without_regions_uses_the_configured_top_band() -> None:
    src = make_us(regions=())
    with pytest.raises(BurnedInAnnotationError, match="no ultrasound regions"):
        deidentify(src, Pseudonymizer(KEY), burned_in="mask")  # no band configured
    out = deidentify(src, Pseudonymizer(KEY), burned_in="mask", top_band_rows=12).dataset
    after, before = _frames(out), _frames(src)
    assert (after[:, :12] == 0).all() and np.array_equal(after[:, 12:], before[:, 12:])
    assert out.BurnedInAnnotation == "NO"


def test_mask_a_real_ultrasound_file_with_a_top_band() -> None:
    src = pydicom.dcmread(_testfile("US1_UNCR.dcm"))
    out = _reread(deidentify(src, Pseudonymizer(KEY), burned_in="mask", top_band_rows=40).dataset)
    assert (out.pixel_array[:40] == 0).all()
    assert np.array_equal(out.pixel_array[40:], src.pixel_array[40:])
    assert out.BurnedInAnnotation == "NO"


def test_mask_a_palette_colour_ultrasound_with_its_black_entry() -> None:
    src = pydicom.dcmread(_testfile("gdcm-US-ALOKA-16.dcm"))
    out = _reread(deidentify(src, Pseudonymizer(KEY), burned_in="mask").dataset)
    keep = np.zeros((src.Rows, src.Columns), dtype=bool)
    for r in src.SequenceOfUltrasoundRegions:
        keep[
            r.RegionLocationMinY0 : r.RegionLocationMaxY1 + 1,
            r.RegionLocationMinX0 : r.RegionLocationMaxX1 + 1,
        ] = True
    rgb = apply_color_lut(out.pixel_array, out)
    assert (rgb[~keep] == 0).all()  # shown black through the palette
    assert np.array_equal(out.pixel_array[keep], src.pixel_array[keep])


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (lambda: pydicom.dcmread(_testfile("US1_J2KR.dcm")), "not native"),
        (lambda: _with(make_instance(modality="OT"), SOPClassUID=SC_IMAGE), "only ultrasound"),
        (lambda: _with(make_instance(), BurnedInAnnotation="YES"), "only ultrasound"),
        (lambda: make_us(photometric="YBR_FULL_422"), "YBR_FULL_422"),
        (lambda: _with(make_us(), PixelRepresentation=1), "unsigned"),
        (lambda: _with(make_us(), PixelData=b"\x00" * 10), "shorter"),
        (lambda: make_us(regions=((70, 90, 80, 99),)), "no ultrasound regions"),  # off-image
    ],
)
def test_what_cannot_be_masked_safely_is_quarantined(build, why: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BurnedInAnnotationError, match=why):
        deidentify(build(), Pseudonymizer(KEY), burned_in="mask", top_band_rows=0)

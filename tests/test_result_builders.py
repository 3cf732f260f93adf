"""AIR result objects: classification SR, nodule SEG + SR.

Every object is written to bytes, read back with highdicom and compared with what went in, and
checked with the dicom3tools validator ``dciodvfy`` (no "Error" lines; warnings allowed).
"""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_io.result_builders import (
    AlgorithmInfo,
    ImageFinding,
    Nodule,
    classification_sr,
    nodule_seg_and_sr,
)
from dicom_io.sr_parts import Coded
from tests.conftest import make_instance
from tests.dciodvfy import dciodvfy, part10

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
INTENDED_USE = "demo model — not for diagnostic use"
PNEUMONIA = Coded("233604007", "SCT", "Pneumonia")
PNEUMOTHORAX = Coded("36118008", "SCT", "Pneumothorax")
PRESENT = ("52101004", "SCT")
ABSENT = ("272519000", "SCT")
TEXT = hd.sr.ValueTypeValues.TEXT


def _algo(sha: str = "ab" * 32, version: str = "0.3.1", name: str = "cxr-demo") -> AlgorithmInfo:
    return AlgorithmInfo(name, version, "radbridge", sha, INTENDED_USE)


def _dx_study() -> list[Dataset]:
    first = make_instance()
    return [first] + [
        make_instance(first.StudyInstanceUID, first.SeriesInstanceUID, seed=i) for i in (1, 2)
    ]


def _findings(sources: list[Dataset]) -> list[ImageFinding]:
    return [
        ImageFinding(
            str(sources[0].SOPInstanceUID),
            PNEUMONIA,
            probability=0.873,
            threshold=0.5,
            present=True,
            display={"en": "Pneumonia", "ru": "Пневмония", "zh": "肺炎"},
        ),
        ImageFinding(
            str(sources[1].SOPInstanceUID),
            PNEUMOTHORAX,
            probability=0.125,
            threshold=0.4,
            present=False,
            display={"en": "Pneumothorax", "ru": "Пневмоторакс", "zh": "气胸"},
        ),
    ]


def _ct_series(slices: int = 8, size: int = 32) -> list[Dataset]:
    """A small CT Image Storage series: axial slices 2.5 mm apart, one frame of reference."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(slices):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = CT_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.PatientName, ds.PatientID = "RB4F7Q2", "RB4F7Q2"  # a pseudonym: one component
        ds.PatientBirthDate, ds.PatientSex = "", "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20261120", "101010", "S1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A7Q", ""
        ds.Modality, ds.BodyPartExamined = "CT", "CHEST"
        ds.SeriesNumber, ds.InstanceNumber = 3, i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-11.2, -11.2, -120.0 + 2.5 * i]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.full((size, size), 24, np.uint16).tobytes()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.UID(CT_STORAGE)
        meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(ds.SOPInstanceUID)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        out.append(ds)
    return out


def _mask() -> np.ndarray:
    mask = np.zeros((8, 32, 32), dtype=bool)
    mask[2:5, 10:16, 9:15] = True  # nodule 1 over three slices
    mask[6, 20:23, 3:6] = True  # nodule 2 on one slice
    return mask


NODULES = [
    Nodule((-3.5, -2.8, -115.0), diameter_mm=4.2, volume_mm3=44.1, segment_number=1),
    Nodule((-8.4, 3.5, -105.0), diameter_mm=2.1, volume_mm3=3.68, segment_number=1),
]


_bytes = part10
_dciodvfy = dciodvfy


def _items(
    ds: Dataset, name: Code, value_type: hd.sr.ValueTypeValues | None = None
) -> list[Dataset]:
    return hd.sr.utils.find_content_items(ds, name=name, value_type=value_type, recursive=True)


def _code(item: Dataset) -> tuple[str, str]:
    return (str(item.value.value), str(item.value.scheme_designator))


# --- algorithm identity ----------------------------------------------------------------------


def test_device_uid_is_stable_and_changes_when_the_model_changes() -> None:
    uid = _algo().device_uid
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid
    assert _algo().device_uid == uid  # same model, same device, every run
    assert _algo(sha="AB" * 32).device_uid == uid  # digest case is not identity
    assert _algo(sha="ac" * 32).device_uid != uid  # retrained weights: a new device
    assert _algo(version="0.3.2").device_uid != uid
    assert _algo(name="cxr-other").device_uid != uid


def test_algorithm_info_rejects_a_bad_digest() -> None:
    with pytest.raises(ValueError, match="64 hexadecimal"):
        _algo(sha="abc")


# --- classification SR -----------------------------------------------------------------------


def test_classification_sr_round_trip(tmp_path: Path) -> None:
    sources = _dx_study()
    findings = _findings(sources)
    algo = _algo()
    sr = classification_sr(sources, findings, algo)
    warned = _dciodvfy(sr, tmp_path, "classification")
    print("dciodvfy classification SR warnings:", warned)

    back = hd.sr.srread(BytesIO(_bytes(sr)))
    assert back.SOPClassUID == COMPREHENSIVE_3D_SR
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert (back.VerificationFlag, back.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert back.PreliminaryFlag == "PRELIMINARY"
    assert "VerifyingObserverSequence" not in back
    assert back.SeriesNumber == 900 and back.InstanceNumber == 1
    assert back.SeriesDescription.startswith("AI RESULT UNVERIFIED")
    assert INTENDED_USE in back.SeriesDescription
    assert (back.Manufacturer, back.ManufacturerModelName) == ("radbridge", "cxr-demo")
    assert back.SoftwareVersions == "0.3.1"
    assert "PredecessorDocumentsSequence" not in back
    # Identity and study come from the sources as they are (pseudonymous at the center).
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert back.PatientID == sources[0].PatientID
    assert back.SOPInstanceUID not in {s.SOPInstanceUID for s in sources}

    # Observation context: the algorithm as device observer.
    device_uid = _items(back, codes.DCM.DeviceObserverUID)
    assert [i.value for i in device_uid] == [algo.device_uid]
    assert [i.value for i in _items(back, codes.DCM.DeviceObserverName)] == ["cxr-demo"]
    assert [i.value for i in _items(back, codes.DCM.DeviceObserverManufacturer)] == ["radbridge"]
    assert [i.value for i in _items(back, codes.DCM.DeviceObserverModelName)] == ["0.3.1"]
    language = _items(back, codes.DCM.LanguageOfContentItemAndDescendants)[0]
    assert language.value.value == "en-US"
    procedure = _items(back, codes.DCM.ProcedureReported)
    assert [_code(p) for p in procedure] == [("168731009", "SCT")]
    # The intended-use statement is in the content tree, in full.
    comments = _items(back, codes.DCM.Comment, TEXT)
    assert [c.value for c in comments] == [INTENDED_USE]

    assert isinstance(back.content, hd.sr.MeasurementReport)
    groups = back.content.get_image_measurement_groups()
    assert len(groups) == len(findings)
    tracking_uids = set()
    for group, finding in zip(groups, findings, strict=True):
        assert group.tracking_uid is not None and group.tracking_identifier
        tracking_uids.add(group.tracking_uid)
        assert group.finding_type is not None
        assert group.finding_type.value == finding.finding.value
        assert group.finding_type.scheme_designator == "SCT"
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name.value == finding.finding.value
        expected = PRESENT if finding.present else ABSENT
        assert _code(evaluation[0]) == expected
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(finding.probability, abs=1e-9)
        assert (probability.unit.value, probability.unit.scheme_designator) == ("1", "UCUM")
        referenced = [str(i.referenced_sop_instance_uid) for i in probability.referenced_images]
        assert referenced == [finding.sop_instance_uid]
        names = _items(probability[0], codes.DCM.AlgorithmName)
        versions = _items(probability[0], codes.DCM.AlgorithmVersion)
        assert [n.value for n in names] == ["cxr-demo"] and [v.value for v in versions] == ["0.3.1"]
        params = [p.value for p in _items(probability[0], codes.DCM.AlgorithmParameters)]
        assert params == [f"decision threshold={finding.threshold:g}"]
        sources_of_group = [str(i.referenced_sop_instance_uid) for i in group.source_images]
        assert sources_of_group == [finding.sop_instance_uid]
        # Display names: a TEXT "Finding" per language, each with its TID 1204 language.
        shown = {
            item.ContentSequence[0].value.value: item.value
            for item in _items(group[0], codes.DCM.Finding, TEXT)
        }
        assert shown == finding.display
    assert len(tracking_uids) == len(findings)

    # Every reference resolves to a source instance; all sources are recorded as evidence.
    evidence = back.get_evidence()
    assert {str(e[2]) for e in evidence} == {str(s.SOPInstanceUID) for s in sources}
    assert {str(e[1]) for e in evidence} == {str(sources[0].SeriesInstanceUID)}
    image_refs = {str(e.value) for e in back.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert image_refs <= {str(s.SOPInstanceUID) for s in sources}


def test_classification_sr_new_version_references_its_predecessor(tmp_path: Path) -> None:
    sources = _dx_study()
    first = classification_sr(sources, _findings(sources), _algo())
    first = hd.sr.srread(BytesIO(_bytes(first)))
    second = classification_sr(
        sources, _findings(sources), _algo(), version=2, instance_number=2, previous=first
    )
    _dciodvfy(second, tmp_path, "classification-v2")
    back = hd.sr.srread(BytesIO(_bytes(second)))
    assert back.SOPInstanceUID != first.SOPInstanceUID  # a new version, not a duplicate
    assert back.SeriesInstanceUID != first.SeriesInstanceUID
    assert "v2" in back.SeriesDescription
    (study,) = back.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == first.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    (ref,) = series.ReferencedSOPSequence
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == COMPREHENSIVE_3D_SR
    assert back.VerificationFlag == "UNVERIFIED"


def test_classification_sr_refuses_inconsistent_input() -> None:
    sources = _dx_study()
    algo = _algo()
    stray = ImageFinding(generate_uid(), PNEUMONIA, 0.9, 0.5, True, {})
    with pytest.raises(ValueError, match="not among the sources"):
        classification_sr(sources, [stray], algo)
    with pytest.raises(ValueError, match="at least one finding"):
        classification_sr(sources, [], algo)
    first = classification_sr(sources, _findings(sources), algo)
    with pytest.raises(ValueError, match="version >= 2"):
        classification_sr(sources, _findings(sources), algo, previous=first)
    other = _dx_study()
    with pytest.raises(ValueError, match="another study"):
        classification_sr(other, _findings(other), algo, version=2, previous=first)
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        ImageFinding(str(sources[0].SOPInstanceUID), PNEUMONIA, 1.5, 0.5, True, {})


# --- nodule SEG + SR -------------------------------------------------------------------------


def _nodule_objects() -> tuple[list[Dataset], Dataset, Dataset]:
    """Sources in position order, and the SEG and SR built from them handed over shuffled."""
    sources = _ct_series()
    shuffled = [sources[i] for i in (3, 0, 7, 1, 5, 2, 6, 4)]  # the builder sorts by position
    seg, sr = nodule_seg_and_sr(shuffled, _mask(), NODULES, _algo())
    return sources, seg, sr


def test_nodule_seg_round_trip(tmp_path: Path) -> None:
    sources, seg, _ = _nodule_objects()
    print("dciodvfy SEG warnings:", _dciodvfy(seg, tmp_path, "seg"))
    back = hd.seg.segread(BytesIO(_bytes(seg)))
    assert back.SOPClassUID == SEGMENTATION
    assert back.SegmentationType == "BINARY"
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert back.StudyInstanceUID == sources[0].StudyInstanceUID
    assert back.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert back.ContentLabel == "AI_RESULT"
    assert "UNVERIFIED" in back.ContentDescription and INTENDED_USE in back.ContentDescription
    assert back.SeriesDescription.startswith("AI RESULT UNVERIFIED")
    assert (back.Manufacturer, back.ManufacturerModelName) == ("radbridge", "cxr-demo")
    assert back.DeviceSerialNumber == _algo().device_uid

    (segment,) = back.SegmentSequence
    assert segment.SegmentNumber == 1 and segment.SegmentLabel == "Pulmonary nodule"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == ("49755003", "SCT")
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator) == ("27925004", "SCT")
    region = segment.AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodingSchemeDesignator) == ("39607008", "SCT")
    (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("cxr-demo", "0.3.1")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # AI

    # References resolve to the source instances, and the mask comes back frame by frame.
    assert {str(u[2]) for u in back.get_source_image_uids()} == {
        str(s.SOPInstanceUID) for s in sources
    }
    (series,) = back.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    pixels = back.get_pixels_by_source_instance(
        [str(s.SOPInstanceUID) for s in sources], segment_numbers=[1]
    )
    mask = _mask()
    assert pixels.shape == (*mask.shape, 1)
    for z in range(mask.shape[0]):
        assert np.array_equal(pixels[z, :, :, 0].astype(bool), mask[z]), f"frame {z}"


def test_nodule_sr_round_trip(tmp_path: Path) -> None:
    sources, seg, sr = _nodule_objects()
    print("dciodvfy nodule SR warnings:", _dciodvfy(sr, tmp_path, "nodule-sr"))
    back = hd.sr.srread(BytesIO(_bytes(sr)))
    assert back.SOPClassUID == COMPREHENSIVE_3D_SR
    assert (back.VerificationFlag, back.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert INTENDED_USE in back.SeriesDescription
    assert [c.value for c in _items(back, codes.DCM.Comment, TEXT)] == [INTENDED_USE]
    assert [i.value for i in _items(back, codes.DCM.DeviceObserverUID)] == [_algo().device_uid]
    procedure = _items(back, codes.DCM.ProcedureReported)
    assert [_code(p) for p in procedure] == [("169069000", "SCT")]

    assert isinstance(back.content, hd.sr.MeasurementReport)
    groups = back.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2 * len(NODULES)
    by_tracking: dict[str, list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]] = {}
    for group in groups:
        assert group.finding_type is not None and group.finding_type.value == "27925004"
        assert [s.value.value for s in group.finding_sites] == ["39607008"]
        by_tracking.setdefault(str(group.tracking_uid), []).append(group)
    assert len(by_tracking) == len(NODULES)
    for nodule, pair in zip(NODULES, by_tracking.values(), strict=True):
        sized, centre = pair
        # The segment's group: SEG reference, diameter and volume.
        ref = sized.referenced_segment
        assert ref is not None
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == SEGMENTATION
        assert ref.referenced_segment_numbers == [nodule.segment_number]
        (diameter,) = sized.get_measurements(name=codes.SCT.Diameter)
        assert diameter.value == pytest.approx(nodule.diameter_mm)
        assert diameter.unit.value == "mm"
        (volume,) = sized.get_measurements(name=codes.SCT.Volume)
        assert volume.value == pytest.approx(nodule.volume_mm3)
        assert volume.unit.value == "mm3"
        # The centre's group: a SCOORD3D POINT in the sources' frame of reference.
        surface = centre.roi
        assert isinstance(surface, hd.sr.VolumeSurface)
        assert surface.graphic_type == hd.sr.GraphicTypeValues3D.POINT
        assert surface.frame_of_reference_uid == sources[0].FrameOfReferenceUID
        np.testing.assert_allclose(np.ravel(surface.graphic_data[0]), nodule.centre_mm, atol=1e-4)
        purpose = _items(centre[0], codes.DCM.GeometricPurposeOfRegion)
        assert [_code(p) for p in purpose] == [("111010", "DCM")]
        series = surface.source_series_for_segmentation
        assert series is not None and series.value == sources[0].SeriesInstanceUID

    # Evidence: the source slices and the SEG, all in the study.
    evidence = {str(e[2]) for e in back.get_evidence()}
    assert evidence == {str(s.SOPInstanceUID) for s in sources} | {str(seg.SOPInstanceUID)}


def test_nodule_sr_new_version_references_its_predecessor(tmp_path: Path) -> None:
    sources, _, first_sr = _nodule_objects()
    seg, sr = nodule_seg_and_sr(sources, _mask(), NODULES, _algo(), version=2, previous_sr=first_sr)
    _dciodvfy(sr, tmp_path, "nodule-sr-v2")
    back = hd.sr.srread(BytesIO(_bytes(sr)))
    ref = back.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert back.SOPInstanceUID != first_sr.SOPInstanceUID
    assert back.InstanceNumber == 2 and seg.InstanceNumber == 2


def test_nodule_seg_refuses_a_mask_that_does_not_fit() -> None:
    sources = _ct_series()
    with pytest.raises(ValueError, match="mask shape"):
        nodule_seg_and_sr(sources, _mask()[:7], NODULES, _algo())
    bad = Nodule((0.0, 0.0, -110.0), 3.0, 14.0, segment_number=2)
    with pytest.raises(ValueError, match="one segment"):
        nodule_seg_and_sr(sources, _mask(), [bad], _algo())
    with pytest.raises(ValueError, match="binary"):
        nodule_seg_and_sr(sources, _mask().astype(np.uint8) * 3, NODULES, _algo())


def test_pseudonymous_names_raise_no_person_name_warning() -> None:
    sources = _ct_series()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nodule_seg_and_sr(sources, _mask(), NODULES, _algo())
    assert not [w for w in caught if "person name" in str(w.message)]

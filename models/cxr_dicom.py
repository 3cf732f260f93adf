"""Write synthetic chest radiograph studies as real DICOM files (DX, For Presentation).

The files carry identity everywhere de-identification must look, including a private block
(group 0x0009, creator ``RADBRIDGE DEMO``) holding the patient name.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

from models.cxr_phantoms import chest_radiograph

__all__ = [
    "DX_FOR_PRESENTATION",
    "PRIVATE_CREATOR",
    "image_rng",
    "save_phantom_instance",
    "write_cxr_study",
]

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
PRIVATE_CREATOR = "RADBRIDGE DEMO"
_SIZE = 256
_SPACING_MM = 1.4


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator drawing image ``index`` of the study written with ``seed``."""
    return np.random.default_rng([seed, index])


def _uid(seed: int, patient_id: str, accession: str, what: str) -> str:
    return str(
        generate_uid(entropy_srcs=["radbridge-demo", str(seed), patient_id, accession, what])
    )


def write_cxr_study(
    out_dir: Path,
    *,
    seed: int,
    findings: set[str],
    patient_name: str,
    patient_id: str,
    birth_date: str,
    n_images: int = 1,
    accession: str = "ACC0001",
) -> list[Path]:
    """Write one DX study (one series, ``n_images`` PA chest radiographs).

    UIDs, dates and pixels are deterministic from ``seed`` (UIDs also from ``patient_id`` and
    ``accession``, so a new patient never reuses a study UID). Image ``i`` holds
    ``chest_radiograph(image_rng(seed, i), findings)``.

    Args:
        out_dir: Folder to write into (created).
        seed: Seed of pixels, UIDs and dates.
        findings: Subset of ``models.cxr_phantoms.FINDINGS`` drawn in every image.
        patient_name: DICOM PN, e.g. ``"Zhang^Wei=张^伟"`` (written as UTF-8).
        patient_id: PatientID.
        birth_date: PatientBirthDate, ``YYYYMMDD``.
        n_images: Instances in the series.
        accession: AccessionNumber.

    Returns:
        The written file paths, in instance order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1_000_003])
    study_day = date(2026, 1, 5) + timedelta(days=int(rng.integers(0, 365)))
    study_time = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00"
    sex = str(rng.choice(["F", "M"]))
    study_uid = _uid(seed, patient_id, accession, "study")
    series_uid = _uid(seed, patient_id, accession, "series")
    spacing = f"{_SPACING_MM:.1f}"
    paths = []
    for i in range(n_images):
        pixels = chest_radiograph(image_rng(seed, i), set(findings), _SIZE)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SOPClassUID = DX_FOR_PRESENTATION
        ds.SOPInstanceUID = _uid(seed, patient_id, accession, f"instance-{i}")
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_day.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
        ds.AccessionNumber = accession
        ds.Modality = "DX"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.Manufacturer = "radbridge"
        ds.InstitutionName = "Demo Hospital"
        ds.ReferringPhysicianName = "Demo^Referrer"
        ds.StudyDescription = "CHEST PA"
        ds.SeriesDescription = "CHEST PA (synthetic phantom)"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth_date
        ds.PatientSex = sex
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.PatientOrientation = ["L", "F"]
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
        ds.ImagerPixelSpacing = ds.PixelSpacing = [spacing, spacing]
        ds.DetectorType = "DIRECT"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
        ds.WindowCenter, ds.WindowWidth = "2048", "4096"
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
        paths.append(save_phantom_instance(ds, out_dir / f"IM{i + 1:04d}.dcm", patient_name))
    return paths


def save_phantom_instance(ds: Dataset, path: Path, patient_name: str) -> Path:
    """Add the private tag a real PACS would leave (identity de-identification must remove),
    the file meta, and write ``ds`` as Part 10 explicit VR little endian."""
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", patient_name)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.save_as(path, enforce_file_format=True)
    return path

"""Write synthetic chest CT phantoms as real DICOM CT series (CT Image Storage, one file a slice).

Pixels are stored unsigned, 12 bits (stored value = HU + 1024, RescaleIntercept -1024,
RescaleSlope 1), so the full phantom range [-1024, 3071] HU round-trips exactly. Instance 1
is the most superior slice (as scanners usually number a head-first scan), so instance
order runs against the patient z axis: readers must sort by position along the slice normal
(``dicom_io.volume.read_series`` does). Identity (name, ID, birth date, accession, and a
private block holding the name) is written everywhere de-identification must look.
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from models.ct_phantoms import CTPhantom
from models.cxr_dicom import save_phantom_instance
from radbridge.errors import ModelError

__all__ = ["CT_IMAGE_STORAGE", "LUNG_WINDOW", "RESCALE_INTERCEPT", "write_ct_series"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESCALE_INTERCEPT = -1024
LUNG_WINDOW = (-600, 1500)  # WindowCenter, WindowWidth


def _uid(seed: int, patient_id: str, accession: str, what: str) -> str:
    return str(
        generate_uid(entropy_srcs=["radbridge-ct-demo", str(seed), patient_id, accession, what])
    )


def _ds(value: float) -> str:
    """A DICOM DS string (at most 16 characters) that parses back to ``value`` within 1e-6 mm."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.10g}"[:16]


def _base_dataset(
    phantom: CTPhantom,
    *,
    seed: int,
    patient_name: str,
    patient_id: str,
    birth_date: str,
    accession: str,
) -> Dataset:
    """The attributes every slice of the series shares."""
    rng = np.random.default_rng([seed, 2_000_003])
    study_day = date(2026, 1, 5) + timedelta(days=int(rng.integers(0, 365)))
    study_time = f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00"
    sz, sy, sx = phantom.spacing
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study_day.strftime(
        "%Y%m%d"
    )
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = study_time
    ds.AccessionNumber = accession
    ds.Modality = "CT"
    ds.Manufacturer = "radbridge"
    ds.InstitutionName = "Demo Hospital"
    ds.ReferringPhysicianName = "Demo^Referrer"
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = "CT CHEST lung (synthetic phantom)"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = str(rng.choice(["F", "M"]))
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.SliceThickness = _ds(sz)
    ds.SpacingBetweenSlices = _ds(sz)
    ds.KVP = "120"
    ds.ConvolutionKernel = "LUNG"
    ds.StudyInstanceUID = _uid(seed, patient_id, accession, "study")
    ds.SeriesInstanceUID = _uid(seed, patient_id, accession, "series")
    ds.FrameOfReferenceUID = _uid(seed, patient_id, accession, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    direction = np.asarray(phantom.direction, dtype=np.float64)
    ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    ds.PixelSpacing = [_ds(sy), _ds(sx)]  # row spacing (between rows), column spacing
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = phantom.hu.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(RESCALE_INTERCEPT), "1", "HU"
    ds.WindowCenter, ds.WindowWidth = str(LUNG_WINDOW[0]), str(LUNG_WINDOW[1])
    ds.WindowCenterWidthExplanation = "LUNG"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    return ds


def write_ct_series(
    out_dir: Path,
    phantom: CTPhantom,
    *,
    seed: int,
    patient_name: str,
    patient_id: str,
    birth_date: str,
    accession: str = "ACC0001",
) -> list[Path]:
    """Write ``phantom`` as one axial CT series, one file per slice.

    UIDs and dates are deterministic from ``seed``, ``patient_id`` and ``accession``.

    Args:
        out_dir: Folder to write into (created).
        phantom: The volume (``models.ct_phantoms.chest_ct``); its origin, spacing and
            direction become ImagePositionPatient, PixelSpacing/SliceThickness and
            ImageOrientationPatient.
        seed: Seed of UIDs, dates and sex.
        patient_name: DICOM PN, e.g. ``"Zhang^Wei=张^伟"`` (written as UTF-8).
        patient_id: PatientID.
        birth_date: PatientBirthDate, ``YYYYMMDD``.
        accession: AccessionNumber.

    Returns:
        The written paths in InstanceNumber order (instance 1 = most superior slice).
    """
    hu = np.asarray(phantom.hu)
    if hu.ndim != 3 or hu.min() < -1024 or hu.max() > 3071:
        raise ModelError(
            f"write_ct_series: need (z, y, x) HU in [-1024, 3071], got shape {hu.shape}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = _base_dataset(
        phantom,
        seed=seed,
        patient_name=patient_name,
        patient_id=patient_id,
        birth_date=birth_date,
        accession=accession,
    )
    direction = np.asarray(phantom.direction, dtype=np.float64)
    origin = np.asarray(phantom.origin, dtype=np.float64)
    nz = hu.shape[0]
    paths = []
    for instance in range(1, nz + 1):
        k = nz - instance  # instance 1 = top slice
        position = origin + direction[:, 2] * (k * phantom.spacing[0])
        ds = base.copy()
        ds.SOPInstanceUID = _uid(seed, patient_id, accession, f"instance-{instance}")
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(float(position @ direction[:, 2]))
        stored = (hu[k].astype(np.int32) - RESCALE_INTERCEPT).astype("<u2")
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        paths.append(save_phantom_instance(ds, out_dir / f"CT{instance:04d}.dcm", patient_name))
    return paths

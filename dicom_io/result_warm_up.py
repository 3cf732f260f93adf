"""The result object builders run once before a replica takes work (``warm_up``).

The first objects a process builds pay for highdicom's and pydicom's first use (about 0.25 s
for a CT's SEG + SR on 2 cores): the Api replica calls :func:`warm_up` before it reports
ready, so that cost stays off the first study's turnaround. It builds on :func:`made_up_ct`,
slices that belong to no one, and keeps nothing.
"""

from __future__ import annotations

import time

import numpy as np
import pydicom

from dicom_io.result_builders import (
    AlgorithmInfo,
    ImageFinding,
    Nodule,
    classification_sr,
    nodule_seg_and_sr,
)
from dicom_io.sr_parts import Coded

__all__ = ["made_up_ct", "warm_up"]


def warm_up() -> float:
    """Build a nodule SEG + SR and a classification SR on a made-up 4-slice CT, and discard
    them; returns the seconds it took (why: the module's docstring)."""
    t0 = time.perf_counter()
    sources = made_up_ct(slices=4, size=16)
    algo = AlgorithmInfo("warm-up", "0", "radbridge", "0" * 64, "warm-up: never stored")
    mask = np.zeros((len(sources), 16, 16), dtype=bool)
    mask[1:3, 4:8, 4:8] = True
    nodule = Nodule((0.0, 0.0, 2.5), diameter_mm=4.0, volume_mm3=20.0, segment_number=1)
    nodule_seg_and_sr(sources, mask, [nodule], algo)
    finding = ImageFinding(
        str(sources[0].SOPInstanceUID),
        Coded("233604007", "SCT", "Pneumonia"),
        0.1,
        0.5,
        False,
        {"en": "Pneumonia"},
    )
    classification_sr(sources[:1], [finding], algo)
    return time.perf_counter() - t0


def made_up_ct(slices: int, size: int) -> list[pydicom.Dataset]:
    """Axial CT slices 2.5 mm apart in one frame of reference, with no one's identity."""
    study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
    out = []
    for i in range(slices):
        ds = pydicom.Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "WARM^UP", "0", "", ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "000000", "1", ""
        ds.ReferringPhysicianName, ds.PositionReferenceIndicator = "", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * i]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.zeros((size, size), dtype=np.int16).tobytes()
        out.append(ds)
    return out

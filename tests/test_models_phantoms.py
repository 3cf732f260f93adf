"""Phantoms: deterministic, each finding where it belongs, and a real DICOM round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.cxr_dicom import DX_FOR_PRESENTATION, PRIVATE_CREATOR, image_rng, write_cxr_study
from models.cxr_phantoms import FINDINGS, chest_radiograph, sample_dataset
from radbridge.errors import ModelError

SEEDS = range(6)


def _pair(seed: int, finding: str) -> tuple[np.ndarray, np.ndarray]:
    """Same draws without and with ``finding``: they differ only where the finding is."""
    base = chest_radiograph(np.random.default_rng(seed), set()).astype(np.int32)
    with_f = chest_radiograph(np.random.default_rng(seed), {finding}).astype(np.int32)
    return base, with_f


def _heart_width(img: np.ndarray) -> int:
    """Widest run of pixels brighter than the abdomen that touches the centre column."""
    n = img.shape[0]
    abdomen = np.median(img[int(0.92 * n), int(0.35 * n) : int(0.65 * n)])
    bright = img[: int(0.8 * n)] > abdomen + 150
    best = 0
    for row in bright:
        left = np.flatnonzero(~row[: n // 2][::-1])
        right = np.flatnonzero(~row[n // 2 :])
        if left.size and right.size:
            best = max(best, int(left[0] + right[0]))
    return best


def test_deterministic_from_seed() -> None:
    a_img, a_lab = sample_dataset(6, seed=11, size=128)
    b_img, b_lab = sample_dataset(6, seed=11, size=128)
    c_img, _ = sample_dataset(6, seed=12, size=128)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (6, 128, 128) and a_img.dtype == np.uint16
    assert a_lab.shape == (6, len(FINDINGS)) and a_lab.dtype == np.float32
    assert int(a_img.max()) <= 4095


def test_labels_are_independent_with_probability_about_0_3() -> None:
    _, labels = sample_dataset(400, seed=3, size=32)
    assert np.all(np.abs(labels.mean(axis=0) - 0.3) < 0.07)


def test_unknown_finding_is_refused() -> None:
    with pytest.raises(ModelError, match="findings"):
        chest_radiograph(np.random.default_rng(0), {"fracture"})


@pytest.mark.parametrize("seed", SEEDS)
def test_cardiomegaly_widens_the_bright_heart(seed: int) -> None:
    base, card = _pair(seed, "cardiomegaly")
    # Drawn CTR is 0.38-0.47 normal and 0.53-0.63 enlarged: at least 1.3x wider at equal draws.
    assert _heart_width(card) >= 1.25 * _heart_width(base)
    changed = np.argwhere(card - base > 100)
    assert 0.35 < changed[:, 0].mean() / 256 < 0.75  # lower-middle thorax
    assert 0.35 < changed[:, 1].mean() / 256 < 0.7


@pytest.mark.parametrize("seed", SEEDS)
def test_pleural_effusion_fills_a_costophrenic_angle(seed: int) -> None:
    base, eff = _pair(seed, "pleural_effusion")
    diff = eff - base
    changed = np.argwhere(np.abs(diff) > 50)
    assert changed.size and (diff > 50).sum() > 0.98 * len(changed)  # dense fluid only
    assert changed[:, 0].min() / 256 > 0.45  # the base of a lung, not the apex
    assert abs(changed[:, 1].mean() / 256 - 0.5) > 0.15  # one side, lateral of the heart


@pytest.mark.parametrize("seed", SEEDS)
def test_pneumothorax_is_dark_lateral_apical_with_a_pleural_line(seed: int) -> None:
    base, pnx = _pair(seed, "pneumothorax")
    diff = pnx - base
    darker, brighter = diff < -50, diff > 40
    assert darker.sum() > 500 and darker.sum() > 20 * brighter.sum()
    assert brighter.any()  # the visceral pleural line
    ys, xs = np.nonzero(darker)
    assert ys.mean() / 256 < 0.55  # apical half
    assert abs(xs.mean() / 256 - 0.5) > 0.2  # lateral
    # no lung markings: what was removed inside the air space is textured, not a flat shift
    # (both images share their noise, so the difference holds the removed markings only)
    inner = darker.copy()
    for axis in (0, 1):
        for shift in (-3, 3):
            inner &= np.roll(darker, shift, axis=axis)
    assert inner.sum() > 100
    assert diff[inner].std() > 30


@pytest.mark.parametrize("seed", SEEDS)
def test_nodule_is_a_round_dense_opacity_in_a_lung(seed: int) -> None:
    base, nod = _pair(seed, "nodule")
    diff = nod - base
    changed = np.argwhere(diff > 50)
    assert (diff < -50).sum() == 0
    radius = np.sqrt(len(changed) / np.pi)
    assert 3 <= radius <= 16, radius
    cy, cx = changed.mean(axis=0).round().astype(int)
    span = changed.max(axis=0) - changed.min(axis=0) + 1
    assert abs(int(span[0]) - int(span[1])) <= 3  # round
    assert base[cy, cx] < 1700  # centred on (dark) lung


def test_dicom_round_trip(tmp_path: Path) -> None:
    name = "Zhang^Wei=张^伟"
    files = write_cxr_study(
        tmp_path / "s",
        seed=7,
        findings={"nodule", "pleural_effusion"},
        patient_name=name,
        patient_id="DEMO-7",
        birth_date="19700101",
        n_images=2,
        accession="ACC77",
    )
    assert [p.name for p in files] == ["IM0001.dcm", "IM0002.dcm"]
    first, second = (pydicom.dcmread(p) for p in files)
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == DX_FOR_PRESENTATION == first.file_meta.MediaStorageSOPClassUID
    assert (first.Modality, first.BodyPartExamined, first.ViewPosition) == ("DX", "CHEST", "PA")
    assert str(first.PatientName) == name and first.PatientID == "DEMO-7"
    assert first.PatientBirthDate == "19700101" and first.AccessionNumber == "ACC77"
    assert first.InstitutionName == "Demo Hospital" and first.StudyDate and first.PatientSex
    assert first.private_block(0x0009, PRIVATE_CREATOR)[0x01].value == name
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert (first.BitsStored, first.HighBit, first.PhotometricInterpretation) == (
        12,
        11,
        "MONOCHROME2",
    )
    for i, ds in enumerate((first, second)):
        expected = chest_radiograph(image_rng(7, i), {"nodule", "pleural_effusion"})
        assert np.array_equal(ds.pixel_array, expected)
    again = write_cxr_study(
        tmp_path / "again",
        seed=7,
        findings={"nodule", "pleural_effusion"},
        patient_name=name,
        patient_id="DEMO-7",
        birth_date="19700101",
        accession="ACC77",
    )
    assert pydicom.dcmread(again[0]).SOPInstanceUID == first.SOPInstanceUID

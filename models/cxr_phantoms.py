"""Synthetic PA chest radiograph phantoms with geometrically defined findings.

Images are 12-bit MONOCHROME2 (bright = dense). All random draws happen in a fixed order that
does not depend on ``findings``: the same generator state with and without a finding gives
images that differ only where the finding is. Coordinates are normalised to [0, 1] (x to the
image right = patient left, y down), so every size draws the same anatomy.
"""

from __future__ import annotations

import functools

import numpy as np

from radbridge.errors import ModelError

__all__ = ["FINDINGS", "chest_radiograph", "sample_dataset"]

FINDINGS: tuple[str, ...] = ("cardiomegaly", "pleural_effusion", "pneumothorax", "nodule")

# Densities of the label map (arbitrary units; 1.0 = soft tissue).
_BODY, _LUNG, _MEDIASTINUM, _HEART, _ABDOMEN, _FLUID, _PNX = 1.0, 0.35, 1.3, 1.55, 1.25, 1.2, 0.2


@functools.lru_cache(maxsize=8)
def _freq2(h: int, w: int) -> np.ndarray:
    """Squared spatial frequencies of an ``rfft2`` of shape (h, w)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    return (-2.0 * np.pi**2 * (fy**2 + fx**2)).astype(np.float32)


def _blur(img: np.ndarray, sigma_px: float, minus_px: float | None = None) -> np.ndarray:
    """Gaussian blur by FFT (periodic edges; fine for phantoms with a dark border).

    With ``minus_px``, returns the band-pass ``blur(sigma_px) - blur(minus_px)``.
    """
    f2 = _freq2(*img.shape)
    kernel = np.exp(sigma_px**2 * f2)
    if minus_px is not None:
        kernel -= np.exp(minus_px**2 * f2)
    return np.fft.irfft2(np.fft.rfft2(img) * kernel, s=img.shape).astype(np.float32)


def _lung(
    x: np.ndarray, y: np.ndarray, lx: float, ax: float, top: float, base: float, dome: float
) -> np.ndarray:
    """One lung: apex at ``top``, widest at ``base``, cut by a diaphragm dome of height ``dome``."""
    t = np.clip((y - top) / (base - top), 0.0, None)
    half = ax * np.sqrt(np.clip(1.0 - (1.0 - np.minimum(t, 1.0)) ** 2, 0.0, 1.0))
    diaphragm = base - dome * np.clip(1.0 - ((x - lx) / ax) ** 2, 0.0, 1.0)
    return (np.abs(x - lx) < half) & (y > top) & (y < diaphragm)


def chest_radiograph(rng: np.random.Generator, findings: set[str], size: int = 256) -> np.ndarray:
    """A PA chest radiograph phantom, uint16 values 0..4095 (MONOCHROME2).

    Args:
        rng: Source of every random variation (position, size, texture, noise, finding geometry).
        findings: Subset of ``FINDINGS`` to draw.
        size: Rows and columns.

    Returns:
        The image, shape (size, size), dtype uint16.
    """
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise ModelError(f"findings: unknown {sorted(unknown)}; known {list(FINDINGS)}")
    px = 1.0 / size  # one pixel in normalised units
    s = size / 256.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)

    # -- fixed-order draws: anatomy, then every finding's geometry, then texture and noise --
    cx = 0.5 + rng.normal(0.0, 0.012)
    sc = 1.0 + rng.uniform(-0.05, 0.05)
    tw = 0.37 * sc  # half thoracic width (outer lung edges at cx +- tw)
    top = 0.13 + rng.uniform(-0.02, 0.02)
    base = 0.72 + rng.uniform(-0.03, 0.03)
    dome = 0.06 + rng.uniform(-0.015, 0.015)
    ctr_u = rng.random()
    heart_h = 0.15 + rng.uniform(-0.015, 0.015)
    eff_side, eff_height, eff_rise = (
        rng.integers(2),
        rng.uniform(0.07, 0.13),
        rng.uniform(0.05, 0.09),
    )
    pnx_side, pnx_collapse = rng.integers(2), rng.uniform(0.68, 0.82)
    nod_side, nod_u, nod_r, nod_amp = (
        rng.integers(2),
        rng.random(),
        rng.uniform(5, 15),
        rng.uniform(0.5, 0.7),
    )
    rib_phase, rib_curve = rng.uniform(-0.015, 0.015), rng.uniform(0.07, 0.11)
    white = rng.standard_normal((size, size), dtype=np.float32)
    gain, offset = rng.uniform(0.92, 1.08), rng.uniform(-80, 80)
    noise = rng.standard_normal((size, size), dtype=np.float32) * 22.0

    # -- anatomy --
    ax = 0.17 * sc
    centres = (cx - tw + ax, cx + tw - ax)  # image-left lung (patient right), image-right lung
    lungs = [_lung(x, y, lx, ax, top, base, dome) for lx in centres]
    body = (np.abs((x - cx) / (0.47 * sc)) ** 4 + np.abs((y - 0.6) / 0.62) ** 4) < 1.0
    mw = 0.05 * sc + 0.03 * np.clip((y - 0.3) / 0.4, 0.0, 1.0)
    mediastinum = (np.abs(x - cx) < mw) & (y > 0.02) & (y < base)
    ctr = 0.53 + 0.10 * ctr_u if "cardiomegaly" in findings else 0.38 + 0.09 * ctr_u
    hw = ctr * tw  # transverse cardiac half-diameter: CTR = 2*hw / (2*tw)
    hcx, hcy = cx + 0.3 * hw, base - 0.6 * heart_h
    heart = (((x - hcx) / hw) ** 2 + ((y - hcy) / heart_h) ** 2 < 1.0) & (y < base - 0.01)
    domes = [np.clip(1.0 - ((x - lx) / ax) ** 2, 0.0, 1.0) for lx in centres]
    abdomen = body & (y > base - dome * np.maximum(domes[0], domes[1]))
    lung_any = (lungs[0] | lungs[1]) & ~heart & ~mediastinum

    dens = np.where(body, np.float32(_BODY), np.float32(0.0))
    dens = np.where(abdomen & ~lung_any, _ABDOMEN, dens)
    dens = np.where(lung_any, _LUNG, dens)
    dens = np.where(mediastinum, _MEDIASTINUM, dens)
    dens = np.where(heart, _HEART, dens)

    # ribs (posterior arcs) and spine
    thorax = body & (np.abs(x - cx) < tw * 1.05) & ~abdomen
    rel = np.abs(x - cx) / tw
    phase = (y - top - rib_phase + rib_curve * (rel - 0.4) ** 2) / 0.062
    ribs = np.clip(1.0 - np.abs(phase - np.round(phase)) / 0.2, 0.0, 1.0) * (rel > 0.1)
    dens += 0.14 * ribs * thorax
    dens += 0.12 * ((np.abs(x - cx) < 0.03 * sc) & body)

    # lung markings: band-pass texture, stronger near the hila
    tex = _blur(white, 1.0 * s, 3.5 * s)
    tex /= tex.std() + 1e-9
    hilum_d = np.minimum(np.hypot(x - centres[0], y - 0.45), np.hypot(x - centres[1], y - 0.45))
    markings = np.clip(tex, 0.0, None) * (0.16 - 0.1 * np.clip(hilum_d / 0.3, 0, 1))

    # -- findings --
    lung_side = [lungs[i] & ~heart & ~mediastinum for i in range(2)]
    marked = lung_any.copy()
    if "pneumothorax" in findings:
        i = int(pnx_side)
        lx = centres[i]
        medial = lx + ax * (1 if i == 0 else -1)
        hx, hy = medial, base - 0.05
        collapsed = _lung(
            hx + (x - hx) / pnx_collapse, hy + (y - hy) / pnx_collapse, lx, ax, top, base, dome
        )
        space = lung_side[i] & ~collapsed & (y < base - 0.04)
        dens -= (_LUNG - _PNX) * space  # air instead of lung; ribs stay visible
        marked &= ~space
        edge = _blur(collapsed.astype(np.float32), 0.8 * s)
        line = (edge > 0.15) & (edge < 0.6) & lung_side[i] & (y < base - 0.04)
        dens += 0.35 * line
    if "pleural_effusion" in findings:
        i = int(eff_side)
        lx = centres[i]
        lateral = lx - ax if i == 0 else lx + ax
        level = base - eff_height - eff_rise * np.clip(1.0 - np.abs(x - lateral) / ax, 0, 1) ** 2
        fluid = lung_side[i] & (y > level)
        dens += (_FLUID - _LUNG) * fluid
        marked &= ~fluid
    dens += markings * marked
    if "nodule" in findings:
        i = int(nod_side)
        r = nod_r * s * px
        inner = _blur(lung_side[i].astype(np.float32), (nod_r + 3) * s) > 0.97
        ys, xs = np.nonzero(inner if inner.any() else lung_side[i])
        k = min(int(nod_u * ys.size), ys.size - 1)
        d2 = ((x - xs[k] * px) ** 2 + (y - ys[k] * px) ** 2) / r**2
        dens += nod_amp * np.sqrt(np.clip(1.0 - d2, 0.0, None))

    dens = _blur(dens, 1.2 * s)
    img = (250.0 + 1900.0 * dens) * gain + offset + noise
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def sample_dataset(n: int, seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``n`` phantoms with independent findings (probability 0.3 each).

    Args:
        n: Number of images.
        seed: Seed of the ``numpy.random.Generator`` drawing labels and images.
        size: Rows and columns of each image.

    Returns:
        Images (n, size, size) uint16 and labels (n, len(FINDINGS)) float32 in ``FINDINGS`` order.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size), dtype=np.uint16)
    labels = (rng.random((n, len(FINDINGS))) < 0.3).astype(np.float32)
    for i in range(n):
        present = {f for f, on in zip(FINDINGS, labels[i], strict=True) if on}
        images[i] = chest_radiograph(rng, present, size)
    return images, labels

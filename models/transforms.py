"""The one preprocessing pipeline, built from a manifest, shared by training and serving.

2-D images (radiographs) go straight through ``build_pipeline``. CT volumes are first
resampled to the model's voxel spacing with ``resample_to_spacing`` (the grid keeps its first
voxel, so the origin and direction stay valid) and then go through ``build_pipeline`` with
``spatial_dims=3``: that is what ``prepare_volume`` does, for training and for serving alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import monai.transforms as mt
import numpy as np
import torch

from models.manifest import TransformSpec
from radbridge.errors import ModelError

__all__ = [
    "CT_HU_WINDOW",
    "CT_PREPROCESSING",
    "DEMO_PREPROCESSING",
    "build_pipeline",
    "prepare_volume",
    "resample_to_spacing",
]

# The demo chest radiograph pipeline (12-bit MONOCHROME2 in, 1 x 128 x 128 in [0, 1] out).
DEMO_PREPROCESSING: list[dict[str, object]] = [
    {"name": "EnsureChannelFirst", "args": {"channel_dim": "no_channel"}},
    {
        "name": "ScaleIntensityRange",
        "args": {"a_min": 0.0, "a_max": 4095.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
    },
    {"name": "Resize", "args": {"spatial_size": [128, 128]}},
    {"name": "EnsureType", "args": {"data_type": "numpy", "dtype": "float32"}},
]

# The demo CT pipeline: (z, y, x) Hounsfield units (already at the model's spacing) in,
# 1 x z x y x in [0, 1] out; the window covers air to dense soft tissue.
CT_HU_WINDOW: tuple[float, float] = (-1000.0, 400.0)
CT_PREPROCESSING: list[dict[str, object]] = [
    {"name": "EnsureChannelFirst", "args": {"channel_dim": "no_channel"}},
    {
        "name": "ScaleIntensityRange",
        "args": {
            "a_min": CT_HU_WINDOW[0],
            "a_max": CT_HU_WINDOW[1],
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        },
    },
    {"name": "EnsureType", "args": {"data_type": "numpy", "dtype": "float32"}},
]


def build_pipeline(
    specs: list[TransformSpec], *, spatial_dims: int = 2
) -> Callable[[np.ndarray], np.ndarray]:
    """Compose ``monai.transforms`` from their specs.

    Args:
        specs: The manifest's ``preprocessing`` list.
        spatial_dims: 2 for images (H, W), 3 for volumes (Z, Y, X).

    Returns:
        A callable taking a float32 array with ``spatial_dims`` axes (pixel values after the
        modality LUT, e.g. Hounsfield units) and returning a float32 numpy array with a
        channel axis first: (C, H', W') or (C, Z', Y', X').

    Raises:
        ModelError: A transform rejects its arguments, or the input or output rank is wrong.
    """
    if spatial_dims not in (2, 3):
        raise ModelError(f"preprocessing: spatial_dims must be 2 or 3, got {spatial_dims}")
    names = {2: ("2-D", "(H, W)", "(C, H, W)"), 3: ("3-D", "(Z, Y, X)", "(C, Z, Y, X)")}
    what, in_axes, out_axes = names[spatial_dims]
    steps = []
    for i, spec in enumerate(specs):
        try:
            steps.append(getattr(mt, spec.name)(**spec.args))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ModelError(f"preprocessing[{i}] ({spec.name}): {exc}") from None
    compose = mt.Compose(steps)

    def run(image: np.ndarray) -> np.ndarray:
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim != spatial_dims:
            raise ModelError(f"preprocessing: expected a {what} {in_axes} array, got {arr.shape}")
        out = compose(arr)
        if hasattr(out, "detach"):  # a MetaTensor/Tensor when no EnsureType(numpy) ends it
            out = out.detach().cpu().numpy()
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != spatial_dims + 1:
            raise ModelError(f"preprocessing: expected {out_axes} output, got shape {out.shape}")
        return out

    return run


def resample_to_spacing(
    volume: np.ndarray,
    spacing: Sequence[float],
    target: Sequence[float],
    *,
    mode: str = "trilinear",
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Resample a (z, y, x) volume to about ``target`` spacing, keeping the first voxel.

    Each axis of ``n`` voxels at spacing ``s`` becomes ``m = round((n - 1) * s / t) + 1``
    voxels spanning the same extent (corner-aligned), so voxel (0, 0, 0) keeps its position:
    the origin and direction of the input describe the output too. The exact new spacing
    ``(n - 1) * s / (m - 1)`` is returned (within half a voxel's worth of ``target``).

    Args:
        volume: (z, y, x) array (HU, probabilities or a 0/1 mask).
        spacing: Its (z, y, x) spacing in mm.
        target: Wanted (z, y, x) spacing in mm.
        mode: ``"trilinear"`` or ``"nearest"`` (``torch.nn.functional.interpolate``).

    Returns:
        The float32 resampled volume and its exact (z, y, x) spacing.
    """
    arr = np.asarray(volume, dtype=np.float32)
    if arr.ndim != 3 or len(spacing) != 3 or len(target) != 3:
        raise ModelError(
            f"resample: need a (z, y, x) volume and 3 spacings, got {arr.shape}, "
            f"{list(spacing)}, {list(target)}"
        )
    if min(spacing) <= 0 or min(target) <= 0:
        raise ModelError(f"resample: spacings must be positive, got {spacing} -> {target}")
    size = [
        max(round((n - 1) * s / t) + 1, 1)
        for n, s, t in zip(arr.shape, spacing, target, strict=True)
    ]
    new_spacing = tuple(
        float(s) if m == 1 else (n - 1) * float(s) / (m - 1)
        for n, s, m in zip(arr.shape, spacing, size, strict=True)
    )
    if list(arr.shape) == size:
        return arr, (new_spacing[0], new_spacing[1], new_spacing[2])
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
        if mode == "nearest":
            out = torch.nn.functional.interpolate(t, size=size, mode="nearest-exact")
        else:
            out = torch.nn.functional.interpolate(t, size=size, mode=mode, align_corners=True)
    return out[0, 0].numpy(), (new_spacing[0], new_spacing[1], new_spacing[2])


def prepare_volume(
    hu: np.ndarray,
    spacing: Sequence[float],
    model_spacing: Sequence[float],
    specs: list[TransformSpec],
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """CT volume in HU at any spacing -> the model's input (1, z', y', x') and its spacing.

    Resamples to ``model_spacing`` (``resample_to_spacing``), then applies the manifest's
    pipeline (``build_pipeline(specs, spatial_dims=3)``). The origin and direction of ``hu``
    still describe the result.
    """
    resampled, new_spacing = resample_to_spacing(hu, spacing, model_spacing)
    return build_pipeline(specs, spatial_dims=3)(resampled), new_spacing

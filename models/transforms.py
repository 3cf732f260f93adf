"""The one preprocessing pipeline, built from a manifest, shared by training and serving."""

from __future__ import annotations

from collections.abc import Callable

import monai.transforms as mt
import numpy as np

from models.manifest import TransformSpec
from radbridge.errors import ModelError

__all__ = ["DEMO_PREPROCESSING", "build_pipeline"]

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


def build_pipeline(specs: list[TransformSpec]) -> Callable[[np.ndarray], np.ndarray]:
    """Compose ``monai.transforms`` from their specs.

    Args:
        specs: The manifest's ``preprocessing`` list.

    Returns:
        A callable taking a 2-D float32 (H, W) array of pixel values after the modality LUT
        and returning a float32 numpy array (C, H', W').

    Raises:
        ModelError: A transform rejects its arguments, or the output is not (C, H', W').
    """
    steps = []
    for i, spec in enumerate(specs):
        try:
            steps.append(getattr(mt, spec.name)(**spec.args))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ModelError(f"preprocessing[{i}] ({spec.name}): {exc}") from None
    compose = mt.Compose(steps)

    def run(image: np.ndarray) -> np.ndarray:
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim != 2:
            raise ModelError(f"preprocessing: expected a 2-D (H, W) image, got shape {arr.shape}")
        out = compose(arr)
        if hasattr(out, "detach"):  # a MetaTensor/Tensor when no EnsureType(numpy) ends it
            out = out.detach().cpu().numpy()
        out = np.asarray(out, dtype=np.float32)
        if out.ndim != 3:
            raise ModelError(f"preprocessing: expected (C, H, W) output, got shape {out.shape}")
        return out

    return run

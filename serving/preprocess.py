"""Preprocessor deployment: DICOM bytes -> model input, with the manifest's MONAI pipeline."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from ray import serve

from dicom_io.pixels import decode_frame
from models.manifest import ModelManifest
from models.transforms import build_pipeline

__all__ = ["Preprocessor"]


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
class Preprocessor:
    """CPU replicas; one pipeline per model, built from its manifest (the training pipeline)."""

    def __init__(self, manifests: dict[str, dict[str, Any]]) -> None:
        self._pipelines: dict[str, Callable[[np.ndarray], np.ndarray]] = {
            key: build_pipeline(ModelManifest.model_validate(m).preprocessing)
            for key, m in manifests.items()
        }

    def __call__(self, encoded: bytes, model_key: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        frame, modality = decode_frame(encoded)
        tensor = np.ascontiguousarray(self._pipelines[model_key](frame), dtype=np.float32)
        return {"tensor": tensor, "seconds": time.perf_counter() - t0, "modality": modality}

"""Preprocessor deployment: DICOM bytes -> model input, with the manifest's MONAI pipeline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from dicom_io.pixels import decode_frame
from models.repository import ModelRepository
from models.transforms import build_pipeline

__all__ = ["Preprocessor"]


@serve.deployment(name="Preprocessor", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Preprocessor:
    """CPU replicas; one pipeline per model version (its training pipeline, from its manifest),
    built on first use so a version installed after start-up needs no restart."""

    def __init__(self, repository: str) -> None:
        self._repository = ModelRepository(Path(repository))
        self._pipelines: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        self._lock = threading.Lock()  # Serve may run __call__ in several threads at once

    def _pipeline(self, model_key: str) -> Callable[[np.ndarray], np.ndarray]:
        with self._lock:
            return self._pipelines.get(model_key) or self._build(model_key)

    def _build(self, model_key: str) -> Callable[[np.ndarray], np.ndarray]:
        if model_key not in self._pipelines:
            name, _, version = model_key.partition(":")
            manifest = self._repository.get(name, version or None).manifest
            self._pipelines[model_key] = build_pipeline(manifest.preprocessing)
        return self._pipelines[model_key]

    def __call__(self, encoded: bytes, model_key: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        frame, modality = decode_frame(encoded)
        tensor = np.ascontiguousarray(self._pipeline(model_key)(frame), dtype=np.float32)
        return {"tensor": tensor, "seconds": time.perf_counter() - t0, "modality": modality}

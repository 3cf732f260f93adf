"""Preprocessor deployment: DICOM bytes -> model input, with the manifest's MONAI pipeline.

Two calls: one instance -> its classifier's tensor (``__call__``), and one CT series -> its
segmentation (``segment_series``: the volume decoded, resampled and preprocessed here, its
sliding windows in the ModelRunner, the nodules and the mask on the source slices here). The
volume work runs on these replicas' CPUs, not in the Api replica, which keeps to routes and
jobs.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from dicom_io.pixels import decode_frame
from models.manifest import ModelManifest
from models.repository import ModelRepository
from models.transforms import build_pipeline
from serving.segmentation import segment_series

__all__ = ["Preprocessor"]


@serve.deployment(name="Preprocessor", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Preprocessor:
    """CPU replicas; one pipeline per model version (its training pipeline, from its manifest),
    built on first use so a version installed after start-up needs no restart."""

    def __init__(self, repository: str, runner: DeploymentHandle | None = None) -> None:
        self._repository = ModelRepository(Path(repository))
        self._runner = runner
        self._pipelines: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        self._lock = threading.Lock()  # Serve may run __call__ in several threads at once

    def _manifest(self, model_key: str) -> ModelManifest:
        name, _, version = model_key.partition(":")
        return self._repository.get(name, version or None).manifest

    def _pipeline(self, model_key: str) -> Callable[[np.ndarray], np.ndarray]:
        with self._lock:
            return self._pipelines.get(model_key) or self._build(model_key)

    def _build(self, model_key: str) -> Callable[[np.ndarray], np.ndarray]:
        if model_key not in self._pipelines:
            self._pipelines[model_key] = build_pipeline(self._manifest(model_key).preprocessing)
        return self._pipelines[model_key]

    def __call__(self, encoded: bytes, model_key: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        frame, modality = decode_frame(encoded)
        tensor = np.ascontiguousarray(self._pipeline(model_key)(frame), dtype=np.float32)
        return {"tensor": tensor, "seconds": time.perf_counter() - t0, "modality": modality}

    async def segment_series(
        self, encoded: list[bytes], model_key: str, priority: str
    ) -> dict[str, Any]:
        """One CT series (its instances' bytes) -> ``{"segmentation": SeriesSegmentation,
        "runner": the ModelRunner's answer without its probabilities}``. The volume crosses
        Ray to the runner once; its windows never do (``ModelRunner.segment``)."""
        if self._runner is None:
            raise RuntimeError("this Preprocessor was bound without a ModelRunner")
        manifest = self._manifest(model_key)
        runner = self._runner.options(multiplexed_model_id=model_key)
        answer: dict[str, Any] = {}

        def probabilities(image: np.ndarray) -> np.ndarray:  # called from the worker thread
            out: dict[str, Any] = runner.segment.remote(image, priority).result()
            probs = out.pop("probabilities")
            answer.update(out)
            return np.asarray(probs)

        seg = await asyncio.to_thread(segment_series, encoded, manifest, probabilities)
        return {"segmentation": seg, "runner": answer}

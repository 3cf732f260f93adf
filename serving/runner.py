"""ModelRunner deployment: one ONNX Runtime session per model version, dynamically batched.

``max_ongoing_requests`` is kept above ``max_batch_size`` (with Serve's default of 5 batches
never form), and ``session.run`` runs in a worker thread so the replica's event loop keeps
answering health checks while a batch computes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from ray import serve

from models.repository import ModelRepository
from serving.providers import resolve_providers

__all__ = ["ModelRunner"]

log = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64)
class ModelRunner:
    def __init__(
        self,
        repository: str,
        name: str,
        version: str,
        providers: list[str],
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        intra_op_threads: int = 0,
    ) -> None:
        model = ModelRepository(Path(repository)).get(name, version)  # verifies sha256 + signature
        self.key = model.key
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        wanted = resolve_providers(providers)
        self.session = ort.InferenceSession(str(model.onnx_path), opts, providers=wanted)
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        if self.provider != wanted[0]:
            log.warning("%s: asked for %s but %s runs", self.key, wanted[0], self.provider)
        log.info("%s: ONNX Runtime provider in use: %s", self.key, self.provider)
        self.infer.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.infer.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, tensors: list[np.ndarray]) -> list[dict[str, Any]]:
        batch = np.stack(tensors).astype(np.float32, copy=False)
        t0 = time.perf_counter()
        logits = await asyncio.to_thread(self._run, batch)
        seconds = time.perf_counter() - t0
        n = len(tensors)
        return [
            {"logits": logits[i], "batch_size": n, "seconds": seconds, "provider": self.provider}
            for i in range(n)
        ]

    async def __call__(self, tensor: np.ndarray) -> dict[str, Any]:
        return await self.infer(tensor)

    def check_health(self) -> None:
        if self.session is None:
            raise RuntimeError("no ONNX Runtime session")

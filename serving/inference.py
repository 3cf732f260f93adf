"""The Api's side of the graph: which model version answers, and one classification through
Preprocessor → ModelRunner → post-processing, with its metrics and optional shadow run.

Model versions are read from the repository at every ``reconfigure`` (Serve calls it when the
config's ``user_config`` changes), so pinning a freshly installed version is a config change
that restarts nothing and fails no request: the runner loads the new version beside the old on
its first request. A shadow version gets the same input after the answer is computed; its
output is recorded (metrics + a JSON record in the center store), never returned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle

from dicom_io.store import DurableStore
from models.manifest import ModelManifest, version_key
from models.repository import ModelRepository
from radbridge.errors import ConfigError, NotFoundError, RadbridgeError
from radbridge.metrics import CenterMetrics, batch_bucket, safe_label
from serving.config import ApiConfig
from serving.postprocess import findings_from_logits
from serving.routing import route
from serving.schemas import Finding
from serving.segmentation import SeriesSegmentation

__all__ = ["Classified", "Inference"]

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Classified:
    key: str
    manifest: ModelManifest
    findings: list[Finding]
    provider: str
    timings_ms: dict[str, float]


class Inference:
    def __init__(
        self,
        repository: Path,
        preprocessor: DeploymentHandle,
        runner: DeploymentHandle,
        metrics: CenterMetrics,
        store: DurableStore,
    ) -> None:
        self.repository = ModelRepository(repository)
        self.preprocessor = preprocessor
        self.runner = runner
        self.metrics = metrics
        self.store = store
        self.config = ApiConfig()
        self.manifests: dict[str, ModelManifest] = {}
        self._shadow_tasks: set[asyncio.Task[None]] = set()

    def reload(self, config: ApiConfig) -> None:
        """Re-read the installed versions; every pin must name one (ConfigError otherwise)."""
        manifests = {m.key: m.manifest for m in self.repository.list()}
        for name, pin in config.models.items():
            for field, version in (("version", pin.version), ("shadow", pin.shadow)):
                if version is not None and f"{name}:{version}" not in manifests:
                    raise ConfigError(
                        f"Api user_config.models.{name}.{field}: {name} version {version} "
                        "is not installed in the model repository"
                    )
        self.config, self.manifests = config, manifests

    # -- which version answers ------------------------------------------------------------

    def key_for(self, name: str, version: str | None = None) -> str:
        """An explicit version, else the config's pin, else the newest installed version."""
        pin = self.config.models.get(name)
        version = version or (pin.version if pin else None)
        if version is not None:
            key = f"{name}:{version}"
            if key not in self.manifests:
                raise NotFoundError(f"model {name} version {version} is not installed")
            return key
        keys = [k for k, m in self.manifests.items() if m.name == name]
        if not keys:
            raise NotFoundError(f"no model named {name}")
        return max(keys, key=lambda k: version_key(self.manifests[k].version))

    def route(self, modality: str | None, body_part: str | None) -> str | None:
        key = route(self.manifests, modality, body_part)
        return None if key is None else self.key_for(self.manifests[key].name)

    # -- one classification ---------------------------------------------------------------

    async def classify_encoded(
        self, key: str, encoded: bytes, priority: str, *, shed: bool
    ) -> Classified:
        """A DICOM instance → the model's findings (preprocessing with the manifest pipeline)."""
        pre = await _unwrapped(self.preprocessor.remote(encoded, key))
        self.metrics.preprocess.labels(key, safe_label(pre["modality"])).observe(pre["seconds"])
        out = await self.classify_tensor(key, pre["tensor"], priority, shed=shed)
        out.timings_ms["preprocess"] = round(pre["seconds"] * 1000, 3)
        return out

    async def classify_tensor(
        self, key: str, tensor: np.ndarray, priority: str, *, shed: bool
    ) -> Classified:
        out = await self.run(key, tensor, priority, shed=shed)
        return self._classified(key, tensor, out)

    async def classify_tensors(
        self, key: str, tensors: np.ndarray, priority: str, *, shed: bool
    ) -> list[Classified]:
        """The images of one request (axis 0) in one runner call: served whole or refused
        whole (:class:`OverloadedError` when sheddable and the runner has no room for all)."""
        outs = await self.run_many(key, tensors, priority, shed=shed)
        return [self._classified(key, t, out) for t, out in zip(tensors, outs, strict=True)]

    async def run_many(
        self, key: str, tensors: np.ndarray, priority: str, *, shed: bool
    ) -> list[dict[str, Any]]:
        """Tensors stacked on axis 0 in one runner call (one handle round trip, not one per
        tensor); each answer as :meth:`run` gives it. Records the runner metrics."""
        handle = self.runner.options(multiplexed_model_id=key)
        outs: list[dict[str, Any]] = await _unwrapped(handle.many.remote(tensors, priority, shed))
        for out in outs:
            self._observe(key, priority, out)
        return outs

    def _classified(self, key: str, tensor: np.ndarray, out: dict[str, Any]) -> Classified:
        """A runner answer → findings (postprocessing), and the shadow run if one is pinned."""
        manifest = self.manifests[key]
        t0 = time.perf_counter()
        findings = findings_from_logits(out["logits"], manifest)
        post_s = time.perf_counter() - t0
        self.metrics.postprocess.labels(key).observe(post_s)
        self._shadow(manifest, tensor, findings)
        return Classified(
            key=key,
            manifest=manifest,
            findings=findings,
            provider=out["provider"],
            timings_ms={
                "queue_wait": round(out["queue_wait"] * 1000, 3),
                "inference": round(out["seconds"] * 1000, 3),
                "postprocess": round(post_s * 1000, 3),
                "batch_size": out["batch_size"],
            },
        )

    async def run(
        self, key: str, tensor: np.ndarray, priority: str, *, shed: bool
    ) -> dict[str, Any]:
        """One tensor through the ModelRunner's gate and batcher; records the runner metrics."""
        handle = self.runner.options(multiplexed_model_id=key)
        out: dict[str, Any] = await _unwrapped(handle.remote(tensor, priority, shed))
        self._observe(key, priority, out)
        return out

    async def segment_series(
        self, key: str, encoded: list[bytes], priority: str
    ) -> tuple[SeriesSegmentation, dict[str, Any]]:
        """A CT series (its instances' bytes) -> its segmentation, made in the Preprocessor
        (decode, resample, nodules) and the ModelRunner (sliding windows), and the runner's
        answer (windows, seconds, queue_wait, provider); records the runner metrics."""
        out = await _unwrapped(self.preprocessor.segment_series.remote(encoded, key, priority))
        runner: dict[str, Any] = out["runner"]
        m = self.manifests[key]
        labels = (m.name, m.version)
        self.metrics.queue_wait.labels(*labels, priority).observe(runner["queue_wait"])
        self.metrics.inference.labels(*labels, "volume", runner["provider"]).observe(
            runner["seconds"]
        )
        self.metrics.provider_info.labels(*labels, runner["provider"]).set(1)
        return out["segmentation"], runner

    def _observe(self, key: str, priority: str, out: dict[str, Any]) -> None:
        """The runner metrics of one image's answer."""
        m = self.manifests[key]
        labels = (m.name, m.version)
        self.metrics.queue_wait.labels(*labels, priority).observe(out["queue_wait"])
        self.metrics.batch_size.labels(*labels).observe(out["batch_size"])
        self.metrics.inference.labels(
            *labels, batch_bucket(out["batch_size"]), out["provider"]
        ).observe(out["seconds"])
        self.metrics.provider_info.labels(*labels, out["provider"]).set(1)

    # -- shadow ---------------------------------------------------------------------------

    def _shadow(self, manifest: ModelManifest, tensor: np.ndarray, answer: list[Finding]) -> None:
        pin = self.config.models.get(manifest.name)
        if pin is None or pin.shadow is None or pin.shadow == manifest.version:
            return
        key = f"{manifest.name}:{pin.shadow}"
        task = asyncio.get_running_loop().create_task(
            self._run_shadow(manifest, key, tensor, answer)
        )
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _run_shadow(
        self, manifest: ModelManifest, key: str, tensor: np.ndarray, answer: list[Finding]
    ) -> None:
        shadow_manifest = self.manifests[key]
        try:  # routine and sheddable: a shadow run never delays or fails real work
            out = await self.run(key, tensor, "routine", shed=True)
            shadow = findings_from_logits(out["logits"], shadow_manifest)
        except Exception as exc:
            log.warning("shadow %s skipped: %s", key, type(exc).__name__)
            return
        by_label = {f.label: f for f in shadow}
        same = [f.label in by_label and by_label[f.label].present == f.present for f in answer]
        diffs = [
            abs(f.probability - by_label[f.label].probability)
            for f in answer
            if f.label in by_label
        ]
        agree, diff = all(same), max(diffs, default=1.0)
        labels = (manifest.name, manifest.version, shadow_manifest.version)
        self.metrics.shadow.labels(*labels, "yes" if agree else "no").inc()
        self.metrics.shadow_diff.labels(*labels).observe(diff)
        record = {
            "model": manifest.name,
            "version": manifest.version,
            "shadow_version": shadow_manifest.version,
            "answer": [f.model_dump() for f in answer],
            "shadow": [f.model_dump() for f in shadow],
            "agree": agree,
            "max_abs_diff": diff,
            "recorded_at": time.time(),
        }
        name = f"shadow/{manifest.name}/{shadow_manifest.version}/{time.time_ns()}.json"
        await asyncio.to_thread(self.store.write, name, json.dumps(record).encode())


async def _unwrapped(call: Awaitable[Any]) -> Any:
    """Await a handle call; a radbridge error raised in the replica comes back as itself
    (Ray wraps it in RayTaskError), so the Api's error table answers it (e.g. 503)."""
    try:
        return await call
    except RayTaskError as exc:
        # A ModelRunner replica that died under the Preprocessor's call is the Pipeline's
        # transient fault (it runs the job again), as when the Api called it itself.
        if isinstance(exc.cause, RadbridgeError | RayActorError):
            raise exc.cause from None
        raise

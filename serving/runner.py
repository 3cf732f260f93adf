"""ModelRunner deployment: ONNX Runtime sessions per model version, dynamically batched.

- **Versions:** one deployment serves every installed model version through Serve's model
  multiplexing (the caller names ``name:version`` as the multiplexed model id); ``@serve.batch``
  splits batches by model id, so a batch never mixes versions, and a new version is loaded
  beside the old on its first request — switching versions fails no request.
- **Priority:** a :class:`~serving.scheduling.PriorityGate` in front of the batcher admits STAT
  work first, caps how long routine work may wait, and sheds sheddable work with 503 beyond
  ``max_queued``. ``max_ongoing_requests`` (checked by :mod:`serving.config`) is large enough for
  requests to reach the gate instead of queueing FIFO in Serve's router.
- **Batch formation:** ``@serve.batch`` forms the next batch from whatever reached its queue
  within ``batch_wait_timeout_s`` and parks it until the running batch ends, so under load it
  would cut a stream of requests into many one- or two-image batches queued behind each other.
  With ``hold_while_computing`` (default) requests admitted while a batch computes wait for it
  to end and then enter together: the next batch is as full as the waiting requests allow (up to
  ``max_batch_size``; the gate admits ``max_batch_size`` by default, highest priority first).
- **Event loop:** ``session.run`` runs in a worker thread, so the replica keeps answering health
  checks while a batch computes.
- **Providers:** TensorRT (engine cache on disk) → CUDA → CPU from ``user_config``; the provider
  that actually runs is reported with every result and by :meth:`info`; the health check fails
  when ``require_provider`` asks for a GPU provider that is not the one running.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from ray import serve

from models.manifest import ModelManifest
from models.nodules import sliding_window_probabilities
from models.repository import ModelRepository
from radbridge.errors import ModelError
from serving.config import MAX_MODELS_PER_REPLICA, RunnerConfig
from serving.providers import resolve_providers, session_providers
from serving.scheduling import PriorityGate

__all__ = ["ModelRunner", "usable_cpus"]

log = logging.getLogger("ray.serve")


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a Kubernetes
    CPU limit), so a pod limited to 4 CPUs on a 64-CPU node does not start 64 threads."""
    cpus = len(os.sched_getaffinity(0))
    v1 = cgroup / "cpu" / "cpu.cfs_quota_us"
    quotas = ((cgroup / "cpu.max", None), (v1, "cpu.cfs_period_us"))
    for path, period_file in quotas:
        try:
            fields = path.read_text().split()
            if period_file is None:  # cgroup v2: "<quota|max> <period>"
                quota, period = fields[0], fields[1]
            else:  # cgroup v1: quota in one file (-1: none), period in another
                quota, period = fields[0], (path.parent / period_file).read_text().split()[0]
        except (OSError, IndexError):
            continue
        if quota not in ("max", "-1"):
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
        break
    return cpus


class _Session:
    def __init__(
        self, key: str, path: Path, cfg: RunnerConfig, manifest: ModelManifest | None = None
    ) -> None:
        self.manifest = manifest
        opts = ort.SessionOptions()
        # ONNX Runtime's own default is one thread per physical core, which on a vCPU host
        # (2 vCPUs = 1 core with 2 threads) under Ray ran the CT model on one thread: the
        # sliding window took 0.83 s in the runner against 0.55 s on every CPU here.
        opts.intra_op_num_threads = cfg.intra_op_threads or usable_cpus()
        spin = "1" if cfg.allow_spinning else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        wanted = resolve_providers(cfg.providers)
        self.key = key
        self.session = ort.InferenceSession(
            str(path), opts, providers=session_providers(wanted, cfg.trt_engine_cache_dir)
        )
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        if self.provider != wanted[0]:
            log.warning("%s: asked for %s but %s runs", key, wanted[0], self.provider)
        log.info("%s: ONNX Runtime provider in use: %s", key, self.provider)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])


@serve.deployment(name="ModelRunner", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=320)
class ModelRunner:
    """One replica's ONNX Runtime sessions (a model version each, multiplexed), behind a
    priority gate and a batcher: classifier images batched, a segmenter's volume windowed
    here beside its session (the module docstring tells how)."""

    def __init__(self, repository: str) -> None:
        self.repository = ModelRepository(Path(repository))
        self.config = RunnerConfig()
        self.gate = PriorityGate(self.config.admitted, self.config.max_queued)
        # weak: the multiplexer's LRU owns sessions; an evicted one leaves this view too
        self.sessions: weakref.WeakValueDictionary[str, _Session] = weakref.WeakValueDictionary()
        self._batches = itertools.count(1)
        self._problem: str | None = None
        self._loading = asyncio.Lock()
        self._computing = 0  # batches in session.run now
        self._batcher_open = asyncio.Event()  # set: no batch computing (or holding is off)
        self._batcher_open.set()
        self.warmed: dict[str, float] = {}  # model id -> seconds its start-up load + run took
        self._configure({})

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's user_config before the replica takes its
        first request, and again on a live redeploy: configure, then preload."""
        self._configure(user_config)
        await self._preload()

    def _configure(self, user_config: dict[str, Any]) -> None:
        cfg = RunnerConfig.model_validate(user_config or {})
        self.config = cfg
        self.infer.set_max_batch_size(cfg.max_batch_size)  # type: ignore[attr-defined]
        self.infer.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.gate.capacity = cfg.admitted
        self.gate.max_waiting = cfg.max_queued
        self.gate.max_wait_s = {str(p): s for p, s in cfg.max_wait_s.items()}
        if not cfg.hold_while_computing or not self._computing:
            self._batcher_open.set()
        self._problem = self._provider_problem()
        if self._problem:  # fails the deploy (and readiness) at once, naming the reason
            log.error("ModelRunner unhealthy: %s", self._problem)
            raise ModelError(self._problem)

    def _provider_problem(self) -> str | None:
        """Healthy unless a GPU provider is required and neither it nor a provider listed
        before it (e.g. TensorRT before a required CUDA) is what runs."""
        need = self.config.require_provider
        if need is None:
            return None
        names = self.config.providers
        acceptable = set(resolve_providers(names[: names.index(need) + 1])) - {
            "CPUExecutionProvider"
        }
        if not acceptable:
            return f"require_provider {need}: not available on this node"
        other = sorted({s.provider for s in self.sessions.values()} - acceptable)
        if other:
            return f"require_provider {need}: sessions run on {other}"
        return None

    async def _preload(self) -> None:
        """Load and run once each model of ``preload`` not loaded yet (the replica is not
        ready until this returns, so no request waits behind a cold session)."""
        wanted = self.config.preload
        if wanted is None:
            newest: dict[str, str] = {}
            for model in await asyncio.to_thread(self.repository.list):
                newest[model.manifest.name] = model.key  # sorted by version: the last wins
            wanted = sorted(newest.values())[:MAX_MODELS_PER_REPLICA]
        for model_id in wanted:
            if model_id in self.sessions:
                continue
            t0 = time.perf_counter()
            sess = await self.session(model_id)
            await asyncio.to_thread(_warm_up, sess)
            self.warmed[model_id] = time.perf_counter() - t0
            log.info("%s preloaded in %.2f s", model_id, self.warmed[model_id])

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def session(self, model_id: str) -> _Session:
        name, _, version = model_id.partition(":")
        async with self._loading:  # sub-batches of two versions may ask at once
            model = await asyncio.to_thread(self.repository.get, name, version or None)
            sess = await asyncio.to_thread(
                _Session, model.key, model.onnx_path, self.config, model.manifest
            )
        self.sessions[model_id] = sess
        self._problem = self._provider_problem()
        return sess

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def infer(self, tensors: list[np.ndarray]) -> list[dict[str, Any]]:
        sess = await self.session(serve.get_multiplexed_model_id())
        batch = np.stack(tensors).astype(np.float32, copy=False)
        self._computing += 1
        if self.config.hold_while_computing:
            self._batcher_open.clear()
        try:
            t0 = time.perf_counter()
            logits = await asyncio.to_thread(sess.run, batch)
            seconds = time.perf_counter() - t0
        finally:
            self._computing -= 1
            if not self._computing:
                self._batcher_open.set()
        n, seq = len(tensors), next(self._batches)
        return [
            {
                "logits": logits[i],
                "batch_size": n,
                "batch_seq": seq,
                "seconds": seconds,
                "provider": sess.provider,
                "model": sess.key,
            }
            for i in range(n)
        ]

    async def __call__(
        self, tensor: np.ndarray, priority: str = "routine", shed: bool = False
    ) -> dict[str, Any]:
        """One input tensor (the model's shape without the batch axis) → its logits, with the
        batch it ran in, the provider and the time it waited."""
        _model_named()
        async with self.gate.slot(priority, shed=shed) as waited:
            t0 = time.monotonic()
            await self._batcher_open.wait()  # hold_while_computing: join the next batch
            held = time.monotonic() - t0
            out = await self.infer(tensor)
        return {**out, "queue_wait": waited + held}

    async def many(
        self, tensors: np.ndarray, priority: str = "routine", shed: bool = False
    ) -> list[dict[str, Any]]:
        """The images of one request (axis 0), as :meth:`__call__` answers each. Sheddable work
        is admitted whole or refused whole (503 before any compute); each image then passes the
        gate and joins batches like a request of its own, beside other requests' images. One
        handle call instead of one per image: the Api and Ray's transport pay once."""
        _model_named()
        if shed:
            self.gate.check_room(len(tensors), priority)
        return list(await asyncio.gather(*(self(t, priority, False) for t in tensors)))

    async def segment(self, image: np.ndarray, priority: str = "routine") -> dict[str, Any]:
        """A preprocessed volume (C, z, y, x) -> per-class probabilities (classes, z, y, x) by
        MONAI sliding-window inference here, beside the session: the volume crosses Ray once
        and its windows never do (through handles, each window's input and logits went through
        the object store: twice the model's own time on a 2-core host, loadtests/ct_latency).
        One gate slot for the whole volume, at the study's priority; the windows run in the
        manifest's sw_batch_size chunks, between which other requests' batches run."""
        _model_named()
        sess = await self.session(serve.get_multiplexed_model_id())
        seg = sess.manifest.segmentation if sess.manifest is not None else None
        if seg is None:
            raise ModelError(f"{sess.key}: not a segmentation model")
        windows = 0

        def counted(batch: np.ndarray) -> np.ndarray:
            nonlocal windows
            windows += len(batch)
            return sess.run(batch)

        async with self.gate.slot(priority, shed=False) as waited:
            t0 = time.perf_counter()
            probs = await asyncio.to_thread(sliding_window_probabilities, counted, image, seg)
            seconds = time.perf_counter() - t0
        return {
            "probabilities": probs,
            "windows": windows,
            "seconds": seconds,
            "queue_wait": waited,
            "provider": sess.provider,
            "model": sess.key,
        }

    async def info(self) -> dict[str, Any]:
        """What runs here: providers per loaded model, the gate's state, any health problem."""
        return {
            "sessions": {k: s.provider for k, s in self.sessions.items()},
            "warmed": dict(self.warmed),
            "problem": self._problem,
            "waiting": self.gate.waiting,
            "running": self.gate.running,
            "admitted": dict(self.gate.stats.admitted),
            "shed": dict(self.gate.stats.shed),
            "promoted": self.gate.stats.promoted,
        }

    def check_health(self) -> None:
        if self._problem:
            raise ModelError(self._problem)


def _warm_up(sess: _Session) -> None:
    """One zero input through the session as requests will use it: ONNX Runtime sizes its
    arenas and picks its kernels on the first run, and a segmenter's first sliding window
    imports torch and MONAI's inferer (seconds on a small host)."""
    m = sess.manifest
    if m is None:
        return
    channels, *spatial = m.input.shape[1:]
    if m.segmentation is not None and isinstance(channels, int):
        roi = m.segmentation.roi_size
        sess.run(np.zeros((m.segmentation.sw_batch_size, channels, *roi), np.float32))
        volume = np.zeros((channels, *roi), np.float32)
        sliding_window_probabilities(sess.run, volume, m.segmentation)
    else:
        dims = [d for d in (channels, *spatial) if isinstance(d, int)]
        if len(dims) == len(spatial) + 1:  # a symbolic size: no zero input fits every model
            sess.run(np.zeros((1, *dims), np.float32))


def _model_named() -> None:
    if not serve.get_multiplexed_model_id():
        raise ModelError("no model named: call with multiplexed_model_id='name:version'")

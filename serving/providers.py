"""ONNX Runtime execution providers: what configuration asks for, what the host can run."""

from __future__ import annotations

import glob
from collections.abc import Sequence

import onnxruntime as ort

__all__ = ["gpu_present", "resolve_providers", "session_providers"]

_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def gpu_present() -> bool:
    """True when an NVIDIA device node exists (onnxruntime-gpu lists CUDA even without one)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def resolve_providers(wanted: Sequence[str]) -> list[str]:
    """Map config names to available ORT providers, in order; CPU is always the last resort."""
    available = set(ort.get_available_providers())
    has_gpu = gpu_present()
    out = []
    for name in wanted:
        provider = _NAMES[name]
        if provider not in available:
            continue
        if name in ("tensorrt", "cuda") and not has_gpu:
            continue
        out.append(provider)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def session_providers(
    resolved: Sequence[str], trt_engine_cache_dir: str | None = None
) -> list[str | tuple[str, dict[str, object]]]:
    """Provider entries for ``ort.InferenceSession``; TensorRT keeps built engines on disk."""
    out: list[str | tuple[str, dict[str, object]]] = []
    for provider in resolved:
        if provider == "TensorrtExecutionProvider" and trt_engine_cache_dir:
            out.append(
                (
                    provider,
                    {
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": trt_engine_cache_dir,
                        "trt_timing_cache_enable": True,
                    },
                )
            )
        else:
            out.append(provider)
    return out

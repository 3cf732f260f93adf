"""Export a torch model to ONNX the way every radbridge model is exported.

Opset 17, the TorchScript-based exporter (``dynamo=False``: the models are plain
convolutional networks it handles exactly), one input and one output named as the model
manifest expects (``image`` → ``logits`` by default) and dynamic axes (the batch axis at least,
plus spatial axes for models that take any volume size).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from radbridge.errors import ModelError

__all__ = ["BATCH", "MAX_ABS_DIFF", "export_onnx", "torch_vs_onnx"]

MAX_ABS_DIFF = 1e-4  # torch vs ONNX Runtime on the same input, after an export

BATCH: Mapping[int, str] = {0: "batch"}


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    axes: Mapping[int, str] = BATCH,
    input_name: str = "image",
    output_name: str = "logits",
) -> None:
    """Write ``model`` (in eval mode), traced on ``example``, to ``path``."""
    with warnings.catch_warnings():
        # the exporter's notices that the TorchScript path is deprecated: asked for on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            opset_version=17,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: dict(axes), output_name: dict(axes)},
            dynamo=False,
        )


def torch_vs_onnx(
    path: Path, cases: Mapping[str, np.ndarray], predict: Callable[[np.ndarray], np.ndarray]
) -> tuple[float, dict[str, float]]:
    """Check the exported model at ``path`` (ONNX checker), then run each case through ONNX
    Runtime and through ``predict`` (the torch model): the largest absolute difference, over
    all and per case. Raises ``ModelError`` on a shape mismatch or a difference of
    ``MAX_ABS_DIFF`` or more."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    diffs = {}
    for key, x in cases.items():
        x = np.ascontiguousarray(x)
        want = np.asarray(predict(x), dtype=np.float64)
        got = np.asarray(sess.run(None, {name: x})[0], dtype=np.float64)
        if got.shape != want.shape:
            raise ModelError(f"onnx export: {key}: output shape {got.shape} != {want.shape}")
        diffs[key] = float(np.max(np.abs(got - want)))
    worst = max(diffs.values())
    if worst >= MAX_ABS_DIFF:
        raise ModelError(f"onnx export: max abs diff torch vs ORT {worst:.3g} >= {MAX_ABS_DIFF}")
    return worst, diffs

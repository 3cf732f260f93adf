"""Export a torch model to ONNX the way every radbridge model is exported.

Opset 17, the TorchScript-based exporter (``dynamo=False``: the models are plain
convolutional networks it handles exactly), one input and one output named as the model
manifest expects (``image`` → ``logits`` by default) and dynamic axes (the batch axis at least,
plus spatial axes for models that take any volume size).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["BATCH", "export_onnx"]

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

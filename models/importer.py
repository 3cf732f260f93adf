"""Bring-your-own model: import an ONNX file + manifest into the repository, verified.

A model is accepted only after (1) its manifest validates, (2) the file's sha256 and its ONNX
input/output signature agree with the manifest, and (3) a validation inference runs: a synthetic
frame goes through the manifest's own preprocessing and ONNX Runtime (CPU) at batch 2, and the
output must have one finite value per label. The model appears under ``<name>/<version>`` only
after all three passed (staged, then renamed into place).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
import yaml

from models.manifest import ModelManifest, dump_manifest, load_manifest
from models.repository import MANIFEST_FILE, MODEL_FILE, LoadedModel, ModelRepository, file_sha256
from models.transforms import build_pipeline
from radbridge.errors import ModelError

__all__ = ["import_model", "validation_inference"]


def validation_inference(model: LoadedModel, batch: int = 2) -> np.ndarray:
    """Run a synthetic input through preprocessing and the ONNX model; returns the output.

    Classifiers get a test frame; segmenters a synthetic volume by sliding window
    (``models.nodules.segmentation_validation_inference``).

    Raises:
        ModelError: When preprocessing does not produce the manifest's input shape, or the
            output's shape or values are wrong.
    """
    m = model.manifest
    if m.task == "segmentation":  # a volume through sliding windows, not one frame
        from models.nodules import segmentation_validation_inference

        return segmentation_validation_inference(model, batch)
    frame = np.tile(np.linspace(0, 4095, 256, dtype=np.float32), (256, 1))
    try:
        tensor = np.asarray(build_pipeline(m.preprocessing)(frame), dtype=np.float32)
    except Exception as exc:  # any transform failure is the manifest's problem
        raise ModelError(f"{model.key}: preprocessing failed on a test frame: {exc}") from None
    want = m.input.shape[1:]
    if len(want) != tensor.ndim or any(
        isinstance(w, int) and w != g for w, g in zip(want, tensor.shape, strict=True)
    ):
        raise ModelError(
            f"{model.key}: preprocessing yields {list(tensor.shape)}, input expects {want}"
        )
    session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    x = np.repeat(tensor[None], batch, axis=0).astype(m.input.dtype)
    try:
        out = np.asarray(session.run(None, {m.input.name: x})[0])
    except Exception as exc:  # ONNX Runtime raises its own types
        raise ModelError(f"{model.key}: validation inference failed: {exc}") from None
    if out.shape != (batch, len(m.labels)):
        raise ModelError(
            f"{model.key}: output shape {list(out.shape)} at batch {batch}, "
            f"expected [{batch}, {len(m.labels)}] (one per label)"
        )
    if not np.isfinite(out).all():
        raise ModelError(f"{model.key}: validation inference produced non-finite values")
    return out


def import_model(
    repo_root: Path, onnx_file: Path, manifest_file: Path, *, force: bool = False
) -> LoadedModel:
    """Copy a user's ONNX model and manifest into the repository after validating both.

    A manifest without ``sha256`` gets the file's; one with a different sha256 is refused.
    """
    onnx_file, manifest_file = Path(onnx_file), Path(manifest_file)
    if not onnx_file.is_file():
        raise ModelError(f"{onnx_file}: no such ONNX file")
    digest = file_sha256(onnx_file)
    try:
        raw = yaml.safe_load(manifest_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"{manifest_file}: cannot read manifest: {exc}") from None
    if isinstance(raw, dict) and not raw.get("sha256"):
        raw["sha256"] = digest
    staging_root = Path(repo_root) / f".staging-{uuid.uuid4().hex}"
    try:
        staging_root.mkdir(parents=True)
        staged_manifest = staging_root / "manifest.in.yaml"
        staged_manifest.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
        manifest: ModelManifest = load_manifest(staged_manifest)
        if manifest.sha256 != digest:
            raise ModelError(
                f"{manifest.name}:{manifest.version}: sha256 mismatch: manifest "
                f"{manifest.sha256}, file {digest}"
            )
        target = Path(repo_root) / manifest.name / manifest.version
        if target.exists() and not force:
            raise ModelError(f"{manifest.name}:{manifest.version}: already in the repository")
        version_dir = staging_root / manifest.name / manifest.version
        version_dir.mkdir(parents=True)
        shutil.copyfile(onnx_file, version_dir / MODEL_FILE)
        dump_manifest(manifest, version_dir / MANIFEST_FILE)
        validation_inference(ModelRepository(staging_root).validate(version_dir))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(version_dir, target)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return ModelRepository(Path(repo_root)).validate(target)

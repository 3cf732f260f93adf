"""Model manifests: the typed contract between a model file, training, and serving.

A manifest lives next to its ONNX file as ``manifest.yaml``. A bad manifest fails at load
with a ``ModelError`` naming the file and the field (``labels[2].display``).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from radbridge.errors import ModelError

__all__ = [
    "DEMO_INTENDED_USE",
    "LabelSpec",
    "ModelManifest",
    "TensorSpec",
    "TransformSpec",
    "dump_manifest",
    "load_manifest",
]

DEMO_INTENDED_USE = "demo model — not for diagnostic use"
REQUIRED_LANGUAGES = ("en", "ru", "zh")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _slug(v: str) -> str:
    if not _SLUG.match(v):
        raise ValueError("must be a slug: lowercase letters, digits, '-' or '_', 1-63 characters")
    return v


class LabelSpec(_Strict):
    """One output of a multilabel classifier."""

    key: str = Field(description="Stable slug of the finding, e.g. 'cardiomegaly'.")
    display: dict[str, str] = Field(description="Display name per language; en, ru, zh required.")
    snomed: str | None = Field(None, description="SNOMED CT concept id of the finding.")
    radlex: str | None = Field(None, description="RadLex id (RID...) of the finding.")
    threshold: float = Field(ge=0.0, le=1.0, description="Probability at or above which present.")

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        return _slug(v)

    @field_validator("display")
    @classmethod
    def _languages(cls, v: dict[str, str]) -> dict[str, str]:
        missing = [lang for lang in REQUIRED_LANGUAGES if not v.get(lang, "").strip()]
        if missing:
            raise ValueError(f"missing display name(s) for {missing}")
        return v


class TransformSpec(_Strict):
    """One array transform of ``monai.transforms``, by class name and keyword arguments."""

    name: str = Field(description="Class name in monai.transforms, e.g. 'ScaleIntensityRange'.")
    args: dict[str, Any] = Field(default_factory=dict, description="Constructor keyword args.")

    @field_validator("name")
    @classmethod
    def _exists(cls, v: str) -> str:
        import monai.transforms as mt

        obj = getattr(mt, v, None)
        if not (isinstance(obj, type) and issubclass(obj, mt.Transform)):
            raise ValueError(f"{v!r} is not a transform class of monai.transforms")
        if issubclass(obj, mt.MapTransform):
            raise ValueError(f"{v!r} is a dictionary transform; use the array version")
        if issubclass(obj, mt.Compose):
            raise ValueError(f"{v!r} composes transforms; list them one by one instead")
        return v


class TensorSpec(_Strict):
    """Name, shape and dtype of a model input or output."""

    name: str = Field(description="Tensor name in the ONNX graph.")
    shape: list[int | str] = Field(
        min_length=1, description="Dimensions; a string names a dynamic axis, e.g. 'batch'."
    )
    dtype: Literal["float32", "float16"] = Field(description="Element type.")

    @field_validator("shape")
    @classmethod
    def _dims(cls, v: list[int | str]) -> list[int | str]:
        for d in v:
            if isinstance(d, int) and d < 1:
                raise ValueError(f"fixed dimensions must be >= 1, got {d}")
            if isinstance(d, str) and not d.strip():
                raise ValueError("dynamic axis names must not be empty")
        return v


class ModelManifest(_Strict):
    """Everything serving needs to know about one model version."""

    name: str = Field(description="Model slug; the repository folder name.")
    version: str = Field(pattern=r"^[0-9]+$", description="Integer version; the folder name.")
    modalities: list[str] = Field(min_length=1, description="DICOM modalities served, e.g. DX.")
    body_parts: list[str] = Field(description="DICOM BodyPartExamined values served; [] = any.")
    task: Literal["multilabel_classification"] = Field(description="What the outputs mean.")
    input: TensorSpec = Field(description="Model input (preprocessed image batch).")
    output: TensorSpec = Field(description="Model output (logits, one per label).")
    preprocessing: list[TransformSpec] = Field(
        description="MONAI pipeline: float32 (H, W) after modality LUT -> (C, H', W')."
    )
    labels: list[LabelSpec] = Field(min_length=1, description="One per output logit, in order.")
    sha256: str = Field(description="SHA-256 of model.onnx, lowercase hex.")
    intended_use: str = Field(min_length=1, description="Shown with every result.")
    provenance: dict[str, Any] = Field(
        default_factory=dict, description="How it was made: seed, data, epochs, versions, time."
    )
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Held-out AUROC per label, thresholds, export check."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _slug(v)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError("must be 64 lowercase hex characters")
        return v

    @field_validator("modalities", "body_parts")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        for item in v:
            if not re.match(r"^[A-Z0-9_ ]{1,16}$", item):
                raise ValueError(f"{item!r} is not an uppercase DICOM code string")
        return v

    @model_validator(mode="after")
    def _labels_match_output(self) -> ModelManifest:
        last = self.output.shape[-1]
        if isinstance(last, int) and last != len(self.labels):
            raise ValueError(
                f"labels: {len(self.labels)} label(s) but output {self.output.name!r} "
                f"has {last} in its last dimension"
            )
        keys = [lbl.key for lbl in self.labels]
        if len(set(keys)) != len(keys):
            raise ValueError(f"labels: duplicate keys in {keys}")
        return self


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _problem(loc: tuple[int | str, ...], msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    return f"{_loc(loc)}: {msg}" if loc else msg


def load_manifest(path: Path | str) -> ModelManifest:
    """Read and validate a manifest YAML file.

    Raises:
        ModelError: ``"<path>: <field.path>: <message>"`` for each problem found.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelError(f"{path}: cannot read manifest: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: (manifest): must be a mapping, got {type(data).__name__}")
    try:
        return ModelManifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_problem(e["loc"], e["msg"]) for e in exc.errors())
        raise ModelError(f"{path}: {problems}") from None


def dump_manifest(manifest: ModelManifest, path: Path | str) -> None:
    """Write ``manifest`` as YAML atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    text = yaml.safe_dump(
        manifest.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=100
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; readers may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

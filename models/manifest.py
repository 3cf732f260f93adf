"""Model manifests: the typed contract between a model file, training, and serving.

A manifest lives next to its ONNX file as ``manifest.yaml``. A bad manifest fails at load
with a ``ModelError`` naming the file and the field (``labels[2].display``).

Two tasks: ``multilabel_classification`` (one logit per label, the chest radiograph models)
and ``segmentation`` (a volumetric segmenter: one channel per label after a background
channel, run by sliding window over a CT volume resampled to ``segmentation.spacing_mm``).
A segmentation manifest carries a ``segmentation`` section; a classifier's has none, so
classifier manifests written before segmentation existed validate unchanged.
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
    "SegmentationSpec",
    "TensorSpec",
    "TransformSpec",
    "dump_manifest",
    "load_manifest",
    "version_key",
]

DEMO_INTENDED_USE = "demo model — not for diagnostic use"
REQUIRED_LANGUAGES = ("en", "ru", "zh")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def version_key(version: str) -> tuple[int, str]:
    """How model versions sort: numbers by value, after any non-numeric version."""
    return (int(version), "") if version.isdigit() else (-1, version)


def _slug(v: str) -> str:
    if not _SLUG.match(v):
        raise ValueError("must be a slug: lowercase letters, digits, '-' or '_', 1-63 characters")
    return v


class LabelSpec(_Strict):
    """One output: a classifier's logit, or a segmenter's class channel (after background)."""

    key: str = Field(description="Stable slug of the finding, e.g. 'cardiomegaly'.")
    display: dict[str, str] = Field(description="Display name per language; en, ru, zh required.")
    snomed: str | None = Field(None, description="SNOMED CT concept id of the finding.")
    radlex: str | None = Field(None, description="RadLex id (RID...) of the finding.")
    threshold: float = Field(
        ge=0.0, le=1.0, description="Probability (per image or voxel) at or above which present."
    )

    @property
    def codes(self) -> dict[str, str]:
        """The finding's codes by scheme (SCT, RADLEX), those the manifest gives."""
        return {k: v for k, v in (("SCT", self.snomed), ("RADLEX", self.radlex)) if v}

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


class SegmentationSpec(_Strict):
    """How to run a volumetric segmenter and turn its output into findings."""

    spacing_mm: list[float] = Field(
        min_length=3, max_length=3, description="(z, y, x) voxel spacing the model expects, mm."
    )
    hu_window: list[float] = Field(
        min_length=2,
        max_length=2,
        description="[low, high] HU the preprocessing maps to [0, 1] (its ScaleIntensityRange).",
    )
    roi_size: list[int] = Field(
        min_length=3, max_length=3, description="(z, y, x) sliding-window size, voxels."
    )
    overlap: float = Field(ge=0.0, lt=1.0, description="Sliding-window overlap fraction.")
    sw_batch_size: int = Field(4, ge=1, description="Windows per inference call.")
    blend_mode: Literal["gaussian", "constant"] = Field(
        "gaussian", description="How overlapping windows are blended (MONAI sliding window)."
    )
    padding_mode: Literal["constant", "replicate"] = Field(
        "constant",
        description="How a volume smaller than roi_size is padded (constant pads with 0, the "
        "bottom of the window; replicate repeats the edge voxels).",
    )
    activation: Literal["softmax", "sigmoid"] = Field(
        description="softmax: channel 0 is background, label i is channel i+1; sigmoid: label "
        "i is channel i."
    )
    min_volume_mm3: float = Field(
        ge=0.0, description="Connected components smaller than this are not reported."
    )
    spatial_multiple: int = Field(
        1, ge=1, description="Each spatial input dimension must be a multiple of this."
    )

    @field_validator("spacing_mm")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if min(v) <= 0:
            raise ValueError(f"spacings must be > 0, got {v}")
        return v

    @field_validator("hu_window")
    @classmethod
    def _window(cls, v: list[float]) -> list[float]:
        if v[0] >= v[1]:
            raise ValueError(f"low must be below high, got {v}")
        return v

    @field_validator("roi_size")
    @classmethod
    def _roi(cls, v: list[int]) -> list[int]:
        if min(v) < 1:
            raise ValueError(f"sizes must be >= 1, got {v}")
        return v

    @property
    def channels_per_label_offset(self) -> int:
        """Output channel of label 0 (1 after a softmax background channel, else 0)."""
        return 1 if self.activation == "softmax" else 0


class ModelManifest(_Strict):
    """Everything serving needs to know about one model version."""

    name: str = Field(description="Model slug; the repository folder name.")
    version: str = Field(pattern=r"^[0-9]+$", description="Integer version; the folder name.")
    modalities: list[str] = Field(min_length=1, description="DICOM modalities served, e.g. DX.")
    body_parts: list[str] = Field(description="DICOM BodyPartExamined values served; [] = any.")
    task: Literal["multilabel_classification", "segmentation"] = Field(
        description="What the outputs mean."
    )
    input: TensorSpec = Field(
        description="Model input: preprocessed image batch (N, C, H, W) or volume batch "
        "(N, C, Z, Y, X)."
    )
    output: TensorSpec = Field(
        description="Model output: logits, one per label (classifier), or per-voxel class "
        "logits (N, classes, Z, Y, X) (segmenter)."
    )
    preprocessing: list[TransformSpec] = Field(
        description="MONAI pipeline: float32 (H, W) after modality LUT -> (C, H', W'); for a "
        "segmenter (Z, Y, X) HU at segmentation.spacing_mm -> (C, Z, Y, X)."
    )
    labels: list[LabelSpec] = Field(
        min_length=1, description="One per output logit or (non-background) class, in order."
    )
    segmentation: SegmentationSpec | None = Field(
        None, description="Segmenters only: spacing, HU window, sliding window, post-processing."
    )
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
        keys = [lbl.key for lbl in self.labels]
        if len(set(keys)) != len(keys):
            raise ValueError(f"labels: duplicate keys in {keys}")
        if self.task == "segmentation":
            _check_segmentation(self)
            return self
        if self.segmentation is not None:
            raise ValueError(f"segmentation: only for task 'segmentation', not {self.task!r}")
        last = self.output.shape[-1]
        if isinstance(last, int) and last != len(self.labels):
            raise ValueError(
                f"labels: {len(self.labels)} label(s) but output {self.output.name!r} "
                f"has {last} in its last dimension"
            )
        return self


def _check_segmentation(m: ModelManifest) -> None:
    """Cross-field rules of a segmenter: tensors, channels, window and HU window agree."""
    seg = m.segmentation
    if seg is None:
        raise ValueError("segmentation: required when task is 'segmentation'")
    for role, spec in (("input", m.input), ("output", m.output)):
        if len(spec.shape) != 5:
            raise ValueError(
                f"{role}.shape: a volumetric segmenter takes (batch, channels, z, y, x), "
                f"got {spec.shape}"
            )
    channels = m.output.shape[1]
    want = len(m.labels) + seg.channels_per_label_offset
    if isinstance(channels, int) and channels != want:
        raise ValueError(
            f"labels: {len(m.labels)} label(s) with {seg.activation} need {want} channel(s), "
            f"output {m.output.name!r} has {channels}"
        )
    if not isinstance(m.input.shape[1], int):
        raise ValueError(f"input.shape: the channel dimension must be fixed, got {m.input.shape}")
    for axis, (d_in, d_out, roi) in enumerate(
        zip(m.input.shape[2:], m.output.shape[2:], seg.roi_size, strict=True)
    ):
        if d_in != d_out:
            raise ValueError(
                f"output.shape: spatial dim {axis + 2} must equal the input's ({d_in!r}), "
                f"got {d_out!r}"
            )
        if isinstance(d_in, int) and d_in != roi:
            raise ValueError(
                f"segmentation.roi_size: {seg.roi_size} but the input is fixed at "
                f"{m.input.shape[2:]}"
            )
        if roi % seg.spatial_multiple:
            raise ValueError(
                f"segmentation.roi_size: {seg.roi_size} is not a multiple of "
                f"spatial_multiple {seg.spatial_multiple}"
            )
    windows = [t for t in m.preprocessing if t.name == "ScaleIntensityRange"]
    if len(windows) != 1:
        raise ValueError(
            "segmentation.hu_window: the preprocessing must apply it with exactly one "
            f"ScaleIntensityRange, found {len(windows)}"
        )
    applied = [windows[0].args.get("a_min"), windows[0].args.get("a_max")]
    if applied != seg.hu_window:
        raise ValueError(
            f"segmentation.hu_window: {seg.hu_window} but the preprocessing's "
            f"ScaleIntensityRange applies [a_min, a_max] = {applied}"
        )


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

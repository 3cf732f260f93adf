"""Model manifests: a bad manifest fails at load and names the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from models.manifest import (
    DEMO_INTENDED_USE,
    ModelManifest,
    TransformSpec,
    dump_manifest,
    load_manifest,
    version_key,
)
from models.transforms import DEMO_PREPROCESSING, build_pipeline
from radbridge.errors import ModelError

LABEL = {
    "key": "cardiomegaly",
    "display": {"en": "Cardiomegaly", "ru": "Кардиомегалия", "zh": "心脏扩大"},
    "snomed": "8186001",
    "radlex": None,
    "threshold": 0.5,
}
GOOD: dict[str, Any] = {
    "name": "tiny",
    "version": "1",
    "modalities": ["DX"],
    "body_parts": ["CHEST"],
    "task": "multilabel_classification",
    "input": {"name": "image", "shape": ["batch", 1, 128, 128], "dtype": "float32"},
    "output": {"name": "logits", "shape": ["batch", 2], "dtype": "float32"},
    "preprocessing": DEMO_PREPROCESSING,
    "labels": [LABEL, {**LABEL, "key": "nodule"}],
    "sha256": "0" * 64,
    "intended_use": DEMO_INTENDED_USE,
    "provenance": {"seed": 0},
    "metrics": {},
}


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_good_manifest_round_trips(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path, GOOD))
    assert m.labels[1].key == "nodule" and m.input.shape[0] == "batch"
    dump_manifest(m, tmp_path / "again.yaml")
    assert load_manifest(tmp_path / "again.yaml") == m
    assert "Кардиомегалия" in (tmp_path / "again.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("labels", 0, "display"), {"en": "Cardiomegaly"}, "labels[0].display"),
        (("labels", 1, "threshold"), 1.5, "labels[1].threshold"),
        (("sha256",), "abc", "sha256"),
        (("input", "dtype"), "int8", "input.dtype"),
        (("name",), "Bad Name", "name"),
        (("version",), "v1", "version"),
        (("surprise",), 1, "surprise"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, path: tuple[Any, ...], value: Any, needle: str) -> None:
    data = copy.deepcopy(GOOD)
    target = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    manifest_path = _write(tmp_path, data)
    with pytest.raises(ModelError) as exc:
        load_manifest(manifest_path)
    assert str(exc.value).startswith(f"{manifest_path}: ")
    assert needle in str(exc.value)


def test_unknown_monai_transform_fails(tmp_path: Path) -> None:
    data = copy.deepcopy(GOOD)
    data["preprocessing"][1]["name"] = "ScaleIntensityRangeTypo"
    with pytest.raises(ModelError, match=r"preprocessing\[1\]\.name: .*ScaleIntensityRangeTypo"):
        load_manifest(_write(tmp_path, data))


def test_dictionary_transform_and_compose_fail() -> None:
    with pytest.raises(ValueError, match="dictionary transform"):
        TransformSpec(name="ScaleIntensityRanged")
    with pytest.raises(ValueError, match="composes transforms"):
        TransformSpec(name="Compose")


def test_label_count_must_match_output(tmp_path: Path) -> None:
    data = copy.deepcopy(GOOD)
    data["output"]["shape"] = ["batch", 4]
    with pytest.raises(ModelError, match=r"labels: 2 label\(s\) but output 'logits' has 4"):
        load_manifest(_write(tmp_path, data))


def test_unreadable_yaml_fails(tmp_path: Path) -> None:
    path = tmp_path / "manifest.yaml"
    path.write_text("name: [unclosed", encoding="utf-8")
    with pytest.raises(ModelError, match="cannot read manifest"):
        load_manifest(path)
    with pytest.raises(ModelError, match="cannot read manifest"):
        load_manifest(tmp_path / "missing.yaml")


def test_demo_pipeline_shape_and_range() -> None:
    m = ModelManifest.model_validate(GOOD)
    run = build_pipeline(m.preprocessing)
    img = np.linspace(-100, 5000, 256 * 200, dtype=np.float32).reshape(256, 200)
    out = run(img)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (1, 128, 128)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_pipeline_rejects_bad_args_and_rank() -> None:
    with pytest.raises(ModelError, match=r"preprocessing\[0\] \(Resize\)"):
        build_pipeline([TransformSpec(name="Resize", args={"no_such_arg": 1})])
    run = build_pipeline([TransformSpec.model_validate(s) for s in DEMO_PREPROCESSING])
    with pytest.raises(ModelError, match="2-D"):
        run(np.zeros((2, 8, 8), dtype=np.float32))


def test_versions_sort_by_number_after_any_non_numeric_one() -> None:
    """The repository, the router and the Api's newest version all sort by this one key."""
    assert sorted(["10", "2", "beta", "1"], key=version_key) == ["beta", "1", "2", "10"]

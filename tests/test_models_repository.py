"""Model repository: only validated models come out; each mismatch names itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from models.manifest import DEMO_INTENDED_USE, ModelManifest, dump_manifest
from models.onnx_export import export_onnx
from models.repository import LoadedModel, ModelRepository, file_sha256
from radbridge.errors import ModelError

LABEL = {"display": {"en": "x", "ru": "х", "zh": "叉"}, "threshold": 0.5}


class _OneConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    torch.manual_seed(0)
    export_onnx(_OneConv(), torch.zeros(1, 1, 16, 16), path)
    return path


def _install(root: Path, onnx_file: Path, version: str = "1", **changes: object) -> Path:
    version_dir = root / "tiny" / version
    version_dir.mkdir(parents=True)
    shutil.copy(onnx_file, version_dir / "model.onnx")
    data = {
        "name": "tiny",
        "version": version,
        "modalities": ["DX", "CR"],
        "body_parts": ["CHEST"],
        "task": "multilabel_classification",
        "input": {"name": "image", "shape": ["batch", 1, 16, 16], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 2], "dtype": "float32"},
        "preprocessing": [{"name": "EnsureChannelFirst", "args": {"channel_dim": "no_channel"}}],
        "labels": [{"key": "a", **LABEL}, {"key": "b", **LABEL}],
        "sha256": file_sha256(version_dir / "model.onnx"),
        "intended_use": DEMO_INTENDED_USE,
        "provenance": {},
        "metrics": {},
        **changes,
    }
    dump_manifest(ModelManifest.model_validate(data), version_dir / "manifest.yaml")
    return version_dir


def test_valid_model_loads(tmp_path: Path, tiny_onnx: Path) -> None:
    version_dir = _install(tmp_path, tiny_onnx)
    repo = ModelRepository(tmp_path)
    (model,) = repo.list()
    assert isinstance(model, LoadedModel)
    assert model.key == "tiny:1" and model.onnx_path == version_dir / "model.onnx"
    assert repo.get("tiny") == model == repo.get("tiny", "1") == repo.validate(version_dir)
    assert repo.for_modality("CR") == model
    assert repo.for_modality("MR") is None


def test_empty_or_missing_root_lists_nothing(tmp_path: Path) -> None:
    assert ModelRepository(tmp_path / "nope").list() == []
    (tmp_path / "half" / "1").mkdir(parents=True)  # a build in progress: no manifest yet
    assert ModelRepository(tmp_path).list() == []


def test_latest_version_is_the_highest_integer(tmp_path: Path, tiny_onnx: Path) -> None:
    for v in ("2", "10", "9"):
        _install(tmp_path, tiny_onnx, version=v)
    repo = ModelRepository(tmp_path)
    assert [m.manifest.version for m in repo.list()] == ["2", "9", "10"]
    assert repo.get("tiny").manifest.version == "10"
    with pytest.raises(ModelError, match="tiny:3: model not found"):
        repo.get("tiny", "3")
    with pytest.raises(ModelError, match="other: model not found"):
        repo.get("other")


def test_sha256_tamper_is_refused(tmp_path: Path, tiny_onnx: Path) -> None:
    version_dir = _install(tmp_path, tiny_onnx)
    with (version_dir / "model.onnx").open("ab") as f:
        f.write(b"\0")
    repo = ModelRepository(tmp_path)
    with pytest.raises(ModelError, match=r"^tiny:1: sha256 mismatch: manifest [0-9a-f]{64}, file"):
        repo.get("tiny")
    with pytest.raises(ModelError, match="sha256"):
        repo.list()  # never skipped silently


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("input", {"name": "image", "shape": ["batch", 1, 16], "dtype": "float32"}, "input rank"),
        ("input", {"name": "img", "shape": ["batch", 1, 16, 16], "dtype": "float32"}, "input name"),
        (
            "input",
            {"name": "image", "shape": ["batch", 1, 32, 16], "dtype": "float32"},
            "input dim 2",
        ),
        ("input", {"name": "image", "shape": [1, 1, 16, 16], "dtype": "float32"}, "input dim 0"),
        (
            "input",
            {"name": "image", "shape": ["batch", 1, 16, 16], "dtype": "float16"},
            "input dtype",
        ),
        ("output", {"name": "logits", "shape": ["batch", 1, 2], "dtype": "float32"}, "output rank"),
    ],
)
def test_signature_mismatch_names_it(
    tmp_path: Path, tiny_onnx: Path, field: str, value: dict[str, object], message: str
) -> None:
    _install(tmp_path, tiny_onnx, **{field: value})
    with pytest.raises(ModelError, match=rf"^tiny:1: {message} mismatch: manifest"):
        ModelRepository(tmp_path).get("tiny", "1")


def test_folder_must_match_manifest(tmp_path: Path, tiny_onnx: Path) -> None:
    version_dir = _install(tmp_path, tiny_onnx)
    moved = version_dir.rename(version_dir.parent / "7")
    with pytest.raises(ModelError, match="folder tiny/7 does not match"):
        ModelRepository(tmp_path).validate(moved)


def test_bad_manifest_is_named(tmp_path: Path, tiny_onnx: Path) -> None:
    version_dir = _install(tmp_path, tiny_onnx)
    path = version_dir / "manifest.yaml"
    path.write_text(path.read_text(encoding="utf-8").replace("task:", "tusk:"), encoding="utf-8")
    with pytest.raises(ModelError, match=r"manifest\.yaml: .*task: Field required"):
        ModelRepository(tmp_path).get("tiny")

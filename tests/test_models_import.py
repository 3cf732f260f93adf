"""Bring-your-own model import: accepted only when manifest, file and inference agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models.importer import import_model
from models.repository import ModelRepository, file_sha256
from radbridge.errors import ModelError
from tests.test_models_repository import LABEL, tiny_onnx  # noqa: F401 - fixture

PREPROCESSING = [
    {"name": "EnsureChannelFirst", "args": {"channel_dim": "no_channel"}},
    {"name": "Resize", "args": {"spatial_size": [16, 16]}},
]


def _manifest(tmp: Path, **changes: object) -> Path:
    data = {
        "name": "hospital-cxr",
        "version": "3",
        "modalities": ["CR"],
        "body_parts": ["CHEST"],
        "task": "multilabel_classification",
        "input": {"name": "image", "shape": ["batch", 1, 16, 16], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 2], "dtype": "float32"},
        "preprocessing": PREPROCESSING,
        "labels": [{"key": "a", **LABEL}, {"key": "b", **LABEL}],
        "intended_use": "hospital's own model, validated by the hospital",
        "provenance": {"source": "exported elsewhere"},
        "metrics": {},
        **changes,
    }
    path = tmp / "manifest.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_import_fills_sha256_and_installs(tmp_path: Path, tiny_onnx: Path) -> None:  # noqa: F811
    repo = tmp_path / "repo"
    model = import_model(repo, tiny_onnx, _manifest(tmp_path))
    assert model.key == "hospital-cxr:3"
    assert model.manifest.sha256 == file_sha256(tiny_onnx)
    assert ModelRepository(repo).get("hospital-cxr").key == "hospital-cxr:3"
    assert [p.name for p in repo.iterdir()] == ["hospital-cxr"]  # no staging left behind
    with pytest.raises(ModelError, match="already in the repository"):
        import_model(repo, tiny_onnx, _manifest(tmp_path))
    assert import_model(repo, tiny_onnx, _manifest(tmp_path), force=True).key == model.key


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"sha256": "f" * 64}, "sha256 mismatch"),
        ({"labels": [{"key": "a", **LABEL}]}, "labels"),
        (
            {
                "preprocessing": [
                    {"name": "EnsureChannelFirst", "args": {"channel_dim": "no_channel"}}
                ]
            },
            r"preprocessing yields \[1, 256, 256\]",
        ),
        (
            {"input": {"name": "pixels", "shape": ["batch", 1, 16, 16], "dtype": "float32"}},
            "input name",
        ),
    ],
)
def test_bad_imports_are_refused_and_leave_nothing(
    tmp_path: Path,
    tiny_onnx: Path,  # noqa: F811
    changes: dict[str, object],
    match: str,
) -> None:
    repo = tmp_path / "repo"
    with pytest.raises(ModelError, match=match):
        import_model(repo, tiny_onnx, _manifest(tmp_path, **changes))
    assert not repo.exists() or list(repo.iterdir()) == []


def test_cli_import_and_validate(tmp_path: Path, tiny_onnx: Path) -> None:  # noqa: F811
    env = dict(os.environ, RADBRIDGE_MODEL_REPOSITORY=str(tmp_path / "repo"))
    cli = [str(Path(sys.executable).parent / "radbridge"), "models"]
    out = subprocess.run(
        [*cli, "import", str(tiny_onnx), "--manifest", str(_manifest(tmp_path))],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([*cli, "validate"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "hospital-cxr:3 valid" in out.stdout, out.stdout + out.stderr
    (tmp_path / "repo" / "hospital-cxr" / "3" / "model.onnx").write_bytes(b"tampered")
    out = subprocess.run([*cli, "validate"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "sha256 mismatch" in out.stdout

"""The demo models shipped in models/shipped: installed in a second, and still what the training
code makes (the slow test retrains both and compares their answers on fixed inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models import ct_nodule_demo, cxr_demo
from models.demo import DEMO_MODELS, SHIPPED, build_all
from models.repository import ModelRepository


def test_every_demo_model_ships_and_validates() -> None:
    shipped = ModelRepository(SHIPPED).list()
    assert {m.manifest.name for m in shipped} == DEMO_MODELS
    for m in shipped:
        assert "not for diagnostic use" in m.manifest.intended_use


def test_install_is_quick_atomic_and_idempotent(tmp_path: Path) -> None:
    lines: list[str] = []
    models = build_all(tmp_path / "models", log=lines.append)
    assert [m.manifest.name for m in models] == ["chest-xray-demo", "ct-lung-nodule-demo"]
    assert sum("installed the shipped model" in line for line in lines) == 2, lines
    for m in models:
        assert (SHIPPED / m.manifest.name / m.manifest.version / "model.onnx").read_bytes() == (
            m.onnx_path.read_bytes()
        )
    assert not [p for p in (tmp_path / "models").rglob(".*") if p.is_dir()]  # no staging left
    lines.clear()
    build_all(tmp_path / "models", log=lines.append)
    assert sum("not retraining" in line for line in lines) == 2, lines


def test_a_tampered_install_is_replaced_by_the_shipped_one(tmp_path: Path) -> None:
    (model,) = [m for m in build_all(tmp_path / "m", log=lambda _: None) if "xray" in m.key]
    model.onnx_path.write_bytes(model.onnx_path.read_bytes()[:-10])
    lines: list[str] = []
    build_all(tmp_path / "m", log=lines.append)
    assert any("existing model invalid" in line for line in lines), lines
    assert ModelRepository(tmp_path / "m").get("chest-xray-demo").manifest.sha256 == (
        model.manifest.sha256
    )


def _outputs(onnx_path: Path, x: np.ndarray, softmax: bool) -> np.ndarray:
    """The model's probabilities as its manifest defines them: a softmax over the classes for
    the segmenter (channel 0 background), a sigmoid per label for the multilabel classifier.
    (A sigmoid of each softmax logit on its own magnified a logit shift that moves no
    probability: 0.147 on a machine whose retrained segmenter differed by 0.023 in its
    actual probabilities, with no voxel changing class.)"""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    logits = np.asarray(out, dtype=np.float64)
    if softmax:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return np.asarray(e / e.sum(axis=1, keepdims=True))
    return np.asarray(1.0 / (1.0 + np.exp(-logits)))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retraining_reproduces_the_shipped_models(tmp_path: Path) -> None:
    """The training code is the source of truth: retrained from scratch (same seeds), both
    models answer fixed inputs as the shipped ones do. When this fails after a change to the
    training code, retrain (`radbridge models build --retrain`) and copy the result into
    models/shipped."""
    retrained = {
        m.manifest.name: m for m in build_all(tmp_path / "models", retrain=True, log=print)
    }
    rng = np.random.default_rng(20261205)
    inputs = {
        cxr_demo.MANIFEST_TEMPLATE["name"]: rng.random((8, 1, 128, 128), dtype=np.float32),
        ct_nodule_demo.MANIFEST_TEMPLATE["name"]: rng.random(
            (1, 1, *ct_nodule_demo.ROI), dtype=np.float32
        ),
    }
    for name, x in inputs.items():
        shipped = ModelRepository(SHIPPED).get(name)
        new = retrained[name]
        same = shipped.manifest.sha256 == new.manifest.sha256
        seg = shipped.manifest.segmentation
        softmax = seg is not None and seg.activation == "softmax"
        diff = float(
            np.max(
                np.abs(
                    _outputs(shipped.onnx_path, x, softmax) - _outputs(new.onnx_path, x, softmax)
                )
            )
        )
        print(f"{name}: identical bytes {same}, max probability difference {diff:.2e}")
        assert diff < 0.05, (name, diff)


def test_models_build_shows_each_model_as_a_step_with_its_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from radbridge.cli import app

    monkeypatch.setenv("RADBRIDGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RADBRIDGE_MODEL_REPOSITORY", str(tmp_path / "models"))
    out = CliRunner().invoke(app, ["models", "build"])
    assert out.exit_code == 0, out.output
    for name in sorted(DEMO_MODELS):
        assert f"✓ {name}:1 (shipped)" in out.output, out.output
    assert "ready in" in out.output

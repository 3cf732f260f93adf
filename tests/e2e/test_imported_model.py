"""Bring your own model: a classifier exported here from a MONAI network, imported with the
hospital's own manifest by `radbridge models import`, is served by the center unchanged code.

The repository holds only that model, so every DX study goes to it; its labels, thresholds
and display names come from the user's manifest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
import torch
import yaml
from monai.networks.nets import DenseNet

from models.cxr_dicom import write_cxr_study
from models.onnx_export import export_onnx
from tests.e2e.stack import running_stack, storescu, wait_for_results

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BIN = Path(sys.executable).parent
AGREEMENT = "demo-hospital-to-center"
LABELS = ["atelectasis", "fracture", "device"]


def _export(path: Path) -> None:
    torch.manual_seed(3)
    net = DenseNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=len(LABELS),
        init_features=8,
        growth_rate=8,
        block_config=(2, 2),
    )
    export_onnx(net, torch.zeros(1, 1, 64, 64), path, input_name="pixels", output_name="scores")


def _manifest(path: Path) -> None:
    display = {"en": "{}", "ru": "{} (ru)", "zh": "{} (zh)"}
    path.write_text(
        yaml.safe_dump(
            {
                "name": "hospital-cxr",
                "version": "7",
                "modalities": ["DX"],
                "body_parts": [],
                "task": "multilabel_classification",
                "input": {"name": "pixels", "shape": ["batch", 1, 64, 64], "dtype": "float32"},
                "output": {"name": "scores", "shape": ["batch", 3], "dtype": "float32"},
                "preprocessing": [
                    {"name": "EnsureChannelFirst", "args": {"channel_dim": "no_channel"}},
                    {"name": "Resize", "args": {"spatial_size": [64, 64]}},
                    {"name": "ScaleIntensity", "args": {}},
                ],
                "labels": [
                    {
                        "key": k,
                        "display": {lang: t.format(k) for lang, t in display.items()},
                        "threshold": 0.5,
                    }
                    for k in LABELS
                ],
                "intended_use": "hospital's own model (test export, untrained)",
                "provenance": {"source": "exported in this test from monai DenseNet"},
                "metrics": {},
            },
            allow_unicode=True,
        ),
        encoding="utf-8",
    )


def test_imported_model_is_served(tmp_path: Path) -> None:
    onnx_file, manifest, repo = tmp_path / "m.onnx", tmp_path / "manifest.yaml", tmp_path / "repo"
    _export(onnx_file)
    _manifest(manifest)
    out = subprocess.run(
        [str(BIN / "radbridge"), "models", "import", str(onnx_file), "--manifest", str(manifest)],
        env=dict(os.environ, RADBRIDGE_MODEL_REPOSITORY=str(repo)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    files = write_cxr_study(
        tmp_path / "study",
        seed=11,
        findings=set(),
        patient_name="Zhao^Lei",
        patient_id="BYO-1",
        birth_date="19800202",
        n_images=2,
    )
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    data = tmp_path / "stack"
    data.mkdir()
    with running_stack(data, models=repo) as stack:
        ports = stack["ports"]
        assert isinstance(ports, dict)
        sent = storescu(ports["edge"], files)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        results: Any = wait_for_results(stack, study_uid, timeout_s=300)
    assert results is not None and results["job"]["state"] == "done", results
    assert len(results["results"]) == 2
    for r in results["results"]:
        assert (r["model"]["name"], r["model"]["version"]) == ("hospital-cxr", "7")
        assert [f["label"] for f in r["findings"]] == LABELS
        assert r["findings"][0]["display"]["ru"] == "atelectasis (ru)"
        assert r["intended_use"].startswith("hospital's own model")

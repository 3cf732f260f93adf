"""The container image's recipe (k8s/image/Dockerfile): linted, consistent with the RayService,
and the package it installs carries every data file the service reads at run time.

Building and running the image needs buildah/podman and a Debian base (k8s/image/README.md); that
is not part of these tests."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

IMAGE = REPO / "k8s" / "image"


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run(
        [str(hadolint), "--config", str(IMAGE / ".hadolint.yaml"), str(IMAGE / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_ray_in_the_image_is_the_rayservices_version() -> None:
    lock = (REPO / "requirements.lock").read_text()
    (locked,) = re.findall(r"^ray==([\d.]+)$", lock, flags=re.M)
    docs = list(yaml.safe_load_all((REPO / "k8s/base/rayservice.yaml").read_text()))
    (rs,) = [d for d in docs if d and d.get("kind") == "RayService"]
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == locked
    assert f"ray.__version__ == '{locked}'" in (IMAGE / "Dockerfile").read_text()


def test_the_image_runs_as_user_1000_with_a_healthcheck() -> None:
    text = (IMAGE / "Dockerfile").read_text()
    runtime = text.split("AS runtime", 1)[1]
    assert "USER 1000:1000" in runtime and "HEALTHCHECK" in runtime
    assert "ENTRYPOINT" in runtime and "tini" in runtime


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_package_carries_its_run_time_data(tmp_path: Path) -> None:
    """What `pip install .` puts in the image: no file the service opens may be left behind."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("radbridge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        "radbridge/defaults/agreements.yaml",
        "radbridge/schemas/dicom-audit-message.rnc",
        "radbridge/migrations/env.py",
        "serving/serve.yaml",
        "models/shipped/chest-xray-demo/1/model.onnx",
        "models/shipped/ct-lung-nodule-demo/1/manifest.yaml",
    }
    assert wanted <= names, wanted - names
    assert any(n.startswith("radbridge/migrations/versions/0006") for n in names)
    assert any(n.startswith("dicom_io/data/") and n.endswith(".json") for n in names)

"""Geometry survives the whole path: a CT phantom with a nodule at a known patient position.

dcmtk storescu pushes the phantom's slices (real patient identity) to `radbridge up`; the
edge de-identifies and forwards them, the center assembles the volume, runs the CT nodule
segmenter by sliding window through the ModelRunner and reports each nodule's centre in
patient coordinates. The reported centre must lie within one voxel of the truth: orientation,
spacing and rescale survived ingest, de-identification, preprocessing and inference. The SEG
and SR of the result wait at the center for the edge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from models.ct_dicom import write_ct_series
from models.ct_phantoms import chest_ct
from tests.e2e.stack import running_stack, storescu, wait_for_results

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
AGREEMENT = "demo-hospital-to-center"


def test_nodule_centre_within_one_voxel_through_the_gateway(tmp_path: Path) -> None:
    phantom = chest_ct(np.random.default_rng([20261123, 7]), n_nodules=1)
    truth = phantom.nodules[0]
    files = write_ct_series(
        tmp_path / "ct",
        phantom,
        seed=7,
        patient_name="Li^Na=李^娜",
        patient_id="CT-GEO-0001",
        birth_date="19700101",
    )
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    data = tmp_path / "stack"
    data.mkdir()
    with running_stack(data) as stack:
        ports, base = stack["ports"], str(stack["base"])
        assert isinstance(ports, dict)
        out = storescu(ports["edge"], files)
        assert out.returncode == 0, out.stdout + out.stderr
        results: Any = wait_for_results(stack, study_uid, timeout_s=400)
        assert results["job"]["state"] == "done", results["job"]
        listed = stack["http"].get(  # type: ignore[attr-defined]
            f"{base}/v1/agreements/{AGREEMENT}/result-objects",
            auth=stack["edge_auth"],  # type: ignore[arg-type]
            timeout=10,
        )
        kinds = sorted(
            o["kind"] for o in listed.json()["objects"] if o["study_uid"] == results["study_uid"]
        )
        # The volume, its SEG and SR at the center: no byte of the patient's identity.
        needles = {"CT-GEO-0001", "李^娜", "Li^Na", study_uid}
        needles |= {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        for f in (data / "center").rglob("*"):
            if f.is_file():
                blob = f.read_bytes()
                assert not any(n.encode() in blob for n in needles), f
        log = Path(str(stack["log"])).read_text(encoding="utf-8", errors="replace")
        assert not any(n in log for n in needles)
    (result,) = results["results"]
    assert result["model"]["name"] == "ct-lung-nodule-demo"
    assert result["findings"][0]["present"] is True
    voxel = np.asarray(phantom.spacing, dtype=float)  # (z, y, x) mm
    distances = [
        np.linalg.norm(np.asarray(n["centre_mm"]) - np.asarray(truth.centre_mm))
        for n in result["nodules"]
    ]
    assert distances, f"no nodule found; truth {truth}"
    print(
        f"nodule truth {truth.centre_mm} d={truth.diameter_mm:.1f} mm; found "
        f"{[n['centre_mm'] for n in result['nodules']]}; nearest {min(distances):.2f} mm; "
        f"voxel {phantom.spacing} mm"
    )
    # Within one voxel: the voxel's diagonal half-extent bounds any one-voxel offset.
    assert min(distances) <= float(np.linalg.norm(voxel)), (distances, truth, voxel)
    assert kinds == ["seg", "sr"]

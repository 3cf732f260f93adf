"""End to end: `radbridge up` as a user runs it, dcmtk as the hospital PACS.

storescu pushes a generated chest radiograph study with a real patient identity to the edge;
the result must appear at the center's results endpoint with the demo-model label, both
/metrics endpoints must show the stage histograms, and no byte the center stored may hold the
patient's name, ID, birth date or any original UID.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from models.cxr_dicom import write_cxr_study
from radbridge.db import Database
from tests.conftest import free_port
from tests.e2e.stack import echo as _echo
from tests.e2e.stack import running_stack, storescu, wait_for_results

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
AGREEMENT = "demo-hospital-to-center"
PATIENT = {"name": "Chen^Jianguo=陈^建国", "id": "HOSP-4401-778", "birth": "19580317"}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    if shutil.which("storescu") is None:
        pytest.fail("dcmtk is not installed (./run test installs it)")
    with running_stack(tmp_path_factory.mktemp("stack")) as st:
        yield st


@pytest.fixture(scope="module")
def prometheus(stack: dict[str, object]) -> Iterator[str]:
    """A real Prometheus server (Debian package) scraping both processes every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (./run test installs it)")
    ports, data = stack["ports"], Path(str(stack["data"]))
    assert isinstance(ports, dict)
    port = free_port()
    config = data / "prometheus.yml"
    jobs = {"edge": ports["metrics"], "center": ports["center"]}
    # The center's /metrics wants the operator's bearer secret (radbridge.auth), over HTTPS
    # with the local CA's certificate.
    auth = {
        "center": f"    authorization: {{credentials_file: '{data / 'keys' / 'operator.token'}'}}\n"
        f"    scheme: https\n    tls_config: {{ca_file: '{stack['ca']}'}}\n"
    }
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n"
        + "".join(
            f"  - job_name: {job}\n    static_configs: [{{targets: ['127.0.0.1:{p}']}}]\n"
            + auth.get(job, "")
            for job, p in jobs.items()
        )
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(data / "prometheus.log").open("wb"),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                if httpx.get(f"{base}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(20)


def _scraped(prom: str, metric: str, timeout_s: float = 30) -> float:
    """Sum of ``metric`` as Prometheus itself scraped it (0 if never seen in time)."""
    deadline, total = time.monotonic() + timeout_s, 0.0
    while time.monotonic() < deadline:
        r = httpx.get(f"{prom}/api/v1/query", params={"query": f"sum({metric})"}, timeout=5)
        result = r.json()["data"]["result"]
        total = float(result[0]["value"][1]) if result else 0.0
        if total > 0:
            return total
        time.sleep(1)
    return total


def _targets_up(prom: str, timeout_s: float = 30) -> set[str]:
    """The scrape jobs whose last scrape succeeded, waiting for both (bounded)."""
    deadline, up = time.monotonic() + timeout_s, set()
    while time.monotonic() < deadline:
        r = httpx.get(f"{prom}/api/v1/query", params={"query": "up == 1"}, timeout=5)
        up = {x["metric"]["job"] for x in r.json()["data"]["result"]}
        if up == {"edge", "center"}:
            break
        time.sleep(1)
    return up


def _histogram_counts(text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name.endswith("_count"):
                counts[sample.name] = counts.get(sample.name, 0) + sample.value
    return counts


def test_push_deidentify_infer_and_measure(
    stack: dict[str, object], prometheus: str, tmp_path: Path
) -> None:
    ports, base, data = stack["ports"], str(stack["base"]), Path(str(stack["data"]))
    assert isinstance(ports, dict)
    files = write_cxr_study(
        tmp_path / "study",
        seed=4242,
        findings={"cardiomegaly"},
        patient_name=PATIENT["name"],
        patient_id=PATIENT["id"],
        birth_date=PATIENT["birth"],
        n_images=2,
        accession="ACC-5521",
    )
    originals = [dcmread(f) for f in files]
    pushed = storescu(ports["edge"], files)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    study_uid = str(originals[0].StudyInstanceUID)

    results: Any = wait_for_results(stack, study_uid, timeout_s=240)
    assert results["job"]["state"] == "done", results["job"]
    assert "not for diagnostic use" in results["notice"]
    assert len(results["results"]) == 2
    manifest_sha = (
        Path(str(stack["env"]["RADBRIDGE_MODEL_REPOSITORY"]))  # type: ignore[index]
        / "chest-xray-demo"
        / "1"
        / "model.onnx"
    ).read_bytes()
    center_files = {p.name: p for p in (data / "center" / "store").rglob("*.dcm")}
    for r in results["results"]:
        assert r["model"]["name"] == "chest-xray-demo"
        assert r["model"]["sha256"] == hashlib.sha256(manifest_sha).hexdigest()
        assert "not for diagnostic use" in r["intended_use"]
        stored = center_files[f"{r['sop_instance_uid']}.dcm"].read_bytes()
        assert r["input_sha256"] == hashlib.sha256(stored).hexdigest()
        labels = {f["label"] for f in r["findings"]}
        assert labels == {"cardiomegaly", "pleural_effusion", "pneumothorax", "nodule"}
        assert all(0.0 <= f["probability"] <= 1.0 for f in r["findings"])
        assert {"en", "ru", "zh"} <= set(r["findings"][0]["display"])
        assert {"preprocess", "inference", "postprocess"} <= set(r["timings_ms"])

    # The job's TID 1500 SR waits at the center for the edge to pull it back.
    edge_auth: Any = stack["edge_auth"]
    http: Any = stack["http"]
    listed = http.get(f"{base}/v1/agreements/{AGREEMENT}/result-objects", auth=edge_auth).json()
    mine = [o for o in listed["objects"] if o["study_uid"] == results["study_uid"]]
    assert [(o["kind"], o["version"]) for o in mine] == [("sr", 1)]
    sr_bytes = http.get(f"{base}/v1/result-objects/{mine[0]['id']}", auth=edge_auth).content
    assert hashlib.sha256(sr_bytes).hexdigest() == mine[0]["sha256"]
    sr = dcmread(BytesIO(sr_bytes))
    assert sr.VerificationFlag == "UNVERIFIED" and sr.StudyInstanceUID == results["study_uid"]

    # No identity in any byte the center stored: files, database, WAL.
    needles = {PATIENT["id"], PATIENT["birth"], "Jianguo", "陈", "建国", "ACC-5521"}
    for ds in originals:
        needles |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
    scanned = 0
    for p in (data / "center").rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            scanned += 1
            for n in needles:
                assert n.encode("utf-8") not in blob, (p, n)
    assert scanned >= 3

    edge_metrics = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).text
    operator: Any = stack["operator"]
    center_metrics = http.get(f"{base}/metrics", headers=operator).text
    e, c = _histogram_counts(edge_metrics), _histogram_counts(center_metrics)
    assert e["radbridge_edge_instance_receive_seconds_count"] >= 2
    assert e["radbridge_edge_study_forward_seconds_count"] >= 1
    assert c["radbridge_center_preprocess_seconds_count"] >= 2
    assert c["radbridge_center_inference_seconds_count"] >= 2
    assert c["radbridge_end_to_end_seconds_count"] >= 1
    assert 'agreement="demo-hospital-to-center"' in edge_metrics
    # And a real Prometheus server scraped them from both processes.
    assert _targets_up(prometheus) == {"edge", "center"}, (data / "prometheus.log").read_text()
    assert _scraped(prometheus, "radbridge_edge_instance_receive_seconds_count") >= 2
    assert _scraped(prometheus, "radbridge_end_to_end_seconds_count") >= 1
    for n in needles:
        assert n not in edge_metrics and n not in center_metrics
    # Nor in anything the stack logged (edge, center, Ray workers all write to this log).
    logged = Path(str(stack["log"])).read_text(encoding="utf-8", errors="replace")
    for n in needles:
        assert n not in logged, n


def test_unknown_calling_ae_is_rejected(stack: dict[str, object]) -> None:
    ports = stack["ports"]
    assert isinstance(ports, dict)
    out = _echo(ports["edge"], "INTRUDER")
    assert out.returncode != 0
    text = (out.stdout + out.stderr).lower()
    assert "rejected permanent" in text and "source: service user" in text
    assert re.search(r"calling ae title not recogni[sz]ed", text), text


def test_malformed_dataset_fails_and_leaves_nothing(
    stack: dict[str, object], tmp_path: Path
) -> None:
    ports, data = stack["ports"], Path(str(stack["data"]))
    assert isinstance(ports, dict)
    files = write_cxr_study(
        tmp_path / "bad",
        seed=7,
        findings=set(),
        patient_name="Bad^Case",
        patient_id="BAD-1",
        birth_date="19990101",
    )
    ds = dcmread(files[0])
    del ds.StudyInstanceUID
    ds.save_as(files[0], enforce_file_format=True)
    before = set((data / "edge" / "store").rglob("*.dcm"))
    out = storescu(ports["edge"], files[:1])
    text = out.stdout + out.stderr
    squashed = text.lower().replace(" ", "")
    assert "0xc000" in squashed or "cannotunderstand" in squashed, text
    assert set((data / "edge" / "store").rglob("*.dcm")) == before
    assert list((data / "edge" / "store" / ".staging").iterdir()) == []
    edge_db = Database(f"sqlite:///{data / 'edge' / 'edge.db'}")
    with edge_db.session() as s:
        from sqlalchemy import select

        from radbridge.db.tables import InstanceRow

        sops = set(s.scalars(select(InstanceRow.sop_instance_uid)))
    assert str(ds.SOPInstanceUID) not in sops

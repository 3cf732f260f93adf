"""Serving pieces that need no Ray: providers, HTTP error table, routing, post-processing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from models.manifest import ModelManifest
from radbridge.errors import DatasetError, NotFoundError, PolicyError, RadbridgeError
from radbridge.http_errors import http_status_for
from radbridge.metrics import batch_bucket, safe_label
from serving.postprocess import findings_from_logits
from serving.providers import gpu_present, resolve_providers
from serving.routing import route


def _manifest(
    name: str = "chest-xray-demo", version: str = "1", modalities=("DX", "CR")
) -> ModelManifest:  # type: ignore[no-untyped-def]
    return ModelManifest.model_validate(
        {
            "name": name,
            "version": version,
            "modalities": list(modalities),
            "body_parts": ["CHEST"],
            "task": "multilabel_classification",
            "input": {"name": "image", "shape": ["batch", 1, 128, 128], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["batch", 2], "dtype": "float32"},
            "preprocessing": [{"name": "ScaleIntensity", "args": {}}],
            "labels": [
                {
                    "key": "cardiomegaly",
                    "display": {"en": "Cardiomegaly", "ru": "Кардиомегалия", "zh": "心脏扩大"},
                    "snomed": "8186001",
                    "radlex": None,
                    "threshold": 0.5,
                },
                {
                    "key": "nodule",
                    "display": {"en": "Lung nodule", "ru": "Узел", "zh": "肺结节"},
                    "snomed": "427359005",
                    "radlex": None,
                    "threshold": 0.2,
                },
            ],
            "sha256": "0" * 64,
            "intended_use": "demo model — not for diagnostic use",
            "provenance": {},
            "metrics": {},
        }
    )


def test_cpu_is_always_the_last_resort() -> None:
    providers = resolve_providers(["tensorrt", "cuda", "cpu"])
    assert providers[-1] == "CPUExecutionProvider"
    if not gpu_present():  # onnxruntime-gpu lists CUDA even without a GPU: we must not pick it
        assert providers == ["CPUExecutionProvider"]
    assert resolve_providers([]) == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (DatasetError("bad_request", "x"), 400),
        (NotFoundError("x"), 404),
        (PolicyError("x"), 409),
        (RadbridgeError("x"), 500),
    ],
)
def test_one_table_maps_errors_to_http(exc: RadbridgeError, code: int) -> None:
    assert http_status_for(exc) == code


def test_routing_picks_the_newest_version_for_the_modality() -> None:
    manifests = {
        "chest-xray-demo:1": _manifest(version="1"),
        "chest-xray-demo:2": _manifest(version="2"),
        "ct-only:1": _manifest(name="ct-only", modalities=("CT",)),
    }
    assert route(manifests, "DX", "CHEST") == "chest-xray-demo:2"
    assert route(manifests, "CT", None) == "ct-only:1"
    assert route(manifests, "DX", "KNEE") is None
    assert route(manifests, "MR", None) is None


def test_findings_use_thresholds_codes_and_three_languages() -> None:
    findings = findings_from_logits(np.array([0.0, -1.0], dtype=np.float32), _manifest())
    card, nod = findings
    assert card.probability == pytest.approx(0.5) and card.present  # p >= threshold 0.5
    assert nod.probability == pytest.approx(1 / (1 + np.e), abs=1e-6) and nod.present
    assert card.codes == {"SCT": "8186001"}
    assert set(card.display) == {"en", "ru", "zh"}
    with pytest.raises(ValueError, match="3 outputs"):
        findings_from_logits(np.zeros(3), _manifest())


def test_metric_labels_never_carry_free_text() -> None:
    assert safe_label("demo-hospital-to-center") == "demo-hospital-to-center"
    assert safe_label("Wang^XiaoDong") == "other"
    assert safe_label("CHEST PA for Wang") == "other"
    assert safe_label(None) == "other"
    assert [batch_bucket(n) for n in (1, 3, 8, 16, 17, 64)] == [
        "1",
        "2-4",
        "5-8",
        "9-16",
        "17-32",
        "33+",
    ]


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_batch_body_is_one_to_most_images_of_the_model_shape() -> None:
    from serving.ingress import _tensors

    images = _tensors(_npy(np.ones((3, 1, 4, 4), np.float64)), (1, 4, 4), 8)
    assert images.shape == (3, 1, 4, 4) and images.dtype == np.float32
    assert images.flags.c_contiguous
    for body, reason in (
        (_npy(np.ones((1, 4, 4))), "wrong_shape"),  # one image without the batch axis
        (_npy(np.ones((3, 1, 4, 5))), "wrong_shape"),
        (_npy(np.float32(1.0)), "wrong_shape"),
        (_npy(np.ones((0, 1, 4, 4))), "wrong_count"),
        (_npy(np.ones((9, 1, 4, 4))), "wrong_count"),
        (_npy(np.array([["a"] * 4] * 4)), "wrong_dtype"),
        (b"\x80\x04not npy", "unparseable"),
    ):
        with pytest.raises(DatasetError) as err:
            _tensors(body, (1, 4, 4), 8)
        assert err.value.reason == reason
    with pytest.raises(DatasetError) as err:  # a named (dynamic) axis matches no tensor
        _tensors(_npy(np.ones((2, 1, 4, 4))), (1, "h", 4), 8)
    assert err.value.reason == "wrong_shape"


def test_openapi_documents_every_answer_of_every_route() -> None:
    """The center's OpenAPI document names each status a route answers (the trust boundary's
    401/403/404 on every protected route) and STOW-RS's multipart body."""
    from serving.ingress import api

    doc = api.openapi()
    answers = {
        (method.upper(), path): set(op["responses"])
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
    }
    for (method, path), codes in answers.items():
        if path == "/healthz":
            assert codes == {"200"}
            continue
        assert {"401", "403"} <= codes, (method, path)
        if path.startswith("/v1/"):
            assert "404" in codes, (method, path)
    assert {"200", "202", "400", "409", "413", "415", "503"} <= answers[("POST", "/v1/studies")]
    assert {"413", "415", "503"} <= answers[("POST", "/v1/models/{name}/infer")]
    body = doc["paths"]["/v1/studies"]["post"]["requestBody"]["content"]
    assert any(media.startswith("multipart/related") for media in body)


def test_usable_cpus_is_the_affinity_capped_by_a_cgroup_quota(tmp_path: Path) -> None:
    from serving.runner import usable_cpus

    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path / "none") == affinity  # no cgroup files: the affinity
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(v2) == affinity  # no quota
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a CPU: still one thread
    assert usable_cpus(v2) == 1
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path / "v1") == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(tmp_path / "v1") == affinity


SHIPPED = Path(__file__).parents[1] / "models" / "shipped"


@pytest.mark.parametrize("name", ["chest-xray-demo", "ct-lung-nodule-demo"])
def test_warm_up_runs_each_model_as_its_requests_will(name: str) -> None:
    """A classifier gets one image of its input shape; a segmenter a batch of sw_batch_size
    windows, then one sliding window (the import of MONAI's inferer happens here)."""
    from serving.config import RunnerConfig
    from serving.runner import _Session, _warm_up

    manifest = ModelManifest.model_validate(
        __import__("yaml").safe_load((SHIPPED / name / "1" / "manifest.yaml").read_text())
    )
    cfg = RunnerConfig(providers=["cpu"])
    sess = _Session(f"{name}:1", SHIPPED / name / "1" / "model.onnx", cfg, manifest)
    shapes: list[tuple[int, ...]] = []
    run = sess.run

    def recorded(batch: np.ndarray) -> np.ndarray:
        shapes.append(batch.shape)
        return run(batch)

    sess.run = recorded  # type: ignore[method-assign]
    _warm_up(sess)
    spatial = [d for d in manifest.input.shape[2:]]
    if manifest.segmentation is None:
        assert shapes == [(1, 1, *spatial)]
    else:
        roi = tuple(manifest.segmentation.roi_size)
        assert shapes == [(manifest.segmentation.sw_batch_size, 1, *roi), (1, 1, *roi)]


def test_preload_names_model_ids_and_no_more_than_a_replica_holds() -> None:
    from pydantic import ValidationError

    from serving.config import MAX_MODELS_PER_REPLICA, RunnerConfig

    assert RunnerConfig().preload is None  # the newest version of every installed model
    assert RunnerConfig(preload=["ct-lung-nodule-demo:1"]).preload == ["ct-lung-nodule-demo:1"]
    with pytest.raises(ValidationError, match="preload"):
        RunnerConfig(preload=["ct-lung-nodule-demo"])  # no version: which one would it load?
    with pytest.raises(ValidationError, match="preload"):
        RunnerConfig(preload=[f"m{i}:1" for i in range(MAX_MODELS_PER_REPLICA + 1)])


def test_a_broken_database_store_or_replica_reruns_the_job_a_bad_study_fails_it() -> None:
    from ray.exceptions import ActorDiedError
    from sqlalchemy.exc import OperationalError

    from radbridge.errors import ModelError, NoModelError, StorageError
    from serving.pipeline import _transient

    rerun = [
        OperationalError("SELECT 1", {}, Exception("terminating connection")),
        StorageError("disk watermark reached"),
        OSError(28, "No space left on device"),
        ActorDiedError(),
    ]
    fail = [
        NoModelError("MR", "no model serves modality MR"),
        DatasetError("undecodable", "pixel data could not be decoded"),
        ModelError("not a segmentation model"),
        ValueError("a bug: fails the job, the hospital is told"),
    ]
    assert [_transient(e) for e in rerun] == [True] * 4
    assert [_transient(e) for e in fail] == [False] * 4

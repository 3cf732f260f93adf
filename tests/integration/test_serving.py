"""The center's Serve application on a local Ray instance, deployed from a Serve config file.

One center per module (starting Ray + Serve costs ~30 s on 2 cores); the tests run in file
order and the last one leaves the application broken on purpose (a required GPU provider).
Covers: batches > 1 under concurrent load, STAT before routine under overload, 503 +
Retry-After on the sync endpoint and on STOW-RS with retries losing nothing, the batch endpoint
(answers as the single one, refused whole under overload), a model-version
switch (and shadow) by config without a failed request, and the failing GPU health check.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import random
import shutil
import statistics
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from sqlalchemy import select, update

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from models.importer import import_model
from radbridge.auth import (
    EdgeAuth,
    EdgeEntry,
    edge_token,
    ensure_local_identity,
    generate_edge_key,
    load_edge_key,
    load_trust,
)
from radbridge.contract import CenterClient, PurgeOut, PurgeStudy, tls_verify
from radbridge.db import Database, upgrade
from radbridge.db.tables import (
    AuditRow,
    InstanceRow,
    JobRow,
    ResultObjectRow,
    SeriesRow,
    StudyRow,
    utcnow,
)
from radbridge.errors import CenterError, ModelError
from radbridge.identity import prepare_local_identity
from radbridge.settings import Settings
from serving.config import DEFAULT_SERVE_CONFIG
from tests.conftest import REPO, free_port, make_instance

pytestmark = pytest.mark.slow

AGREEMENT = "demo-hospital-to-center"
MODEL = "chest-xray-demo"
MODELS = Path(os.environ.get("RADBRIDGE_TEST_MODELS", REPO / "var" / "models"))
RUNNER_CONFIG = {
    "max_batch_size": 4,
    "batch_wait_timeout_s": 0.02,
    "providers": ["cpu"],
    "capacity": 4,
    "max_queued": 12,
    "max_wait_s": {"urgent": 30, "routine": 120},
}
# Within the smallest runner queue a test deploys (room for 2): the config check refuses a
# batch request size the runner could never admit.
API_CONFIG = {"max_batch_images": 2}


class Center:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.models = root / "models"
        shutil.copytree(MODELS / MODEL / "1", self.models / MODEL / "1")
        v1 = self.models / MODEL / "1"
        manifest = yaml.safe_load((v1 / "manifest.yaml").read_text())
        manifest["version"] = "2"
        (root / "v2.yaml").write_text(yaml.safe_dump(manifest, allow_unicode=True))
        import_model(self.models, v1 / "model.onnx", root / "v2.yaml")
        self.settings = Settings(
            data_dir=root / "data",
            model_repository=self.models,
            # The route table test makes dozens of failed calls from 127.0.0.1 on purpose.
            center={
                "port": self.port,
                "ray_num_cpus": 4,
                "auth_max_failures": 1000,
                "max_body_bytes": 4 << 20,  # small, so the 413 test need not send 256 MiB
            },
        )
        upgrade(self.settings.center_db_url, "center")
        self.url = s_url = self.settings.center_url
        assert s_url.startswith("https://")  # the local center speaks TLS, checked below
        self.shape = tuple(manifest["input"]["shape"][1:])
        # The local identity start_center would make, plus a second edge bound to another
        # agreement only: a tenant that must not see this one's studies.
        s = self.settings
        ensure_local_identity(s.edge_key_file, s.center_trust_file, s.edge.id, [AGREEMENT])
        self.other_key = generate_edge_key(root / "other-edge.pem")
        trust = load_trust(s.center_trust_file)
        other = EdgeEntry(
            id="other-edge", agreements=["other-agreement"], keys=[self.other_key.jwk]
        )
        trust = trust.model_copy(update={"edges": [*trust.edges, other]})
        s.center_trust_file.write_text(yaml.safe_dump(trust.model_dump(mode="json")))
        keys = s.center_trust_file.parent
        self.integration = {"authorization": f"Bearer {(keys / 'integration.token').read_text()}"}
        self.operator = {"authorization": f"Bearer {(keys / 'operator.token').read_text()}"}
        self.edge_auth = EdgeAuth(load_edge_key(s.edge_key_file), s.edge.id)
        # Every test call goes through a real TLS handshake, trusting only the local CA that
        # start_center makes (made here first: the identity above is made the same way).
        prepare_local_identity(s)
        self.verify = tls_verify(s.edge.center_ca_file)
        self.http = httpx.Client(verify=self.verify, timeout=60)
        self.other_edge_auth = EdgeAuth(self.other_key, "other-edge")

    def deploy(
        self, *, runner: dict[str, Any] | None = None, api: dict[str, Any] | None = None
    ) -> None:
        from serving.center import start_center

        raw = yaml.safe_load(DEFAULT_SERVE_CONFIG.read_text())
        raw = copy.deepcopy(raw)
        for d in raw["applications"][0]["deployments"]:
            if d["name"] == "ModelRunner":
                d["user_config"] = {**RUNNER_CONFIG, **(runner or {})}
                d["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
            elif d["name"] == "Api":
                d["user_config"] = {**d["user_config"], **API_CONFIG, **(api or {})}
                d["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}
        path = self.root / f"serve-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(raw))
        self.settings.center.serve_config = path
        start_center(self.settings, timeout_s=240)

    def metric(self, name: str, **labels: str) -> float:
        text = self.http.get(f"{self.url}/metrics", headers=self.operator, timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="module")
def center(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Center]:
    from serving.center import stop_center

    c = Center(tmp_path_factory.mktemp("center"))
    try:
        c.deploy()
        yield c
    finally:
        stop_center()


def _complete_study(s: Any, study_uid: str) -> StudyRow:
    """A complete DX study of AGREEMENT, written straight into the center's database."""
    study = StudyRow(
        agreement_id=AGREEMENT,
        study_uid=study_uid,
        modality="DX",
        state="complete",
        first_received_at=utcnow(),
        last_received_at=utcnow(),
    )
    s.add(study)
    s.flush()
    return study


def _npy(shape: tuple[int, ...], seed: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).random(shape, dtype=np.float32))
    return buf.getvalue()


async def _post(
    client: httpx.AsyncClient, url: str, body: bytes, priority: str = "routine"
) -> httpx.Response:
    return await client.post(
        url,
        content=body,
        headers={
            "content-type": "application/x-npy",
            "x-radbridge-agreement": AGREEMENT,
            "x-radbridge-priority": priority,
        },
    )


def test_ray_processes_start_with_the_small_machine_proxy_limits(center: Center) -> None:
    """Serve's controller reads its proxy health-check limits from the environment of the
    processes Ray starts: a task on this cluster must see start_center's values, and run at
    normal priority (Ray's default nice 15 let any busy process starve the proxy)."""
    import ray

    from serving.center import SERVE_ENV_DEFAULTS

    @ray.remote(num_cpus=0)
    def environment(names: list[str]) -> tuple[dict[str, str | None], int]:
        return {n: os.environ.get(n) for n in names}, os.nice(0)

    names = [*SERVE_ENV_DEFAULTS, "RAY_AUTH_MODE"]
    seen, niceness = ray.get(environment.remote(names), timeout=60)
    assert {n: seen[n] for n in SERVE_ENV_DEFAULTS} == {
        n: os.environ.get(n, v) for n, v in SERVE_ENV_DEFAULTS.items()
    }
    assert niceness == 0
    # Ray's control plane (GCS, raylets, workers) requires its token on this local cluster.
    assert seen["RAY_AUTH_MODE"] == "token"


def _replica_ports_on_every_interface() -> list[int]:
    """The TCP ports Serve replicas of this machine listen on, on every interface (Ray 2.60
    binds their inter-deployment gRPC server to ``[::]:0``; docs/operations.md)."""
    import psutil

    ports = []
    for proc in psutil.process_iter(["cmdline"]):
        if "ServeReplica" not in " ".join(proc.info["cmdline"] or ()):
            continue
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        ports += [
            c.laddr.port
            for c in conns
            if c.status == psutil.CONN_LISTEN and c.laddr.ip in ("::", "0.0.0.0")
        ]
    return ports


def test_replica_ports_on_every_interface_refuse_calls_without_the_cluster_token(
    center: Center,
) -> None:
    """A Serve replica's inter-deployment gRPC port listens on every interface; a caller that
    is not part of the cluster (no token, or a wrong one) is refused before the handler runs.
    Without Ray's token authentication the same call would reach the replica's handler."""
    import grpc
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    ports = _replica_ports_on_every_interface()
    assert ports, "no Serve replica listens on every interface: update docs/operations.md"
    for port in ports:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = serve_pb2_grpc.ASGIServiceStub(channel)
            for metadata in ((), (("authorization", "Bearer not-the-cluster-token"),)):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.HandleRequest(serve_pb2.ASGIRequest(), metadata=metadata, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, (
                    port,
                    metadata,
                    refused.value.details(),
                )
    # The control: the cluster's own token gets past the check (the empty request then fails
    # in the handler, or not at all, but not for want of a token).
    from ray._private.authentication.grpc_authentication_client_interceptor import (
        _get_authentication_metadata_tuple,
    )

    token = _get_authentication_metadata_tuple()
    assert token, "this driver holds no cluster token"
    with grpc.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
        stub = serve_pb2_grpc.ASGIServiceStub(channel)
        try:
            stub.HandleRequest(serve_pb2.ASGIRequest(), metadata=token, timeout=10)
        except grpc.RpcError as failed:
            assert failed.code() != grpc.StatusCode.UNAUTHENTICATED, failed.details()


def test_a_runner_replica_is_ready_with_its_models_loaded_and_run_once(center: Center) -> None:
    """Serve awaits the runner's reconfigure before the replica takes requests: the newest
    version of every installed model is loaded and has run once by then; a config naming a
    version loads it on a live redeploy, without a request."""
    from ray import serve

    runner = serve.get_deployment_handle("ModelRunner", app_name="radbridge-center")
    info = runner.info.remote().result(timeout_s=30)
    assert set(info["warmed"]) >= {f"{MODEL}:2"} and info["warmed"][f"{MODEL}:2"] > 0
    assert f"{MODEL}:1" not in info["warmed"]  # not the newest: loads on its first request
    center.deploy(runner={"preload": [f"{MODEL}:1"]})
    info = runner.info.remote().result(timeout_s=30)
    assert f"{MODEL}:1" in info["sessions"]
    center.deploy()  # the module's config again


def test_sync_endpoint_forms_batches_under_concurrent_load(center: Center) -> None:
    url = f"{center.url}/v1/models/{MODEL}/infer"

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            timeout=60, headers=center.integration, verify=center.verify
        ) as client:
            await _post(client, url, _npy(center.shape, 0))  # loads the model version
            sem = asyncio.Semaphore(12)  # within capacity + max_queued: nothing is shed

            async def one(i: int) -> httpx.Response:
                async with sem:
                    return await _post(client, url, _npy(center.shape, i))

            return await asyncio.gather(*(one(i) for i in range(48)))

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 48, responses[0].text
    bodies = [r.json() for r in responses]
    sizes = [b["timings_ms"]["batch_size"] for b in bodies]
    assert max(sizes) > 1 and max(sizes) <= RUNNER_CONFIG["max_batch_size"]
    assert {b["provider"] for b in bodies} == {"CPUExecutionProvider"}
    assert {b["model"]["version"] for b in bodies} == {"2"}  # no pin: the newest version
    assert len(bodies[0]["findings"]) == 4
    assert center.metric("radbridge_center_batch_size_count", model=MODEL) >= 48
    assert (
        center.metric(
            "radbridge_center_model_provider_info", model=MODEL, provider="CPUExecutionProvider"
        )
        >= 1
    )


def test_bad_requests_name_the_problem(center: Center) -> None:
    url = f"{center.url}/v1/models/{MODEL}/infer"
    h = {"x-radbridge-agreement": AGREEMENT, **center.integration}
    wrong = center.http.post(
        url, content=_npy((1, 8, 8), 0), headers={**h, "content-type": "application/x-npy"}
    )
    assert wrong.status_code == 400 and wrong.json()["reason"] == "wrong_shape"
    pickle = center.http.post(
        url, content=b"\x80\x04junk", headers={**h, "content-type": "application/x-npy"}
    )
    assert pickle.status_code == 400 and pickle.json()["reason"] == "unparseable"
    text = center.http.post(url, content=b"hi", headers={**h, "content-type": "text/plain"})
    assert text.status_code == 415
    unknown = center.http.post(f"{center.url}/v1/models/nope/infer", content=b"", headers=h)
    assert unknown.status_code == 404
    no_version = center.http.post(url + "?version=9", content=b"", headers=h)
    assert no_version.status_code == 404
    # DICOM with identity is refused: the center takes de-identified data only.
    buf = io.BytesIO()
    make_instance().save_as(buf, enforce_file_format=True)
    ident = center.http.post(
        url, content=buf.getvalue(), headers={**h, "content-type": "application/dicom"}
    )
    assert ident.status_code == 400 and ident.json()["reason"] == "not_deidentified"


def _npy_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _images(shape: tuple[int, ...], n: int) -> np.ndarray:
    return np.stack([np.random.default_rng(i).random(shape, dtype=np.float32) for i in range(n)])


def test_batch_endpoint_answers_each_image_as_the_single_endpoint_does(center: Center) -> None:
    center.deploy(api={"max_batch_images": 8})
    base = f"{center.url}/v1/models/{MODEL}"
    h = {
        "x-radbridge-agreement": AGREEMENT,
        "content-type": "application/x-npy",
        **center.integration,
    }
    images = _images(center.shape, 8)
    singles = [
        center.http.post(f"{base}/infer", content=_npy_of(images[i]), headers=h, timeout=60).json()
        for i in (0, 5, 7)
    ]
    r = center.http.post(f"{base}/infer-batch", content=_npy_of(images), headers=h, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["version"] == "2" and body["provider"] == "CPUExecutionProvider"
    assert len(body["results"]) == 8 and body["timings_ms"]["total"] > 0
    for i, single in zip((0, 5, 7), singles, strict=True):  # in the request's order
        got = {f["label"]: f["probability"] for f in body["results"][i]["findings"]}
        want = {f["label"]: f["probability"] for f in single["findings"]}
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) < 1e-4 for k in want)
    sizes = [x["timings_ms"]["batch_size"] for x in body["results"]]
    assert max(sizes) == RUNNER_CONFIG["max_batch_size"]  # one request's images share batches

    def bad(content: bytes, ctype: str = "application/x-npy") -> httpx.Response:
        return center.http.post(
            f"{base}/infer-batch", content=content, headers={**h, "content-type": ctype}
        )

    too_many = bad(_npy_of(_images(center.shape, 9)))
    assert too_many.status_code == 400 and too_many.json()["reason"] == "wrong_count"
    one_image = bad(_npy_of(images[0]))  # no batch axis
    assert one_image.status_code == 400 and one_image.json()["reason"] == "wrong_shape"
    empty = bad(_npy_of(images[:0]))
    assert empty.status_code == 400 and empty.json()["reason"] == "wrong_count"
    assert bad(b"dicom?", "application/dicom").status_code == 415


def test_batch_request_is_refused_whole_when_the_queue_cannot_take_it(center: Center) -> None:
    from ray import serve

    # As in the STAT test: two slots feeding slow-filling batches, so a flood of durable
    # requests through the handle waits in the gate, filling the queue past max_queued.
    center.deploy(runner={"capacity": 2, "batch_wait_timeout_s": 0.2})
    runner = serve.get_deployment_handle("ModelRunner", app_name="radbridge-center")
    handle = runner.options(multiplexed_model_id=f"{MODEL}:2")

    def gate() -> tuple[int, int]:
        info = runner.info.remote().result(timeout_s=30)
        return sum(info["admitted"].values()), sum(info["shed"].values())

    admitted, shed = gate()
    tensor = np.random.default_rng(1).random(center.shape, dtype=np.float32)
    handle.remote(tensor, "routine", False).result(timeout_s=60)
    flood = [handle.remote(tensor, "routine", False) for _ in range(40)]
    deadline = time.monotonic() + 30
    while runner.info.remote().result(timeout_s=30)["waiting"] < 20:
        assert time.monotonic() < deadline, "the flood never queued in the gate"
        time.sleep(0.01)
    url = f"{center.url}/v1/models/{MODEL}/infer-batch"
    h = {
        "x-radbridge-agreement": AGREEMENT,
        "content-type": "application/x-npy",
        **center.integration,
    }
    refused = center.http.post(
        url, content=_npy_of(_images(center.shape, 2)), headers=h, timeout=60
    )
    assert refused.status_code == 503 and float(refused.headers["retry-after"]) >= 1
    for f in flood:
        f.result(timeout_s=120)
    # Refused whole: not one of its images entered the gate; one refusal counted.
    assert gate() == (admitted + 41, shed + 1)
    again = center.http.post(url, content=_npy_of(_images(center.shape, 2)), headers=h, timeout=60)
    assert again.status_code == 200 and len(again.json()["results"]) == 2
    assert gate() == (admitted + 43, shed + 1)


def test_stat_is_served_before_earlier_routine_work_under_overload(center: Center) -> None:
    from ray import serve

    # Two slots feeding batches of up to 4 that wait 0.2 s to fill: ~10 requests/s, so the
    # routine flood queues in the gate whatever the speed of this machine.
    center.deploy(runner={"capacity": 2, "batch_wait_timeout_s": 0.2})
    handle = serve.get_deployment_handle("ModelRunner", app_name="radbridge-center").options(
        multiplexed_model_id=f"{MODEL}:1"
    )
    tensor = np.random.default_rng(1).random(center.shape, dtype=np.float32)
    handle.remote(tensor, "routine", False).result(timeout_s=60)  # version 1 loaded

    info = serve.get_deployment_handle("ModelRunner", app_name="radbridge-center").info
    routine = [handle.remote(tensor, "routine", False) for _ in range(80)]
    deadline = time.monotonic() + 30
    while (waiting := info.remote().result(timeout_s=30)["waiting"]) < 40:
        assert time.monotonic() < deadline, "the routine flood never queued in the gate"
        time.sleep(0.01)
    stat = [handle.remote(tensor, "stat", False) for _ in range(4)]
    r_out = [r.result(timeout_s=120) for r in routine]
    s_out = [r.result(timeout_s=120) for r in stat]

    assert max(o["queue_wait"] for o in s_out) < statistics.median(o["queue_wait"] for o in r_out)
    last_stat = max(o["batch_seq"] for o in s_out)
    after_stat = [o for o in r_out if o["batch_seq"] > last_stat]
    # The routine requests still waiting when STAT came (all but a couple of batches'
    # worth of in-flight slots) were served after every STAT request.
    assert len(after_stat) >= waiting - 4


def test_overload_answers_503_retry_after_and_retries_lose_nothing(center: Center) -> None:
    # Room for two requests in the runner: 100 concurrent requests overload it whatever the
    # machine's speed. With the module's room for 16, a CI machine's client sent them slower
    # than the runner's batches of 4 drained them, and nothing was refused.
    center.deploy(runner={"max_batch_size": 1, "capacity": 1, "max_queued": 1})
    url = f"{center.url}/v1/models/{MODEL}/infer"
    refused: list[float] = []

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            verify=center.verify,
            headers=center.integration,
            timeout=60,
            limits=httpx.Limits(max_connections=200),
        ) as client:

            async def one(i: int) -> httpx.Response:
                # Bounded by time, not by a count of tries: retries are not served in arrival
                # order, so on a loaded CI machine an unlucky request may be refused 50+ times
                # before its turn (seen in CI), the way an edge outbox keeps retrying.
                deadline = time.monotonic() + 180
                while True:
                    r = await _post(client, url, _npy(center.shape, i))
                    if r.status_code != 503 or time.monotonic() > deadline:
                        return r
                    refused.append(float(r.headers["retry-after"]))
                    # sooner than Retry-After, to keep the test short; spread so that retries
                    # do not arrive as one burst that only two requests can enter
                    await asyncio.sleep(random.uniform(0.1, 0.5))

            return await asyncio.gather(*(one(i) for i in range(100)))

    before = center.metric("radbridge_center_rejected_total", endpoint="infer")
    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 100  # every request answered in the end
    assert refused and min(refused) >= 1
    assert center.metric("radbridge_center_rejected_total", endpoint="infer") - before == len(
        refused
    )


def test_stow_over_the_backlog_bound_is_503_then_accepted(center: Center) -> None:
    center.deploy(api={"max_queued_instances": 2, "retry_after_s": 7})
    db = Database(center.settings.center_db_url)
    with db.session() as s:  # a backlog of 2 instances in a queued job no replica is running
        study = _complete_study(s, "2.25.1")
        series = SeriesRow(study_id=study.id, series_uid="2.25.2", modality="DX")
        s.add(series)
        s.flush()
        for i in range(2):
            s.add(
                InstanceRow(
                    series_id=series.id,
                    sop_instance_uid=f"2.25.3{i}",
                    sop_class_uid="1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"x/{i}.dcm",
                    size=1,
                    sha256="0" * 64,
                )
            )
        # Held by a replica that looks alive (its lease runs an hour): no health check's
        # resume takes the job over while the test counts on it staying queued.
        job = JobRow(
            study_id=study.id,
            state="queued",
            priority="routine",
            owner="a-live-replica-elsewhere",
            lease_until=utcnow() + timedelta(hours=1),
        )
        s.add(job)
    from dicom_io.stow import encode_multipart

    ds = make_instance()
    ds.PatientIdentityRemoved = "YES"
    ds.PatientName, ds.PatientID = "", "PSEUDO1"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    body, ctype = encode_multipart([buf.getvalue()])
    h = {"content-type": ctype, "x-radbridge-agreement": AGREEMENT}
    time.sleep(1.1)  # the Api counts the backlog at most once a second
    r = center.http.post(
        f"{center.url}/v1/studies", content=body, headers=h, auth=center.edge_auth, timeout=30
    )
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    stat = center.http.post(
        f"{center.url}/v1/studies",
        content=body,
        headers={**h, "x-radbridge-priority": "stat"},
        auth=center.edge_auth,
        timeout=30,
    )
    assert stat.status_code == 200  # STAT may use twice the bound
    with db.session() as s:
        s.query(JobRow).filter(JobRow.state == "queued").delete()
    time.sleep(1.1)
    assert (
        center.http.post(
            f"{center.url}/v1/studies", content=body, headers=h, auth=center.edge_auth, timeout=30
        ).status_code
        == 200
    )
    db.dispose()


def test_version_switch_and_shadow_by_config_fail_no_request(center: Center) -> None:
    url = f"{center.url}/v1/models/{MODEL}/infer"
    center.deploy(api={"models": {MODEL: {"version": "1"}}})
    seen: list[tuple[float, int, str]] = []
    stop = asyncio.Event()

    async def load() -> None:
        async with httpx.AsyncClient(
            timeout=60, headers=center.integration, verify=center.verify
        ) as client:

            async def worker(w: int) -> None:
                i = 0
                while not stop.is_set():
                    r = await _post(client, url, _npy(center.shape, w * 1000 + i))
                    version = r.json()["model"]["version"] if r.status_code == 200 else ""
                    seen.append((time.monotonic(), r.status_code, version))
                    i += 1

            await asyncio.gather(*(worker(w) for w in range(4)))

    async def main() -> float:
        async with httpx.AsyncClient(
            verify=center.verify, timeout=60, headers=center.integration
        ) as client:  # version 1 loaded before the load
            assert (await _post(client, url, _npy(center.shape, 0))).status_code == 200
        task = asyncio.create_task(load())
        await asyncio.sleep(3)
        await asyncio.to_thread(
            center.deploy, api={"models": {MODEL: {"version": "2", "shadow": "1"}}}
        )
        switched = time.monotonic()
        await asyncio.sleep(6)  # includes loading version 2 on its first request
        stop.set()
        await task
        return switched

    switched = asyncio.run(main())
    assert len(seen) > 20
    assert {code for _, code, _ in seen} == {200}  # not one request failed during the switch
    assert seen[0][2] == "1"
    after = [v for t, _, v in seen if t > switched + 0.5]  # answered after the switch
    assert after and set(after) == {"2"}
    shadows = center.metric(
        "radbridge_center_shadow_results_total", model=MODEL, version="2", shadow_version="1"
    )
    assert shadows >= 1
    records = list((center.settings.center_store / "shadow" / MODEL / "1").glob("*.json"))
    assert records
    rec = json.loads(records[0].read_text())
    assert rec["version"] == "2" and rec["shadow_version"] == "1" and rec["agree"] is True


def test_required_gpu_provider_missing_fails_the_health_check(center: Center) -> None:
    """Last: leaves the application failed. On this CPU-only machine CUDA cannot run."""
    with pytest.raises(ModelError) as err:
        center.deploy(runner={"providers": ["cuda", "cpu"], "require_provider": "cuda"})
    assert "require_provider cuda" in str(err.value)


def test_every_route_refuses_callers_without_the_right_credential(center: Center) -> None:
    """The trust boundary on the running center: per route, no credential and a token signed
    by a key the center does not know answer 401; a known caller in the wrong role 403; an edge
    of another agreement 404, exactly as for a missing object."""
    db = Database(center.settings.center_db_url)
    with db.session() as s:  # a finished study of AGREEMENT
        study = _complete_study(s, "2.25.77")
        s.add(JobRow(study_id=study.id, state="done", priority="routine", version=1))
    db.dispose()
    stranger = EdgeAuth(generate_edge_key(center.root / "stranger.pem"), "local-edge")
    npy = _npy(center.shape, 1)
    complete = json.dumps(
        {"agreement_id": AGREEMENT, "priority": "routine", "instance_count": 1}
    ).encode()
    purge = json.dumps({"agreement_id": AGREEMENT, "reason": "consent-withdrawn"}).encode()
    routes: list[tuple[str, str, bytes, str]] = [
        ("POST", "/v1/studies", b"", "edge"),
        ("POST", "/v1/studies/2.25.77/complete", complete, "edge"),
        ("GET", "/v1/studies/2.25.77/results", b"", "edge"),
        ("POST", "/v1/studies/2.25.77/purge", purge, "edge"),
        ("GET", f"/v1/agreements/{AGREEMENT}/result-objects", b"", "edge"),
        ("GET", "/v1/result-objects/1", b"", "edge"),
        ("POST", f"/v1/models/{MODEL}/infer", npy, "integration"),
        ("POST", f"/v1/models/{MODEL}/infer-batch", npy, "integration"),
        ("GET", "/metrics", b"", "operator"),
    ]
    base = {"x-radbridge-agreement": AGREEMENT, "content-type": "application/x-npy"}
    table = []
    with httpx.Client(base_url=center.url, verify=center.verify, timeout=60) as http:
        for method, path, body, role in routes:

            def call(
                headers: dict[str, str] | None = None,
                auth: Any = None,
                method: str = method,
                path: str = path,
                body: bytes = body,
            ) -> int:
                h = {**base, **(headers or {})}
                if path.endswith(("/complete", "/purge")):
                    h["content-type"] = "application/json"
                return http.request(method, path, content=body, headers=h, auth=auth).status_code

            anonymous = http.request(method, path, content=body, headers=base)
            assert anonymous.status_code == 401, (path, anonymous.text)
            assert anonymous.headers["www-authenticate"].startswith("Bearer")
            assert call(auth=stranger) == 401, path
            assert call({"authorization": "Bearer " + "x" * 40}) == 401, path
            wrong_role = center.operator if role != "operator" else center.integration
            assert call(wrong_role) == 403, path
            if role == "edge":
                assert call(auth=center.other_edge_auth) == 404, path
            table.append((method, path, role))
        # The edge of the agreement is let in where the other edge was told "missing".
        own = http.get(
            "/v1/studies/2.25.77/results", headers=base, auth=center.edge_auth
        ).status_code
        assert own == 200
        assert (
            http.get(
                f"/v1/agreements/{AGREEMENT}/result-objects", auth=center.edge_auth
            ).status_code
            == 200
        )
    print(
        "\n".join(
            f"{m:5} {p:50} {r}: 401/401/401/403{'/404' if r == 'edge' else ''}" for m, p, r in table
        )
    )
    assert center.metric("radbridge_center_refused_requests_total", reason="unauthenticated") >= 24


def test_bodies_over_the_cap_are_413_declared_or_streamed(center: Center) -> None:
    h = {
        "x-radbridge-agreement": AGREEMENT,
        "content-type": 'multipart/related; type="application/dicom"; boundary=x',
    }

    def chunks() -> Iterator[bytes]:
        for _ in range(6):  # 6 MiB without a Content-Length: counted as it arrives
            yield b"\0" * (1 << 20)

    with httpx.Client(
        base_url=center.url, verify=center.verify, timeout=60, auth=center.edge_auth
    ) as http:
        streamed = http.post("/v1/studies", content=chunks(), headers=h)
        assert streamed.status_code == 413, streamed.text
        assert streamed.json()["reason"] == "body_too_large"
    infer = center.http.post(
        f"{center.url}/v1/models/{MODEL}/infer",
        content=chunks(),
        headers={**h, **center.integration, "content-type": "application/x-npy"},
        timeout=60,
    )
    assert infer.status_code == 413, infer.text


def test_generated_requests_keep_the_openapi_contract(center: Center) -> None:
    """schemathesis against the running center, with real credentials for each route's role
    (an edge token minted per request, the integration and operator secrets): generated valid
    and invalid requests (bounded: 40 per route, derandomized) must never make the center fail
    (5xx) nor answer a status, media type or body its OpenAPI document does not declare."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from serving.boundary import ROLES_BY_PREFIX

    spec = center.http.get(f"{center.url}/openapi.json").json()
    # Raw bodies for the binary media types: a real instance or image, cut short, or noise.
    buf = io.BytesIO()
    make_instance().save_as(buf, enforce_file_format=True)
    instance = buf.getvalue()
    npy = _npy(center.shape, 1)
    bodies = {
        'multipart/related; type="application/dicom"': [instance],
        "application/x-npy": [npy],
        "application/dicom": [instance],
    }
    for media, real in bodies.items():
        samples = st.sampled_from([*real, *(r[: len(r) // 3] for r in real), b""])
        schemathesis.openapi.media_type(media, samples | st.binary(max_size=4096))
    schema = schemathesis.openapi.from_dict(spec)
    session = requests.Session()
    ca = str(center.settings.edge.center_ca_file)  # every call a real TLS handshake
    secrets = {"operator": center.operator, "integration": center.integration}
    failures: list[str] = []
    counted = [0]

    def check(case: Any, role: str) -> None:
        counted[0] += 1
        headers = dict(secrets.get(role, {}))
        if role == "edge":  # bound to the path as sent (percent-encoded), like EdgeAuth
            url = case.as_transport_kwargs(base_url=center.url)["url"]
            path = urllib.parse.urlsplit(url).path
            token = edge_token(center.edge_auth.key, "local-edge", case.method, path)
            headers["authorization"] = f"Bearer {token}"
        response = case.call(base_url=center.url, session=session, headers=headers, verify=ca)
        try:
            case.validate_response(response, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:  # collected, then reported together
            failures.append(f"{case.method} {case.formatted_path}: {exc}"[:600])

    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    for result in schema.get_all_operations():
        op = result.ok()
        role = next((r.value for p, r in ROLES_BY_PREFIX if op.path.startswith(p)), "open")
        given(case=st.one_of(*(op.as_strategy(m) for m in modes)))(
            settings(
                max_examples=40,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )(_bound(check, role))
        )()
    cases = counted[0]
    print(f"schemathesis: {cases} generated requests, {len(failures)} failures")
    assert cases >= 100
    assert not failures, "\n".join(failures[:20])


def _bound(check: Any, role: str) -> Any:
    """``check`` with its role fixed: hypothesis's @given takes no function with defaults."""

    def run(case: Any) -> None:
        check(case, role)

    return run


def test_the_center_exports_its_free_disk_and_certificate_expiry(center: Center) -> None:
    free = center.metric("radbridge_center_store_free_bytes")
    assert free > 0
    expiry = center.metric("radbridge_center_certificate_expiry_timestamp_seconds")
    assert 360 < (expiry - time.time()) / 86400 <= 365  # the local CA's one-year certificate


def test_the_edge_has_a_study_purged_at_the_center(center: Center) -> None:
    """A withdrawn consent at the hospital: the edge asks, the center deletes the study and
    audits it (110105); asking again is harmless; the other agreement's edge cannot."""
    db = Database(center.settings.center_db_url)
    with db.session() as s:
        study = _complete_study(s, "2.25.78")
        s.add(JobRow(study_id=study.id, state="done", priority="routine", version=1))
    body = PurgeStudy(agreement_id=AGREEMENT, reason="consent-withdrawn")
    own = CenterClient(center.url, auth=center.edge_auth, verify=center.verify)
    other = CenterClient(center.url, auth=center.other_edge_auth, verify=center.verify)
    try:
        with pytest.raises(CenterError) as refused:
            other.purge("2.25.78", body)
        assert refused.value.status == 404
        assert own.purge("2.25.78", body) == PurgeOut(purged=True, files=0)
        assert own.purge("2.25.78", body) == PurgeOut(purged=False, files=0)
        with db.session() as s:
            gone = s.scalars(select(StudyRow).where(StudyRow.study_uid == "2.25.78")).first()
            assert gone is None
            deleted = s.scalars(
                select(AuditRow).where(
                    AuditRow.event_id == "110105", AuditRow.study_uid == "2.25.78"
                )
            ).all()
        assert len(deleted) == 1 and "consent-withdrawn" in deleted[0].details
    finally:
        own.close()
        other.close()
        db.dispose()


def test_a_waiting_listing_answers_with_the_first_object_built_after_it_began(
    center: Center,
) -> None:
    """The edge's long poll: a listing with wait_s answers with an object that did not exist
    when it was asked for (here built by "another replica", straight into the database),
    and an empty page once wait_s passed without one."""
    db = Database(center.settings.center_db_url)
    client = CenterClient(center.url, auth=center.edge_auth, verify=center.verify)
    try:
        after = max([0, *(o.id for o in client.result_objects(AGREEMENT, 0, 1000))])
        assert client.result_objects(AGREEMENT, after, 10, wait_s=1.0) == []
        with db.session() as s:
            study = _complete_study(s, "2.25.79")
            job = JobRow(  # run by that other replica: its lease keeps resume() off it
                study_id=study.id,
                state="running",
                priority="routine",
                version=1,
                owner="a-live-replica-elsewhere",
                lease_until=utcnow() + timedelta(hours=1),
            )
            s.add(job)
            s.flush()
            job_id = job.id

        def build_later() -> None:
            time.sleep(0.7)
            with db.session() as s:
                s.add(
                    ResultObjectRow(
                        agreement_id=AGREEMENT,
                        job_id=job_id,
                        study_uid="2.25.79",
                        version=1,
                        kind="sr",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                        sop_instance_uid="2.25.7901",
                        series_instance_uid="2.25.7902",
                        path="x.dcm",
                        size=1,
                        sha256="0" * 64,
                    )
                )
                s.execute(update(JobRow).where(JobRow.id == job_id).values(state="done"))

        builder = threading.Thread(target=build_later)
        builder.start()
        listed = client.result_objects(AGREEMENT, after, 10, wait_s=20.0)
        builder.join()
        assert [o.sop_instance_uid for o in listed] == ["2.25.7901"]
    finally:
        client.close()
        db.dispose()

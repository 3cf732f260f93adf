"""`radbridge ops` (serving/kube.py) against a loopback HTTP server that plays the Kubernetes API
server with hand-written responses in the API's own shapes: the official client talks to it as
to a cluster. No API server runs on this machine, so what is checked is every request the
commands send: its method, path and content type, and the object it leaves behind, validated
against the vendored RayService CRD schema and kubernetes-validate's strict core schemas (the
responses' Pods and Nodes too, so the fixtures cannot drift from what a cluster answers)."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request, Response
from typer.testing import CliRunner

from radbridge.errors import ConfigError
from serving.kube import Cluster, connect, roll_model, scale_patch, status
from tests.conftest import free_port
from tests.test_k8s import build, core_errors, crd_errors, one

NS = "radbridge"
RS_PATH = f"/apis/ray.io/v1/namespaces/{NS}/rayservices/radbridge-center"
EDGE_METRICS = """# TYPE radbridge_edge_outbox_studies gauge
radbridge_edge_outbox_studies{state="receiving"} 3.0
radbridge_edge_outbox_studies{state="blocked"} 1.0
"""


def _rayservice() -> dict[str, Any]:
    rs = one(build("production"), "RayService")
    rs["metadata"].update(namespace=NS, resourceVersion="4242", uid="0c4a1f3e-0000-4000-8000-1")
    rs["status"] = {
        "serviceStatus": "Running",
        "activeServiceStatus": {
            "rayClusterName": "radbridge-center-raycluster-x7k2p",
            "applicationStatuses": {
                "radbridge-center": {"status": "RUNNING"},
                "radbridge-review": {"status": "RUNNING"},
            },
        },
    }
    return rs


def _pod(
    name: str, labels: dict[str, str], node: str, phase: str = "Running", gpus: int = 0
) -> dict[str, Any]:
    limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "main", "image": "radbridge:0.1.0", "resources": {"limits": limits}}
            ],
        },
        "status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if phase == "Running" else "False"}],
        },
    }


def _node(name: str, gpus: int) -> dict[str, Any]:
    allocatable = {"cpu": "16", "memory": "64Gi"} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"allocatable": allocatable, "capacity": allocatable},
    }


CLUSTER = "radbridge-center-raycluster-x7k2p"
RAY_PODS = [
    _pod("head-0", {"ray.io/cluster": CLUSTER, "ray.io/group": "headgroup"}, "cpu-1"),
    _pod("gpu-a", {"ray.io/cluster": CLUSTER, "ray.io/group": "gpu"}, "gpu-1", gpus=1),
    _pod("gpu-b", {"ray.io/cluster": CLUSTER, "ray.io/group": "gpu"}, "gpu-2", "Pending", gpus=1),
    _pod("cpu-a", {"ray.io/cluster": CLUSTER, "ray.io/group": "cpu"}, "cpu-1"),
]
EDGE_LABELS = {"app.kubernetes.io/name": "radbridge", "app.kubernetes.io/component": "edge"}
EDGE_PODS = [_pod("edge-0", EDGE_LABELS, "cpu-1"), _pod("edge-1", EDGE_LABELS, "cpu-2", "Pending")]
NODES = [_node("cpu-1", 0), _node("cpu-2", 0), _node("gpu-1", 1), _node("gpu-2", 1)]


class FakeApiServer:
    """The few routes the ops commands use, answering from the objects above; records every
    request (method, path, query, content type, JSON body)."""

    def __init__(self) -> None:
        self.rayservice = _rayservice()
        self.requests: list[dict[str, Any]] = []
        app = FastAPI()

        @app.middleware("http")
        async def record(request: Request, call_next: Any) -> Response:
            body = await request.body()
            self.requests.append(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "query": dict(request.query_params),
                    "content_type": request.headers.get("content-type"),
                    "body": json.loads(body) if body else None,
                }
            )
            response: Response = await call_next(request)
            return response

        @app.get(RS_PATH)
        def get_rs() -> dict[str, Any]:
            return self.rayservice

        @app.patch(RS_PATH)
        async def patch_rs(request: Request) -> dict[str, Any]:
            patch = json.loads(await request.body())
            if request.headers["content-type"] == "application/json-patch+json":
                self.rayservice = _json_patch(self.rayservice, patch)
            else:
                self.rayservice = _merge_patch(self.rayservice, patch)
            return self.rayservice

        @app.get(f"/api/v1/namespaces/{NS}/pods")
        def pods(labelSelector: str = "") -> dict[str, Any]:
            wanted = dict(kv.split("=", 1) for kv in labelSelector.split(",") if kv)
            items = [
                p
                for p in RAY_PODS + EDGE_PODS
                if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())
            ]
            return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

        @app.get("/api/v1/pods")
        def all_pods(fieldSelector: str = "") -> dict[str, Any]:
            items = [p for p in RAY_PODS + EDGE_PODS if p["status"]["phase"] == "Running"]
            return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

        @app.get("/api/v1/nodes")
        def nodes() -> dict[str, Any]:
            return {"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": NODES}

        @app.get(f"/api/v1/namespaces/{NS}/pods/{{name}}/proxy/metrics")
        def metrics(name: str) -> Response:
            return Response(EDGE_METRICS, media_type="text/plain")

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def cluster(self) -> Cluster:
        from kubernetes import client

        config = client.Configuration(host=f"http://127.0.0.1:{self.port}")
        return connect(NS, api_client=client.ApiClient(config))


def _json_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    for op in ops:
        *parents, last = op["path"].lstrip("/").split("/")
        target: Any = out
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if op["op"] == "test":
            assert target[last] == op["value"], f"test failed at {op['path']}"
        elif op["op"] in ("add", "replace"):
            target[last] = op["value"]
        else:
            raise AssertionError(f"unexpected op {op['op']}")
    return out


def _merge_patch(obj: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    out = dict(obj) if isinstance(obj, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.thread.start()
    deadline = time.monotonic() + 10
    while not server.server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield server
    server.server.should_exit = True
    server.thread.join(5)


def test_the_recorded_responses_are_valid_kubernetes_objects() -> None:
    for obj in RAY_PODS + EDGE_PODS + NODES:
        assert core_errors(obj) == [], obj["metadata"]["name"]
    assert crd_errors(_rayservice()) == []


def test_status_reads_the_rayservice_groups_gpus_and_edges(api: FakeApiServer) -> None:
    st = status(api.cluster(), "radbridge-center")
    assert st.service_status == "Running"
    assert st.applications == {"radbridge-center": "RUNNING", "radbridge-review": "RUNNING"}
    groups = {g.name: g for g in st.groups}
    assert groups["gpu"].running == 1 and groups["gpu"].gpus_per_pod == 1
    assert groups["cpu"].running == 1
    assert {(n.name, n.gpus, n.requested) for n in st.gpu_nodes} == {
        ("gpu-1", 1, 1),
        ("gpu-2", 1, 0),  # gpu-b is still Pending there
    }
    edges = {e.pod: e for e in st.edges}
    assert edges["edge-0"].outbox == {"receiving": 3.0, "blocked": 1.0}
    assert not edges["edge-1"].ready and edges["edge-1"].outbox == {}
    paths = {r["path"] for r in api.requests}
    assert RS_PATH in paths and f"/api/v1/namespaces/{NS}/pods/edge-0:9101/proxy/metrics" in paths
    assert all(r["method"] == "GET" for r in api.requests)  # status changes nothing


def test_scale_sends_a_guarded_json_patch_that_leaves_a_valid_rayservice(
    api: FakeApiServer, cli: Any
) -> None:
    out = CliRunner().invoke(cli, ["ops", "scale", "--group", "gpu", "--min", "2", "--max", "6"])
    assert out.exit_code == 0, out.output
    [patch] = [r for r in api.requests if r["method"] == "PATCH"]
    assert patch["path"] == RS_PATH and patch["content_type"] == "application/json-patch+json"
    assert patch["body"][0]["op"] == "test"  # the group is pinned at its index
    gpu = next(
        g
        for g in api.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        if g["groupName"] == "gpu"
    )
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (2, 6)
    assert 2 <= gpu["replicas"] <= 6
    assert crd_errors(api.rayservice) == []
    with pytest.raises(ConfigError, match="no worker group"):
        scale_patch(api.rayservice, "tpu", 1, 2)
    with pytest.raises(ConfigError, match="min <= max"):
        scale_patch(api.rayservice, "gpu", 3, 2)


def test_roll_model_changes_one_line_of_serve_config_and_dry_run_sends_nothing(
    api: FakeApiServer, cli: Any
) -> None:
    runner = CliRunner()
    dry = runner.invoke(
        cli,
        ["ops", "roll-model", "chest-xray-demo", "2", "--old", "drop", "--dry-run"],
        terminal_width=200,
    )
    assert dry.exit_code == 0, dry.output
    assert "-          models: {}" in dry.output
    assert "+          models: {chest-xray-demo: {version: '2'}}" in dry.output
    assert not [r for r in api.requests if r["method"] == "PATCH"]

    out = runner.invoke(cli, ["ops", "roll-model", "chest-xray-demo", "2", "--old", "drop"])
    assert out.exit_code == 0, out.output
    [patch] = [r for r in api.requests if r["method"] == "PATCH"]
    assert patch["content_type"] == "application/merge-patch+json"
    assert set(patch["body"]) == {"spec"} and set(patch["body"]["spec"]) == {"serveConfigV2"}
    assert crd_errors(api.rayservice) == []
    # Then 3, with 2 shadowing it: the comment on the line stays, nothing else changes.
    roll = roll_model(api.rayservice, "chest-xray-demo", "3", "shadow")
    assert roll.after == {"version": "3", "shadow": "2"}
    changed = [
        line for line in roll.diff.splitlines() if line[:1] in "+-" and line[:3] not in "+++---"
    ]
    assert len(changed) == 2 and "# pin per model" in changed[1]
    config = yaml.safe_load(roll.patch["spec"]["serveConfigV2"])
    api_dep = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Api")
    assert api_dep["user_config"]["models"] == {"chest-xray-demo": {"version": "3", "shadow": "2"}}
    with pytest.raises(ConfigError, match="already pinned"):
        roll_model(api.rayservice, "chest-xray-demo", "2", "drop")


def test_roll_model_refuses_to_shadow_an_unpinned_model(api: FakeApiServer) -> None:
    with pytest.raises(ConfigError, match="no pinned version to shadow"):
        roll_model(api.rayservice, "chest-xray-demo", "2", "shadow")


@pytest.fixture
def cli(api: FakeApiServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The CLI with its cluster connection pointed at the fake API server."""
    import serving.kube
    from radbridge.cli import app

    cluster = api.cluster()
    monkeypatch.setattr(serving.kube, "connect", lambda *_a, **_k: cluster)
    return app

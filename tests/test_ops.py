"""`radbridge ops` (serving/kube.py) against a loopback HTTP server that plays the Kubernetes API
server with hand-written responses in the API's own shapes: the official client talks to it as
to a cluster. No API server runs on this machine, so what is checked is every request the
commands send: its method, path and content type, and the object it leaves behind, validated
against the vendored RayService CRD schema and kubernetes-validate's strict core schemas (the
responses' Pods and Nodes too, so the fixtures cannot drift from what a cluster answers). The
edge's /metrics are written by radbridge's own EdgeMetrics catalog, and its Services are the
ones kustomize builds from k8s/."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request, Response
from prometheus_client import generate_latest
from typer.testing import CliRunner

from radbridge.errors import ConfigError
from radbridge.metrics import EdgeMetrics
from serving.kube import (
    DRAINING_SINCE,
    INTAKE_LABEL,
    Cluster,
    Outbox,
    connect,
    drain_patch,
    patch_pod,
    roll_model,
    scale_patch,
    status,
    undrain_patch,
)
from tests.conftest import free_port
from tests.test_k8s import _selects, build, core_errors, crd_errors, one

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
EDGE_LABELS = {  # the edge Deployment's pod template (a test below holds them equal)
    "app.kubernetes.io/name": "radbridge",
    "app.kubernetes.io/part-of": "radbridge",
    "app.kubernetes.io/component": "edge",
    INTAKE_LABEL: "open",
}
EDGE_PODS = [_pod("edge-0", EDGE_LABELS, "cpu-1"), _pod("edge-1", EDGE_LABELS, "cpu-2", "Pending")]
NODES = [_node("cpu-1", 0), _node("cpu-2", 0), _node("gpu-1", 1), _node("gpu-2", 1)]


def _edge_metrics(
    *,
    associations: float = 0,
    receiving: float | None = 0,
    blocked: float = 0,
    oldest: float = 0,
    pending: float | None = 0,
    dead: float = 0,
) -> str:
    """An edge's /metrics as the gateway writes them (None: that gauge not set yet)."""
    m = EdgeMetrics()
    m.active_associations.set(associations)
    if receiving is not None:
        m.outbox_depth.labels("receiving").set(receiving)
        m.outbox_depth.labels("blocked").set(blocked)
        m.outbox_oldest.set(oldest)
    if pending is not None:
        for state, n in (("pending", pending), ("delivered", 7), ("dead", dead)):
            m.deliveries.labels(state).set(n)
    return generate_latest(m.registry).decode()


EDGE_POD_PATH = f"/api/v1/namespaces/{NS}/pods/edge-0"


class FakeApiServer:
    """The few routes the ops commands use, answering from the objects above; records every
    request (method, path, query, content type, JSON body)."""

    def __init__(self) -> None:
        self.rayservice = _rayservice()
        self.pods = copy.deepcopy(RAY_PODS + EDGE_PODS)
        objs = build("production")
        self.services = {s["metadata"]["name"]: s for s in objs if s["kind"] == "Service"}
        self.deployment = one(objs, "Deployment", "radbridge-edge")
        self.metrics: Callable[[str], str] = lambda _pod: EDGE_METRICS
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
                for p in self.pods
                if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())
            ]
            return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

        @app.get("/api/v1/pods")
        def all_pods(fieldSelector: str = "") -> dict[str, Any]:
            items = [p for p in self.pods if p["status"]["phase"] == "Running"]
            return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

        @app.get("/api/v1/nodes")
        def nodes() -> dict[str, Any]:
            return {"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": NODES}

        @app.get(f"/api/v1/namespaces/{NS}/pods/{{name}}/proxy/metrics")
        def metrics(name: str) -> Response:
            return Response(self.metrics(name.split(":")[0]), media_type="text/plain")

        @app.get(f"/api/v1/namespaces/{NS}/pods/{{name}}")
        def get_pod(name: str) -> Any:
            return self._pod(name) or _not_found("pods", name)

        @app.patch(f"/api/v1/namespaces/{NS}/pods/{{name}}")
        async def patch_pod(name: str, request: Request) -> Any:
            pod = self._pod(name)
            if pod is None:
                return _not_found("pods", name)
            assert request.headers["content-type"] == "application/json-patch+json"
            try:
                patched = _json_patch(pod, json.loads(await request.body()))
            except AssertionError as exc:  # a failed test op: what the API server answers
                return _status(422, "Invalid", str(exc))
            self.pods[self.pods.index(pod)] = patched
            return patched

        @app.get(f"/api/v1/namespaces/{NS}/services/{{name}}")
        def get_service(name: str) -> Any:
            return self.services.get(name) or _not_found("services", name)

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def _pod(self, name: str) -> dict[str, Any] | None:
        return next((p for p in self.pods if p["metadata"]["name"] == name), None)

    def cluster(self) -> Cluster:
        from kubernetes import client

        config = client.Configuration(host=f"http://127.0.0.1:{self.port}")
        return connect(NS, api_client=client.ApiClient(config))


def _status(code: int, reason: str, message: str) -> Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    body |= {"message": message, "reason": reason, "code": code}
    return Response(json.dumps(body), code, media_type="application/json")


def _not_found(resource: str, name: str) -> Response:
    return _status(404, "NotFound", f'{resource} "{name}" not found')


def _json_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 as far as the commands use it; a failed test or a missing path raises
    AssertionError (the API server answers 422)."""
    out = copy.deepcopy(obj)
    for op in ops:
        *parents, last = (
            k.replace("~1", "/").replace("~0", "~") for k in op["path"].lstrip("/").split("/")
        )
        target: Any = out
        for key in parents:
            assert isinstance(target, list) or key in target, f"no {key} in {op['path']}"
            target = target[int(key)] if isinstance(target, list) else target[key]
        if op["op"] == "test":
            assert target.get(last) == op["value"], f"test failed at {op['path']}"
        elif op["op"] == "replace":
            assert last in target, f"replace of a missing {op['path']}"
            target[last] = op["value"]
        elif op["op"] == "add":
            target[last] = op["value"]
        elif op["op"] == "remove":
            assert last in target, f"remove of a missing {op['path']}"
            del target[last]
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


# -- drain-edge ----------------------------------------------------------------------------------


def _edge_pod(api: FakeApiServer) -> dict[str, Any]:
    pod = api._pod("edge-0")
    assert pod is not None
    return pod


def _drain(cli: Any, *args: str) -> Any:
    return CliRunner().invoke(cli, ["ops", "drain-edge", "edge-0", "--interval", "0.02", *args])


def _text(result: Any) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.mark.parametrize("name", ["dev", "production"])
def test_the_intake_label_is_selected_by_the_pacs_service_only(name: str) -> None:
    """drain-edge relabels the pod: that must take it out of the PACS-facing Service, and out
    of nothing else (its ReplicaSet would start a second pod on the same volume; Prometheus
    would lose its outbox)."""
    objs = build(name)
    deployment = one(objs, "Deployment", "radbridge-edge")
    template = deployment["spec"]["template"]["metadata"]["labels"]
    assert template == EDGE_LABELS  # the fixture pods are the template's
    assert INTAKE_LABEL not in deployment["spec"]["selector"]["matchLabels"]
    pacs = one(objs, "Service", "radbridge-edge")["spec"]["selector"]
    assert pacs[INTAKE_LABEL] == "open"
    drained = template | {INTAKE_LABEL: "draining"}
    assert _selects({"matchLabels": pacs}, template)
    assert not _selects({"matchLabels": pacs}, drained)
    assert _selects(deployment["spec"]["selector"], drained)
    for svc in (o for o in objs if o["kind"] == "Service"):
        if svc["metadata"]["name"] != "radbridge-edge" and INTAKE_LABEL in svc["spec"]["selector"]:
            raise AssertionError(f"{svc['metadata']['name']} would lose a draining edge")
    metrics = one(objs, "Service", "radbridge-edge-metrics")["spec"]["selector"]
    assert _selects({"matchLabels": metrics}, drained)


def test_drain_edge_sends_a_guarded_json_patch_and_waits_for_the_outbox(
    api: FakeApiServer, cli: Any
) -> None:
    readings = iter(
        [
            _edge_metrics(associations=1, receiving=2, oldest=40, pending=1),
            _edge_metrics(receiving=1, oldest=20, pending=1, blocked=0),
            _edge_metrics(blocked=1, oldest=9000, dead=2),  # held: not waited for
        ]
    )
    last = _edge_metrics(blocked=1, oldest=9000, dead=2)
    api.metrics = lambda pod: next(readings, last)
    before = datetime.now(UTC).replace(microsecond=0)
    out = _drain(cli, "--timeout", "5")
    assert out.exit_code == 0, out.output
    [patch] = [r for r in api.requests if r["method"] == "PATCH"]
    assert patch["path"] == EDGE_POD_PATH
    assert patch["content_type"] == "application/json-patch+json"
    label = "/metadata/labels/radbridge.io~1intake"
    assert patch["body"][:2] == [
        {"op": "test", "path": label, "value": "open"},
        {"op": "replace", "path": label, "value": "draining"},
    ]
    [annotate] = patch["body"][2:]
    assert annotate["op"] == "add" and annotate["path"] == "/metadata/annotations"
    since = datetime.fromisoformat(annotate["value"][DRAINING_SINCE])
    assert before <= since <= datetime.now(UTC) + timedelta(seconds=1)
    # The pod left behind: a valid Pod, out of the PACS Service, still its Deployment's and
    # still scraped; nothing deleted.
    pod = _edge_pod(api)
    assert core_errors(pod) == []
    labels = pod["metadata"]["labels"]
    assert labels == EDGE_LABELS | {INTAKE_LABEL: "draining"}
    assert not _selects({"matchLabels": api.services["radbridge-edge"]["spec"]["selector"]}, labels)
    assert _selects(api.deployment["spec"]["selector"], labels)
    metrics_svc = api.services["radbridge-edge-metrics"]["spec"]["selector"]
    assert _selects({"matchLabels": metrics_svc}, labels)
    assert not [r for r in api.requests if r["method"] in ("DELETE", "POST", "PUT")]
    # Progress, then drained: blocked studies and dead deliveries are named, not waited for.
    assert "1 DICOM association(s) open; 2 studies to forward (oldest 40 s)" in _text(out)
    assert "1 results to deliver to the PACS" in _text(out)
    assert "edge-0 drained" in _text(out)
    assert "1 blocked studies, 2 dead deliveries stay on its volume" in _text(out)
    assert {e.pod: e.draining for e in status(api.cluster(), "radbridge-center").edges} == {
        "edge-0": True,
        "edge-1": False,
    }
    # Again: already out, nothing sent, only waits.
    again = _drain(cli, "--timeout", "5")
    assert again.exit_code == 0, again.output
    assert "already out of Service radbridge-edge" in _text(again)
    assert len([r for r in api.requests if r["method"] == "PATCH"]) == 1


def test_drain_edge_dry_run_prints_the_patch_and_sends_nothing(
    api: FakeApiServer, cli: Any
) -> None:
    api.metrics = lambda pod: _edge_metrics(receiving=4, oldest=12)
    out = _drain(cli, "--dry-run")
    assert out.exit_code == 0, out.output
    assert '"path": "/metadata/labels/radbridge.io~1intake"' in _text(out)
    assert '"value": "draining"' in _text(out)
    assert (
        "dry run, nothing sent; edge-0 now: pending: 4 studies to forward (oldest 12 s)"
        in _text(out)
    )
    assert all(r["method"] == "GET" for r in api.requests)
    assert _edge_pod(api)["metadata"]["labels"] == EDGE_LABELS


def test_drain_edge_times_out_naming_what_is_pending(api: FakeApiServer, cli: Any) -> None:
    api.metrics = lambda pod: _edge_metrics(receiving=2, oldest=900, pending=3)
    started = time.monotonic()
    out = _drain(cli, "--timeout", "0.3")
    assert time.monotonic() - started < 5
    assert out.exit_code == 1, out.output
    assert (
        "not drained after 0.3 s, still pending on edge-0: 2 studies to forward (oldest 900 s); "
        "3 results to deliver to the PACS"
    ) in _text(out)
    assert "run drain-edge again" in _text(out)
    assert _edge_pod(api)["metadata"]["labels"][INTAKE_LABEL] == "draining"  # stays out


def test_undrain_edge_restores_the_labels(api: FakeApiServer, cli: Any) -> None:
    api.metrics = lambda pod: _edge_metrics()
    assert _drain(cli, "--timeout", "5").exit_code == 0
    drained = copy.deepcopy(_edge_pod(api))
    runner = CliRunner()
    dry = runner.invoke(cli, ["ops", "undrain-edge", "edge-0", "--dry-run"], terminal_width=200)
    assert dry.exit_code == 0, dry.output
    assert _edge_pod(api) == drained
    out = runner.invoke(cli, ["ops", "undrain-edge", "edge-0"], terminal_width=200)
    assert out.exit_code == 0, out.output
    patch = [r for r in api.requests if r["method"] == "PATCH"][-1]
    assert patch["path"] == EDGE_POD_PATH
    assert patch["content_type"] == "application/json-patch+json"
    label = "/metadata/labels/radbridge.io~1intake"
    assert patch["body"] == [
        {"op": "test", "path": label, "value": "draining"},
        {"op": "replace", "path": label, "value": "open"},
        {"op": "remove", "path": "/metadata/annotations/radbridge.io~1draining-since"},
    ]
    pod = _edge_pod(api)
    assert core_errors(pod) == []
    assert pod["metadata"]["labels"] == EDGE_LABELS
    assert DRAINING_SINCE not in (pod["metadata"].get("annotations") or {})
    assert _selects(
        {"matchLabels": api.services["radbridge-edge"]["spec"]["selector"]}, EDGE_LABELS
    )
    # Not draining any more: refused, nothing sent.
    again = runner.invoke(cli, ["ops", "undrain-edge", "edge-0"], terminal_width=200)
    assert again.exit_code == 2 and "not draining" in _text(again)
    # A patch built from a stale read fails its test op instead of applying twice.
    with pytest.raises(ConfigError, match="changed meanwhile"):
        patch_pod(api.cluster(), "edge-0", undrain_patch(drained))


def test_drain_patch_refuses_what_relabelling_would_not_drain(api: FakeApiServer) -> None:
    pod, now = _edge_pod(api), datetime.now(UTC)
    pacs = api.services["radbridge-edge"]["spec"]["selector"]
    old_service = {k: v for k, v in pacs.items() if k != INTAKE_LABEL}
    with pytest.raises(ConfigError, match="apply the current k8s/ manifests"):
        drain_patch(pod, old_service, now)
    with pytest.raises(ConfigError, match="not an edge gateway"):
        drain_patch(api.pods[0], pacs, now)
    unlabelled = copy.deepcopy(pod)
    del unlabelled["metadata"]["labels"][INTAKE_LABEL]  # a pod from before the label
    with pytest.raises(ConfigError, match="not behind the edge Service"):
        drain_patch(unlabelled, pacs, now)
    annotated = copy.deepcopy(pod)
    annotated["metadata"]["annotations"] = {"kubectl.kubernetes.io/restartedAt": "x"}
    assert drain_patch(annotated, pacs, now)[2] == {
        "op": "add",
        "path": "/metadata/annotations/radbridge.io~1draining-since",
        "value": now.isoformat(timespec="seconds"),
    }
    with pytest.raises(ConfigError, match="not draining"):
        undrain_patch(pod)


def test_drain_edge_names_a_pod_that_is_not_there(api: FakeApiServer, cli: Any) -> None:
    out = CliRunner().invoke(cli, ["ops", "drain-edge", "edge-9"])
    assert out.exit_code == 2, out.output
    assert "pod edge-9 or Service radbridge-edge not found in namespace radbridge" in _text(out)
    assert all(r["method"] == "GET" for r in api.requests)


def test_an_outbox_is_drained_only_when_its_gauges_say_so() -> None:
    assert Outbox(0, 0, 0, 0, 0, 0).pending() == []
    assert Outbox(0, 0, 3, 7200, 0, 1).pending() == []  # blocked / dead: held, not pending
    assert Outbox(0, 0, 3, 7200, 0, 1).held() == ["3 blocked studies", "1 dead deliveries"]
    # Gauges not set yet (a gateway just started) are not zeros.
    assert Outbox(0, None, None, None, None, None).pending() == [
        "no outbox count in /metrics yet",
        "no delivery count in /metrics yet",
    ]
    assert Outbox(0, 0, 0, 5, 0, 0).pending() == ["a study waiting 5 s"]
    assert Outbox(None, None, None, None, None, None, "metrics unreadable: 503").pending() == [
        "metrics unreadable: 503"
    ]

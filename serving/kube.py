"""The center and its edges on Kubernetes, as ``radbridge ops`` sees and changes them.

Reads and writes go through the official ``kubernetes`` client (kubeconfig, or the pod's service
account in the cluster). What the changes are:

- :func:`scale_patch` - a JSON patch of one RayService worker group's ``minReplicas`` /
  ``maxReplicas``; a ``test`` op pins the group's name at its index, so a reordered list is
  refused by the API server instead of scaling the wrong group.
- :func:`roll_model` - a merge patch of ``spec.serveConfigV2`` in which the Api's
  ``user_config.models`` pin of one model moves to a new version, the old one shadowing it or
  gone. Only that line of the embedded Serve config changes (its comments stay); the result is
  checked as serving/config.py checks any Serve config, and the diff is what ``--dry-run``
  prints. KubeRay hands a changed ``user_config`` to the running replicas (reconfigure(), no
  restart); a version the image does not carry fails that reconfigure and KubeRay keeps the
  old config serving.

:func:`status` gathers the RayService's state, its worker groups and their pods, the GPU nodes
and what is scheduled on them, and the edge pods with their outbox from their ``/metrics``
(through the API server's pod proxy).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from radbridge.errors import ConfigError
from serving.config import ServeConfig

__all__ = [
    "CENTER_APP",
    "GROUP",
    "PLURAL",
    "VERSION",
    "Cluster",
    "EdgeState",
    "GpuNode",
    "Status",
    "WorkerGroup",
    "connect",
    "roll_model",
    "scale_patch",
    "status",
]

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
CENTER_APP = "radbridge-center"
EDGE_SELECTOR = "app.kubernetes.io/name=radbridge,app.kubernetes.io/component=edge"
EDGE_METRICS_PORT = 9101
GPU = "nvidia.com/gpu"


@dataclass
class Cluster:
    """The API groups the ops commands use, bound to one namespace."""

    core: Any  # kubernetes.client.CoreV1Api
    custom: Any  # kubernetes.client.CustomObjectsApi
    namespace: str


def connect(namespace: str, context: str | None = None, api_client: Any = None) -> Cluster:
    """A :class:`Cluster` from the kubeconfig (``context``), or the pod's service account."""
    from kubernetes import client, config

    if api_client is None:
        try:
            config.load_kube_config(context=context)
        except Exception:  # no kubeconfig: are we a pod?
            try:
                config.load_incluster_config()
            except Exception:
                raise ConfigError(
                    "no Kubernetes credentials: a kubeconfig (--context) or a service account"
                ) from None
        api_client = client.ApiClient()
    return Cluster(client.CoreV1Api(api_client), client.CustomObjectsApi(api_client), namespace)


# -- changes -----------------------------------------------------------------------------------


def scale_patch(rayservice: dict[str, Any], group: str, minimum: int, maximum: int) -> list[Any]:
    """The JSON patch that sets worker group ``group``'s replica bounds."""
    if not 0 <= minimum <= maximum:
        raise ConfigError(f"--min {minimum} / --max {maximum}: want 0 <= min <= max")
    groups = rayservice["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])
    names = [g.get("groupName") for g in groups]
    if group not in names:
        raise ConfigError(f"--group: no worker group {group!r} (groups: {', '.join(names)})")
    base = f"/spec/rayClusterConfig/workerGroupSpecs/{names.index(group)}"
    current = groups[names.index(group)]
    ops: list[dict[str, Any]] = [{"op": "test", "path": f"{base}/groupName", "value": group}]
    # replicas must stay within the new bounds, or the API server refuses the object.
    replicas = min(max(int(current.get("replicas", minimum)), minimum), maximum)
    ops += [
        {"op": "add", "path": f"{base}/minReplicas", "value": minimum},
        {"op": "add", "path": f"{base}/maxReplicas", "value": maximum},
        {"op": "add", "path": f"{base}/replicas", "value": replicas},
    ]
    return ops


@dataclass(frozen=True)
class Roll:
    patch: dict[str, Any]  # the merge patch to send
    diff: str  # unified diff of spec.serveConfigV2
    before: dict[str, Any]  # the model's pin before ({} = the newest installed version)
    after: dict[str, Any]


def roll_model(
    rayservice: dict[str, Any], model: str, version: str, old: Literal["shadow", "drop"]
) -> Roll:
    """Pin ``model`` to ``version`` in the Api's user_config; the previous pin shadows it
    (``old="shadow"``: its outputs are recorded beside the new version's) or goes."""
    text = rayservice["spec"].get("serveConfigV2")
    if not isinstance(text, str):
        raise ConfigError("the RayService has no spec.serveConfigV2")
    config = yaml.safe_load(text)
    api = _api_deployment(config)
    models: dict[str, Any] = dict((api.get("user_config") or {}).get("models") or {})
    before = dict(models.get(model) or {})
    previous = before.get("version")
    if previous == version:
        raise ConfigError(f"{model} is already pinned to version {version}")
    after: dict[str, Any] = {"version": version}
    if old == "shadow":
        if previous is None:
            raise ConfigError(
                f"{model} has no pinned version to shadow with (it serves the newest "
                "installed): roll with --old drop, or pin the current version first"
            )
        after["shadow"] = previous
    models[model] = after
    new_text = _replace_models_line(text, models)
    ServeConfig(yaml.safe_load(new_text), "serveConfigV2")  # ConfigError naming the field
    diff = "".join(
        difflib.unified_diff(
            text.splitlines(keepends=True),
            new_text.splitlines(keepends=True),
            "serveConfigV2 (running)",
            "serveConfigV2 (after)",
        )
    )
    return Roll({"spec": {"serveConfigV2": new_text}}, diff, before, after)


def _api_deployment(config: dict[str, Any]) -> dict[str, Any]:
    for app in config.get("applications") or []:
        if app.get("name") == CENTER_APP:
            for dep in app.get("deployments") or []:
                if dep.get("name") == "Api":
                    return dict(dep)
    raise ConfigError(f"serveConfigV2 has no application {CENTER_APP} with an Api deployment")


_MODELS = re.compile(r"^(?P<indent>\s+)models:\s*(?P<value>\{.*?\}|\S.*?)?(?P<comment>\s+#.*)?$")


def _replace_models_line(text: str, models: dict[str, Any]) -> str:
    """``text`` with the Api's ``models:`` line (a flow mapping) holding ``models``."""
    lines = text.splitlines(keepends=True)
    in_api = False
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("- name:"):
            in_api = stripped == "- name: Api"
            continue
        match = _MODELS.match(line.rstrip("\n"))
        if in_api and match:
            value = yaml.safe_dump(models, default_flow_style=True, width=10_000).strip()
            comment = match.group("comment") or ""
            lines[i] = f"{match.group('indent')}models: {value}{comment}\n"
            return "".join(lines)
    raise ConfigError(
        "the Api's user_config has no one-line 'models:' mapping to change; set it by hand"
    )


# -- status ------------------------------------------------------------------------------------


@dataclass
class WorkerGroup:
    name: str
    minimum: int
    maximum: int
    desired: int
    running: int
    gpus_per_pod: int


@dataclass
class GpuNode:
    name: str
    gpus: int
    requested: int  # by running pods scheduled on it


@dataclass
class EdgeState:
    pod: str
    phase: str
    ready: bool
    outbox: dict[str, float] = field(default_factory=dict)  # state -> studies
    pending_purges: float | None = None
    error: str | None = None


@dataclass
class Status:
    rayservice: str
    service_status: str
    applications: dict[str, str]  # app -> status
    groups: list[WorkerGroup]
    gpu_nodes: list[GpuNode]
    edges: list[EdgeState]


def status(cluster: Cluster, name: str) -> Status:
    rs = cluster.custom.get_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, name
    )
    st = rs.get("status") or {}
    active = st.get("activeServiceStatus") or {}
    apps = {
        app: str((info or {}).get("status", "?"))
        for app, info in (active.get("applicationStatuses") or {}).items()
    }
    cluster_name = active.get("rayClusterName")
    pods = (
        cluster.core.list_namespaced_pod(
            cluster.namespace, label_selector=f"ray.io/cluster={cluster_name}"
        ).items
        if cluster_name
        else []
    )
    groups = []
    for spec in rs["spec"]["rayClusterConfig"].get("workerGroupSpecs", []):
        group = spec.get("groupName", "?")
        running = sum(
            1
            for p in pods
            if (p.metadata.labels or {}).get("ray.io/group") == group
            and p.status.phase == "Running"
        )
        gpus = _gpus(spec["template"]["spec"].get("containers", []))
        groups.append(
            WorkerGroup(
                group,
                int(spec.get("minReplicas", 0)),
                int(spec.get("maxReplicas", 0)),
                int(spec.get("replicas", 0)),
                running,
                gpus,
            )
        )
    nodes = cluster.core.list_node().items
    all_pods = cluster.core.list_pod_for_all_namespaces(field_selector="status.phase=Running").items
    gpu_nodes = []
    for node in nodes:
        capacity = int((node.status.allocatable or {}).get(GPU, "0") or 0)
        if capacity <= 0:
            continue
        requested = sum(_gpus_of_pod(p) for p in all_pods if p.spec.node_name == node.metadata.name)
        gpu_nodes.append(GpuNode(node.metadata.name, capacity, requested))
    edges = [_edge(cluster, p) for p in cluster.core.list_namespaced_pod(
        cluster.namespace, label_selector=EDGE_SELECTOR
    ).items]  # fmt: skip
    service = str(st.get("serviceStatus") or _condition(st) or "unknown")
    return Status(name, service, apps, groups, gpu_nodes, edges)


def _condition(st: dict[str, Any]) -> str | None:
    ready = [c for c in st.get("conditions") or [] if c.get("type") == "Ready"]
    return f"Ready={ready[0].get('status')}" if ready else None


def _gpus(containers: list[dict[str, Any]]) -> int:
    total = 0
    for c in containers:
        limits = ((c.get("resources") or {}).get("limits")) or {}
        total += int(limits.get(GPU, 0) or 0)
    return total


def _gpus_of_pod(pod: Any) -> int:
    total = 0
    for c in pod.spec.containers or []:
        limits = (c.resources.limits if c.resources else None) or {}
        total += int(limits.get(GPU, 0) or 0)
    return total


def _edge(cluster: Cluster, pod: Any) -> EdgeState:
    ready = any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))
    state = EdgeState(pod.metadata.name, str(pod.status.phase), ready)
    if pod.status.phase != "Running":
        return state
    try:
        text = cluster.core.connect_get_namespaced_pod_proxy_with_path(
            f"{pod.metadata.name}:{EDGE_METRICS_PORT}", cluster.namespace, "metrics"
        )
    except Exception as exc:  # an edge whose /metrics cannot be read is shown, not fatal
        state.error = f"metrics unreadable: {type(exc).__name__}"
        return state
    for line in str(text).splitlines():
        m = re.match(r'^radbridge_edge_outbox_studies\{state="([a-z_-]+)"\}\s+(\S+)$', line)
        if m:
            state.outbox[m.group(1)] = float(m.group(2))
    return state

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

:func:`drain_patch` / :func:`undrain_patch` and :func:`wait_drained` take one edge pod out of
the PACS-facing Service before maintenance, wait for its outbox to empty, and put it back; the
design is in :func:`drain_patch`'s docstring.
"""

from __future__ import annotations

import difflib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
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
    "Outbox",
    "Status",
    "WorkerGroup",
    "connect",
    "drain_patch",
    "patch_pod",
    "read_edge",
    "read_outbox",
    "roll_model",
    "scale_patch",
    "status",
    "undrain_patch",
    "wait_drained",
]

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
CENTER_APP = "radbridge-center"
EDGE_LABELS = {"app.kubernetes.io/name": "radbridge", "app.kubernetes.io/component": "edge"}
EDGE_SELECTOR = ",".join(f"{k}={v}" for k, v in EDGE_LABELS.items())
EDGE_SERVICE = "radbridge-edge"  # the PACS-facing Service (k8s/base/edge.yaml)
INTAKE_LABEL = "radbridge.io/intake"  # in that Service's selector, not in the Deployment's
INTAKE_OPEN, INTAKE_DRAINING = "open", "draining"
DRAINING_SINCE = "radbridge.io/draining-since"  # annotation: when drain-edge took it out
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


# -- draining an edge ---------------------------------------------------------------------------


def _pointer(key: str) -> str:
    """``key`` as one JSON-pointer segment (RFC 6901: ``~`` -> ``~0``, ``/`` -> ``~1``)."""
    return key.replace("~", "~0").replace("/", "~1")


def _edge_pod(pod: dict[str, Any]) -> tuple[str, dict[str, str], dict[str, str]]:
    meta = pod.get("metadata") or {}
    name, labels = str(meta.get("name")), dict(meta.get("labels") or {})
    if any(labels.get(k) != v for k, v in EDGE_LABELS.items()):
        raise ConfigError(f"pod {name} is not an edge gateway (labels: {EDGE_SELECTOR} wanted)")
    return name, labels, dict(meta.get("annotations") or {})


def drain_patch(pod: dict[str, Any], service_selector: dict[str, str], now: datetime) -> list[Any]:
    """The JSON patch that takes edge ``pod`` out of the PACS-facing Service; ``[]`` when it
    is out already (a second ``drain-edge`` only waits again).

    Why a label the Service selects on, and only the Service: in k8s/base/edge.yaml the edge is
    a one-replica Deployment (``strategy: Recreate``) on a ReadWriteOnce volume holding the only
    copy of what the PACS was acknowledged, and its Service ``radbridge-edge`` once selected on
    exactly the Deployment's selector labels. Changing one of those on the pod would take it
    out of the Service, but also out of its ReplicaSet, which would start a replacement pod at
    once: on the same node a ReadWriteOnce volume mounts twice, and two gateways would write one
    store (and the replacement would be in the Service, taking associations again). So the pod
    template carries ``radbridge.io/intake: open``, the PACS-facing Service selects on it too,
    the Deployment's selector (immutable) does not, and neither does ``radbridge-edge-metrics``.
    Draining replaces it with ``draining``: the endpoints controller removes the pod from the
    Service (new associations and STOW-RS requests no longer reach it; open associations run
    to their end), the ReplicaSet keeps owning it (no second pod), Prometheus keeps scraping
    it. Nothing is deleted: the gateway keeps forwarding and delivering from its volume.

    A ``test`` op pins the label's current value, so a pod drained or restored meanwhile makes
    the API server refuse the patch instead of applying it twice; the annotation
    ``radbridge.io/draining-since`` records when. A pod recreated by its Deployment starts with
    the template's ``open``: a drain lasts as long as the pod.
    """
    name, labels, annotations = _edge_pod(pod)
    if service_selector.get(INTAKE_LABEL) != INTAKE_OPEN:
        raise ConfigError(
            f"the edge Service does not select on {INTAKE_LABEL}={INTAKE_OPEN} (selector: "
            f"{service_selector}): relabelling the pod would not take it out, or would take it "
            "away from its Deployment; apply the current k8s/ manifests first"
        )
    intake = labels.get(INTAKE_LABEL)
    if intake == INTAKE_DRAINING:
        return []
    if any(labels.get(k) != v for k, v in service_selector.items()):
        raise ConfigError(
            f"pod {name} is not behind the edge Service (its {INTAKE_LABEL} is {intake!r}, "
            f"the Service selects {service_selector})"
        )
    label = f"/metadata/labels/{_pointer(INTAKE_LABEL)}"
    since = now.isoformat(timespec="seconds")
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": label, "value": INTAKE_OPEN},
        {"op": "replace", "path": label, "value": INTAKE_DRAINING},
    ]
    if annotations:
        path = f"/metadata/annotations/{_pointer(DRAINING_SINCE)}"
        ops.append({"op": "add", "path": path, "value": since})
    else:  # "add" below a missing object fails: add the object
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {DRAINING_SINCE: since}})
    return ops


def undrain_patch(pod: dict[str, Any]) -> list[Any]:
    """The JSON patch that puts a drained edge pod back into its Service (label back to
    ``open``, the ``draining-since`` annotation removed)."""
    name, labels, annotations = _edge_pod(pod)
    if labels.get(INTAKE_LABEL) != INTAKE_DRAINING:
        raise ConfigError(
            f"pod {name} is not draining ({INTAKE_LABEL}: {labels.get(INTAKE_LABEL)!r})"
        )
    label = f"/metadata/labels/{_pointer(INTAKE_LABEL)}"
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": label, "value": INTAKE_DRAINING},
        {"op": "replace", "path": label, "value": INTAKE_OPEN},
    ]
    if DRAINING_SINCE in annotations:
        ops.append({"op": "remove", "path": f"/metadata/annotations/{_pointer(DRAINING_SINCE)}"})
    return ops


def read_edge(
    cluster: Cluster, pod: str, service: str = EDGE_SERVICE
) -> tuple[dict[str, Any], dict[str, str]]:
    """Edge ``pod`` (as the API's JSON) and the selector of its PACS-facing ``service``."""
    from kubernetes.client.exceptions import ApiException

    try:
        obj = cluster.core.read_namespaced_pod(pod, cluster.namespace)
        svc = cluster.core.read_namespaced_service(service, cluster.namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise ConfigError(
                f"pod {pod} or Service {service} not found in namespace {cluster.namespace}"
            ) from None
        raise
    pod_json: dict[str, Any] = cluster.core.api_client.sanitize_for_serialization(obj)
    return pod_json, dict(svc.spec.selector or {})


def patch_pod(cluster: Cluster, pod: str, patch: list[Any]) -> None:
    """Send a JSON patch of ``pod`` (said so explicitly: the client would otherwise pick the
    content type itself); a failed ``test`` op becomes a ConfigError saying why."""
    from kubernetes.client.exceptions import ApiException

    try:
        cluster.core.patch_namespaced_pod(
            pod, cluster.namespace, patch, _content_type="application/json-patch+json"
        )
    except ApiException as exc:
        if exc.status in (409, 422):
            raise ConfigError(
                f"pod {pod} changed meanwhile (the patch's test failed, HTTP {exc.status}); "
                "run the command again"
            ) from None
        raise


@dataclass(frozen=True)
class Outbox:
    """What an edge still has to do, from its ``/metrics`` (``None``: not published yet)."""

    associations: float | None  # DICOM associations open
    receiving: float | None  # studies to forward (in their quiet period, or retrying)
    blocked: float | None  # studies held: no legal basis, de-identification refused
    oldest_s: float | None  # the oldest study waiting to leave (receiving or blocked)
    deliveries_pending: float | None  # results to store at the PACS
    deliveries_dead: float | None  # results given up on: `radbridge gateway resend`
    error: str | None = None  # the metrics could not be read

    def pending(self) -> list[str]:
        """What keeps the edge from being drained; ``[]`` when drained.

        Blocked studies and dead deliveries are not waited for: they move only when a person
        acts, and they stay on the edge's volume through the maintenance. The oldest age counts
        blocked studies too, so it must be 0 only when none is blocked.
        """
        if self.error:
            return [self.error]
        out = []
        if self.associations is None:
            out.append("no association count in /metrics yet")
        elif self.associations > 0:
            out.append(f"{self.associations:g} DICOM association(s) open")
        if self.receiving is None:
            out.append("no outbox count in /metrics yet")
        elif self.receiving > 0:
            oldest = f" (oldest {self.oldest_s:.0f} s)" if self.oldest_s else ""
            out.append(f"{self.receiving:g} studies to forward{oldest}")
        elif not self.blocked and self.oldest_s:  # the gauges are between two updates
            out.append(f"a study waiting {self.oldest_s:.0f} s")
        if self.deliveries_pending is None:
            out.append("no delivery count in /metrics yet")
        elif self.deliveries_pending > 0:
            out.append(f"{self.deliveries_pending:g} results to deliver to the PACS")
        return out

    def held(self) -> list[str]:
        """What stays at the edge until a person acts (not waited for)."""
        out = []
        if self.blocked:
            out.append(f"{self.blocked:g} blocked studies")
        if self.deliveries_dead:
            out.append(f"{self.deliveries_dead:g} dead deliveries")
        return out


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)")


def _samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of a Prometheus text exposition (comments skipped)."""
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _metrics_text(cluster: Cluster, pod: str) -> str:
    return str(
        cluster.core.connect_get_namespaced_pod_proxy_with_path(
            f"{pod}:{EDGE_METRICS_PORT}", cluster.namespace, "metrics"
        )
    )


def read_outbox(cluster: Cluster, pod: str) -> Outbox:
    """Edge ``pod``'s outbox and deliveries, read as :func:`status` reads them."""
    try:
        s = _samples(_metrics_text(cluster, pod))
    except Exception as exc:  # reported as what is pending: the pod may be restarting
        return Outbox(None, None, None, None, None, None, f"metrics unreadable: {exc!s:.200}")
    return Outbox(
        s.get("radbridge_edge_active_associations"),
        s.get('radbridge_edge_outbox_studies{state="receiving"}'),
        s.get('radbridge_edge_outbox_studies{state="blocked"}'),
        s.get("radbridge_edge_outbox_oldest_seconds"),
        s.get('radbridge_edge_deliveries{state="pending"}'),
        s.get('radbridge_edge_deliveries{state="dead"}'),
    )


def wait_drained(
    cluster: Cluster,
    pod: str,
    timeout_s: float,
    interval_s: float = 5.0,
    progress: Callable[[Outbox], None] | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bool, Outbox]:
    """Poll ``pod``'s outbox every ``interval_s`` until it is drained (``Outbox.pending()``
    empty on two reads in a row: the gauges are refreshed by the gateway's loops, so one
    reading of zeros right after an association closed may predate its study), or until
    ``timeout_s`` has passed. Returns (drained, the last reading); ``progress`` sees each."""
    deadline = clock() + timeout_s
    clean = 0
    while True:
        outbox = read_outbox(cluster, pod)
        if progress:
            progress(outbox)
        clean = clean + 1 if not outbox.pending() else 0
        if clean >= 2:
            return True, outbox
        if clock() + interval_s > deadline:
            return False, outbox
        sleep(interval_s)


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
    draining: bool = False  # out of the PACS-facing Service (`radbridge ops drain-edge`)


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
    state.draining = (pod.metadata.labels or {}).get(INTAKE_LABEL) == INTAKE_DRAINING
    if pod.status.phase != "Running":
        return state
    try:
        text = _metrics_text(cluster, pod.metadata.name)
    except Exception as exc:  # an edge whose /metrics cannot be read is shown, not fatal
        state.error = f"metrics unreadable: {type(exc).__name__}"
        return state
    for line in text.splitlines():
        m = re.match(r'^radbridge_edge_outbox_studies\{state="([a-z_-]+)"\}\s+(\S+)$', line)
        if m:
            state.outbox[m.group(1)] = float(m.group(2))
    return state

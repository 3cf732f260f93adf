"""k8s/: every kustomize build, validated offline, and what its parts must agree on.

Each overlay is built with the real kustomize (``kustomize build`` or ``kubectl kustomize``;
``./run test`` installs one, ``RADBRIDGE_TEST_KUSTOMIZE`` names another binary). Core kinds are
validated with kubernetes-validate (strict: unknown fields fail), custom resources with
jsonschema against the vendored CRD schemas in k8s/schemas (strict too). Then the cross-checks
no schema can make: the embedded Serve config, ports, env names against ``Settings``, alert
expressions against the metrics catalog, GPU arithmetic, nothing bound unsafely.
No API server is involved: admission, the operators and scheduling are not exercised here.
"""

from __future__ import annotations

import copy
import importlib.resources
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic import BaseModel
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from radbridge.agreements import Priority, load_agreements
from radbridge.db import Database
from radbridge.lifecycle import DeliveryState, EdgeStudyState
from radbridge.metrics import CenterMetrics, EdgeMetrics
from radbridge.settings import DEV_SECRET, Settings, load_settings
from review.metrics import ReviewMetrics
from serving.center import SERVE_ENV_DEFAULTS
from serving.config import load_serve_config

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
BUILDS = {
    "base": K8S / "base",
    "monitoring": K8S / "monitoring",
    "dev": K8S / "overlays/dev",
    "production": K8S / "overlays/production",
}
DEPLOYABLE = ("dev", "production")
WITH_APPS = ("base", "dev", "production")
GPU_BUILDS = ("base", "production")
# The oldest Kubernetes minor the manifests target, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.major_minor(kubernetes_validate.latest_version()))
CORE_KINDS = {
    "Namespace",
    "ConfigMap",
    "Secret",
    "Service",
    "PersistentVolumeClaim",
    "Deployment",
    "Job",
    "NetworkPolicy",
}
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): "rayservice.ray.io_v1.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com_v1.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.monitoring.coreos.com_v1.yaml",
}
SERVE_CONFIGS = {
    "base": K8S / "base/serve-config.yaml",
    "production": K8S / "base/serve-config.yaml",
    "dev": K8S / "overlays/dev/serve-config.yaml",
}
Obj = dict[str, Any]


# -- building ---------------------------------------------------------------------------------


def _kustomize() -> list[str]:
    exe = os.environ.get("RADBRIDGE_TEST_KUSTOMIZE")
    if exe:
        return [exe, "kustomize"] if "kubectl" in Path(exe).name else [exe, "build"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail(
        "neither kustomize nor kubectl on PATH: `./run test` installs one (ensure_kustomize)"
    )


@cache
def _build_text(name: str) -> str:
    proc = subprocess.run(
        [*_kustomize(), str(BUILDS[name])], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kustomize build {name} failed:\n{proc.stderr}"
    return proc.stdout


def build(name: str) -> list[Obj]:
    """The objects of one build (a fresh copy each call)."""
    return [d for d in yaml.safe_load_all(_build_text(name)) if d]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(objs: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(where, pod spec) of every workload, the RayService's head and worker groups included."""
    for o in objs:
        where = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield where, o["spec"]["template"]["spec"]
        elif o["kind"] == "RayService":
            rc = o["spec"]["rayClusterConfig"]
            yield f"{where}/head", rc["headGroupSpec"]["template"]["spec"]
            for g in rc.get("workerGroupSpecs", []):
                yield f"{where}/{g['groupName']}", g["template"]["spec"]


def containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def ray_groups(rayservice: Obj) -> dict[str, Obj]:
    rc = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": rc["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in rc["workerGroupSpecs"]})
    return groups


def autoscaling(deployment: Any) -> dict[str, Any]:
    a = deployment.autoscaling_config
    assert a is not None, f"{deployment.name}: no autoscaling_config"
    return dict(a) if isinstance(a, dict) else dict(a.model_dump())


def deployment_options(serve_config: Path, name: str) -> Any:
    cfg = load_serve_config(serve_config)
    return next(d for d in cfg.app.deployments if d.name == name)


@pytest.mark.parametrize("name", list(BUILDS))
def test_build_renders_distinct_named_objects(name: str) -> None:
    objs = build(name)
    assert objs
    keys = [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys)), f"duplicate objects in {name}"
    kinds = {o["kind"] for o in objs}
    assert kinds <= CORE_KINDS | {k for _, k in CRD_SCHEMAS}, f"unvalidated kinds {kinds}"


# -- schemas ----------------------------------------------------------------------------------


def _k8s_schema_dir(version: str) -> Any:
    exact = [v for v in kubernetes_validate.utils.all_versions() if v.startswith(version + ".")]
    assert exact, f"kubernetes-validate has no schemas for {version}"
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    return root / f"v{exact[-1]}-local-strict"


def _k8s_schema(version: str, file: str) -> Any:
    return json.loads((_k8s_schema_dir(version) / file).read_text())


@cache
def _k8s_registry(version: str) -> Registry:
    resources = []
    for file in ("_definitions.json", "podtemplatespec-v1.json"):
        contents = _k8s_schema(version, file)
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources).crawl()


@cache
def _core_validator(api_version: str, kind: str, version: str) -> jsonschema.Draft202012Validator:
    """kubernetes-validate's strict schema of a kind, compiled once (its ``validate()`` reloads
    the 1.3 MB definitions on every call); test_validators_reject... checks they agree."""
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = _k8s_schema(version, f"{kind.lower()}-{group}.json")
    return jsonschema.Draft202012Validator(schema, registry=_k8s_registry(version))


def core_errors(o: Obj, version: str = K8S_VERSIONS[-1]) -> list[str]:
    validator = _core_validator(o["apiVersion"], o["kind"], version)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(o)]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(BUILDS))
def test_core_objects_validate_strictly(name: str, version: str) -> None:
    checked = 0
    for o in build(name):
        if o["kind"] in CORE_KINDS:
            assert core_errors(o, version) == [], f"{o['kind']}/{o['metadata']['name']}"
            checked += 1
    assert checked or name == "monitoring"


def _strict(schema: Any) -> Any:
    """Unknown fields fail wherever the schema lists properties (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def _crd_validator(api_version: str, kind: str, version: str) -> jsonschema.Draft202012Validator:
    schema = yaml.safe_load((K8S / "schemas" / CRD_SCHEMAS[(api_version, kind)]).read_text())
    schema = _strict(schema)
    schema["properties"]["metadata"] = {
        "$ref": "https://kubernetes.io/api/_definitions.json"
        "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
    }
    registry = _k8s_registry(version).with_resource(
        "urn:radbridge:crd", DRAFT202012.create_resource(schema)
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def crd_errors(o: Obj, version: str = K8S_VERSIONS[-1]) -> list[str]:
    validator = _crd_validator(o["apiVersion"], o["kind"], version)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(o)]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(BUILDS))
def test_custom_resources_validate_against_vendored_crds(name: str, version: str) -> None:
    customs = [o for o in build(name) if o["kind"] not in CORE_KINDS]
    for o in customs:
        assert (o["apiVersion"], o["kind"]) in CRD_SCHEMAS, f"no schema for {o['kind']}"
        assert crd_errors(o, version) == [], f"{o['kind']}/{o['metadata']['name']}"
    assert customs


def test_validators_reject_what_the_api_server_would() -> None:
    """Negative controls: the checks above are not vacuous."""
    rs = one(build("base"), "RayService")
    typo = copy.deepcopy(rs)
    typo["spec"]["rayClusterConfig"]["workerGroupSpec"] = typo["spec"]["rayClusterConfig"].pop(
        "workerGroupSpecs"
    )
    assert any("workerGroupSpec" in e for e in crd_errors(typo))
    bad_pod = copy.deepcopy(rs)  # through the $ref into the core PodTemplateSpec
    bad_pod["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resource"
    ] = {}
    assert crd_errors(bad_pod)
    no_replicas = copy.deepcopy(rs)
    del no_replicas["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["maxReplicas"]
    assert any("maxReplicas" in e for e in crd_errors(no_replicas))
    numeric = copy.deepcopy(rs)
    numeric["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0
    assert crd_errors(numeric)  # rayStartParams values are strings
    mon = build("monitoring")
    rule = one(mon, "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    assert crd_errors(rule)
    sm = one(mon, "ServiceMonitor", "radbridge-edge")
    del sm["spec"]["selector"]
    assert crd_errors(sm)
    # The compiled core validator agrees with kubernetes-validate's own validate().
    good = one(build("base"), "Deployment")
    kubernetes_validate.validate(good, K8S_VERSIONS[0], strict=True)
    assert core_errors(good, K8S_VERSIONS[0]) == []
    dep = copy.deepcopy(good)
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["tcpSocket"] = {"prot": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)
    assert core_errors(dep, K8S_VERSIONS[0])
    svc = one(build("base"), "Service", "radbridge-edge")
    svc["spec"]["ports"][0]["port"] = "11112"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, K8S_VERSIONS[-1], strict=True)
    assert core_errors(svc)


# -- the Serve config embedded in the RayService ----------------------------------------------


def _load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["k8s_render"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", WITH_APPS)
def test_serve_config_v2_is_the_file_byte_for_byte(name: str) -> None:
    rs = one(build(name), "RayService")
    assert rs["spec"]["serveConfigV2"] == SERVE_CONFIGS[name].read_text(encoding="utf-8")


def test_render_reports_and_repairs_drift(tmp_path: Path) -> None:
    render = _load_render()
    assert render.check() == []
    for t in render.TARGETS:
        assert t.source.exists() and t.target.exists()
    source, target = tmp_path / "serve-config.yaml", tmp_path / "rayservice.yaml"
    base = render.TARGETS[0]
    source.write_text(base.source.read_text().replace("max_replicas: 8 ", "max_replicas: 6 "))
    target.write_text(base.target.read_text())
    t = render.Target(source, target, base.key, base.value)
    assert render.check((t,)) != []
    assert render.render((t,)) == [target]
    assert render.check((t,)) == []
    assert render.render((t,)) == []  # idempotent
    before, after = base.target.read_text().splitlines(), target.read_text().splitlines()
    changed = [b for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 1 and "max_replicas: 6" in changed[0]  # nothing else touched
    source.write_text(source.read_text() + "\n")  # would be lost by clip chomping
    with pytest.raises(render.RenderError):
        render.render((t,))


def _serve_config_files() -> list[Path]:
    found = []
    for path in K8S.rglob("*.yaml"):
        docs = list(yaml.safe_load_all(path.read_text()))
        if len(docs) == 1 and isinstance(docs[0], dict) and "applications" in docs[0]:
            found.append(path)
    return sorted(found)


def test_every_serve_config_under_k8s_loads() -> None:
    files = _serve_config_files()
    assert {K8S / "base/serve-config.yaml", K8S / "overlays/dev/serve-config.yaml"} <= set(files)
    for path in files:
        cfg = load_serve_config(path)
        assert cfg.schema.http_options.host == "0.0.0.0", path  # inside a pod, behind a Service
        runner = cfg.runner
        if runner.require_provider:
            # serving/runner.py accepts the required provider or one listed before it; the CPU
            # must come after it, or a CPU fallback would pass as healthy.
            need = runner.providers.index(runner.require_provider)
            assert "cpu" not in runner.providers[: need + 1], path


# -- GPU and capacity arithmetic --------------------------------------------------------------


def _quantity(value: Any) -> float:
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


@pytest.mark.parametrize("name", WITH_APPS)
def test_ray_start_params_match_container_resources(name: str) -> None:
    rs = one(build(name), "RayService")
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    for group, g in ray_groups(rs).items():
        params = g["rayStartParams"]
        ray = g["template"]["spec"]["containers"][0]
        limits = ray["resources"]["limits"]
        if group != "head":
            assert params["num-cpus"] == str(int(_quantity(limits["cpu"]))), group
            assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], group
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert int(params.get("num-gpus", gpus)) == gpus, group
    head = ray_groups(rs)["head"]["rayStartParams"]
    assert head["num-gpus"] == "0" and head["num-cpus"] == "0"


@pytest.mark.parametrize("name", GPU_BUILDS)
def test_gpu_worker_group_fits_the_model_runners(name: str) -> None:
    rs = one(build(name), "RayService")
    gpu = ray_groups(rs)["gpu"]
    spec = gpu["template"]["spec"]
    limits = spec["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    runner = deployment_options(SERVE_CONFIGS[name], "ModelRunner")
    opts = runner.ray_actor_options
    assert 0 < opts.num_gpus < 1  # fractional: several runners share a GPU
    per_pod = math.floor(int(gpu["rayStartParams"]["num-gpus"]) / opts.num_gpus)
    assert per_pod * opts.num_cpus <= int(gpu["rayStartParams"]["num-cpus"])
    max_runners = autoscaling(runner)["max_replicas"]
    assert max_runners * opts.num_gpus <= gpu["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert autoscaling(runner)["min_replicas"] >= 1
    cfg = load_serve_config(SERVE_CONFIGS[name])
    assert cfg.runner.require_provider in ("cuda", "tensorrt")
    assert cfg.runner.trt_engine_cache_dir
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert cfg.runner.trt_engine_cache_dir in mounts  # on a volume, writable
    assert not mounts[cfg.runner.trt_engine_cache_dir].get("readOnly")
    for d in cfg.app.deployments:
        assert autoscaling(d)["max_replicas"] > 1, d.name


def test_dev_overlay_runs_without_any_gpu() -> None:
    objs = build("dev")
    assert "nvidia.com/gpu" not in json.dumps(objs)
    rs = one(objs, "RayService")
    cfg = load_serve_config(SERVE_CONFIGS["dev"])
    assert cfg.runner.require_provider is None and cfg.runner.providers == ["cpu"]
    cpus = [int(g["rayStartParams"]["num-cpus"]) for n, g in ray_groups(rs).items() if n != "head"]
    need = 0.0
    for d in cfg.app.deployments:
        opts = d.ray_actor_options
        assert not opts.num_gpus, d.name
        assert opts.num_cpus is not None and opts.num_cpus <= max(cpus), d.name
        need += opts.num_cpus * autoscaling(d)["min_replicas"]
    assert need <= sum(cpus)


# -- nothing bound or privileged unsafely -----------------------------------------------------


@pytest.mark.parametrize("name", WITH_APPS)
def test_pods_are_unprivileged_and_off_the_host(name: str) -> None:
    seen = 0
    for where, spec in pod_specs(build(name)):
        seen += 1
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), f"{where}: {flag}"
        assert spec.get("automountServiceAccountToken") is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert not any("hostPath" in v for v in spec.get("volumes", [])), where
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"
            assert not sc.get("privileged"), f"{where}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{where}/{c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, f"{where}/{c['name']}"
            assert not any("hostPort" in p for p in c.get("ports", [])), f"{where}/{c['name']}"
            assert c["resources"]["limits"]["memory"], f"{where}/{c['name']}"
    assert seen >= 4


@pytest.mark.parametrize("name", WITH_APPS)
def test_services_expose_only_what_they_must(name: str) -> None:
    objs = build(name)
    for svc in (o for o in objs if o["kind"] == "Service"):
        spec, svc_name = svc["spec"], svc["metadata"]["name"]
        ports = {p["name"] for p in spec["ports"]}
        exposed = spec.get("type", "ClusterIP") in ("LoadBalancer", "NodePort")
        if exposed:
            # allowed_source_ips is checked against the client address: it must survive.
            assert spec["externalTrafficPolicy"] == "Local", svc_name
            # Outside the cluster: TLS only (DICOM TLS, STOW-RS over HTTPS).
            assert ports <= {"dicom-tls", "stow"}, svc_name
            if "stow" in ports:
                gw = one(objs, "Deployment", "radbridge-edge")["spec"]["template"]["spec"]
                env = {e["name"]: e.get("value") for e in gw["containers"][0]["env"]}
                assert env.get("RADBRIDGE_EDGE__STOW_TLS") == "true", svc_name
        if "metrics" in ports or svc_name.startswith("radbridge-center"):
            assert not exposed, svc_name
    rs = one(objs, "RayService")
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress")
    assert "serveService" not in rs["spec"]  # KubeRay's default: ClusterIP


@pytest.mark.parametrize("name", WITH_APPS)
def test_ray_dashboard_is_reachable_only_by_the_operator_and_ray_pods(name: str) -> None:
    objs = build(name)
    rs = one(objs, "RayService")
    head = ray_groups(rs)["head"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_labels = head["template"]["metadata"]["labels"]
    policies = [
        p
        for p in objs
        if p["kind"] == "NetworkPolicy" and _selects(p["spec"]["podSelector"], head_labels)
    ]
    assert policies, "no NetworkPolicy selects the Ray head"
    for p in policies:
        assert "Ingress" in p["spec"]["policyTypes"]
        for rule in p["spec"]["ingress"]:
            assert rule.get("from"), "an ingress rule open to every source"
            ports = {port["port"] for port in rule.get("ports", [])}
            peers = json.dumps(rule["from"])
            if not ports or 8265 in ports:
                # the operator, or pods of this namespace picked by a non-empty selector
                assert "kuberay-operator" in peers or all(
                    peer.get("podSelector") and "namespaceSelector" not in peer
                    for peer in rule["from"]
                ), rule
    workers = [g["template"]["metadata"]["labels"] for n, g in ray_groups(rs).items()]
    for labels in workers:
        assert any(_selects(p["spec"]["podSelector"], labels) for p in policies)


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        has, value = e["key"] in labels, labels.get(e["key"])
        ok = {
            "In": has and value in e.get("values", []),
            "NotIn": not has or value not in e.get("values", []),
            "Exists": has,
            "DoesNotExist": not has,
        }[e["operator"]]
        if not ok:
            return False
    return True


# -- environment, ports and volumes against Settings ------------------------------------------


def _field_path_exists(env_name: str) -> bool:
    model: type[BaseModel] = Settings
    parts = env_name.removeprefix("RADBRIDGE_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i == len(parts) - 1:
            return True
        nested = [
            a
            for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not nested:
            return False
        model = nested[0]
    return True


def _env(container: Obj, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The container's RADBRIDGE_* environment, secrets as placeholders, set for Settings."""
    for name in [n for n in os.environ if n.startswith("RADBRIDGE_")]:
        monkeypatch.delenv(name)
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if not e["name"].startswith("RADBRIDGE_"):
            continue
        assert e["name"] not in env, f"{e['name']} set twice"
        assert _field_path_exists(e["name"]), f"{e['name']} names no Settings field"
        if "valueFrom" in e:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = f"placeholder-from-secret-{ref['name']}-{ref['key']}"
        else:
            env[e["name"]] = e["value"]
        monkeypatch.setenv(e["name"], env[e["name"]])
    return env


@pytest.mark.parametrize("name", WITH_APPS)
def test_every_radbridge_variable_names_a_settings_field(name: str) -> None:
    names = {
        e["name"]
        for _, spec in pod_specs(build(name))
        for c in containers(spec)
        for e in c.get("env", [])
        if e["name"].startswith("RADBRIDGE_")
    }
    assert names and [n for n in sorted(names) if not _field_path_exists(n)] == []


def test_env_name_check_is_not_vacuous() -> None:
    assert _field_path_exists("RADBRIDGE_EDGE__TLS__CA_FILE")
    assert _field_path_exists("RADBRIDGE_CENTER__DATABASE_URL")
    assert not _field_path_exists("RADBRIDGE_EDGE__METRIC_PORT")
    assert not _field_path_exists("RADBRIDGE_EDGE__PORT__X")
    assert not _field_path_exists("RADBRIDGE_CENTRE__STORE_DIR")


def _mounts(container: Obj, spec: Obj) -> dict[str, tuple[Obj, Obj]]:
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container["volumeMounts"]}


def _under(path: Path, mounts: dict[str, tuple[Obj, Obj]], *, writable: bool) -> Obj:
    hits = [(p, mv) for p, mv in mounts.items() if path == Path(p) or Path(p) in path.parents]
    assert hits, f"{path} is on no volume"
    mount, volume = max(hits, key=lambda h: len(h[0]))[1]
    if writable:
        assert not mount.get("readOnly"), f"{path} is on a read-only mount"
    return volume


@pytest.mark.parametrize("name", WITH_APPS)
def test_edge_deployment_matches_its_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objs = build(name)
    dep = one(objs, "Deployment", "radbridge-edge")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    spec = dep["spec"]["template"]["spec"]
    (gw,) = spec["containers"]
    _env(gw, monkeypatch)
    assert "valueFrom" in next(e for e in gw["env"] if e["name"] == "RADBRIDGE_EDGE__MASTER_SECRET")
    s = load_settings()  # the production-mode secret check included
    assert s.mode == "production" and s.edge.master_secret.get_secret_value() != DEV_SECRET
    assert s.edge.host == "0.0.0.0" and s.edge.metrics_host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    wanted = {"dicom": s.edge.port, "stow": s.edge.stow_port, "metrics": s.edge.metrics_port}
    if s.edge.tls:
        wanted["dicom-tls"] = s.edge.tls.port
    assert ports == wanted
    assert gw["readinessProbe"]["tcpSocket"]["port"] in ("dicom", s.edge.port)
    assert gw["startupProbe"]["tcpSocket"]["port"] in ("dicom", s.edge.port)
    live = gw["livenessProbe"]["httpGet"]
    assert live["path"] == "/metrics" and live["port"] in ("metrics", s.edge.metrics_port)
    mounts = _mounts(gw, spec)
    data = _under(s.edge_store, mounts, writable=True)
    assert data["persistentVolumeClaim"]["claimName"] == "radbridge-edge-data"
    assert s.edge_db_url.startswith("sqlite:///")
    _under(Path(s.edge_db_url.removeprefix("sqlite:///")), mounts, writable=True)
    _under(s.agreements_file, mounts, writable=False)
    _under(Path("/tmp"), mounts, writable=True)
    pvc = one(objs, "PersistentVolumeClaim", "radbridge-edge-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    services = [
        o
        for o in objs
        if o["kind"] == "Service"
        and _selects(
            {"matchLabels": o["spec"]["selector"]}, dep["spec"]["template"]["metadata"]["labels"]
        )
    ]
    svc_ports = {p["name"]: p for svc in services for p in svc["spec"]["ports"]}
    assert set(svc_ports) <= set(wanted) and "stow" in svc_ports
    assert ("dicom-tls" in svc_ports) == bool(s.edge.tls)
    for port_name, port in svc_ports.items():
        assert port["targetPort"] in (port_name, wanted[port_name])
        assert port["port"] == wanted[port_name]
    center = urlparse(s.edge.center_url)
    if center.hostname and center.hostname.endswith("-serve-svc"):  # same cluster
        rs = one(objs, "RayService")
        assert center.hostname == f"{rs['metadata']['name']}-serve-svc"
        assert center.port == load_serve_config(SERVE_CONFIGS[name]).schema.http_options.port
    else:
        assert center.scheme == "https", "a center outside the cluster is reached over HTTPS"


# Read by every Ray process (not only Serve's controller on the head): a pod without them
# would export counters twice, or pass model inputs through the object store.
CLUSTER_RAY_SETTINGS = ("RAY_EXPORT_COUNTER_AS_GAUGE", "RAY_max_direct_call_object_size")


@pytest.mark.parametrize("name", WITH_APPS)
def test_ray_pods_share_one_valid_center_environment(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = build(name)
    rs = one(objs, "RayService")
    serve = load_serve_config(SERVE_CONFIGS[name]).schema.http_options
    envs = []
    for group, g in ray_groups(rs).items():
        spec = g["template"]["spec"]
        ray = spec["containers"][0]
        env = _env(ray, monkeypatch)
        envs.append(env)
        db = next(e for e in ray["env"] if e["name"] == "RADBRIDGE_CENTER__DATABASE_URL")
        assert db["valueFrom"]["secretKeyRef"]["name"] == "radbridge-center-db"
        s = load_settings()
        mounts = _mounts(ray, spec)
        _under(s.center_store, mounts, writable=True)
        models = _under(s.models_dir, mounts, writable=False)
        assert models["persistentVolumeClaim"]["claimName"] == "radbridge-models"
        assert mounts[str(s.models_dir)][0]["readOnly"] is True
        _under(s.agreements_file, mounts, writable=False)
        _under(Path("/tmp"), mounts, writable=True)
        ports = {p["name"]: p["containerPort"] for p in ray["ports"]}
        assert ports["serve"] == serve.port, group  # EveryNode: a proxy on every pod
        # Ray's own settings a local center starts with, in every Ray pod alike.
        values = {e["name"]: e.get("value") for e in ray["env"]}
        for var in CLUSTER_RAY_SETTINGS:
            assert values.get(var) == SERVE_ENV_DEFAULTS[var], (group, var)
    # A replica may land on any pod and the app builder runs on any: one environment for all.
    assert all(e == envs[0] for e in envs)


@pytest.mark.parametrize("name", WITH_APPS)
def test_volumes_have_the_access_modes_their_readers_need(name: str) -> None:
    objs = build(name)
    claims = {
        o["metadata"]["name"]: o["spec"]["accessModes"]
        for o in objs
        if o["kind"] == "PersistentVolumeClaim"
    }
    rs = one(objs, "RayService")
    for _, spec in pod_specs([rs]):
        for v in spec["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
    if name == "dev":  # one node: ReadWriteOnce is what local-path / hostpath provision
        assert all(modes == ["ReadWriteOnce"] for modes in claims.values())
    else:
        assert claims["radbridge-models"] == ["ReadOnlyMany"]
        assert claims["radbridge-center-store"] == ["ReadWriteMany"]
        assert claims["radbridge-trt-cache"] == ["ReadWriteMany"]
        assert claims["radbridge-edge-data"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("name", WITH_APPS)
def test_one_image_everywhere(name: str) -> None:
    images = {c["image"] for _, spec in pod_specs(build(name)) for c in containers(spec)}
    assert len(images) == 1 and next(iter(images)).startswith("ghcr.io/radbridge/radbridge:")


# -- secrets and config: referenced, and defined only as dev examples ---------------------------


def _references(objs: list[Obj]) -> set[tuple[str, str]]:
    refs = set()
    for _, spec in pod_specs(objs):
        for v in spec.get("volumes", []):
            if "secret" in v:
                refs.add(("Secret", v["secret"]["secretName"]))
            if "configMap" in v:
                refs.add(("ConfigMap", v["configMap"]["name"]))
        for c in containers(spec):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add(("Secret", ref["name"]))
            for src in c.get("envFrom", []):
                refs.add(("Secret", src["secretRef"]["name"]))
    for o in objs:  # a ServiceMonitor's scrape credentials (the center's operator secret)
        if o["kind"] == "ServiceMonitor":
            for ep in o["spec"].get("endpoints", []):
                cred = ep.get("authorization", {}).get("credentials")
                if cred:
                    refs.add(("Secret", cred["name"]))
    return refs


def test_secrets_live_only_in_the_dev_example() -> None:
    for name in ("base", "monitoring", "production"):
        assert not [o for o in build(name) if o["kind"] == "Secret"], name
    dev = build("dev")
    secrets = [o for o in dev if o["kind"] == "Secret"]
    assert secrets
    for s in secrets:
        assert "radbridge.io/example" in s["metadata"]["annotations"]
        assert s["metadata"]["name"] in (K8S / "overlays/dev/example-secrets.yaml").read_text()
    defined = {(o["kind"], o["metadata"]["name"]) for o in dev}
    assert _references(dev) <= defined, "dev references something it does not create"


def test_production_lists_every_object_it_expects_out_of_band() -> None:
    comment = (K8S / "overlays/production/kustomization.yaml").read_text()
    listed = set(re.findall(r"^#\s+(Secret|ConfigMap) (\S+)", comment, re.M))
    objs = build("production")
    defined = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert listed == _references(objs) - defined


def test_agreements_files_under_k8s_are_valid() -> None:
    files = sorted(K8S.rglob("agreements.yaml"))
    assert files
    stow = one(build("dev"), "Secret", "radbridge-edge-stow")["stringData"]
    for path in files:
        for a in load_agreements(path).agreements:
            if a.hospital.stow:
                assert a.hospital.stow.password_env in stow


# -- monitoring -------------------------------------------------------------------------------


def test_service_monitors_find_their_targets() -> None:
    objs = build("production")
    monitors = [o for o in objs if o["kind"] == "ServiceMonitor"]
    names = {m["metadata"]["name"] for m in monitors}
    assert names == {"radbridge-edge", "radbridge-center", "radbridge-ray"}
    pods = [
        labels
        for o in objs
        for labels in (
            [o["spec"]["template"]["metadata"]["labels"]]
            if o["kind"] == "Deployment"
            else [g["template"]["metadata"]["labels"] for g in ray_groups(o).values()]
            if o["kind"] == "RayService"
            else []
        )
    ]
    serve_port = load_serve_config(SERVE_CONFIGS["production"]).schema.http_options.port
    for m in monitors:
        services = [
            o
            for o in objs
            if o["kind"] == "Service" and _selects(m["spec"]["selector"], o["metadata"]["labels"])
        ]
        assert len(services) == 1, m["metadata"]["name"]
        (svc,) = services
        port_names = {p["name"] for p in svc["spec"]["ports"]}
        # The center's metrics come from the Ray pods' metrics agents (every Api replica,
        # summed); the Api's own /metrics (one replica) is not scraped.
        paths = {"/read/metrics"} if m["metadata"]["name"] == "radbridge-center" else {"/metrics"}
        assert {ep["path"] for ep in m["spec"]["endpoints"]} == paths
        for ep in m["spec"]["endpoints"]:
            assert ep["port"] in port_names
        selected = [p for p in pods if _selects({"matchLabels": svc["spec"]["selector"]}, p)]
        assert selected
        if m["metadata"]["name"] == "radbridge-center":
            assert svc["spec"]["ports"][0]["port"] == serve_port
        if m["metadata"]["name"] == "radbridge-ray":
            assert svc["spec"]["clusterIP"] == "None"  # each pod scraped, none left out
            (rayservice,) = [o for o in objs if o["kind"] == "RayService"]
            assert len(selected) == len(ray_groups(rayservice))  # the head and every group
            for group in ray_groups(rayservice).values():
                assert group["rayStartParams"]["metrics-export-port"] == str(
                    svc["spec"]["ports"][0]["port"]
                )
            (ep,) = m["spec"]["endpoints"]
            rename = ep["metricRelabelings"][0]
            assert rename["regex"] == "ray_(radbridge_.*)" and rename["replacement"] == "$1"


def _catalog() -> dict[str, set[str]]:
    """Every series name radbridge exports -> its label names (from the live collectors)."""
    agreements = load_agreements(REPO / "radbridge/defaults/agreements.yaml")
    out: dict[str, set[str]] = {}
    review = ReviewMetrics(Database("sqlite://"), agreements)  # the database is not queried
    for metrics, module in (
        (EdgeMetrics(), "radbridge/metrics.py"),
        (CenterMetrics(), "radbridge/metrics.py"),
        (review, "review/metrics.py"),
    ):
        source = (REPO / module).read_text()
        for collector in vars(metrics).values():
            if not isinstance(collector, MetricWrapperBase):
                continue
            name: str = collector._name  # type: ignore[attr-defined]
            kind = str(collector._type)  # type: ignore[attr-defined]
            labels = set(collector._labelnames)  # type: ignore[attr-defined]
            suffixes = {
                "counter": ["_total"],
                "gauge": [""],
                "histogram": ["_bucket", "_sum", "_count"],
            }[kind]
            assert f'"{name}' in source  # defined in its metrics module, not elsewhere
            for suffix in suffixes:
                out[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    # The reading room's gauge is a collector reading the database at scrape time.
    assert '"radbridge_review_oldest_unread_seconds"' in (REPO / "review/metrics.py").read_text()
    out["radbridge_review_oldest_unread_seconds"] = {"agreement"}
    return out


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
_VALUES: dict[tuple[str | None, str], set[str]] = {
    (None, "priority"): {p.value for p in Priority},
    ("radbridge_edge_outbox_studies", "state"): {s.value for s in EdgeStudyState},
    ("radbridge_edge_deliveries", "state"): {s.value for s in DeliveryState},
    (None, "provider"): {
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    },
}


def promql_problems(expr: str, catalog: dict[str, set[str]]) -> list[str]:
    """Names, labels and label values of ``expr`` that radbridge does not export."""
    problems = []
    names: set[str] = set()
    for name, body in _SELECTOR.findall(expr):
        names.add(name)
        for label, op, value in _MATCHER.findall(body):
            if name in catalog and label not in catalog[name]:
                problems.append(f"{name} has no label {label}")
            allowed = _VALUES.get((name, label)) or _VALUES.get((None, label))
            if allowed and op in ("=", "!=") and value not in allowed:
                problems.append(f"{name}{{{label}={value!r}}}: not a value radbridge sets")
    rest = _STRING.sub('""', expr)
    rest = re.sub(r"\{[^}]*\}", " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    grouping = {g.strip() for lst in _GROUPING.findall(rest) for g in lst.split(",") if g.strip()}
    rest = _GROUPING.sub(" ", rest)
    for m in _IDENT.finditer(rest):
        token = m.group(0)
        if token in _KEYWORDS or rest[m.end() :].lstrip().startswith("("):
            continue
        names.add(token)
    for name in sorted(names):
        if name not in catalog:
            problems.append(f"{name} is not a radbridge metric")
    known = set().union(*(catalog.get(n, set()) for n in names)) if names else set()
    problems += [f"grouping label {g} is on none of {sorted(names)}" for g in grouping - known]
    if not names:
        problems.append("no metric referenced")
    return problems


def test_promql_check_is_not_vacuous() -> None:
    catalog = _catalog()
    assert promql_problems("rate(radbridge_center_rejected_total[5m]) > 0", catalog) == []
    assert promql_problems("rate(radbridge_center_rejects_total[5m]) > 0", catalog)
    assert promql_problems("sum by (agreement) (up)", catalog)
    assert promql_problems('radbridge_edge_deliveries{state="lost"} > 0', catalog)
    assert promql_problems('radbridge_edge_deliveries{sate="dead"} > 0', catalog)
    assert promql_problems("sum by (model) (radbridge_edge_deliveries)", catalog)
    q = 'histogram_quantile(0.9, sum by (le, model) (rate(radbridge_center_queue_wait_seconds_bucket{priority="stat"}[5m])))'  # noqa: E501
    assert promql_problems(q, catalog) == []


def test_alerts_use_only_radbridge_metrics_and_labels() -> None:
    rule = one(build("monitoring"), "PrometheusRule")
    catalog = _catalog()
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    names = {r["alert"] for r in alerts}
    for must in (
        "RadbridgeEdgeTurnaroundOverSLA",
        "RadbridgeEdgeDeliveryFailuresRising",
        "RadbridgeCenterRejecting",
        "RadbridgeCenterQueueWaitHigh",
        "RadbridgeModelOnCPU",
    ):
        assert must in names
    used: set[str] = set()
    for r in alerts:
        assert promql_problems(str(r["expr"]), catalog) == [], r["alert"]
        used |= {n for n in catalog if re.search(rf"\b{n}\b", str(r["expr"]))}
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"], r["alert"]
    expected = {
        "radbridge_edge_turnaround_seconds_bucket",
        "radbridge_edge_delivery_failures_total",
        "radbridge_center_rejected_total",
        "radbridge_center_queue_wait_seconds_bucket",
        "radbridge_center_model_provider_info",
    }
    assert expected <= used
    on_cpu = next(r for r in alerts if r["alert"] == "RadbridgeModelOnCPU")
    assert 'provider="CPUExecutionProvider"' in on_cpu["expr"]


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is missing: `./run test` installs Debian's prometheus package")
    return tool


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    """Prometheus' own parser on every rule (the catalog check above reads names only)."""
    rule = one(build("monitoring"), "PrometheusRule")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    run = subprocess.run(
        [_promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_fires_when_it_should_and_only_then(tmp_path: Path) -> None:
    """promtool unit tests (k8s/monitoring/tests/alerts.test.yaml) of the rules as deployed:
    every alert of the PrometheusRule has a case that makes it fire with its labels and
    summary, and the healthy neighbours in those cases do not fire."""
    rule = one(build("monitoring"), "PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    cases = K8S / "monitoring" / "tests" / "alerts.test.yaml"
    shutil.copy(cases, tmp_path / "alerts.test.yaml")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    tested = {
        t["alertname"]
        for group in yaml.safe_load(cases.read_text())["tests"]
        for t in group["alert_rule_test"]
        if t["exp_alerts"]
    }
    assert alerts == tested, f"alerts without a firing case: {sorted(alerts - tested)}"
    run = subprocess.run(
        [_promtool(), "test", "rules", "alerts.test.yaml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_dev_identity_is_consistent_across_edge_and_center(tmp_path: Path) -> None:
    """The dev overlay's throwaway identity fits together: the edge's key is the one the
    center's trust file lists for it, the JWKS the edge trusts is the center's signing key,
    and Prometheus' operator secret hashes to the trust file's entry."""
    from radbridge.auth import load_edge_key, load_trust, secret_hash
    from radbridge.signing import load_center_keys

    dev = build("dev")
    identity = one(dev, "Secret", "radbridge-edge-identity")["stringData"]
    signing = one(dev, "Secret", "radbridge-center-signing")["stringData"]
    operator = one(dev, "Secret", "radbridge-center-operator")["stringData"]["token"]
    trust_text = one(dev, "ConfigMap", "radbridge-center-trust")["data"]["center-trust.yaml"]
    files = {
        "edge.pem": identity["edge-ed25519.pem"],
        "jwks.json": identity["center-signing.jwks.json"],
        "center.pem": signing["center-signing.pem"],
        "trust.yaml": trust_text,
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    trust = load_trust(tmp_path / "trust.yaml")
    edge = load_edge_key(tmp_path / "edge.pem")
    dep = one(dev, "Deployment", "radbridge-edge")
    env = {
        e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    (entry,) = [e for e in trust.edges if e.id == env["RADBRIDGE_EDGE__ID"]]
    assert entry.keys == [edge.jwk]
    assert set(entry.agreements) == {
        a.id for a in load_agreements(K8S / "overlays/dev/agreements.yaml").agreements
    }
    center_key = load_edge_key(tmp_path / "center.pem", "center.signing_key_file")
    assert load_center_keys(tmp_path / "jwks.json") == [center_key.jwk]
    assert [o.token_sha256 for o in trust.operators] == [secret_hash(operator)]


@pytest.mark.parametrize("name", WITH_APPS)
def test_network_policy_peers_name_their_namespace(name: str) -> None:
    """A peer from another namespace is selected by that namespace's name as well as by pod
    labels: `namespaceSelector: {}` would let a look-alike pod in any namespace in."""
    policies = [o for o in build(name) if o["kind"] == "NetworkPolicy"]
    assert policies
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "namespaceSelector" in peer:
                    labels = peer["namespaceSelector"].get("matchLabels", {})
                    assert labels.get("kubernetes.io/metadata.name"), (name, peer)
                    assert "podSelector" in peer, (name, peer)


DASHBOARDS = ("radbridge-overview", "radbridge-agreement", "radbridge-model", "radbridge-edge")


def _dashboards() -> dict[str, dict[str, Any]]:
    """The dashboards as the monitoring base ships them (one ConfigMap for Grafana's sidecar)."""
    cm = one(build("monitoring"), "ConfigMap", "radbridge-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    return {key.removesuffix(".json"): json.loads(text) for key, text in cm["data"].items()}


def _dashboards_module() -> Any:
    name = "radbridge_grafana_dashboards"  # k8s/ is no package: loaded from its path
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, REPO / "k8s/monitoring/grafana/dashboards.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_dashboards_are_what_their_code_generates() -> None:
    """Generated from code (grafanalib): the shipped JSON is exactly dashboards.py's output."""
    module = _dashboards_module()
    shipped = _dashboards()
    assert set(shipped) == set(DASHBOARDS) == {b.uid for b in module.BOARDS}
    for board in module.BOARDS:
        assert json.loads(module.render(board)) == shipped[board.uid], board.uid
        path = REPO / "k8s/monitoring/grafana" / f"{board.uid}.json"
        assert path.read_text() == module.render(board), f"run {path.parent}/dashboards.py"


def test_every_dashboard_is_laid_out_and_wired_for_grafana() -> None:
    """What Grafana's dashboard model needs, checked on each: a unique uid, panel ids unique,
    every panel inside the 24-column grid and none overlapping, every query on the
    ${datasource} variable, a variable for every $name a query uses, and each query variable
    reading a label radbridge exports."""
    catalog = _catalog()
    for name, board in _dashboards().items():
        assert board["uid"] == name and board["title"] and board["schemaVersion"] >= 12
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), name
        cells: set[tuple[int, int]] = set()
        for p in board["panels"]:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, (name, p["title"])
            xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
            mine = {(x, y) for x in xs for y in ys}
            assert not cells & mine, (name, p["title"], "overlaps")
            cells |= mine
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        for p in board["panels"]:
            if p["type"] == "row":
                continue
            assert p["datasource"] == "${datasource}", (name, p["title"])
            for t in p["targets"]:
                assert set(re.findall(r"\$(\w+)", t["expr"])) <= set(variables), t["expr"]
        for v in variables.values():
            if v["type"] == "query":
                found = re.fullmatch(r"label_values\((\w+), (\w+)\)", v["query"])
                assert found is not None, v["query"]
                metric, label = found.groups()
                assert label in catalog[metric], v["query"]


def test_the_dashboards_query_only_what_radbridge_exports(tmp_path: Path) -> None:
    """Every panel's query names radbridge metrics and labels only, and Prometheus' own parser
    takes each (as a recording rule); together the dashboards show every stage."""
    catalog = _catalog()
    targets = [
        t
        for board in _dashboards().values()
        for p in board["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]
    assert len(targets) >= 50
    used: set[str] = set()
    for t in targets:
        assert promql_problems(t["expr"], catalog) == [], t["expr"]
        named = {n for n in catalog if n in t["expr"]}
        used |= {n.removesuffix("_bucket") for n in named}
    # Every stage has a panel: edge receive, de-identification, outbox, delivery, queue wait,
    # inference, both turnarounds, the oldest unread study.
    for stage in (
        "radbridge_edge_instance_receive_seconds",
        "radbridge_edge_deidentify_seconds",
        "radbridge_edge_outbox_studies",
        "radbridge_edge_deliveries",
        "radbridge_center_queue_wait_seconds",
        "radbridge_center_inference_seconds",
        "radbridge_edge_turnaround_seconds",
        "radbridge_review_turnaround_seconds",
        "radbridge_review_oldest_unread_seconds",
    ):
        assert stage in used, stage
    # A query with a variable goes to promtool as Grafana sends it for "All" (regex .*).
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel_{i}", "expr": re.sub(r"\$\w+", ".*", t["expr"])}
                    for i, t in enumerate(targets)
                ],
            }
        ]
    }
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(rules))
    run = subprocess.run(
        [_promtool(), "check", "rules", str(tmp_path / "dashboard.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr

"""Run the center: a local (or given) Ray cluster, Serve's HTTP proxy, the app from the config.

The application is deployed from the Serve config file (:mod:`serving.config`) exactly as
`serve deploy` and KubeRay do — Serve's controller builds it with ``serving.app:build`` and
applies the file's deployment options — with the installation's bind address and settings
filled in.

Start-up is staged so that it survives a small, busy machine (2 cores, model replicas loading):

1. the center's port is checked free before Ray starts (a clear error names the port);
2. Serve's controller and HTTP proxy start, with proxy health-check limits that suit a loaded
   machine (:data:`SERVE_ENV_DEFAULTS`), and the start-up waits until the proxy is HEALTHY —
   if Serve replaced a proxy that was slow to start, the wait simply covers its successor;
3. only then is the application deployed (model loading no longer starves the proxy's start);
4. it returns once the application is RUNNING and answers ``/healthz`` through the proxy.

When it cannot start in time, the error says which stage failed and ends with the last lines of
the proxy's and controller's own logs.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from radbridge.auth import load_trust
from radbridge.errors import ConfigError, ModelError
from radbridge.identity import prepare_local_identity
from radbridge.pki import check_server_files
from radbridge.settings import Settings
from radbridge.signing import load_signer

if TYPE_CHECKING:
    from ray.serve._private.client import ServeControllerClient
    from ray.serve.schema import ServeDeploySchema

__all__ = ["SERVE_ENV_DEFAULTS", "start_center", "stop_center"]

log = logging.getLogger("radbridge.center")
_RADBRIDGE_ERROR = re.compile(r"radbridge\.errors\.(\w+Error: [^\n]+)")

# Serve's defaults declare a proxy dead when its first readiness check takes over 5 s, or when
# three health checks in a row take over 10 s each; it then kills the proxy and starts another,
# which may find the port still held. A proxy process importing uvicorn/FastAPI on 2 busy cores
# takes longer than 5 s. Serve's controller (a process Ray starts) reads these from its
# environment, so they are set before ray.init; a value already in the environment wins.
#
# And the root of the starvation: Ray starts every worker process (the Serve controller, the
# HTTP proxy, the replicas) at nice 15, so on a small machine any process at normal priority —
# the edge gateway in the same `radbridge up`, a test runner, a busy PACS peer — takes the CPU
# from the proxy while it should answer its health checks (measured: two nice-0 busy loops left
# the proxy and replicas 3 % of a core). The center's processes are the service, not
# background work: they run at normal priority (RAY_worker_niceness, Ray's own setting).
SERVE_ENV_DEFAULTS: dict[str, str] = {
    "RAY_worker_niceness": "0",
    # Ray exports a Counter as a Prometheus counter and, for compatibility, also as a gauge
    # of the same name; the gauge would clash with the counter in every scrape.
    "RAY_EXPORT_COUNTER_AS_GAUGE": "0",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "10",
    # A task argument over Ray's max_direct_call_object_size (100 KiB) goes through the
    # object store (create, seal, pin, free: raylet work per call) instead of inside the call.
    # One model input is 200 KiB (1x224x224 float32) to 1 MiB (512x512): at 2 MiB each
    # image goes to the ModelRunner inline. Measured (loadtests.bench_serving, 2 cores):
    # HTTP 19.1 -> 22.1 img/s, handle 23.7 -> 27.3, raylet CPU 0.06 -> 0.01 cores.
    "RAY_max_direct_call_object_size": str(2 << 20),
}
_LOG_TAIL_LINES = 15


def start_center(
    settings: Settings, timeout_s: float = 300.0, step: Callable[[str], None] | None = None
) -> None:
    """Start Ray (local unless ``center.ray_address``) and deploy the app; returns when ready.
    ``step`` is told each stage as it starts (``radbridge up`` shows them with their times)."""
    step = step or (lambda _: None)
    # Ray must not pick the host's interface address: loopback only unless told otherwise.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for name, value in SERVE_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import ray

    from serving.config import load_serve_config

    c = settings.center
    step("center: Serve config, identity, certificates")
    config = load_serve_config(c.serve_config)  # fails here, naming the field, if invalid
    prepare_local_identity(settings)  # local mode: a throwaway identity under data_dir/keys
    load_trust(settings.center_trust_file)  # fails here, naming the field, if invalid
    load_signer(settings.center_signing_key_file)
    if c.tls is not None:
        check_server_files(c.tls.cert_file, c.tls.key_file)
    deadline = time.monotonic() + timeout_s
    if not ray.is_initialized():
        step(f"center: connecting to Ray at {c.ray_address}" if c.ray_address else "center: Ray")
        if c.ray_address:
            ray.init(address=c.ray_address, log_to_driver=True)
        else:
            check_port_free(c.host, c.port)
            # Ray's control plane authenticates with its own token: Ray 2.60 turns token
            # authentication on for a new local cluster (RAY_AUTH_MODE=token, the token in
            # ~/.ray/auth_token); tests/integration/test_serving.py checks it stays so.
            ray.init(
                _node_ip_address="127.0.0.1",
                num_cpus=c.ray_num_cpus or max(4, os.cpu_count() or 1),
                include_dashboard=False,
                log_to_driver=True,
                _metrics_export_port=c.ray_metrics_port or None,
            )
    # The app's args: the settings it needs, not the config file's path — a redeploy whose
    # only change is user_config then reconfigures replicas in place instead of replacing them.
    app_settings = settings.model_dump(
        mode="json", exclude={"edge": True, "center": {"serve_config"}}
    )
    tls = (str(c.tls.cert_file), str(c.tls.key_file)) if c.tls is not None else None
    schema = config.deploy_schema(host=c.host, port=c.port, settings=app_settings, tls=tls)
    step("center: Serve's HTTP proxy")
    client = _start_serve(schema, deadline)
    deployed_at = time.time()
    client.deploy_apps(schema)
    for name in config.apps:
        step(f"center: {name} (replicas start, models load)")
        _wait_running(name, deployed_at, deadline)
    scheme = "https" if tls is not None else "http"
    step("center: answering /healthz")
    _wait_answers(f"{scheme}://{_loopback(c.host)}:{c.port}/healthz", deadline)
    log.info("center serving on %s://%s:%d", scheme, c.host, c.port)


def check_port_free(host: str, port: int, setting: str = "center.port") -> None:
    """Raise :class:`ConfigError` naming ``setting`` when ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            why = f"is in use by {_holder(port)}" if exc.errno == errno.EADDRINUSE else exc.strerror
            variable = "RADBRIDGE_" + setting.upper().replace(".", "__")
            raise ConfigError(
                f"{setting}: {host}:{port} {why}; stop that process or choose another port "
                f"({variable})"
            ) from None


def _holder(port: int) -> str:
    """Which process listens on ``port`` (pid and name), where the OS lets us see it."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    break
                name = psutil.Process(conn.pid).name()
                return f"another process (pid {conn.pid}, {name})"
    except Exception:  # diagnostics only: never fail the start-up check on them
        pass
    return "another process"


def _start_serve(schema: ServeDeploySchema, deadline: float) -> ServeControllerClient:
    """Serve's controller and proxy, returned once the proxy is HEALTHY.

    ``serve_start`` waits up to 60 s for the first proxy it made; when Serve replaced that proxy
    meanwhile (``ActorDiedError``) or it was slow, the controller is up and goes on restarting
    the proxy by itself, so the wait continues on ``serve.status()`` until ``deadline``.
    """
    import ray
    from ray.serve._private.api import serve_start

    http_options = schema.http_options.model_dump()
    proxy_location = schema.proxy_location
    try:
        client = serve_start(http_options=http_options, proxy_location=proxy_location)
    except (TimeoutError, ray.exceptions.RayActorError) as exc:
        log.warning("Serve's first HTTP proxy did not start (%s); waiting for its successor", exc)
        client = serve_start(http_options=http_options, proxy_location=proxy_location)
    _wait_proxies_healthy(deadline)
    return client


def _wait_proxies_healthy(deadline: float) -> None:
    from ray import serve
    from ray.serve.schema import ProxyStatus

    seen: dict[str, str] = {}
    while True:
        proxies = serve.status().proxies
        seen = {node: str(getattr(st, "value", st)) for node, st in proxies.items()}
        if proxies and all(st == ProxyStatus.HEALTHY for st in proxies.values()):
            return
        if time.monotonic() > deadline:
            raise ModelError(
                f"center: Serve's HTTP proxy is not healthy ({seen or 'none started'})"
                + ray_log_tail()
            )
        time.sleep(0.5)


def _wait_running(app_name: str, deployed_at: float, deadline: float) -> None:
    """Until this deployment (not a previous one still listed as RUNNING) runs or fails."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    while True:
        app = serve.status().applications.get(app_name)
        if app is not None and app.last_deployed_time_s < deployed_at - 1:
            app = None  # the controller has not taken this config yet
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status in (
            ApplicationStatus.DEPLOY_FAILED,
            ApplicationStatus.UNHEALTHY,
        ):
            problems = [
                f"{name}: {_reason(d.message)}" for name, d in app.deployments.items() if d.message
            ] or [_reason(app.message)]
            raise ModelError(f"center {app.status.value}: {'; '.join(problems)[:2000]}")
        if time.monotonic() > deadline:
            state = app.status.value if app is not None else "not deployed yet"
            raise ModelError(f"center application not running in time ({state})" + ray_log_tail())
        time.sleep(0.5)


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def _wait_answers(url: str, deadline: float) -> None:
    """Until the app's ``/healthz`` answers 200 through the proxy at ``url``.

    The certificate is not checked here: this probe of our own proxy sends no credential and
    reads nothing but the status; the edge checks it (radbridge.contract.tls_verify)."""
    import httpx

    last = "no answer"
    while True:
        try:
            r = httpx.get(url, timeout=5, verify=False)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        if time.monotonic() > deadline:
            raise ModelError(f"center: {url} does not answer 200 ({last})" + ray_log_tail())
        time.sleep(0.5)


def _reason(message: str) -> str:
    """The radbridge error at the bottom of a replica's traceback, else Serve's first line."""
    found = _RADBRIDGE_ERROR.findall(message or "")
    return found[-1] if found else (message or "").strip().splitlines()[0][:300]


def ray_log_tail(lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of Serve's proxy and controller logs of this Ray session, for an error."""
    logs = ray_logs_dir()
    if logs is None:
        return ""
    out = [f"\nRay's logs: {logs}"]
    for pattern in ("serve/proxy_*.log", "serve/controller_*.log"):
        files = sorted(logs.glob(pattern), key=lambda p: p.stat().st_mtime)
        if files:
            out.append(f"--- {files[-1].name} (last {lines} lines)")
            out.extend(files[-1].read_text(errors="replace").splitlines()[-lines:])
    return "\n".join(out)


def ray_logs_dir() -> Path | None:
    """This process's Ray session log folder, when it started or joined one on this machine."""
    try:
        import ray._private.worker as worker

        node = worker._global_node
        return Path(node.get_logs_dir_path()) if node is not None else None
    except Exception:  # Ray internals moved: no log tail rather than a second failure
        return None


def stop_center() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()

"""Run the center: a local (or given) Ray cluster, Serve's HTTP proxy, the app from the config.

The application is deployed from the Serve config file (:mod:`serving.config`) exactly as
`serve deploy` and KubeRay do — Serve's controller builds it with ``serving.app:build`` and
applies the file's deployment options — with the installation's bind address and settings
filled in.
"""

from __future__ import annotations

import logging
import os
import re
import time

from radbridge.errors import ModelError
from radbridge.settings import Settings

__all__ = ["start_center", "stop_center"]

log = logging.getLogger("radbridge.center")
_RADBRIDGE_ERROR = re.compile(r"radbridge\.errors\.(\w+Error: [^\n]+)")


def start_center(settings: Settings, timeout_s: float = 300.0) -> None:
    """Start Ray (local unless ``center.ray_address``) and deploy the app; returns when ready."""
    # Ray must not pick the host's interface address: loopback only unless told otherwise.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.serve._private.api import serve_start

    from serving.config import load_serve_config

    c = settings.center
    config = load_serve_config(c.serve_config)  # fails here, naming the field, if invalid
    if not ray.is_initialized():
        if c.ray_address:
            ray.init(address=c.ray_address, log_to_driver=True)
        else:
            ray.init(
                _node_ip_address="127.0.0.1",
                num_cpus=c.ray_num_cpus or max(4, os.cpu_count() or 1),
                include_dashboard=False,
                log_to_driver=True,
            )
    # The app's args: the settings it needs, not the config file's path — a redeploy whose
    # only change is user_config then reconfigures replicas in place instead of replacing them.
    app_settings = settings.model_dump(
        mode="json", exclude={"edge": True, "center": {"serve_config"}}
    )
    schema = config.deploy_schema(host=c.host, port=c.port, settings=app_settings)
    client = serve_start(
        http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location
    )
    deployed_at = time.time()
    client.deploy_apps(schema)
    _wait_running(config.app.name, deployed_at, timeout_s)
    log.info("center serving on http://%s:%d", c.host, c.port)


def _wait_running(app_name: str, deployed_at: float, timeout_s: float) -> None:
    """Until this deployment (not a previous one still listed as RUNNING) runs or fails."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
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
            raise ModelError(f"center not running after {timeout_s:.0f}s")
        time.sleep(0.5)


def _reason(message: str) -> str:
    """The radbridge error at the bottom of a replica's traceback, else Serve's first line."""
    found = _RADBRIDGE_ERROR.findall(message or "")
    return found[-1] if found else (message or "").strip().splitlines()[0][:300]


def stop_center() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()

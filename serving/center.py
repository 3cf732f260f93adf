"""Run the center: a local (or given) Ray cluster, Serve's HTTP proxy, the application."""

from __future__ import annotations

import logging
import os

from radbridge.settings import Settings

__all__ = ["start_center", "stop_center"]

log = logging.getLogger("radbridge.center")


def start_center(settings: Settings) -> None:
    """Start Ray (local unless ``center.ray_address``) and deploy the app; returns when ready."""
    # Ray must not pick the host's interface address: loopback only unless told otherwise.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from serving.app import APP_NAME, build_app

    c = settings.center
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
    serve.start(http_options={"host": c.host, "port": c.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    log.info("center serving on http://%s:%d", c.host, c.port)


def stop_center() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()

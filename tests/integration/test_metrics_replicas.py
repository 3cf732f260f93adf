"""Center metrics across replicas: each Api replica keeps its own prometheus-client registry (its
/metrics shows that replica alone), and mirrors every update to Ray's metrics, which the node's
metrics agent exports for all replicas at one scrape target (radbridge.metrics.RayMirrored).

Two replicas of a deployment holding the center's metrics count instances; the test scrapes
the real Ray metrics agent over loopback and finds both replicas' counts there, adding up to
what was sent, while each replica's own registry holds only its part."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
REQUESTS = 24
REPORT_INTERVAL = "RAY_metrics_report_interval_ms"  # Ray's own setting, lower case as Ray has it


@pytest.fixture
def ray_node() -> Iterator[int]:
    """A local Ray node on loopback with its metrics agent on a known port."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from serving.center import SERVE_ENV_DEFAULTS

    for name, value in SERVE_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    os.environ[REPORT_INTERVAL] = "1000"  # the agent sees updates within about a second
    import ray
    from ray import serve

    port = free_port()
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=4,
        include_dashboard=False,
        _metrics_export_port=port,
        log_to_driver=False,
    )
    try:
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop(REPORT_INTERVAL, None)


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def test_two_api_replicas_add_up_at_the_nodes_metrics_agent(ray_node: int) -> None:
    from ray import serve

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.1})
    class Counting:
        """Stands in for the Api: the center's metrics, mirrored as the Api mirrors them."""

        def __init__(self) -> None:
            import ray

            from radbridge.metrics import CenterMetrics

            self.metrics = CenterMetrics(mirror_to_ray=ray.is_initialized())
            self.replica = serve.get_replica_context().replica_id.unique_id

        def __call__(self) -> dict[str, Any]:
            self.metrics.instances_received.labels("demo-agreement", "CT").inc()
            self.metrics.job.labels("demo-agreement", "CT").observe(2.0)
            own = _samples(
                generate_latest(self.metrics.registry).decode(),
                "radbridge_center_instances_received_total",
            )
            return {"replica": self.replica, "own": sum(v for _, v in own)}

    handle = serve.run(Counting.bind(), name="metrics-replicas", route_prefix=None)
    answers = [handle.remote().result(timeout_s=60) for _ in range(REQUESTS)]
    replicas = {a["replica"] for a in answers}
    if len(replicas) < 2:  # the router chose one replica every time: send until both answered
        deadline = time.monotonic() + 60
        while len(replicas) < 2 and time.monotonic() < deadline:
            answers.append(handle.remote().result(timeout_s=60))
            replicas.add(answers[-1]["replica"])
    assert len(replicas) == 2, replicas
    sent = len(answers)
    own_views = {a["replica"]: a["own"] for a in answers}  # each replica's last answer
    assert all(0 < v < sent for v in own_views.values())  # /metrics of one replica: a part
    assert sum(own_views.values()) == sent

    deadline = time.monotonic() + 60
    counted: list[tuple[dict[str, str], float]] = []
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{ray_node}/metrics", timeout=5).text
        counted = _samples(text, "ray_radbridge_center_instances_received_total")
        jobs = _samples(text, "ray_radbridge_center_job_seconds_count")
        if sum(v for _, v in counted) == sent and sum(v for _, v in jobs) == sent:
            break
        time.sleep(0.5)
    assert sum(v for _, v in counted) == sent, counted
    assert len({labels["WorkerId"] for labels, _ in counted}) == 2  # one series per replica
    assert {labels["agreement"] for labels, _ in counted} == {"demo-agreement"}
    assert {labels["modality"] for labels, _ in counted} == {"CT"}
    # No counter is also exported as a same-named gauge (RAY_EXPORT_COUNTER_AS_GAUGE=0).
    assert not _samples(text, "ray_radbridge_center_instances_received")

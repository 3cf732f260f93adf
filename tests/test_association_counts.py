"""Association counts in one process and shared across the gateway's receiving processes:
the same answers from both (the cross-process case itself: tests/integration/test_receivers)."""

from __future__ import annotations

import pytest

from dicom_io.association_counts import AssociationCounts, LocalCounts, SharedCounts
from dicom_io.receivers import Relay, apply_event
from radbridge.metrics import EdgeMetrics


@pytest.fixture(params=["local", "shared"])
def counts(request: pytest.FixtureRequest) -> AssociationCounts:
    return LocalCounts() if request.param == "local" else SharedCounts(["a", "b"])


def test_connections_stop_at_the_limit_and_free_on_disconnect(counts: AssociationCounts) -> None:
    assert counts.connect(2) and counts.connect(2)
    assert not counts.connect(2)
    assert counts.connections == 2
    counts.disconnect()
    assert counts.connections == 1 and counts.connect(2)


def test_each_agreement_has_its_own_limit(counts: AssociationCounts) -> None:
    assert counts.open("a", 1)
    assert not counts.open("a", 1)
    assert counts.open("b", 1)
    counts.close("a")
    assert counts.open("a", 1)
    assert counts.open("a", None) and counts.open("a", None)  # no limit


def test_a_relayed_update_lands_in_the_gateways_registry() -> None:
    sent: list[tuple[object, ...]] = []

    class Events:
        def put(self, event: tuple[object, ...]) -> None:
            sent.append(event)

    relay = Relay(Events())
    relay.instances.labels("a", "stored").inc()  # type: ignore[attr-defined]
    relay.instance_receive.labels("a", "CT").observe(0.25)  # type: ignore[attr-defined]
    metrics = EdgeMetrics()
    for event in sent:
        apply_event(event, metrics)
    get = metrics.registry.get_sample_value
    assert get("radbridge_edge_instances_total", {"agreement": "a", "outcome": "stored"}) == 1
    assert (
        get("radbridge_edge_instance_receive_seconds_sum", {"agreement": "a", "modality": "CT"})
        == 0.25
    )
    with pytest.raises(ValueError, match="unknown relayed metric"):
        apply_event(("inc", "disk_free", (), 1.0), metrics)

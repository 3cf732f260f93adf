"""The metrics catalog: every Prometheus metric radbridge exports, defined once.

Label values are agreement ids, modality codes, model names/versions, batch buckets and status
words: never identifiers. ``safe_label`` enforces that at the call site.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from radbridge.agreements import AgreementSet

__all__ = [
    "CenterMetrics",
    "EdgeMetrics",
    "RayMirrored",
    "batch_bucket",
    "safe_label",
    "with_sla_bounds",
]

# Seconds; from sub-millisecond C-STORE writes to hour-long turnarounds.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 14400, 86400)
_LABEL = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")


def safe_label(value: str | None) -> str:
    """Return ``value`` if it is a short code-like token, else ``"other"``.

    Free text (a study description, a name) never becomes a label value.
    """
    if value and _LABEL.match(value):
        return value
    return "other"


def batch_bucket(n: int) -> str:
    """Bucket a batch size into a small, fixed set of label values."""
    for hi, name in ((1, "1"), (4, "2-4"), (8, "5-8"), (16, "9-16"), (32, "17-32")):
        if n <= hi:
            return name
    return "33+"


def with_sla_bounds(base: Iterable[float], agreements: AgreementSet | None) -> tuple[float, ...]:
    """Histogram bounds: ``base`` plus every agreement's SLA in seconds, so "within SLA" is
    one bucket of a turnaround histogram (buckets are fixed when the metric is made)."""
    slas = (
        {float(m) * 60 for a in agreements.agreements for m in a.sla_minutes.values()}
        if agreements is not None
        else set()
    )
    return tuple(sorted({float(b) for b in base} | slas))


class EdgeMetrics:
    """Metrics of the edge gateway (prometheus-client, served on its own /metrics).

    ``agreements``: their SLAs become bounds of the turnaround histogram."""

    def __init__(
        self, registry: CollectorRegistry | None = None, agreements: AgreementSet | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.instance_receive = Histogram(
            "radbridge_edge_instance_receive_seconds",
            "C-STORE handling time: parse, durable write, index commit.",
            ["agreement", "modality"],
            buckets=_FAST,
            registry=r,
        )
        self.instances = Counter(
            "radbridge_edge_instances_total",
            "C-STORE requests answered, by outcome.",
            ["agreement", "outcome"],
            registry=r,
        )
        self.associations_rejected = Counter(
            "radbridge_edge_associations_rejected_total",
            "A-ASSOCIATE requests rejected by policy.",
            ["reason"],
            registry=r,
        )
        self.study_forward = Histogram(
            "radbridge_edge_study_forward_seconds",
            "Study stable -> de-identified and accepted by the center.",
            ["agreement", "modality"],
            buckets=_SLOW,
            registry=r,
        )
        self.deidentify = Histogram(
            "radbridge_edge_deidentify_seconds",
            "De-identification time per instance.",
            ["agreement"],
            buckets=_FAST,
            registry=r,
        )
        self.forward_failures = Counter(
            "radbridge_edge_forward_failures_total",
            "Forward attempts that failed and were scheduled for retry.",
            ["agreement", "reason"],
            registry=r,
        )
        self.clock_steps_back = Counter(
            "radbridge_edge_clock_steps_back_total",
            "Steps back of the wall clock the outboxes noticed (each moved its waits back).",
            registry=r,
        )
        self.active_associations = Gauge(
            "radbridge_edge_active_associations",
            "DICOM associations open right now.",
            registry=r,
        )
        self.disk_free = Gauge(
            "radbridge_edge_store_free_bytes",
            "Free bytes on the store's file system.",
            registry=r,
        )
        self.outbox_depth = Gauge(
            "radbridge_edge_outbox_studies",
            "Studies waiting to be forwarded, by state.",
            ["state"],
            registry=r,
        )
        self.outbox_oldest = Gauge(
            "radbridge_edge_outbox_oldest_seconds",
            "Age of the oldest study not yet forwarded (receiving or blocked); 0 when none.",
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "radbridge_edge_certificate_expiry_timestamp_seconds",
            "When the edge's own TLS certificate (DICOM TLS / STOW-RS) expires (Unix time).",
            registry=r,
        )
        self.delivery = Histogram(
            "radbridge_edge_delivery_seconds",
            "Result object ready at the center -> stored at the hospital PACS.",
            ["agreement", "priority"],
            buckets=_SLOW,
            registry=r,
        )
        self.turnaround = Histogram(
            "radbridge_edge_turnaround_seconds",
            "Study's first instance received at the edge -> its result stored at the PACS.",
            ["agreement", "priority"],
            buckets=with_sla_bounds(_SLOW, agreements),
            registry=r,
        )
        self.deliveries = Gauge(
            "radbridge_edge_deliveries",
            "Result deliveries to the hospital PACS, by state (pending, delivered, dead).",
            ["state"],
            registry=r,
        )
        self.transfer_persons = Gauge(
            "radbridge_edge_transfer_persons",
            "Distinct persons whose data left the hospital this calendar year (all of its "
            "agreements), as the agreement's ceiling counts them.",
            ["agreement"],
            registry=r,
        )
        self.transfer_persons_ceiling = Gauge(
            "radbridge_edge_transfer_persons_ceiling",
            "The agreement's yearly person ceiling: counted persons must stay below it.",
            ["agreement"],
            registry=r,
        )
        self.delivery_failures = Counter(
            "radbridge_edge_delivery_failures_total",
            "Result delivery failures, by reason (pacs_refused, pacs_unreachable, center, "
            "reidentification, expired).",
            ["agreement", "reason"],
            registry=r,
        )


class RayMirrored:
    """A prometheus-client metric whose every update also goes to a Ray metric of the same
    name, labels and buckets (``ray.util.metrics``).

    Each Serve replica keeps its own prometheus-client registry, so its /metrics shows that
    replica alone; Ray's per-node metrics agent collects the Ray metrics of every replica on
    the node (one series per worker, label ``WorkerId``), so one scrape per node sees them all
    and ``sum`` adds the replicas up. Ray exports them as ``ray_<name>``; the Kubernetes scrape
    renames them back (k8s/monitoring). Callback gauges (``set_function``) are pushed to Ray by
    :meth:`CenterMetrics.refresh`.
    """

    def __init__(self, prom: Any) -> None:
        from ray.util import metrics as ray_metrics

        self.prom = prom
        self._labelnames: tuple[str, ...] = tuple(prom._labelnames)
        self._function: Callable[[], float] | None = None
        kind, name, doc = prom._type, prom._name, prom._documentation
        tags = self._labelnames or None
        if kind == "counter":  # prometheus-client keeps the name without _total; Ray adds it
            self.ray: Any = ray_metrics.Counter(name, description=doc, tag_keys=tags)
        elif kind == "histogram":
            bounds = [b for b in prom._upper_bounds if b != float("inf")]
            self.ray = ray_metrics.Histogram(
                name, description=doc, boundaries=bounds, tag_keys=tags
            )
        elif kind == "gauge":
            self.ray = ray_metrics.Gauge(name, description=doc, tag_keys=tags)
        else:
            raise TypeError(f"{name}: no Ray mirror for a {kind}")

    def labels(self, *values: str) -> _MirroredChild:
        tags = dict(zip(self._labelnames, (str(v) for v in values), strict=True))
        return _MirroredChild(self.prom.labels(*values), self.ray, tags)

    def inc(self, amount: float = 1.0) -> None:
        _MirroredChild(self.prom, self.ray, {}).inc(amount)

    def observe(self, value: float) -> None:
        _MirroredChild(self.prom, self.ray, {}).observe(value)

    def set(self, value: float) -> None:
        _MirroredChild(self.prom, self.ray, {}).set(value)

    def set_function(self, function: Callable[[], float]) -> None:
        self.prom.set_function(function)
        self._function = function

    def refresh(self) -> None:
        """Push a callback gauge's current value to Ray."""
        if self._function is not None:
            self.ray.set(float(self._function()))


class _MirroredChild:
    def __init__(self, prom: Any, ray: Any, tags: dict[str, str]) -> None:
        self.prom, self.ray, self.tags = prom, ray, tags or None

    def inc(self, amount: float = 1.0) -> None:
        self.prom.inc(amount)
        if amount:
            self.ray.inc(amount, tags=self.tags)

    def observe(self, value: float) -> None:
        self.prom.observe(value)
        self.ray.observe(value, tags=self.tags)

    def set(self, value: float) -> None:
        self.prom.set(value)
        self.ray.set(value, tags=self.tags)


class CenterMetrics:
    """Metrics of the center's ingress (served at the Serve app's /metrics).

    ``mirror_to_ray`` (in a Serve replica): every metric is also a Ray metric
    (:class:`RayMirrored`), so the replicas of the Api add up at each node's metrics agent.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, mirror_to_ray: bool = False
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "radbridge_center_instances_received_total",
            "De-identified instances accepted over STOW-RS.",
            ["agreement", "modality"],
            registry=r,
        )
        self.preprocess = Histogram(
            "radbridge_center_preprocess_seconds",
            "Pixel decoding + MONAI preprocessing per instance.",
            ["model", "modality"],
            buckets=_FAST,
            registry=r,
        )
        self.inference = Histogram(
            "radbridge_center_inference_seconds",
            "ONNX Runtime run time of the batch an instance was part of.",
            ["model", "version", "batch", "provider"],
            buckets=_FAST,
            registry=r,
        )
        self.postprocess = Histogram(
            "radbridge_center_postprocess_seconds",
            "Thresholding and result assembly per instance.",
            ["model"],
            buckets=_FAST,
            registry=r,
        )
        self.job = Histogram(
            "radbridge_center_job_seconds",
            "Study complete at the center -> all results stored.",
            ["agreement", "modality"],
            buckets=_SLOW,
            registry=r,
        )
        self.end_to_end = Histogram(
            "radbridge_end_to_end_seconds",
            "First instance received at the edge -> result available at the center.",
            ["agreement", "modality", "priority"],
            buckets=_SLOW,
            registry=r,
        )
        self.queue_wait = Histogram(
            "radbridge_center_queue_wait_seconds",
            "Wait in the ModelRunner's priority gate before an instance entered the batcher.",
            ["model", "version", "priority"],
            buckets=(*_FAST, 10.0, 30.0, 120.0),
            registry=r,
        )
        self.batch_size = Histogram(
            "radbridge_center_batch_size",
            "Size of the batch each inference request ran in.",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.request = Histogram(
            "radbridge_center_request_seconds",
            "One inference request, received -> answered (sync endpoint) or result saved (study).",
            ["model", "version", "priority", "path"],
            buckets=(*_FAST, 10.0, 30.0, 120.0),
            registry=r,
        )
        self.provider_info = Gauge(
            "radbridge_center_model_provider_info",
            "1 for the ONNX Runtime execution provider that actually ran a model version.",
            ["model", "version", "provider"],
            registry=r,
        )
        self.rejected = Counter(
            "radbridge_center_rejected_total",
            "Requests answered 503 + Retry-After because a bounded queue was full.",
            ["endpoint", "priority"],
            registry=r,
        )
        self.refused = Counter(
            "radbridge_center_refused_requests_total",
            "Requests refused at the trust boundary: unauthenticated (401), forbidden (403: "
            "role), other_agreement (404: an agreement the caller may not act for).",
            ["reason"],
            registry=r,
        )
        self.backlog = Gauge(
            "radbridge_center_backlog_instances",
            "Instances of queued or running study jobs (the bound of STOW-RS admission).",
            registry=r,
        )
        self.store_free = Gauge(
            "radbridge_center_store_free_bytes",
            "Free bytes on the file system of the center's store.",
            registry=r,
        )
        self.certificate_expiry = Gauge(
            "radbridge_center_certificate_expiry_timestamp_seconds",
            "When the center's TLS server certificate (Serve's proxy) expires (Unix time).",
            registry=r,
        )
        self.store_bytes = Gauge(
            "radbridge_center_store_bytes",
            "Bytes the center's store holds per agreement (images and result objects), as of "
            "the last retention pass.",
            ["agreement"],
            registry=r,
        )
        self.shadow = Counter(
            "radbridge_center_shadow_results_total",
            "Shadow-version results recorded, by whether every finding's call agreed.",
            ["model", "version", "shadow_version", "agree"],
            registry=r,
        )
        self.shadow_diff = Histogram(
            "radbridge_center_shadow_abs_diff",
            "Largest |probability difference| between the answering and the shadow version.",
            ["model", "version", "shadow_version"],
            buckets=(0.001, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.prepared = Counter(
            "radbridge_center_prepared_series_total",
            "Series segmented ahead of their job on an edge's hint, by outcome: started, used "
            "by the job, unused (dropped, or the study changed), skipped (the replica had job "
            "work, or prepare_ahead is off).",
            ["outcome"],
            registry=r,
        )
        self.jobs = Counter(
            "radbridge_center_jobs_total",
            "Inference jobs finished, by outcome.",
            ["agreement", "outcome"],
            registry=r,
        )
        self._mirrored: list[RayMirrored] = []
        if mirror_to_ray:
            for attr, value in list(vars(self).items()):
                if isinstance(value, Counter | Gauge | Histogram):
                    mirrored = RayMirrored(value)
                    setattr(self, attr, mirrored)
                    self._mirrored.append(mirrored)

    def refresh(self) -> None:
        """Push callback gauges (free bytes of the store) to Ray; the health check calls it."""
        for mirrored in self._mirrored:
            mirrored.refresh()

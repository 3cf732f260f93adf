"""The edge gateway process: SCP + outbox forwarder + result delivery + /metrics, from settings."""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable

from prometheus_client import start_http_server

from dicom_io.association_counts import AssociationCounts
from dicom_io.consent import ConsentRegister
from dicom_io.deid.ocr import tesseract
from dicom_io.delivery import Deliverer
from dicom_io.forwarder import Forwarder
from dicom_io.ingest import Ingestor, Pending
from dicom_io.person_ledger import PersonLedger
from dicom_io.purge_requests import PurgeOutbox
from dicom_io.receivers import Receivers
from dicom_io.scp import StorageSCP
from dicom_io.store import DurableStore
from dicom_io.stow_server import StowServer, build_stow_app
from dicom_io.structure import Limits
from dicom_io.tls import server_context
from radbridge.agreements import AgreementSet, load_agreements
from radbridge.audit import AuditTrail
from radbridge.contract import center_client
from radbridge.db.agreements import sync_agreements
from radbridge.db.engine import Database
from radbridge.identity import prepare_local_identity
from radbridge.metrics import EdgeMetrics
from radbridge.pki import certificate_expiry
from radbridge.settings import Settings
from radbridge.signing import ResultVerifier, load_center_keys

__all__ = ["Gateway", "quiet_value_echoing_warnings", "receive_path"]

log = logging.getLogger("radbridge.edge")
# Unnamed files made ahead for the receive path (dicom_io.spare_files): a few, one per
# association writing at once is plenty; each is an open descriptor and an empty inode.
SPARE_FILES = 4


def quiet_value_echoing_warnings() -> None:
    """pydicom's validation warnings quote element values (names, IDs): keep them out of logs.

    Our own code decides what is valid (``header.parse_header``) and never logs values.
    """
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def receive_path(
    settings: Settings,
    db: Database | None,
    store: DurableStore,
    agreements: Callable[[], AgreementSet],
    metrics: EdgeMetrics,
    *,
    index: Callable[[list[Pending]], None] | None = None,
    counts: AssociationCounts | None = None,
) -> tuple[Ingestor, StorageSCP]:
    """The Ingestor and the SCP in front of it, from the edge's settings: the gateway's, and
    each receiving process's (``dicom_io.receivers``; ``counts`` shared: the port is too;
    ``index``: the gateway process's index, reached over ``dicom_io.index_link``)."""
    e = settings.edge
    ingestor = Ingestor(
        db,
        store,
        max_instance_bytes=e.max_instance_bytes,
        limits=Limits(max_inflated_bytes=e.max_inflated_bytes, max_pixel_bytes=e.max_pixel_bytes),
        index=index,
    )
    scp = StorageSCP(
        e.ae_title,
        agreements,
        ingestor,
        metrics,
        max_associations=e.max_associations,
        max_pdu=e.max_pdu,
        acse_timeout_s=e.acse_timeout_s,
        dimse_timeout_s=e.dimse_timeout_s,
        network_timeout_s=e.network_timeout_s,
        counts=counts,
        reuse_port=counts is not None,
    )
    return ingestor, scp


class Gateway:
    """Owns every edge component; ``start()`` returns once the SCP listens."""

    def __init__(self, settings: Settings) -> None:
        quiet_value_echoing_warnings()
        self.settings = settings
        self.agreements: AgreementSet = load_agreements(settings.agreements_file)
        if any(a.deidentification.text_in_pixels != "off" for a in self.agreements.agreements):
            tesseract()  # ConfigError naming the setting, at start, not at the first image
        self.metrics = EdgeMetrics(agreements=self.agreements)  # SLAs: turnaround bounds
        self.db = Database(settings.edge_db_url)
        e = settings.edge
        self.store = DurableStore(
            settings.edge_store, min_free_bytes=e.min_free_bytes, spare_files=SPARE_FILES
        )
        self._tls_context = server_context(e.tls) if e.tls else None  # fails fast on bad files
        self.receivers: Receivers | None = None
        if e.receivers > 1:
            ids = [a.id for a in self.agreements.agreements]
            self.receivers = Receivers(settings, ids, e.receivers - 1)
        self.ingestor, self.scp = receive_path(
            settings,
            self.db,
            self.store,
            lambda: self.agreements,
            self.metrics,
            counts=self.receivers.counts if self.receivers else None,
        )
        self.stow: StowServer | None = None
        if e.stow_port:
            app = build_stow_app(
                lambda: self.agreements,
                self.ingestor,
                self.metrics,
                max_body_bytes=e.stow_max_body_bytes,
            )
            self.stow = StowServer(app, e.host, e.stow_port, e.tls if e.stow_tls else None)
        self.metrics.active_associations.set_function(lambda: self.scp.active_associations)
        self.metrics.disk_free.set_function(self.store.free_bytes)
        if e.tls is not None:
            self.metrics.certificate_expiry.set(certificate_expiry(e.tls.cert_file))
        prepare_local_identity(settings)  # local mode: a throwaway identity under data_dir/keys
        results = ResultVerifier(load_center_keys(settings.edge_center_keys_file))
        self.audit = AuditTrail(self.db, f"edge:{e.id}")
        self.forwarder = Forwarder(
            self.db,
            self.store,
            lambda: self.agreements,
            settings.edge.master_secret.get_secret_value(),
            center_client(settings),
            self.metrics,
            retry_base_s=settings.edge.retry_base_s,
            retry_max_s=settings.edge.retry_max_s,
            audit=self.audit,
            ledger=PersonLedger(
                self.db, settings.edge.master_secret.get_secret_value(), self.metrics, self.audit
            ),
            consent=ConsentRegister(
                self.db, settings.edge.master_secret.get_secret_value(), self.audit
            ),
            forward_early=settings.edge.forward_early,
        )
        self.ingestor.on_stored = self.forwarder.wake  # a new study's quiet period starts now
        self.purges = PurgeOutbox(
            self.db,
            center_client(settings),
            retry_base_s=e.retry_base_s,
            retry_max_s=e.retry_max_s,
            audit=self.audit,
        )
        self.deliverer = Deliverer(
            self.db,
            self.store,
            lambda: self.agreements,
            center_client(settings),
            e.ae_title,
            self.metrics,
            timeout_s=e.forward_timeout_s,
            retry_base_s=e.retry_base_s,
            retry_max_s=e.retry_max_s,
            max_age_s=e.delivery_max_age_s,
            wait_s=e.delivery_wait_s,
            results=results,
            edge_id=e.id,
            audit=self.audit,
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._metrics_server: object | None = None

    def start(self) -> None:
        e = self.settings.edge
        for agreement_id, digest in sync_agreements(self.db, self.agreements):
            self.audit.record(
                "agreements-changed", agreement_id=agreement_id, details={"sha256": digest}
            )
        leftovers = self.store.recover()
        reclaimed = self.forwarder.recover()
        redeliver = self.deliverer.recover()
        if leftovers or reclaimed or redeliver:
            log.info(
                "recovered %d staging files, %d claimed studies, %d deliveries in flight",
                leftovers,
                reclaimed,
                redeliver,
            )
        if e.metrics_port:
            server, _thread = start_http_server(
                e.metrics_port, addr=e.metrics_host, registry=self.metrics.registry
            )
            self._metrics_server = server
        if self.receivers is not None:
            # The other receiving processes first (each returns once it listens): until they
            # have imported and opened their stores they would take CPU from every
            # association this process had already accepted.
            self.receivers.start(self.metrics, self.ingestor.index_entries)
        self.scp.start(e.host, e.port)
        if self._tls_context is not None:
            assert e.tls is not None
            self.scp.start(e.host, e.tls.port, ssl_context=self._tls_context)
        if self.stow is not None:
            self.stow.start()
        for name, loop, interval in (
            ("radbridge-forwarder", self.forwarder.run, e.poll_interval_s),
            ("radbridge-delivery", self.deliverer.run, e.delivery_poll_s),
            ("radbridge-purges", self.purges.run, e.poll_interval_s),
        ):
            t = threading.Thread(target=loop, args=(self._stop, interval), name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "edge gateway %s listening on %s:%d, metrics on %s:%d, forwarding to %s",
            e.ae_title,
            e.host,
            e.port,
            e.metrics_host,
            e.metrics_port,
            self.settings.center_url,
        )

    def stop(self) -> None:
        self._stop.set()
        if self.receivers is not None:
            self.receivers.stop()
        self.scp.stop()
        if self.stow is not None:
            self.stow.stop()
        for t in self._threads:
            t.join(timeout=10)
            if t.is_alive():  # its step ignores stop: a bug, named so the next stop is quick
                log.error("%s did not stop within 10 s", t.name)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # type: ignore[attr-defined]
        self.forwarder.close()
        self.deliverer.close()
        self.purges.close()
        self.store.close()
        self.db.dispose()

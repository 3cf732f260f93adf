"""The edge's DICOM SCP: Verification and Storage, with per-agreement association policy.

The association is accepted only from a calling AE title owned by an active agreement and a
source address that agreement allows; otherwise A-ASSOCIATE-RJ with the standard reason
(PS3.8 9.3.4: rejected-permanent, service-user, 3 = calling AE title not recognized).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_io.ingest import Ingestor
from dicom_io.statuses import NOT_AUTHORIZED, SUCCESS, status_for
from radbridge.agreements import Agreement, AgreementSet
from radbridge.errors import RadbridgeError
from radbridge.metrics import EdgeMetrics, safe_label

__all__ = ["StorageSCP"]

log = logging.getLogger("radbridge.edge.scp")

REJECTED_PERMANENT, SERVICE_USER = 0x01, 0x01
NO_REASON, CALLING_AE_NOT_RECOGNIZED = 0x01, 0x03


class StorageSCP:
    """A pynetdicom AE serving C-ECHO and C-STORE for the agreements given."""

    def __init__(
        self,
        ae_title: str,
        agreements: Callable[[], AgreementSet],
        ingestor: Ingestor,
        metrics: EdgeMetrics,
        *,
        max_associations: int = 16,
        acse_timeout_s: float = 30.0,
        dimse_timeout_s: float = 60.0,
        network_timeout_s: float = 60.0,
    ) -> None:
        self._agreements = agreements
        self._ingestor = ingestor
        self._metrics = metrics
        self._by_assoc: weakref.WeakKeyDictionary[Association, Agreement] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = True
        ae.maximum_pdu_size = 0  # no limit on what we receive
        ae.maximum_associations = max_associations  # beyond: A-ASSOCIATE-RJ transient, 2/3/2
        ae.acse_timeout = acse_timeout_s
        ae.dimse_timeout = dimse_timeout_s
        ae.network_timeout = network_timeout_s
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax)
        self.ae = ae
        self._server: object | None = None

    def start(self, host: str, port: int) -> None:
        handlers: list = [  # type: ignore[type-arg]
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server = None

    @property
    def active_associations(self) -> int:
        return len(self.ae.active_associations)

    # -- handlers -------------------------------------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        # pynetdicom leaves Nagle's algorithm on, which stalls each C-STORE response ~40 ms.
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        assert primitive is not None
        calling = str(primitive.calling_ae_title).strip()
        agreement = self._agreements().for_calling_ae(calling)
        if agreement is None:
            log.warning("association rejected: calling AE %r has no active agreement", calling)
            self._metrics.associations_rejected.labels("calling_ae").inc()
            self._reject(assoc, CALLING_AE_NOT_RECOGNIZED)
            return
        address = assoc.requestor.address
        if not agreement.hospital.allows_ip(address):
            log.warning(
                "association rejected: %s is not an allowed source for agreement %s",
                address,
                agreement.id,
            )
            self._metrics.associations_rejected.labels("source_ip").inc()
            self._reject(assoc, NO_REASON)
            return
        with self._lock:
            self._by_assoc[assoc] = agreement

    @staticmethod
    def _reject(assoc: Association, diagnostic: int) -> None:
        assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, diagnostic)
        # As pynetdicom's own ACSE does: let the DUL flush the A-ASSOCIATE-RJ before the
        # connection is shut down, or the peer sees an abort instead of the reason.
        assoc.kill()

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        t0 = time.perf_counter()
        with self._lock:
            agreement = self._by_assoc.get(event.assoc)
        if agreement is None:  # cannot happen: policy runs before any DIMSE message
            return NOT_AUTHORIZED
        modality = "other"
        try:
            encoded = event.encoded_dataset(include_meta=True)
            outcome, header = self._ingestor.accept(
                agreement, encoded, str(event.request.AffectedSOPClassUID)
            )
            modality = safe_label(header.modality)
        except RadbridgeError as exc:
            return self._failed(agreement, exc, status_for(exc))
        self._metrics.instance_receive.labels(agreement.id, modality).observe(
            time.perf_counter() - t0
        )
        self._metrics.instances.labels(agreement.id, outcome).inc()
        return SUCCESS

    def _failed(self, agreement: Agreement, exc: RadbridgeError, status: int) -> int:
        reason = getattr(exc, "reason", type(exc).__name__)
        log.warning("C-STORE refused (agreement %s): 0x%04X %s", agreement.id, status, exc)
        self._metrics.instances.labels(agreement.id, safe_label(str(reason))).inc()
        return status

"""The edge's DICOM SCP: Verification and Storage, with per-agreement association policy.

The association is accepted only from a calling AE title owned by an active agreement, a source
address that agreement allows, the called AE title the hospital must use, over TLS with a known
client certificate when the agreement requires it, and within the hospital's association limit.
Otherwise A-ASSOCIATE-RJ with the standard result/source/reason (PS3.8 9.3.4 / 7.1.1.9):

| check | result, source, reason |
|---|---|
| calling AE title unknown or its agreement inactive | 1, 1, 3 calling AE not recognized |
| called AE title not the hospital's | 1, 1, 7 called AE not recognized |
| source address, TLS required, client certificate | 1, 1, 1 no reason given |
| hospital's max_associations reached | 2, 3, 2 local limit exceeded |
| edge.max_associations reached (pynetdicom) | 2, 3, 2 local limit exceeded |

Every transfer syntax pynetdicom knows is accepted and stored as received (store-and-forward
must not lose what a modality sent). Pixels are decoded only on demand (``dicom_io.pixels``);
the syntaxes with a decoder here are listed in docs/edge-conformance.md, and an instance without
one (video, JPEG XL, HTJ2K) is kept and forwarded but skipped by the models.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_io.dimse_statuses import NOT_AUTHORIZED, PROCESSING_FAILURE, SUCCESS, status_for
from dicom_io.ingest import Ingestor
from radbridge.agreements import Agreement, AgreementSet
from radbridge.errors import RadbridgeError
from radbridge.metrics import EdgeMetrics, safe_label

__all__ = ["StorageSCP"]

log = logging.getLogger("radbridge.edge.scp")

REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SERVICE_USER, SERVICE_PROVIDER_PRESENTATION = 0x01, 0x03
NO_REASON, CALLING_AE_NOT_RECOGNIZED, CALLED_AE_NOT_RECOGNIZED = 0x01, 0x03, 0x07
LOCAL_LIMIT_EXCEEDED = 0x02


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
        max_pdu: int = 262_144,
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
        self._open: dict[str, int] = {}  # agreement id -> accepted associations still open
        self._lock = threading.Lock()
        self.ae_title = ae_title
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = False  # checked per hospital in _on_requested
        ae.maximum_pdu_size = max_pdu  # 0: no limit on the P-DATA PDUs we receive
        ae.maximum_associations = max_associations  # beyond: A-ASSOCIATE-RJ transient, 2/3/2
        ae.acse_timeout = acse_timeout_s
        ae.dimse_timeout = dimse_timeout_s
        ae.network_timeout = network_timeout_s
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae = ae
        self._servers: list[object] = []

    def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on ``host:port``; with ``ssl_context`` the port speaks DICOM TLS.

        May be called twice (plain and TLS ports); both share the policy and the limits.
        """
        tls = ssl_context is not None
        handlers: list = [  # type: ignore[type-arg]
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested, [tls]),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        server = self.ae.start_server(
            (host, port), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
        self._servers.append(server)

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()  # type: ignore[attr-defined]
        self._servers.clear()

    @property
    def active_associations(self) -> int:
        return len(self.ae.active_associations)

    # -- handlers -------------------------------------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        # pynetdicom leaves Nagle's algorithm on, which stalls each C-STORE response ~40 ms.
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_requested(self, event: evt.Event, tls: bool) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        assert primitive is not None
        calling = str(primitive.calling_ae_title).strip()
        agreement = self._agreements().for_calling_ae(calling)
        if agreement is None:
            log.warning("association rejected: calling AE %r has no active agreement", calling)
            self._refuse(assoc, "calling_ae", CALLING_AE_NOT_RECOGNIZED)
            return
        hospital = agreement.hospital
        called = str(primitive.called_ae_title).strip()
        if called != (hospital.called_ae_title or self.ae_title):
            log.warning("association rejected: wrong called AE for agreement %s", agreement.id)
            self._refuse(assoc, "called_ae", CALLED_AE_NOT_RECOGNIZED)
            return
        address = assoc.requestor.address
        if not hospital.allows_ip(address):
            log.warning(
                "association rejected: %s is not an allowed source for agreement %s",
                address,
                agreement.id,
            )
            self._refuse(assoc, "source_ip", NO_REASON)
            return
        if hospital.require_tls and not tls:
            log.warning("association rejected: agreement %s requires DICOM TLS", agreement.id)
            self._refuse(assoc, "tls_required", NO_REASON)
            return
        if tls and hospital.tls_client_names:
            name = _peer_common_name(assoc)
            if name not in hospital.tls_client_names:
                log.warning(
                    "association rejected: client certificate not allowed for agreement %s",
                    agreement.id,
                )
                self._refuse(assoc, "client_cert", NO_REASON)
                return
        with self._lock:
            limit = hospital.max_associations
            if limit is not None and self._open.get(agreement.id, 0) >= limit:
                refused = True
            else:
                refused = False
                self._by_assoc[assoc] = agreement
                self._open[agreement.id] = self._open.get(agreement.id, 0) + 1
        if refused:
            log.warning("association rejected: agreement %s at its association limit", agreement.id)
            self._refuse(
                assoc,
                "agreement_limit",
                LOCAL_LIMIT_EXCEEDED,
                result=REJECTED_TRANSIENT,
                source=SERVICE_PROVIDER_PRESENTATION,
            )

    def _on_conn_close(self, event: evt.Event) -> None:
        with self._lock:
            agreement = self._by_assoc.pop(event.assoc, None)
            if agreement is not None:
                self._open[agreement.id] = max(self._open.get(agreement.id, 1) - 1, 0)

    def _refuse(
        self,
        assoc: Association,
        reason: str,
        diagnostic: int,
        *,
        result: int = REJECTED_PERMANENT,
        source: int = SERVICE_USER,
    ) -> None:
        self._metrics.associations_rejected.labels(reason).inc()
        assoc.acse.send_reject(result, source, diagnostic)
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
        except Exception as exc:  # never pynetdicom's 0xC211 with a traceback full of values
            log.error(
                "C-STORE failed (agreement %s): 0x%04X %s",
                agreement.id,
                PROCESSING_FAILURE,
                type(exc).__name__,
            )
            self._metrics.instances.labels(agreement.id, "processing_failure").inc()
            return PROCESSING_FAILURE
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


def _peer_common_name(assoc: Association) -> str | None:
    """The subject CN of the TLS client certificate, or None."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for attribute in rdn:
            if attribute[0] == "commonName":
                return str(attribute[1])
    return None

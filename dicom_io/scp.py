"""The edge's DICOM SCP: Verification and Storage, with per-agreement association policy.

Who may associate, and the A-ASSOCIATE-RJ each refusal gets, is ``dicom_io.association_policy``
(its table); this module adds the edge-wide association limit and the application context.

The protocol is radbridge's own lean acceptor (``dicom_io.upper_layer``, ``dimse_commands``):
one thread per association reads each PDU straight off the socket, a C-STORE's data set
fragments are joined once, and the answer goes as soon as the instance is durable. pynetdicom's
reactor polled with 1 ms sleeps on two threads per association and built a DIMSE message
object per PDU, which bounded one association at about 80 instances/s (`loadtests.ingest_bench
--profile`).
A peer that breaks the protocol gets an A-ABORT (source 2, with the reason) and a log line
naming the problem; a data set over ``max_instance_bytes`` is read to its end and discarded,
then refused 0xA701, so memory stays bounded by one instance.

Every transfer syntax pynetdicom knows is accepted and stored as received (store-and-forward
must not lose what a modality sent). Pixels are decoded only on demand (``dicom_io.pixels``);
the syntaxes with a decoder here are listed in docs/edge-conformance.md, and an instance without
one (video, JPEG XL, HTJ2K) is kept and forwarded but skipped by the models.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pynetdicom import ALL_TRANSFER_SYNTAXES
from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_io import upper_layer as ul
from dicom_io.association_counts import AssociationCounts, LocalCounts
from dicom_io.association_policy import (
    APPLICATION_CONTEXT_NOT_SUPPORTED,
    LOCAL_LIMIT_EXCEEDED,
    REJECTED_PERMANENT,
    REJECTED_TRANSIENT,
    SERVICE_PROVIDER_PRESENTATION,
    SERVICE_USER,
    Peer,
    Refusal,
    admit,
)
from dicom_io.dimse_commands import (
    C_ECHO_RQ,
    C_STORE_RQ,
    MAX_COMMAND,
    Command,
    file_meta,
    parse_command,
    response,
)
from dicom_io.dimse_statuses import PROCESSING_FAILURE, SUCCESS, status_for
from dicom_io.ingest import Ingestor
from radbridge.agreements import Agreement, AgreementSet
from radbridge.errors import DatasetError, ProtocolError, RadbridgeError
from radbridge.metrics import EdgeMetrics, safe_label

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["StorageSCP"]

log = logging.getLogger("radbridge.edge.scp")

VERIFICATION = "1.2.840.10008.1.1"
UNRECOGNIZED_OPERATION = 0x0211  # PS3.7 C.4.3: a command this provider does not perform
COMMAND, LAST = 0x01, 0x02  # message control header bits, PS3.8 E.2
# Connections over edge.max_associations are answered A-ASSOCIATE-RJ, a few at a time, each
# given this long to send its request; more than that at once are closed unread.
OVER_LIMIT_ANSWERED, OVER_LIMIT_READ_S = 8, 5.0
FLOOD_LOG_EVERY_S = 10.0  # one log line per this long for connections closed unread
ACCEPT_POLL_S = 0.25  # how soon stop() is noticed where shutdown() does not wake accept()


@dataclass
class _Association:
    """An accepted association: its agreement, counted open until released or gone."""

    agreement: Agreement
    contexts: dict[int, ul.PresentationContext]
    peer_max_pdu: int = 0  # the requestor's maximum length received; 0: no limit
    counted: bool = True


@dataclass
class _Message:
    """One DIMSE message being assembled from its PDVs."""

    context: ul.PresentationContext
    command_parts: list[bytes] = field(default_factory=list)
    command_size: int = 0
    command: Command | None = None
    data_parts: list[bytes] = field(default_factory=list)
    data_size: int = 0
    # A C-STORE's file meta and the running sha256 of meta + data set: hashed as each
    # fragment arrives (hashlib lets go of the GIL), while the peer is still sending.
    meta: bytes | None = None
    digest: _Hash | None = None


class StorageSCP:
    """The edge's C-ECHO and C-STORE acceptor for the agreements given, on one or more ports."""

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
        counts: AssociationCounts | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._agreements = agreements
        self._ingestor = ingestor
        self._metrics = metrics
        self._max_associations = max_associations
        # 0 means "no limit" on the wire; the receiver still bounds what it reads at once.
        self._max_pdu = max_pdu
        self._read_bound = max_pdu or 16 << 20
        self._acse_timeout = acse_timeout_s
        self._dimse_timeout = dimse_timeout_s
        self._network_timeout = network_timeout_s
        self._abstract_syntaxes = frozenset(
            {VERIFICATION} | {str(cx.abstract_syntax) for cx in AllStoragePresentationContexts}
        )
        self._transfer_syntaxes = frozenset(str(ts) for ts in ALL_TRANSFER_SYNTAXES)
        # Open associations per agreement and in all: this process's, or shared with the
        # gateway's other receiving processes (edge.receivers), which listen on the same port.
        self._counts: AssociationCounts = counts or LocalCounts()
        self._reuse_port = reuse_port
        self._connections: set[socket.socket] = set()  # every connection being served
        self._over_limit = 0  # of them, those over edge.max_associations (to be refused)
        self._flood_closed, self._flood_logged_at = 0, float("-inf")
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listeners: list[tuple[socket.socket, threading.Thread]] = []
        self.ae_title = ae_title

    def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on ``host:port``; with ``ssl_context`` the port speaks DICOM TLS.

        May be called twice (plain and TLS ports); both share the policy and the limits.
        """
        self._stopping.clear()
        listener = socket.create_server((host, port), backlog=64, reuse_port=self._reuse_port)
        listener.settimeout(ACCEPT_POLL_S)
        thread = threading.Thread(
            target=self._accept_loop,
            args=(listener, ssl_context),
            name=f"radbridge-scp-{port}",
            daemon=True,
        )
        thread.start()
        self._listeners.append((listener, thread))

    def stop(self) -> None:
        """Stop listening and cut every open association (the peer sees the connection close)."""
        self._stopping.set()
        for listener, thread in self._listeners:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept() now (Linux)
            thread.join(timeout=5)
            listener.close()
        self._listeners.clear()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    @property
    def active_associations(self) -> int:
        """Connections being served, under the limit (all receiving processes' when shared)."""
        return self._counts.connections

    # -- connections ----------------------------------------------------------------------

    def _note_flood(self) -> None:
        """Count a connection closed unread; one log line per ``FLOOD_LOG_EVERY_S``. Both
        listeners (plain and TLS) count under the lock, so no line loses a count."""
        now = time.monotonic()
        with self._lock:
            self._flood_closed += 1
            if now - self._flood_logged_at < FLOOD_LOG_EVERY_S:
                return
            closed, self._flood_closed, self._flood_logged_at = self._flood_closed, 0, now
        log.warning(
            "%d connections closed unread since the last line: edge.max_associations reached "
            "and %d more already waiting for their refusal",
            closed,
            OVER_LIMIT_ANSWERED,
        )

    def _accept_loop(self, listener: socket.socket, ssl_context: ssl.SSLContext | None) -> None:
        while not self._stopping.is_set():
            try:
                conn, address = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._stopping.is_set():
                    log.exception("the DICOM listener failed; no new associations")
                return
            counted = self._counts.connect(self._max_associations)
            if not counted and not self._answer_over_limit():
                # A flood past the limit gets no thread: closed unread (an A-ASSOCIATE-RJ
                # needs the request read first, which is what the flood would hold us to).
                self._metrics.associations_rejected.labels("edge_flood").inc()
                conn.close()
                self._note_flood()
                continue
            threading.Thread(
                target=self._serve,
                args=(conn, str(address[0]), ssl_context, counted),
                name="radbridge-association",
                daemon=True,
            ).start()

    def _answer_over_limit(self) -> bool:
        """Take one of the few places for connections over the limit, answered A-ASSOCIATE-RJ
        (local limit exceeded) once their request is read; False when all are taken."""
        with self._lock:
            if self._over_limit >= OVER_LIMIT_ANSWERED:
                return False
            self._over_limit += 1
            return True

    def _serve(
        self,
        conn: socket.socket,
        address: str,
        ssl_context: ssl.SSLContext | None,
        counted: bool,
    ) -> None:
        """One association, from the connection to its release or abort, on its own thread.
        ``counted``: under the edge's limit; otherwise it is refused once its request is read,
        which may take at most ``OVER_LIMIT_READ_S``."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(
            self._acse_timeout if counted else min(self._acse_timeout, OVER_LIMIT_READ_S)
        )
        with self._lock:
            self._connections.add(conn)
        association: _Association | None = None
        try:
            if ssl_context is not None:
                tls_conn = self._handshake(conn, ssl_context)
                if tls_conn is None:
                    return
                with self._lock:
                    self._connections.discard(conn)
                    self._connections.add(tls_conn)
                conn = tls_conn
            association = self._associate(conn, address, over_limit=not counted)
            if association is not None:
                self._exchange(conn, association)
        except ProtocolError as exc:
            log.warning("association aborted (%s): %s", _whose(association), exc)
            _send_quietly(conn, ul.abort_pdu(0x02, exc.reason))
        except TimeoutError:
            log.warning("association aborted (%s): the peer went silent", _whose(association))
            _send_quietly(conn, ul.abort_pdu(0x02, 0x00))
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            if not self._stopping.is_set():
                log.info("association ended (%s): %s", _whose(association), type(exc).__name__)
        finally:
            if association is not None:
                self._uncount(association)
            with self._lock:
                self._connections.discard(conn)
                if not counted:
                    self._over_limit -= 1
            if counted:
                self._counts.disconnect()
            conn.close()

    def _handshake(self, conn: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket | None:
        try:
            return context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.warning("DICOM TLS handshake refused: %s", type(exc).__name__)
            return None

    # -- association ----------------------------------------------------------------------

    def _associate(
        self, conn: socket.socket, address: str, *, over_limit: bool
    ) -> _Association | None:
        """Read the A-ASSOCIATE-RQ and answer it: RJ with the table's reason, or AC."""
        pdu_type, body = ul.read_pdu(conn, ul.MAX_ASSOCIATE_RQ)
        if pdu_type != ul.ASSOCIATE_RQ:
            raise ProtocolError(ul.UNEXPECTED_PDU, f"PDU 0x{pdu_type:02X} before A-ASSOCIATE-RQ")
        request = ul.parse_associate_rq(body)
        if over_limit:
            log.warning("association rejected: edge.max_associations reached")
            conn.sendall(
                ul.associate_rj(
                    REJECTED_TRANSIENT, SERVICE_PROVIDER_PRESENTATION, LOCAL_LIMIT_EXCEEDED
                )
            )
            return None
        tls = isinstance(conn, ssl.SSLSocket)
        peer = Peer(address, tls, _peer_common_name(conn) if tls else None)
        outcome = admit(request, peer, self._agreements(), self.ae_title, self._counts)
        if isinstance(outcome, Refusal):
            self._metrics.associations_rejected.labels(outcome.reason).inc()
            conn.sendall(ul.associate_rj(outcome.result, outcome.source, outcome.diagnostic))
            return None
        association = _Association(outcome, {}, peer_max_pdu=request.max_pdu)
        if request.application_context != ul.APPLICATION_CONTEXT:
            self._uncount(association)
            log.warning("association rejected: not the DICOM application context")
            conn.sendall(
                ul.associate_rj(REJECTED_PERMANENT, SERVICE_USER, APPLICATION_CONTEXT_NOT_SUPPORTED)
            )
            return None
        for context in request.contexts:
            if context.abstract_syntax not in self._abstract_syntaxes:
                context.result = ul.ABSTRACT_SYNTAX_NOT_SUPPORTED
                continue
            chosen = next(
                (ts for ts in context.transfer_syntaxes if ts in self._transfer_syntaxes), None
            )
            if chosen is None:
                context.result = ul.TRANSFER_SYNTAXES_NOT_SUPPORTED
                continue
            context.result, context.transfer_syntax = ul.ACCEPTANCE, chosen
            association.contexts[context.id] = context
        conn.sendall(ul.associate_ac(request, self._max_pdu))
        return association

    def _uncount(self, association: _Association) -> None:
        with self._lock:
            counted, association.counted = association.counted, False
        if counted:
            self._counts.close(association.agreement.id)

    # -- DIMSE ----------------------------------------------------------------------------

    def _exchange(self, conn: socket.socket, association: _Association) -> None:
        """P-DATA until A-RELEASE-RQ or A-ABORT; each complete request is answered at once."""
        message: _Message | None = None
        idle, busy = self._network_timeout, min(self._dimse_timeout, self._network_timeout)
        while True:
            conn.settimeout(busy if message is not None else idle)
            pdu_type, body = ul.read_pdu(conn, self._read_bound)
            if pdu_type == ul.RELEASE_RQ:
                if message is not None:
                    raise ProtocolError(ul.UNEXPECTED_PDU, "A-RELEASE-RQ inside a DIMSE message")
                self._uncount(association)  # freed before the RP: the peer may reconnect
                conn.sendall(ul.release_rp())
                return
            if pdu_type == ul.ABORT:
                return
            if pdu_type != ul.P_DATA_TF:
                raise ProtocolError(ul.UNEXPECTED_PDU, f"PDU 0x{pdu_type:02X} in an association")
            for context_id, control, fragment in ul.pdvs(body):
                message = self._fragment(message, association, context_id, control, fragment)
                if message.command is not None and (
                    not message.command.has_data_set or (not control & COMMAND and control & LAST)
                ):
                    self._answer(conn, association, message)
                    message = None

    def _fragment(
        self,
        message: _Message | None,
        association: _Association,
        context_id: int,
        control: int,
        fragment: memoryview,
    ) -> _Message:
        """Add one PDV to the message being assembled (PS3.8 E.2, PS3.7 8.1: the command's
        fragments, then the data set's, on one presentation context)."""
        context = association.contexts.get(context_id)
        if context is None:
            raise ProtocolError(
                ul.INVALID_PARAMETER, f"PDV on presentation context {context_id}, not accepted"
            )
        if control & ~(COMMAND | LAST):
            raise ProtocolError(ul.INVALID_PARAMETER, f"PDV control header 0x{control:02X}")
        if message is None:
            message = _Message(context)
        elif message.context.id != context_id:
            raise ProtocolError(ul.INVALID_PARAMETER, "a message's PDVs on two contexts")
        if control & COMMAND:
            if message.command is not None:
                raise ProtocolError(ul.UNEXPECTED_PDU, "a command fragment after the command")
            message.command_size += len(fragment)
            if message.command_size > MAX_COMMAND:
                raise ProtocolError(ul.INVALID_PARAMETER, "a command set over 64 KiB")
            message.command_parts.append(bytes(fragment))
            if control & LAST:
                message.command = parse_command(b"".join(message.command_parts))
                self._start_digest(message)
            return message
        if message.command is None or not message.command.has_data_set:
            raise ProtocolError(ul.UNEXPECTED_PDU, "a data set fragment without its command")
        message.data_size += len(fragment)
        if message.data_size <= self._ingestor.max_instance_bytes:
            message.data_parts.append(bytes(fragment))
            if message.digest is not None:
                message.digest.update(fragment)
        else:  # read to its end and refused then; memory stays bounded by one instance
            message.data_parts.clear()
            message.digest = None
        return message

    @staticmethod
    def _start_digest(message: _Message) -> None:
        """A C-STORE's file meta, and its hash begun, once its command is whole. Meta that
        cannot be built is left to ``_store``, which answers the failure."""
        command = message.command
        assert command is not None
        if command.field != C_STORE_RQ or not command.has_data_set:
            return
        try:
            message.meta = _file_meta(message)
        except RadbridgeError:
            return
        message.digest = hashlib.sha256(message.meta)

    def _answer(self, conn: socket.socket, association: _Association, message: _Message) -> None:
        command = message.command
        assert command is not None
        if command.field == C_ECHO_RQ:
            status = SUCCESS
        elif command.field == C_STORE_RQ:
            status = self._store(association.agreement, message)
        else:
            log.warning("DIMSE command 0x%04X refused: not a C-STORE or C-ECHO", command.field)
            status = UNRECOGNIZED_OPERATION
        rsp = response(command, status)
        # Each PDV within the requestor's maximum length (its 6-byte item header included).
        step = max(association.peer_max_pdu - 6, 2) if association.peer_max_pdu else len(rsp)
        pdus = [
            ul.p_data_tf(
                message.context.id,
                COMMAND | (LAST if at + step >= len(rsp) else 0),
                rsp[at : at + step],
            )
            for at in range(0, len(rsp), step)
        ]
        conn.sendall(b"".join(pdus))

    def _store(self, agreement: Agreement, message: _Message) -> int:
        t0 = time.perf_counter()
        command = message.command
        assert command is not None
        modality = "other"
        try:
            if message.data_size > self._ingestor.max_instance_bytes:
                raise DatasetError(
                    "instance_too_large",
                    f"instance of {message.data_size} bytes is over the limit of "
                    f"{self._ingestor.max_instance_bytes}",
                )
            meta = message.meta or _file_meta(message)
            encoded = b"".join((meta, *message.data_parts))
            message.data_parts.clear()
            digest = message.digest.hexdigest() if message.digest is not None else None
            outcome, header = self._ingestor.accept(
                agreement, encoded, command.sop_class_uid, sha256=digest
            )
            modality = safe_label(header.modality)
        except RadbridgeError as exc:
            return self._failed(agreement, exc, status_for(exc))
        except Exception as exc:  # never a traceback full of values
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


def _file_meta(message: _Message) -> bytes:
    """The Part 10 file meta of a C-STORE whose command is whole."""
    command = message.command
    assert command is not None
    return file_meta(
        command.sop_class_uid,
        command.sop_instance_uid,
        message.context.transfer_syntax,
        ul.IMPLEMENTATION_CLASS_UID,
        ul.IMPLEMENTATION_VERSION_NAME,
    )


def _whose(association: _Association | None) -> str:
    return f"agreement {association.agreement.id}" if association else "not associated"


def _send_quietly(conn: socket.socket, pdu: bytes) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(pdu)


def _peer_common_name(sock: socket.socket) -> str | None:
    """The subject CN of the TLS client certificate, or None."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for attribute in rdn:
            if attribute[0] == "commonName":
                return str(attribute[1])
    return None

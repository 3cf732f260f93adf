"""Storage SCU: Part 10 files (the demo sender) or one dataset (result delivery) to a peer.

TCP_NODELAY is set on every association, as the SCP does (Nagle stalls each response).
Every association is requested through :func:`associate`, which keeps a fast rejection a
rejection (see there).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import StoragePresentationContexts

from radbridge.errors import PeerError, PolicyError

__all__ = ["associate", "send_files", "store_dataset"]


def _nodelay(event: evt.Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(ae: AE, host: str, port: int, **kwargs: Any) -> Association:
    """``ae.associate(host, port, **kwargs)``, with a rejection read "too soon" kept a rejection.

    pynetdicom 3.0's requesting thread, once its reactor thread has sent the A-ASSOCIATE-RQ,
    checks that the socket is still connected. When the peer's A-ASSOCIATE-RJ arrives before
    that check runs (a peer that rejects at once, a loaded machine), the reactor has already
    closed the socket on it (PS3.8 AE-4), so the association reads as aborted and the RJ is
    left on the reactor's queue, unread. Here that RJ, the answer the peer actually sent, is
    taken as the association's answer: ``is_rejected`` and ``acceptor.primitive`` as when the
    thread wins the race. Only a rejection closes the socket on receipt, so only it can be lost
    this way.
    """
    assoc = ae.associate(host, port, **kwargs)
    if assoc.is_aborted and not assoc.is_rejected and assoc.acceptor.primitive is None:
        unread = list(assoc.dul.to_user_queue.queue)
        answer = next(
            (p for p in unread if isinstance(p, A_ASSOCIATE) and p.result in (0x01, 0x02)), None
        )
        if answer is not None:
            assoc.acceptor.primitive = answer
            assoc.is_aborted, assoc.is_rejected = False, True
    return assoc


def send_files(
    paths: Iterable[Path], host: str, port: int, calling_ae: str, called_ae: str
) -> list[int]:
    """C-STORE each file; returns the status of each (raises if the association fails)."""
    files = list(paths)
    ae = AE(ae_title=calling_ae)
    syntaxes = sorted(
        {str(dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in files}
    )
    for cx in StoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_requested_context(cx.abstract_syntax, syntaxes)
    assoc = associate(
        ae, host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
    )
    if not assoc.is_established:
        raise PolicyError(f"association with {called_ae}@{host}:{port} was not established")
    statuses = []
    try:
        for p in files:
            rsp = assoc.send_c_store(p)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        assoc.release()
    return statuses


def store_dataset(
    ds: Dataset, host: str, port: int, called_ae: str, calling_ae: str, timeout_s: float
) -> int:
    """C-STORE one dataset on its own association; returns the status the peer answered.

    The dataset's own transfer syntax is offered beside explicit and implicit VR little
    endian. Raises ``PeerError`` (``pacs_unreachable`` / ``pacs_refused``) when no status
    came back.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    own = ds.file_meta.TransferSyntaxUID
    if own not in syntaxes:
        syntaxes.insert(0, own)  # e.g. a compressed SEG: offered as it is, too
    ae.add_requested_context(ds.SOPClassUID, syntaxes)
    where = f"{called_ae}@{host}:{port}"
    try:
        assoc = associate(
            ae, host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
        )
    except (OSError, RuntimeError, ValueError) as exc:
        raise PeerError("pacs_unreachable", f"PACS {where}: {type(exc).__name__}") from None
    if assoc.is_rejected:
        raise PeerError("pacs_refused", f"PACS {where} rejected the association")
    if not assoc.is_established:
        raise PeerError("pacs_unreachable", f"PACS {where} unreachable (no association)")
    try:
        rsp = assoc.send_c_store(ds)
    except (ValueError, AttributeError, RuntimeError) as exc:
        raise PeerError(
            "pacs_refused",
            f"PACS {where} accepted no presentation context for the object ({type(exc).__name__})",
        ) from None
    finally:
        if assoc.is_established:
            assoc.release()
    status = rsp.get("Status")
    if status is None:
        raise PeerError(
            "pacs_unreachable", f"PACS {where} sent no C-STORE response (aborted or timeout)"
        )
    return int(status)

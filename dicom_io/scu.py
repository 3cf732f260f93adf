"""Storage SCU: Part 10 files (the demo sender) or one dataset (result delivery) to a peer.

TCP_NODELAY is set on every association, as the SCP does (Nagle stalls each response).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

from radbridge.errors import PeerError, PolicyError

__all__ = ["send_files", "store_dataset"]


def _nodelay(event: evt.Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
    assoc = ae.associate(
        host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
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
        assoc = ae.associate(
            host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)]
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

"""A Storage SCU: send Part 10 files over one association (TCP_NODELAY set)."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

from radbridge.errors import PolicyError

__all__ = ["send_files"]


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

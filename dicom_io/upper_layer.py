"""The DICOM upper layer protocol (PS3.8 9) as the edge's receiver speaks it: PDUs read from and
written to a socket, the A-ASSOCIATE-RQ parsed, the A-ASSOCIATE-AC / -RJ, A-RELEASE-RP and
A-ABORT built.

Only the acceptor's side: the edge never requests an association on this code (its SCU, towards
the hospital PACS, is pynetdicom's). Every length read from the wire is checked against what it
must fit in before anything is allocated, so a peer cannot make the receiver allocate more than
the maximum PDU it was told (plus the A-ASSOCIATE-RQ's own bound).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from radbridge.errors import ProtocolError

__all__ = [
    "ABORT",
    "APPLICATION_CONTEXT",
    "ASSOCIATE_AC",
    "ASSOCIATE_RJ",
    "ASSOCIATE_RQ",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "INVALID_PARAMETER",
    "MAX_ASSOCIATE_RQ",
    "P_DATA_TF",
    "RELEASE_RP",
    "RELEASE_RQ",
    "UNEXPECTED_PDU",
    "AssociateRequest",
    "PresentationContext",
    "abort_pdu",
    "associate_ac",
    "associate_rj",
    "p_data_tf",
    "parse_associate_rq",
    "pdvs",
    "read_pdu",
    "release_rp",
]

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# radbridge's own implementation class UID (a UUID-derived 2.25 UID) and version (SH, <= 16).
IMPLEMENTATION_CLASS_UID = "2.25.98668767838424346885169282053777277409"
IMPLEMENTATION_VERSION_NAME = "RADBRIDGE_1"
MAX_ASSOCIATE_RQ = 1 << 20  # 128 contexts x 64 transfer syntaxes fit many times over

# A-ABORT reasons (source 2, service provider), PS3.8 Table 9-26
UNEXPECTED_PDU, UNRECOGNIZED_PARAMETER, INVALID_PARAMETER = 0x02, 0x04, 0x06
UNRECOGNIZED_PDU = 0x01
# Presentation context results, PS3.8 Table 9-18
ACCEPTANCE, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 3, 4

_HEADER = struct.Struct(">BxI")
_ITEM = struct.Struct(">BxH")
_PDV = struct.Struct(">IBB")


@dataclass
class PresentationContext:
    """One proposed presentation context, and what the acceptor answers for it."""

    id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]
    result: int = ABSTRACT_SYNTAX_NOT_SUPPORTED
    transfer_syntax: str = ""  # the accepted one


@dataclass
class AssociateRequest:
    called_ae: str
    calling_ae: str
    application_context: str
    contexts: list[PresentationContext] = field(default_factory=list)
    max_pdu: int = 0  # the requestor's maximum length received; 0: no limit
    implementation_class_uid: str = ""
    raw_called_ae: bytes = b""
    raw_calling_ae: bytes = b""


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Exactly ``n`` bytes, or ConnectionError when the peer closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the peer closed the connection in the middle of a PDU")
        got += k
    return buf


def read_pdu(sock: socket.socket, max_body: int) -> tuple[int, bytearray]:
    """The next PDU's type and body. A body longer than ``max_body`` (the maximum PDU length
    this side announced, or the A-ASSOCIATE-RQ bound) is refused before it is read."""
    pdu_type, length = _HEADER.unpack(recv_exact(sock, _HEADER.size))
    if not ASSOCIATE_RQ <= pdu_type <= ABORT:
        raise ProtocolError(UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{pdu_type:02X}")
    limit = MAX_ASSOCIATE_RQ if pdu_type == ASSOCIATE_RQ else max_body
    if length > limit:
        raise ProtocolError(
            INVALID_PARAMETER, f"PDU of {length} bytes is over the maximum length of {limit}"
        )
    return pdu_type, recv_exact(sock, length)


def _text(raw: bytes | bytearray | memoryview) -> str:
    return bytes(raw).rstrip(b"\x00 ").lstrip(b" ").decode("ascii", "replace")


def _items(body: memoryview, start: int, what: str) -> Iterator[tuple[int, memoryview]]:
    offset = start
    while offset < len(body):
        if offset + _ITEM.size > len(body):
            raise ProtocolError(INVALID_PARAMETER, f"{what}: an item header runs past the end")
        item_type, length = _ITEM.unpack_from(body, offset)
        end = offset + _ITEM.size + length
        if end > len(body):
            raise ProtocolError(
                INVALID_PARAMETER, f"{what}: item 0x{item_type:02X} runs past the end"
            )
        yield item_type, body[offset + _ITEM.size : end]
        offset = end


def parse_associate_rq(body: bytearray) -> AssociateRequest:
    """PS3.8 9.3.2: the fixed fields, then the application context, presentation context and
    user information items. Items this side does not use (role selection, extended and user
    identity negotiation, asynchronous operations) are read past: not answering them declines
    them (PS3.7 D.3.3)."""
    view = memoryview(body)
    if len(view) < 68:
        raise ProtocolError(INVALID_PARAMETER, "A-ASSOCIATE-RQ shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", view, 0)
    if not version & 0x0001:
        raise ProtocolError(INVALID_PARAMETER, "A-ASSOCIATE-RQ without protocol version 1")
    request = AssociateRequest(
        called_ae=_text(view[4:20]),
        calling_ae=_text(view[20:36]),
        application_context="",
        raw_called_ae=bytes(view[4:20]),
        raw_calling_ae=bytes(view[20:36]),
    )
    for item_type, value in _items(view, 68, "A-ASSOCIATE-RQ"):
        if item_type == 0x10:
            request.application_context = _text(value)
        elif item_type == 0x20:
            request.contexts.append(_presentation_context(value))
        elif item_type == 0x50:
            for sub_type, sub in _items(value, 0, "user information"):
                if sub_type == 0x51:
                    if len(sub) != 4:
                        raise ProtocolError(INVALID_PARAMETER, "maximum length item not 4 bytes")
                    (request.max_pdu,) = struct.unpack(">I", sub)
                elif sub_type == 0x52:
                    request.implementation_class_uid = _text(sub)
        else:
            raise ProtocolError(
                UNRECOGNIZED_PARAMETER, f"A-ASSOCIATE-RQ item 0x{item_type:02X} is not defined"
            )
    if not request.application_context:
        raise ProtocolError(INVALID_PARAMETER, "A-ASSOCIATE-RQ without an application context")
    if not request.implementation_class_uid:
        raise ProtocolError(INVALID_PARAMETER, "A-ASSOCIATE-RQ without an implementation UID")
    return request


def _presentation_context(value: memoryview) -> PresentationContext:
    if len(value) < 4:
        raise ProtocolError(INVALID_PARAMETER, "presentation context item too short")
    context = PresentationContext(id=value[0], abstract_syntax="", transfer_syntaxes=[])
    if context.id % 2 == 0:
        raise ProtocolError(INVALID_PARAMETER, f"presentation context id {context.id} is even")
    for sub_type, sub in _items(value, 4, "presentation context"):
        if sub_type == 0x30:
            context.abstract_syntax = _text(sub)
        elif sub_type == 0x40:
            context.transfer_syntaxes.append(_text(sub))
        else:
            raise ProtocolError(
                UNRECOGNIZED_PARAMETER, f"presentation context sub-item 0x{sub_type:02X}"
            )
    if not context.abstract_syntax or not context.transfer_syntaxes:
        raise ProtocolError(
            INVALID_PARAMETER, "presentation context without abstract or transfer syntax"
        )
    return context


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM.pack(item_type, len(value)) + value


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return _HEADER.pack(pdu_type, len(body)) + body


def associate_ac(request: AssociateRequest, max_pdu: int) -> bytes:
    """PS3.8 9.3.3: the request's AE titles echoed, a result per proposed context (a context
    not accepted still carries one transfer syntax sub-item, not significant), and this side's
    maximum length, implementation class UID and version name."""
    contexts = b"".join(
        _item(
            0x21,
            bytes((c.id, 0, c.result, 0))
            + _item(0x40, _uid(c.transfer_syntax or c.transfer_syntaxes[0])),
        )
        for c in request.contexts
    )
    user = _item(
        0x50,
        _item(0x51, struct.pack(">I", max_pdu))
        + _item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
        + _item(0x55, IMPLEMENTATION_VERSION_NAME.encode("ascii")),
    )
    body = (
        struct.pack(">HH", 1, 0)
        + request.raw_called_ae
        + request.raw_calling_ae
        + bytes(32)
        + _item(0x10, _uid(APPLICATION_CONTEXT))
        + contexts
        + user
    )
    return _pdu(ASSOCIATE_AC, body)


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """PS3.8 9.3.4."""
    return _pdu(ASSOCIATE_RJ, bytes((0, result, source, reason)))


def release_rp() -> bytes:
    return _pdu(RELEASE_RP, bytes(4))


def abort_pdu(source: int = 0x02, reason: int = 0x00) -> bytes:
    """PS3.8 9.3.8; source 0 service user, 2 service provider (then ``reason`` is given)."""
    return _pdu(ABORT, bytes((0, 0, source, reason if source == 0x02 else 0)))


def pdvs(body: bytearray) -> Iterator[tuple[int, int, memoryview]]:
    """The presentation data values of a P-DATA-TF body: (context id, message control header,
    fragment), PS3.8 9.3.5 and E.2."""
    view = memoryview(body)
    offset = 0
    if not view:
        raise ProtocolError(INVALID_PARAMETER, "P-DATA-TF without a presentation data value")
    while offset < len(view):
        if offset + _PDV.size > len(view):
            raise ProtocolError(INVALID_PARAMETER, "PDV item header runs past the P-DATA-TF")
        length, context_id, control = _PDV.unpack_from(view, offset)
        end = offset + 4 + length
        if length < 2 or end > len(view):
            raise ProtocolError(INVALID_PARAMETER, f"PDV item length {length} does not fit")
        yield context_id, control, view[offset + _PDV.size : end]
        offset = end


def p_data_tf(context_id: int, control: int, fragment: bytes) -> bytes:
    """One P-DATA-TF holding one PDV."""
    return _pdu(P_DATA_TF, _PDV.pack(len(fragment) + 2, context_id, control) + fragment)

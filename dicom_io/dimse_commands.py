"""DIMSE command sets (PS3.7 6.3, 9.3.1, 9.3.5): the group 0000 elements, always Implicit VR
Little Endian, that the edge's receiver reads from a C-STORE-RQ or C-ECHO-RQ and writes in
its response; and the Part 10 file meta header written in front of a received data set.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dicom_io.upper_layer import INVALID_PARAMETER
from radbridge.errors import ProtocolError

__all__ = [
    "C_ECHO_RQ",
    "C_STORE_RQ",
    "NO_DATA_SET",
    "Command",
    "file_meta",
    "parse_command",
    "response",
]

C_STORE_RQ, C_ECHO_RQ = 0x0001, 0x0030
NO_DATA_SET = 0x0101
MAX_COMMAND = 1 << 16  # a command set is a few hundred bytes

_ELEMENT = struct.Struct("<HHI")
_AFFECTED_SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID = 0x0002, 0x0100, 0x0110
_DATA_SET_TYPE, _AFFECTED_SOP_INSTANCE = 0x0800, 0x1000


@dataclass(frozen=True)
class Command:
    field: int
    message_id: int
    has_data_set: bool
    sop_class_uid: str
    sop_instance_uid: str


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def parse_command(raw: bytes) -> Command:
    """The fields a C-STORE/C-ECHO provider needs; anything malformed aborts the association
    (the command set is not the peer's data, it is the protocol)."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(raw):
        if offset + _ELEMENT.size > len(raw):
            raise ProtocolError(INVALID_PARAMETER, "command set element header runs past its end")
        group, element, length = _ELEMENT.unpack_from(raw, offset)
        offset += _ELEMENT.size
        if group != 0x0000 or offset + length > len(raw):
            raise ProtocolError(
                INVALID_PARAMETER, "command set holds a non-command element or runs past its end"
            )
        values[element] = raw[offset : offset + length]
        offset += length
    try:
        field = struct.unpack("<H", values[_COMMAND_FIELD])[0]
        message_id = struct.unpack("<H", values[_MESSAGE_ID])[0]
        data_set_type = struct.unpack("<H", values[_DATA_SET_TYPE])[0]
    except (KeyError, struct.error) as exc:
        raise ProtocolError(
            INVALID_PARAMETER, "command set without command field, message id or data set type"
        ) from exc
    return Command(
        field=field,
        message_id=message_id,
        has_data_set=data_set_type != NO_DATA_SET,
        sop_class_uid=_uid(values.get(_AFFECTED_SOP_CLASS, b"")),
        sop_instance_uid=_uid(values.get(_AFFECTED_SOP_INSTANCE, b"")),
    )


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, tag, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def response(request: Command, status: int) -> bytes:
    """The response command set (C-STORE-RSP / C-ECHO-RSP: the request's field with bit 15)."""
    body = b"".join(
        (
            _element(_AFFECTED_SOP_CLASS, _uid_value(request.sop_class_uid)),
            _element(_COMMAND_FIELD, struct.pack("<H", request.field | 0x8000)),
            _element(0x0120, struct.pack("<H", request.message_id)),
            _element(_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
            _element(0x0900, struct.pack("<H", status)),
            _element(_AFFECTED_SOP_INSTANCE, _uid_value(request.sop_instance_uid))
            if request.sop_instance_uid
            else b"",
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, tag, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag, vr, len(value)) + value


def file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_class_uid: str,
    implementation_version: str,
) -> bytes:
    """Preamble, ``DICM`` and the file meta group (PS3.10 7.1, Explicit VR Little Endian) for a
    data set received over the network in ``transfer_syntax``."""
    version = implementation_version.encode("ascii")
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _uid_value(sop_class_uid)),
            _meta_element(0x0003, b"UI", _uid_value(sop_instance_uid)),
            _meta_element(0x0010, b"UI", _uid_value(transfer_syntax)),
            _meta_element(0x0012, b"UI", _uid_value(implementation_class_uid)),
            _meta_element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
        )
    )
    return bytes(128) + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<I", len(body))) + body

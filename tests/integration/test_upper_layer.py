"""The edge's own DICOM upper layer (dicom_io.upper_layer, dimse_commands, scp) against a peer
that writes its PDUs by hand on a loopback socket: what a broken or hostile SCU gets back.

The PDUs here are encoded independently of the code under test (PS3.8 9.3), so a mistake in
the receiver's codec is not mirrored by the test's. Interoperability with real peers (pynetdicom,
dcmtk storescu/dcmsend, Orthanc) is in test_scp, test_corpus, test_orthanc_peer and the
ingest benchmark.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from dicom_io.ingest import Ingestor
from dicom_io.scp import StorageSCP
from dicom_io.store import DurableStore
from radbridge.agreements import load_agreements
from radbridge.db import Database
from radbridge.db.tables import InstanceRow
from radbridge.metrics import EdgeMetrics
from tests.conftest import DX_STORAGE, REPO, free_port, make_instance, write_instance

VERIFICATION = "1.2.840.10008.1.1"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(value)) + value


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxI", kind, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode().ljust(16)


def associate_rq(
    contexts: list[tuple[int, str, list[str]]],
    *,
    calling: str = "DEMO_PACS",
    called: str = "RADBRIDGE",
    app_context: str = APP_CONTEXT,
    max_pdu: int = 16384,
    extra_items: bytes = b"",
) -> bytes:
    items = _item(0x10, app_context.encode())
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, t.encode()) for t in syntaxes)
        items += _item(0x20, bytes((cid, 0, 0, 0)) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4")
    items += _item(0x50, user) + extra_items
    return _pdu(0x01, struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32) + items)


def _uid(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def command(field: int, message_id: int, sop_class: str, sop_instance: str = "") -> bytes:
    """A command set, Implicit VR Little Endian, with its group length."""
    elements = [
        (0x0002, _uid(sop_class)),
        (0x0100, struct.pack("<H", field)),
        (0x0110, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", 0x0101 if field == 0x0030 else 0x0000)),
    ]
    if field == 0x0001:
        elements.insert(3, (0x0700, struct.pack("<H", 0)))
        elements.append((0x1000, _uid(sop_instance)))
    body = b"".join(struct.pack("<HHI", 0, tag, len(v)) + v for tag, v in elements)
    return struct.pack("<HHI", 0, 0, 4) + struct.pack("<I", len(body)) + body


def pdv(context_id: int, control: int, fragment: bytes) -> bytes:
    return struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment


class Peer:
    """A hand-written SCU on a loopback socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> tuple[int, bytes]:
        head = self._exact(6)
        kind, length = struct.unpack(">BxI", head)
        return kind, self._exact(length)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def associate(self, contexts: list[tuple[int, str, list[str]]], **kw: object) -> bytes:
        self.send(associate_rq(contexts, **kw))  # type: ignore[arg-type]
        kind, body = self.read()
        assert kind == 0x02, f"expected A-ASSOCIATE-AC, got PDU 0x{kind:02X} {body!r}"
        return body

    def status(self) -> int:
        """The Status (0000,0900) of the next response command."""
        kind, body = self.read()
        assert kind == 0x04
        fragment = body[6:]
        offset = 0
        while offset < len(fragment):
            _, tag, length = struct.unpack_from("<HHI", fragment, offset)
            if tag == 0x0900:
                return int(struct.unpack_from("<H", fragment, offset + 8)[0])
            offset += 8 + length
        raise AssertionError("no status in the response")


def context_results(ac_body: bytes) -> dict[int, tuple[int, str]]:
    """(result, transfer syntax) per presentation context id of an A-ASSOCIATE-AC."""
    out: dict[int, tuple[int, str]] = {}
    offset = 68
    while offset < len(ac_body):
        kind, length = struct.unpack_from(">BxH", ac_body, offset)
        value = ac_body[offset + 4 : offset + 4 + length]
        if kind == 0x21:
            ts_len = struct.unpack_from(">H", value, 6)[0]
            out[value[0]] = (value[2], value[8 : 8 + ts_len].rstrip(b"\x00").decode())
        offset += 4 + length
    return out


def user_items(ac_body: bytes) -> dict[int, bytes]:
    offset = 68
    while offset < len(ac_body):
        kind, length = struct.unpack_from(">BxH", ac_body, offset)
        if kind == 0x50:
            value, items, at = ac_body[offset + 4 : offset + 4 + length], {}, 0
            while at < len(value):
                sub, n = struct.unpack_from(">BxH", value, at)
                items[sub] = value[at + 4 : at + 4 + n]
                at += 4 + n
            return items
        offset += 4 + length
    raise AssertionError("no user information item")


@pytest.fixture
def edge(edge_db: Database, tmp_path: Path) -> Iterator[tuple[int, Database, Path]]:
    agreements = load_agreements(REPO / "radbridge/defaults/agreements.yaml")
    server = StorageSCP(
        "RADBRIDGE",
        lambda: agreements,
        Ingestor(edge_db, DurableStore(tmp_path / "store"), max_instance_bytes=1 << 20),
        EdgeMetrics(),
        max_pdu=16384,
    )
    port = free_port()
    server.start("127.0.0.1", port)
    yield port, edge_db, tmp_path / "store"
    server.stop()


EXPLICIT = str(ExplicitVRLittleEndian)


def test_contexts_are_answered_one_by_one(edge: tuple[int, Database, Path]) -> None:
    peer = Peer(edge[0])
    ac = peer.associate(
        [
            (1, VERIFICATION, ["1.2.840.10008.1.2"]),
            (3, DX_STORAGE, ["1.2.3.999", EXPLICIT]),  # first one it knows
            (5, "1.2.3.4.5.6", [EXPLICIT]),  # not a storage SOP class
            (7, DX_STORAGE, ["1.2.3.999"]),  # no transfer syntax it knows
        ]
    )
    results = context_results(ac)
    assert user_items(ac)[0x51] == struct.pack(">I", 16384)  # the receiver's maximum PDU
    assert results[1] == (0, "1.2.840.10008.1.2")
    assert results[3] == (0, EXPLICIT)
    assert results[5][0] == 3
    assert results[7][0] == 4
    peer.send(_pdu(0x04, pdv(1, 0x03, command(0x0030, 7, VERIFICATION))))
    assert peer.status() == 0x0000
    peer.send(_pdu(0x05, bytes(4)))
    assert peer.read() == (0x06, bytes(4))


def test_a_store_split_over_many_pdvs_is_stored(
    edge: tuple[int, Database, Path], tmp_path: Path
) -> None:
    port, db, store = edge
    ds = make_instance()
    path = write_instance(ds, tmp_path / "in.dcm")
    raw = path.read_bytes()
    data = raw[144 + int.from_bytes(raw[140:144], "little") :]
    peer = Peer(port)
    peer.associate([(1, DX_STORAGE, [EXPLICIT])])
    cmd = command(0x0001, 1, DX_STORAGE, str(ds.SOPInstanceUID))
    # the command in two fragments, then the data set in 4 KiB fragments, two PDVs per PDU
    peer.send(_pdu(0x04, pdv(1, 0x01, cmd[:20]) + pdv(1, 0x03, cmd[20:])))
    chunks = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    for i in range(0, len(chunks), 2):
        pair = chunks[i : i + 2]
        last = i + 2 >= len(chunks)
        body = b"".join(
            pdv(1, 0x02 if last and j == len(pair) - 1 else 0x00, c) for j, c in enumerate(pair)
        )
        peer.send(_pdu(0x04, body))
    assert peer.status() == 0x0000
    peer.send(_pdu(0x05, bytes(4)))
    assert peer.read()[0] == 0x06
    with db.session() as s:
        (row,) = s.scalars(select(InstanceRow)).all()
    stored = (store / row.path).read_bytes()
    assert stored.endswith(data) and stored[128:132] == b"DICM"
    assert (
        str(ds.SOPInstanceUID).encode()
        in stored[132 : 144 + int.from_bytes(stored[140:144], "little")]
    )


@pytest.mark.parametrize(
    ("name", "after_ac", "reason"),
    [
        ("unknown PDU type", _pdu(0x09, bytes(4)), 0x01),
        ("a second A-ASSOCIATE-RQ", associate_rq([(1, VERIFICATION, [EXPLICIT])]), 0x02),
        ("P-DATA on a context not accepted", _pdu(0x04, pdv(3, 0x03, b"\x00" * 8)), 0x06),
        ("data before its command", _pdu(0x04, pdv(1, 0x02, b"\x00" * 8)), 0x02),
        ("PDU over the maximum length", _pdu(0x04, bytes(16385)), 0x06),
        ("PDV running past its PDU", _pdu(0x04, struct.pack(">IBB", 999, 1, 3) + b"x"), 0x06),
        (
            "command set with a data element",
            _pdu(0x04, pdv(1, 0x03, b"\x08\x00\x18\x00" + bytes(4))),
            0x06,
        ),
    ],
)
def test_a_protocol_breach_is_aborted_with_its_reason(
    edge: tuple[int, Database, Path], name: str, after_ac: bytes, reason: int
) -> None:
    peer = Peer(edge[0])
    peer.associate([(1, VERIFICATION, [EXPLICIT])])
    peer.send(after_ac)
    kind, body = peer.read()
    assert (kind, body[2], body[3]) == (0x07, 0x02, reason), name
    assert peer.closed()


def test_a_wrong_application_context_is_rejected(edge: tuple[int, Database, Path]) -> None:
    peer = Peer(edge[0])
    peer.send(associate_rq([(1, VERIFICATION, [EXPLICIT])], app_context="1.2.3.4"))
    kind, body = peer.read()
    assert (kind, body[1], body[2], body[3]) == (0x03, 1, 1, 2)


def test_garbage_instead_of_an_association_request_is_aborted(
    edge: tuple[int, Database, Path],
) -> None:
    peer = Peer(edge[0])
    peer.send(_pdu(0x04, pdv(1, 0x03, b"x" * 8)))
    kind, body = peer.read()
    assert (kind, body[2], body[3]) == (0x07, 0x02, 0x02)
    truncated = Peer(edge[0])
    truncated.send(associate_rq([(1, VERIFICATION, [EXPLICIT])])[:40])
    truncated.sock.shutdown(socket.SHUT_WR)
    assert truncated.closed()  # nothing half-parsed is answered


def test_an_unsupported_command_gets_0211_and_the_association_goes_on(
    edge: tuple[int, Database, Path],
) -> None:
    peer = Peer(edge[0])
    peer.associate([(1, VERIFICATION, [EXPLICIT])])
    peer.send(_pdu(0x04, pdv(1, 0x03, command(0x0030, 1, VERIFICATION))))
    assert peer.status() == 0x0000
    find = bytearray(command(0x0030, 2, VERIFICATION))
    struct.pack_into("<H", find, find.index(struct.pack("<HHI", 0, 0x0100, 2)) + 8, 0x0020)
    peer.send(_pdu(0x04, pdv(1, 0x03, bytes(find))))  # C-FIND-RQ without an identifier
    assert peer.status() == 0x0211
    peer.send(_pdu(0x04, pdv(1, 0x03, command(0x0030, 3, VERIFICATION))))
    assert peer.status() == 0x0000


def test_an_instance_over_the_size_limit_is_read_to_its_end_and_refused(
    edge: tuple[int, Database, Path],
) -> None:
    """2 MiB of data set against max_instance_bytes of 1 MiB: 0xA701, nothing stored, and the
    association still answers the next request."""
    port, db, store = edge
    peer = Peer(port)
    peer.associate([(1, DX_STORAGE, [EXPLICIT])])
    peer.send(_pdu(0x04, pdv(1, 0x03, command(0x0001, 1, DX_STORAGE, "1.2.3.4"))))
    chunk = bytes(16000)
    for i in range(131):
        peer.send(_pdu(0x04, pdv(1, 0x02 if i == 130 else 0x00, chunk)))
    assert peer.status() == 0xA701
    with db.session() as s:
        assert s.scalars(select(InstanceRow)).all() == []
    assert not list(store.rglob("*.dcm"))
    peer.send(_pdu(0x05, bytes(4)))
    assert peer.read()[0] == 0x06


def test_a_response_fits_the_requestors_maximum_length(edge: tuple[int, Database, Path]) -> None:
    """A requestor that receives at most 32 bytes per P-DATA-TF gets the C-ECHO response in
    fragments of at most 26 bytes, the last one flagged, which join to the full command."""
    peer = Peer(edge[0])
    peer.associate([(1, VERIFICATION, [EXPLICIT])], max_pdu=32)
    peer.send(_pdu(0x04, pdv(1, 0x03, command(0x0030, 9, VERIFICATION))))
    parts, controls = [], []
    while not controls or not controls[-1] & 0x02:
        kind, body = peer.read()
        assert kind == 0x04 and len(body) <= 32
        length, context_id, control = struct.unpack_from(">IBB", body)
        assert length == len(body) - 4 and context_id == 1 and control & 0x01
        parts.append(body[6:])
        controls.append(control)
    assert len(parts) >= 3 and controls[:-1] == [0x01] * (len(parts) - 1)
    rsp = b"".join(parts)
    assert struct.unpack_from("<H", rsp, rsp.index(struct.pack("<HHI", 0, 0x0900, 2)) + 8) == (0,)

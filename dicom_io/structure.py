"""Check that a received Part 10 instance parses in full, before the edge acknowledges it.

The receive path stores the bytes as sent and parses only the header fields the index needs
(:mod:`dicom_io.header`); a data set truncated after those fields, with an element length that
runs past its container or with pixel data shorter than its own Rows × Columns says, would
otherwise be acknowledged (0x0000) and fail later, after the sender has forgotten it. So every
instance goes through :func:`check_structure` first — one walk over the encoded element
structure, decoding no values but the few pixel-module integers:

- the Part 10 preamble, ``DICM`` and the File Meta group (explicit VR little endian) with a
  Transfer Syntax UID;
- every element header (tag, VR, length) of the data set, in the encoding its transfer syntax
  declares (a sender that declares explicit VR and writes implicit VR is refused, as dcmtk
  refuses it), nested sequences and items with
  defined or undefined lengths and their delimiters, each length inside its container, the
  walk ending exactly at the end of the bytes; nesting depth bounded;
- a Deflated Explicit VR data set inflated through a bounded ``zlib.decompressobj`` loop
  (pydicom and pynetdicom inflate in one unbounded call: a 1000:1 bomb would take the memory);
- native Pixel Data: at least Rows × Columns × Frames × Samples × Bits Allocated / 8 bytes
  (YBR_FULL_422 at 2 samples); more is trailing padding, which readers drop;
- encapsulated Pixel Data: Basic Offset Table item, one or more fragment items of defined
  length, at least one fragment per frame, offsets that point at fragment starts, and the
  sequence delimiter;
- a pixel module (Rows, Columns) with its Pixel Data, so an instance cut off at an element
  boundary between the two is refused too;
- Rows × Columns × Frames × Samples × Bits Allocated within ``max_pixel_bytes`` before anything
  could decode it.

Each failure is a :class:`~radbridge.errors.DatasetError` whose ``reason`` the DIMSE and STOW
status tables map (``dicom_io.dimse_statuses``); messages name the element tag, never its value.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from radbridge.errors import DatasetError

__all__ = ["DEFLATED", "HEADER_TAGS", "Limits", "Walked", "check_structure"]

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
# Explicit VR little endian with native (not encapsulated) pixel data.
_NATIVE = frozenset({IMPLICIT_LITTLE, "1.2.840.10008.1.2.1", EXPLICIT_BIG, DEFLATED})

_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
# VRs with a 2-byte reserved field and a 4-byte length in explicit VR (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR"})
_LONG_VRS |= {b"UT", b"SV", b"UV"}
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN"}
    | {b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
# Top-level pixel-module elements read for the pixel data checks (US, or IS for frames).
_ROWS, _COLUMNS, _SAMPLES, _BITS = 0x00280010, 0x00280011, 0x00280002, 0x00280100
_FRAMES, _PHOTOMETRIC = 0x00280008, 0x00280004
_WANTED = frozenset({_ROWS, _COLUMNS, _SAMPLES, _BITS, _FRAMES, _PHOTOMETRIC})
_OTHER_PIXEL_DATA = frozenset({0x7FE00008, 0x7FE00009})  # Float / Double Float Pixel Data
# Top-level elements whose raw values the walk keeps for the index's header (dicom_io.header):
# Specific Character Set, SOP Class/Instance, Modality, Patient ID, Body Part Examined, Patient
# Identity Removed, Study/Series Instance UID, Number of Study Related Instances, Requested
# Procedure Priority; and that priority inside the Request Attributes Sequence's items.
HEADER_TAGS = frozenset(
    {0x00080005, 0x00080016, 0x00080018, 0x00080060, 0x00100020, 0x00180015, 0x00120062}
    | {0x0020000D, 0x0020000E, 0x00201208, 0x00401003}
)
_REQUEST_ATTRIBUTES, _REQUESTED_PRIORITY = 0x00400275, 0x00401003
_MAX_DEPTH = 32


@dataclass(frozen=True)
class Limits:
    """Bounds on what one instance may make the edge hold in memory."""

    max_inflated_bytes: int = 32 << 20  # a Deflated data set, inflated
    max_pixel_bytes: int = 1 << 30  # Rows × Columns × Frames × Samples × Bits Allocated / 8


@dataclass(frozen=True)
class Walked:
    """What the walk read on its way: the transfer syntax, the raw top-level values of
    ``HEADER_TAGS`` (duplicates: the last), and each Requested Procedure Priority found in an
    item of the Request Attributes Sequence."""

    transfer_syntax: str
    values: dict[int, bytes]
    request_priorities: list[bytes]


@dataclass
class _Walk:
    buf: bytes | memoryview
    implicit: bool
    little: bool
    pixel: dict[int, bytes] = field(default_factory=dict)  # top-level pixel-module values
    header: dict[int, bytes] = field(default_factory=dict)  # top-level HEADER_TAGS values
    request_priorities: list[bytes] = field(default_factory=list)
    in_request_attributes: bool = False
    pixel_data: tuple[int, int, int] | None = None  # (vr code, value offset, length or -1)
    fragments: list[int] = field(default_factory=list)  # offsets of fragment items
    bot: bytes = b""
    other_pixels: bool = False  # Float or Double Float Pixel Data


def check_structure(encoded: bytes, limits: Limits | None = None) -> Walked:
    """Raise :class:`DatasetError` unless ``encoded`` (Part 10) parses in full; see module doc.
    Returns the values the index's header is read from, so the receive path walks once."""
    limits = limits or Limits()
    try:
        ts, start = _file_meta(encoded)
        body: bytes | memoryview = memoryview(encoded)[start:]
        if ts == DEFLATED:
            body = _inflate(bytes(body), limits.max_inflated_bytes)
        little = ts != EXPLICIT_BIG
        w = _Walk(body, implicit=ts == IMPLICIT_LITTLE, little=little)
        end = _dataset(w, 0, len(body), depth=0, top=True)
        if end != len(body):
            raise _malformed("an item or sequence delimiter outside any sequence")
        _check_pixels(w, native=ts in _NATIVE, limits=limits)
        return Walked(ts, w.header, w.request_priorities)
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise _malformed(f"element structure cannot be read ({type(exc).__name__})") from None


def _malformed(why: str) -> DatasetError:
    return DatasetError("malformed", f"data set does not parse in full: {why}")


def _file_meta(b: bytes) -> tuple[str, int]:
    """The Transfer Syntax UID and the offset where the data set starts."""
    if len(b) < 132 or b[128:132] != b"DICM":
        raise DatasetError("unparseable", "no Part 10 preamble and DICM prefix")
    pos, ts = 132, None
    while pos + 8 <= len(b):
        group, elem = struct.unpack_from("<HH", b, pos)
        if group != 0x0002:
            break
        vr = bytes(b[pos + 4 : pos + 6])
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", b, pos + 8)
            header = 12
        elif vr in _SHORT_VRS:
            (length,) = struct.unpack_from("<H", b, pos + 6)
            header = 8
        else:
            raise _malformed(f"File Meta element (0002,{elem:04X}) has no valid VR")
        if length == _UNDEFINED or pos + header + length > len(b):
            raise DatasetError(
                "truncated", f"File Meta element (0002,{elem:04X}) runs past the end"
            )
        if elem == 0x0010:
            ts = bytes(b[pos + header : pos + header + length]).rstrip(b"\0 ").decode("ascii")
        pos += header + length
    if not ts:
        raise DatasetError("unparseable", "File Meta has no Transfer Syntax UID")
    return ts, pos


def _inflate(data: bytes, limit: int) -> bytes:
    """Raw deflate (PS3.5 A.5) inflated in bounded steps; refused past ``limit`` bytes."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    out: list[bytes] = []
    size, pending = 0, data
    try:
        while pending or not d.eof:
            chunk = d.decompress(pending, 1 << 20)
            size += len(chunk)
            if size > limit:
                raise DatasetError(
                    "inflate_limit",
                    f"deflated data set inflates past the limit of {limit >> 20} MiB",
                )
            out.append(chunk)
            pending = d.unconsumed_tail
            if not chunk and not pending:
                break  # input exhausted before the end of the stream
    except zlib.error:
        raise _malformed("deflated data set is not a valid deflate stream") from None
    if not d.eof:
        raise DatasetError("truncated", "deflated data set ends before its deflate stream")
    return b"".join(out)


def _dataset(w: _Walk, pos: int, end: int, depth: int, top: bool = False) -> int:
    """Walk elements from ``pos``; returns the offset after the last one, or of a delimiter
    (for the caller of an undefined-length item to check)."""
    if depth > _MAX_DEPTH:
        raise _malformed(f"sequences nested deeper than {_MAX_DEPTH}")
    buf, little = w.buf, w.little
    u16, u32 = ("<H", "<L") if little else (">H", ">L")
    tag_fmt = "<HH" if little else ">HH"
    while pos < end:
        if end - pos < 8:
            raise DatasetError("truncated", "data set ends inside an element header")
        group, elem = struct.unpack_from(tag_fmt, buf, pos)
        tag = (group << 16) | elem
        if tag in (_ITEM_END, _SEQ_END):
            return pos
        if w.implicit:
            (length,) = struct.unpack_from(u32, buf, pos + 4)
            vr, header = b"", 8
        else:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise DatasetError("truncated", "data set ends inside an element header")
                (length,) = struct.unpack_from(u32, buf, pos + 8)
                header = 12
            elif vr in _SHORT_VRS:
                (length,) = struct.unpack_from(u16, buf, pos + 6)
                header = 8
            else:
                raise _malformed(f"element ({group:04X},{elem:04X}) has no valid VR")
        value = pos + header
        if tag == _ITEM:
            raise _malformed(f"an item outside a sequence at ({group:04X},{elem:04X})")
        if length == _UNDEFINED:
            if top and tag == _PIXEL_DATA and (w.implicit or vr in (b"OB", b"OW")):
                pos = _encapsulated(w, value, end)
            elif vr in (b"SQ", b"UN") or w.implicit:
                # An undefined-length UN holds implicit VR little endian (PS3.5 6.2.2).
                w.in_request_attributes = w.in_request_attributes or (
                    top and tag == _REQUEST_ATTRIBUTES
                )
                pos = _sequence(w, value, end, depth, implicit_items=vr == b"UN")
                if top:
                    w.in_request_attributes = False
            else:
                raise _malformed(f"element ({group:04X},{elem:04X}) has undefined length")
            continue
        if value + length > end:
            raise DatasetError(
                "truncated", f"element ({group:04X},{elem:04X}) runs past the end of its container"
            )
        if vr == b"SQ" or (w.implicit and _implicit_sequence(w, tag, value, length)):
            w.in_request_attributes = w.in_request_attributes or (
                top and tag == _REQUEST_ATTRIBUTES
            )
            if _sequence(w, value, value + length, depth, defined=True) != value + length:
                raise _malformed(f"sequence ({group:04X},{elem:04X}) ends inside an item")
            if top:
                w.in_request_attributes = False
        elif top:
            if tag in HEADER_TAGS:
                w.header[tag] = bytes(buf[value : value + length])
            if tag in _WANTED:
                w.pixel[tag] = bytes(buf[value : value + length])
            elif tag == _PIXEL_DATA:
                w.pixel_data = (0, value, length)
            elif tag in _OTHER_PIXEL_DATA:
                w.other_pixels = True
        elif depth == 1 and w.in_request_attributes and tag == _REQUESTED_PRIORITY:
            w.request_priorities.append(bytes(buf[value : value + length]))
        pos = value + length
    if pos != end:
        raise DatasetError("truncated", "data set ends inside an element")
    return pos


def _implicit_sequence(w: _Walk, tag: int, value: int, length: int) -> bool:
    """In implicit VR a defined-length SQ is known by its dictionary VR; a private one by its
    first item tag."""
    from pydicom.datadict import dictionary_VR

    try:
        if dictionary_VR(tag) == "SQ":
            return True
    except KeyError:
        pass
    if tag >> 16 & 1 and length >= 8:  # private: an SQ starts with an item tag
        group, elem = struct.unpack_from("<HH", w.buf, value)
        return ((group << 16) | elem) == _ITEM
    return False


def _sequence(
    w: _Walk,
    pos: int,
    end: int,
    depth: int,
    *,
    defined: bool = False,
    implicit_items: bool = False,
) -> int:
    """Items from ``pos``; returns the offset after the sequence (and its delimiter)."""
    tag_fmt, u32 = ("<HH", "<L") if w.little else (">HH", ">L")
    saved = (w.implicit, w.little)
    while True:
        if defined and pos == end:
            return pos
        if end - pos < 8:
            raise DatasetError("truncated", "data set ends inside a sequence")
        group, elem = struct.unpack_from(tag_fmt, w.buf, pos)
        tag = (group << 16) | elem
        (length,) = struct.unpack_from(u32, w.buf, pos + 4)
        if tag == _SEQ_END:
            if defined or length != 0:
                raise _malformed("misplaced sequence delimiter")
            return pos + 8
        if tag != _ITEM:
            raise _malformed(f"({group:04X},{elem:04X}) where a sequence item was expected")
        start = pos + 8
        if implicit_items:
            w.implicit, w.little = True, True
        try:
            if length == _UNDEFINED:
                stop = _dataset(w, start, end, depth + 1)
                if stop + 8 > end:
                    raise DatasetError("truncated", "item without its delimiter")
                group, elem = struct.unpack_from(tag_fmt, w.buf, stop)
                if (group << 16) | elem != _ITEM_END:
                    raise _malformed("item ends with a sequence delimiter")
                pos = stop + 8
            else:
                if start + length > end:
                    raise DatasetError("truncated", "an item runs past the end of its sequence")
                if _dataset(w, start, start + length, depth + 1) != start + length:
                    raise _malformed("a delimiter inside a defined-length item")
                pos = start + length
        finally:
            w.implicit, w.little = saved


def _encapsulated(w: _Walk, pos: int, end: int) -> int:
    """Basic Offset Table, fragments, delimiter (PS3.5 A.4); returns the offset after them."""
    first = True
    while True:
        if end - pos < 8:
            raise DatasetError("truncated", "encapsulated Pixel Data without its delimiter")
        group, elem, length = struct.unpack_from("<HHL", w.buf, pos)
        tag = (group << 16) | elem
        if tag == _SEQ_END:
            if first or length != 0:
                raise _malformed("encapsulated Pixel Data without a Basic Offset Table item")
            w.pixel_data = (1, pos, -1)
            return pos + 8
        if tag != _ITEM or length == _UNDEFINED:
            raise _malformed("encapsulated Pixel Data item is not a defined-length item")
        if pos + 8 + length > end:
            raise DatasetError("truncated", "a Pixel Data fragment runs past the end")
        if first:
            w.bot = bytes(w.buf[pos + 8 : pos + 8 + length])
            first = False
        else:
            w.fragments.append(pos)
        pos += 8 + length


def _check_pixels(w: _Walk, *, native: bool, limits: Limits) -> None:
    if w.pixel_data is None:
        # A pixel module without its Pixel Data: cut off at an element boundary in between.
        # (An image stripped of its whole pixel module, as test corpora are, still parses.)
        if not w.other_pixels and (_ROWS in w.pixel or _COLUMNS in w.pixel):
            raise DatasetError("pixel_module", "a pixel module without Pixel Data")
        return
    rows, cols = _us(w, _ROWS), _us(w, _COLUMNS)
    samples, bits = _us(w, _SAMPLES), _us(w, _BITS)
    frames = _frames(w)
    photometric = w.pixel.get(_PHOTOMETRIC, b"").rstrip(b"\0 ").decode("ascii", "replace")
    if not (rows and cols and bits and samples and photometric):
        raise DatasetError(
            "pixel_module",
            "Pixel Data without Rows, Columns, Bits Allocated, Samples per Pixel or "
            "Photometric Interpretation (Type 1 of the Image Pixel module)",
        )
    if photometric == "YBR_FULL_422":
        samples = 2  # two samples' worth of bytes per pixel (PS3.3 C.7.6.3.1.2)
    bits_total = rows * cols * frames * samples * bits
    expected = (bits_total + 7) // 8
    if expected > limits.max_pixel_bytes:
        raise DatasetError(
            "pixel_too_large",
            f"Rows × Columns × Frames × Samples × Bits Allocated is {expected >> 20} MiB, "
            f"over the limit of {limits.max_pixel_bytes >> 20} MiB",
        )
    kind, _, length = w.pixel_data
    if kind == 0:
        if not native:
            raise _malformed("native Pixel Data in an encapsulated transfer syntax")
        if length < expected:  # longer is trailing padding, which readers drop
            raise DatasetError(
                "pixel_length",
                f"Pixel Data is {length} bytes; Rows × Columns × Frames × Samples × "
                f"Bits Allocated make {expected}",
            )
        return
    if native:
        raise _malformed("encapsulated Pixel Data in a native transfer syntax")
    if len(w.fragments) < frames:
        raise DatasetError(
            "pixel_fragments", f"{frames} frames in {len(w.fragments)} Pixel Data fragments"
        )
    if w.bot:
        if len(w.bot) % 4:
            raise DatasetError("pixel_fragments", "Basic Offset Table length is not 4 × n")
        offsets = struct.unpack(f"<{len(w.bot) // 4}L", w.bot)
        base = w.fragments[0]
        starts = {f - base for f in w.fragments}
        if len(offsets) != frames or any(o not in starts for o in offsets):
            raise DatasetError(
                "pixel_fragments", "Basic Offset Table does not point at the frames' fragments"
            )


def _us(w: _Walk, tag: int) -> int:
    raw = w.pixel.get(tag, b"")
    if len(raw) < 2:
        return 0
    return int(struct.unpack("<H" if w.little else ">H", raw[:2])[0])


def _frames(w: _Walk) -> int:
    raw = w.pixel.get(_FRAMES)
    if raw is None:
        return 1
    text = raw.rstrip(b"\0 ").strip().decode("ascii", "replace")
    try:
        frames = int(text) if text else 1
    except ValueError:
        frames = 0
    if frames < 1:
        raise DatasetError("pixel_module", "Number of Frames is not a positive integer")
    return frames

"""Test data from pydicom-data and pydicom's own test files, and helpers to send it to the edge.

* ``storage_instances()``: every Part 10 storage instance of both collections, deduplicated.
* ``expected_status(path)``: the C-STORE status the edge must answer for a file, predicted
  from its header with rules written here, independently of ``dicom_io.header``.
* ``SYNTAX_CASES``: one grayscale sample per transfer syntax the edge must decode, with the
  reference its pixels must equal (lossless) or approach (lossy); samples that no collection
  holds are made here from an uncompressed image.
* ``running_edge`` / ``c_store_files``: a real ``StorageSCP`` on loopback, and a pynetdicom SCU
  that sends files exactly as they are encoded on disk.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import subprocess
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from unittest import mock

import numpy as np
import pydicom
import yaml
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.encaps import encapsulate
from pydicom.filereader import read_dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_io.ingest import Ingestor
from dicom_io.pixels import decode_frame
from dicom_io.scp import StorageSCP
from dicom_io.store import DurableStore
from radbridge.agreements import KNOWN_MODALITIES, AgreementSet, parse_agreements
from radbridge.db import Database, upgrade
from radbridge.db.agreements import sync_agreements
from radbridge.metrics import EdgeMetrics
from tests.conftest import free_port

__all__ = [
    "AGREEMENT_ID",
    "CALLED_AE",
    "CALLING_AE",
    "REQUIRED_SYNTAXES",
    "SYNTAX_CASES",
    "SyntaxCase",
    "all_modalities_agreements",
    "c_store_files",
    "corpus_id",
    "dataset_bytes",
    "expected_status",
    "native_reference",
    "network_cases",
    "running_edge",
    "storage_instances",
]

REPO = Path(__file__).resolve().parent.parent
CALLING_AE, CALLED_AE = "DEMO_PACS", "RADBRIDGE"
AGREEMENT_ID = "demo-hospital-to-center"
MAX_CONTEXTS = 128  # presentation contexts in one association (PS3.8: odd IDs 1..255)

SUCCESS, NOT_AUTHORIZED, SOP_CLASS_MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0x0124, 0xA900, 0xC000
TRUNCATED, MALFORMED, PIXEL_MISMATCH = 0xC001, 0xC002, 0xC003

STORAGE_SOP_CLASSES = frozenset(
    str(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax
)


# -- the corpus ---------------------------------------------------------------------------


def _candidate_files() -> list[Path]:
    """Every file of the pydicom-data distribution and of pydicom's test files."""
    found: set[Path] = set()
    for f in importlib.metadata.files("pydicom-data") or []:
        p = Path(str(f.locate()))
        if p.is_file():
            found.add(p.resolve())
    for name in get_testdata_files():  # pydicom's own, and pydicom-data's through its hook
        p = Path(name)
        if p.is_file():
            found.add(p.resolve())
    return sorted(found)


def _readable_storage_instance(path: Path) -> bool:
    try:
        ds = pydicom.dcmread(path, force=False)  # Part 10 only: preamble, DICM, file meta
    except Exception:
        return False
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        return False
    return str(ds.get("SOPClassUID", "")) in STORAGE_SOP_CLASSES


@functools.cache
def storage_instances() -> list[Path]:
    """Part 10 files with a Transfer Syntax UID and a storage SOP Class pynetdicom knows.

    Deduplicated by content: of identical files, the first by path is kept.
    """
    seen: set[str] = set()
    out = []
    for path in _candidate_files():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in seen or not _readable_storage_instance(path):
            continue
        seen.add(digest)
        out.append(path)
    return out


def corpus_id(path: Path) -> str:
    """A short, stable name: ``pydicom-data/<name>`` or ``pydicom/<path under test_files>``."""
    parts = path.parts
    if "test_files" in parts:
        return "pydicom/" + "/".join(parts[parts.index("test_files") + 1 :])
    return "pydicom-data/" + path.name


# -- what the edge must answer --------------------------------------------------------------


def _valid_uid(value: object) -> bool:
    """PS3.5 9.1: at most 64 characters, dot-separated numbers, no leading zeros."""
    if not isinstance(value, str):  # absent (None) or multi-valued (MultiValue)
        return False
    text = str(value).strip()
    if not text or len(text) > 64:
        return False
    for component in text.split("."):
        if not component or not (component.isascii() and component.isdigit()):
            return False
        if len(component) > 1 and component[0] == "0":
            return False
    return True


def expected_status(path: Path, modalities: frozenset[str] = KNOWN_MODALITIES) -> int:
    """The C-STORE status the edge must answer when this file is sent as it is on disk.

    Rules, in the edge's order:

    * 0xC002 when dcmtk's ``dcmdump`` (an independent parser) cannot read the file and meets a
      non-standard VR on the way, 0xC001 when it cannot for another reason (an element larger
      than the bytes left);
    * 0xC003 when pydicom cannot compute the pixel data's expected length from the pixel
      module, or native Pixel Data is shorter than it;
    * 0xC000 when the SOP Class, SOP Instance, Study Instance or Series Instance UID is
      missing, empty or not a valid UID;
    * 0xA900 when the request's Affected SOP Class UID differs from the dataset's SOP Class
      UID. ``c_store_files`` sends the encoded file as is, and pynetdicom then takes the
      Affected SOP Class from the file meta (0002,0002), not from the dataset;
    * 0x0124 when Modality is not one the agreement allows (``modalities``);
    * 0x0000 otherwise.
    """
    dcmtk = dcmtk_problem(path)
    if dcmtk is not None:
        return dcmtk
    if not _pixel_module_agrees(path):
        return PIXEL_MISMATCH
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not _valid_uid(ds.get(keyword)):
            return CANNOT_UNDERSTAND
    affected = str(ds.file_meta.get("MediaStorageSOPClassUID", "")).strip()
    if affected != str(ds.SOPClassUID).strip():
        return SOP_CLASS_MISMATCH
    modality = ds.get("Modality")
    if not isinstance(modality, str) or modality.strip() not in modalities:
        return NOT_AUTHORIZED
    return SUCCESS


@functools.cache
def dcmtk_problem(path: Path) -> int | None:
    """The status dcmtk's dcmdump predicts: None when it reads the file to its end."""
    done = subprocess.run(["dcmdump", str(path)], capture_output=True, timeout=60)
    if done.returncode == 0:
        return None
    return MALFORMED if b"Non-standard VR" in done.stderr + done.stdout else TRUNCATED


def _pixel_module_agrees(path: Path) -> bool:
    from pydicom.pixels.utils import get_expected_length

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        return True
    try:
        expected = int(get_expected_length(ds, unit="bytes"))
    except (AttributeError, ValueError, TypeError, KeyError):
        return False
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return True
    return len(ds.PixelData) >= expected


# -- encoded bytes ----------------------------------------------------------------------------


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after preamble and file meta: what a C-STORE of the file carries."""
    _, offset = split_dataset(path)
    with path.open("rb") as f:
        f.seek(offset)
        return f.read()


def native_reference(path: Path) -> np.ndarray:
    """Pixels of an uncompressed one-frame grayscale file read with numpy alone.

    The dataset after the file meta is inflated with zlib when deflated, parsed with the
    transfer syntax's VR and byte order, and Pixel Data taken as the raw integers it holds,
    then rescaled linearly: nothing of pydicom's pixel pipeline is involved. Only for
    BitsStored == BitsAllocated (no sign extension or masking needed).
    """
    tsuid = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    body = dataset_bytes(path)
    if tsuid == DeflatedExplicitVRLittleEndian:
        body = zlib.decompress(body, -zlib.MAX_WBITS)
    ds = read_dataset(BytesIO(body), tsuid.is_implicit_VR, tsuid.is_little_endian)
    rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    assert int(ds.BitsStored) == bits and int(ds.get("NumberOfFrames", 1) or 1) == 1
    order = "<" if tsuid.is_little_endian else ">"
    kind = "i" if int(ds.PixelRepresentation) else "u"
    raw = np.frombuffer(ds.PixelData, f"{order}{kind}{bits // 8}", count=rows * cols)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return (raw.reshape(rows, cols) * slope + intercept).astype(np.float32)


# -- samples of each transfer syntax ----------------------------------------------------------


def jpeg_lossless(image: np.ndarray, precision: int, predictor: int) -> bytes:
    """Encode a grayscale image as a JPEG Process 14 (lossless, Huffman) codestream.

    A minimal ITU-T T.81 Annex H encoder, so that the tests have lossless JPEG with every
    predictor (1-7), not only selection value 1 that the available encoders (GDCM) write.
    """
    assert image.ndim == 2 and 2 <= precision <= 16 and 1 <= predictor <= 7
    x = image.astype(np.int64)
    rows, cols = x.shape
    ra, rb, rc = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    ra[:, 1:], rb[1:, :], rc[1:, 1:] = x[:, :-1], x[:-1, :], x[:-1, :-1]
    pred = {
        1: ra,
        2: rb,
        3: rc,
        4: ra + rb - rc,
        5: ra + ((rb - rc) >> 1),
        6: rb + ((ra - rc) >> 1),
        7: (ra + rb) >> 1,
    }[predictor].copy()
    pred[0, :] = ra[0, :]  # first line: Ra
    pred[1:, 0] = rb[1:, 0]  # first column: Rb
    pred[0, 0] = 1 << (precision - 1)
    diff = (x - pred) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)  # -32767 .. 32768
    # One DC table: categories 0..16, every code five bits long (none is all ones).
    codes = []
    for d in diff.ravel().tolist():
        ssss = abs(d).bit_length()
        codes.append(format(ssss, "05b"))  # the category's Huffman code
        if 0 < ssss < 16:  # then its SSSS additional bits (none for 0 and for 32768)
            codes.append(format(d if d > 0 else d + (1 << ssss) - 1, f"0{ssss}b"))
    stream = "".join(codes)
    stream += "1" * (-len(stream) % 8)  # pad the last byte with 1-bits
    scan = int(stream, 2).to_bytes(len(stream) // 8, "big").replace(b"\xff", b"\xff\x00")

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof3 = (
        bytes([precision]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    )
    counts = bytes([0, 0, 0, 0, 17] + [0] * 11)
    dht = b"\x00" + counts + bytes(range(17))
    sos = bytes([1, 1, 0x00, predictor, 0, 0])
    return (
        b"\xff\xd8"
        + segment(0xC3, sof3)
        + segment(0xC4, dht)
        + segment(0xDA, sos)
        + scan
        + b"\xff\xd9"
    )


def _testdata(name: str) -> Path:
    return Path(str(get_testdata_file(name)))


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_jpeg_lossless(out: Path, syntax: UID = JPEGLossless, predictor: int = 7) -> Path:
    """MR_small.dcm (16-bit signed, values 127..2145) as JPEG lossless with ``predictor``."""
    ds = pydicom.dcmread(_testdata("MR_small.dcm"))
    stored = ds.pixel_array.view(np.uint16)  # the bit pattern the codestream carries
    ds.PixelData = encapsulate([jpeg_lossless(stored, int(ds.BitsStored), predictor)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    return _save(ds, out / f"MR_small_jpeg_lossless_{syntax}_p{predictor}.dcm")


def make_jpeg_baseline(out: Path) -> Path:
    """vlut_04.dcm (8-bit grayscale OT) as JPEG Baseline, encoded by GDCM.

    Every JPEG Baseline file of both collections is colour, which ``decode_frame`` refuses.
    """
    import gdcm  # python-gdcm

    src, dst = _testdata("vlut_04.dcm"), out / "vlut_04_jpeg_baseline.dcm"
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGBaselineProcess1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


def make_jpegls_near_lossless(out: Path, error: int = 3) -> Path:
    """MR_small.dcm as JPEG-LS near-lossless (pyjpegls), each pixel within ``error``."""
    ds = pydicom.dcmread(_testdata("MR_small.dcm"))
    ds.compress(JPEGLSNearLossless, jls_error=error)
    return _save(ds, out / f"MR_small_jpeg_ls_near_{error}.dcm")


def _decoded(path: Path) -> np.ndarray:
    return decode_frame(path.read_bytes())[0]


def _plugin(name: str) -> Callable[[Path], np.ndarray]:
    """Reference by a second decoder: lossless pixels must not depend on the plugin used."""

    def reference(path: Path) -> np.ndarray:
        ds = pydicom.dcmread(path)
        ds.pixel_array_options(decoding_plugin=name)
        return np.asarray(pydicom.pixels.apply_modality_lut(ds.pixel_array, ds), np.float32)

    return reference


@dataclass(frozen=True)
class SyntaxCase:
    """A grayscale sample of one transfer syntax and what its decoded pixels must match.

    ``sample(dir)`` returns the file (a collection file, or one it writes under ``dir``).
    ``reference(path)`` returns the expected float32 pixels. ``tolerance`` is ``None`` for
    bit-exact equality, else the largest mean absolute difference allowed as a fraction of the
    reference's range; ``max_error`` bounds every pixel's difference (JPEG-LS near-lossless).
    """

    id: str
    syntax: UID
    sample: Callable[[Path], Path]
    reference: Callable[[Path], np.ndarray]
    tolerance: float | None = None
    max_error: float | None = None


def _file(name: str) -> Callable[[Path], Path]:
    return lambda _dir: _testdata(name)


def _ref_file(name: str) -> Callable[[Path], np.ndarray]:
    return lambda _path: _decoded(_testdata(name))


# The first case of each syntax is the one sent over the network by the integration tests.
SYNTAX_CASES: list[SyntaxCase] = [
    SyntaxCase(
        "implicit-MR_small_implicit",
        ImplicitVRLittleEndian,
        _file("MR_small_implicit.dcm"),
        native_reference,
    ),
    SyntaxCase(
        "explicit-le-MR_small", ExplicitVRLittleEndian, _file("MR_small.dcm"), native_reference
    ),
    SyntaxCase(
        "deflated-image_dfl",
        DeflatedExplicitVRLittleEndian,
        _file("image_dfl.dcm"),
        native_reference,
    ),
    SyntaxCase(
        "explicit-be-MR_small_bigendian",
        ExplicitVRBigEndian,
        _file("MR_small_bigendian.dcm"),
        native_reference,
    ),
    SyntaxCase(
        "jpeg-baseline-vlut_04-gdcm",
        JPEGBaseline8Bit,
        make_jpeg_baseline,
        _ref_file("vlut_04.dcm"),
        tolerance=0.01,
    ),
    SyntaxCase(
        "jpeg-extended-JPGExtended",
        JPEGExtended12Bit,
        _file("JPGExtended.dcm"),
        _ref_file("JPEG-LL.dcm"),  # the lossless original of the same NM image
        tolerance=0.02,
    ),
    SyntaxCase(
        "jpeg-lossless-p7-MR_small",
        JPEGLossless,
        lambda d: make_jpeg_lossless(d, JPEGLossless, predictor=7),
        _ref_file("MR_small.dcm"),
    ),
    SyntaxCase(
        "jpeg-lossless-sv1-JPEG-LL",
        JPEGLosslessSV1,
        _file("JPEG-LL.dcm"),
        _plugin("pylibjpeg"),  # no uncompressed original in the collections
    ),
    SyntaxCase(
        "jpeg-ls-lossless-MR_small_jpeg_ls_lossless",
        JPEGLSLossless,
        _file("MR_small_jpeg_ls_lossless.dcm"),
        _ref_file("MR_small.dcm"),
    ),
    SyntaxCase(
        "jpeg-ls-near-lossless-MR_small-e3",
        JPEGLSNearLossless,
        make_jpegls_near_lossless,
        _ref_file("MR_small.dcm"),
        tolerance=0.01,
        max_error=3,
    ),
    SyntaxCase(
        "j2k-lossless-MR_small_jp2klossless",
        JPEG2000Lossless,
        _file("MR_small_jp2klossless.dcm"),
        _ref_file("MR_small.dcm"),
    ),
    SyntaxCase(
        "j2k-MR2_J2KI",
        JPEG2000,
        _file("MR2_J2KI.dcm"),
        _ref_file("MR2_UNCR.dcm"),  # the original; MR2_UNCI is the lossy one decoded
        tolerance=0.02,
    ),
    SyntaxCase(
        "rle-MR_small_RLE", RLELossless, _file("MR_small_RLE.dcm"), _ref_file("MR_small.dcm")
    ),
    # Further samples: other encoders, bit depths and predictors.
    SyntaxCase(
        "deflated-MR_small-pydicom",
        DeflatedExplicitVRLittleEndian,
        lambda d: _deflated(d, "MR_small.dcm"),
        _ref_file("MR_small.dcm"),
    ),
    SyntaxCase(
        "jpeg-lossless-sv1-MR_small",
        JPEGLosslessSV1,
        lambda d: make_jpeg_lossless(d, JPEGLosslessSV1, predictor=1),
        _ref_file("MR_small.dcm"),
    ),
    SyntaxCase(
        "jpeg-lossless-sv1-8bit-US",
        JPEGLosslessSV1,
        _file("JPGLosslessP14SV1_1s_1f_8b.dcm"),
        _plugin("pylibjpeg"),
    ),
    *[
        SyntaxCase(
            f"jpeg-lossless-p{p}-MR_small",
            JPEGLossless,
            functools.partial(make_jpeg_lossless, syntax=JPEGLossless, predictor=p),
            _ref_file("MR_small.dcm"),
        )
        for p in (1, 2, 3, 4, 5, 6)
    ],
    SyntaxCase(
        "jpeg-ls-lossless-emri_small",
        JPEGLSLossless,
        _file("emri_small_jpeg_ls_lossless.dcm"),
        _ref_file("emri_small.dcm"),
    ),
    SyntaxCase(
        "j2k-lossless-693_J2KR",
        JPEG2000Lossless,
        _file("693_J2KR.dcm"),
        _ref_file("693_UNCR.dcm"),
    ),
    SyntaxCase(
        "j2k-JPEG2000", JPEG2000, _file("JPEG2000.dcm"), _ref_file("JPEG-LL.dcm"), tolerance=0.03
    ),
    SyntaxCase(
        "rle-emri_small_RLE",
        RLELossless,
        _file("emri_small_RLE.dcm"),
        _ref_file("emri_small.dcm"),
    ),
]

REQUIRED_SYNTAXES: tuple[str, ...] = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


def _deflated(out: Path, name: str) -> Path:
    ds = pydicom.dcmread(_testdata(name))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return _save(ds, out / f"{Path(name).stem}_deflated.dcm")


def network_cases() -> list[SyntaxCase]:
    """The first case of each required syntax."""
    first: dict[str, SyntaxCase] = {}
    for case in SYNTAX_CASES:
        first.setdefault(str(case.syntax), case)
    return [first[s] for s in REQUIRED_SYNTAXES]


# -- the edge and a sender ------------------------------------------------------------------


def all_modalities_agreements() -> AgreementSet:
    """The default agreement, allowing every modality radbridge knows."""
    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text("utf-8"))
    raw["agreements"][0]["modalities"] = sorted(KNOWN_MODALITIES)
    agreements = parse_agreements(raw, source="all-modalities")
    assert agreements.agreements[0].id == AGREEMENT_ID
    return agreements


@dataclass
class Edge:
    port: int
    db: Database
    store: Path


@contextlib.contextmanager
def running_edge(db_url: str, store_dir: Path) -> Iterator[Edge]:
    """A migrated database, a StorageSCP on a free loopback port, every modality allowed."""
    agreements = all_modalities_agreements()
    upgrade(db_url, "edge")
    db = Database(db_url)
    sync_agreements(db, agreements)
    server = StorageSCP(
        CALLED_AE, lambda: agreements, Ingestor(db, DurableStore(store_dir)), EdgeMetrics()
    )
    port = free_port()
    server.start("127.0.0.1", port)
    try:
        yield Edge(port, db, store_dir)
    finally:
        server.stop()
        db.dispose()


def c_store_files(
    port: int, paths: list[Path], max_contexts: int = MAX_CONTEXTS
) -> dict[Path, int | str]:
    """C-STORE each file as it is encoded on disk; its status, or why it could not be sent.

    pynetdicom's SCU sends the bytes after the file meta unchanged (no decoding, no
    re-encoding: ``STORE_SEND_CHUNKED_DATASET``) on a presentation context of the file
    meta's SOP Class and Transfer Syntax, one context per (SOP Class, Transfer Syntax) pair
    and at most ``max_contexts`` (128 at most) contexts per association, so a corpus takes
    one or more associations. A file whose meta lacks its SOP Class or Transfer Syntax gets
    no context; pynetdicom refuses to send it (AttributeError), which is reported.
    """
    assert 1 <= max_contexts <= MAX_CONTEXTS
    result: dict[Path, int | str] = {}
    by_context: dict[tuple[str, str], list[Path]] = {}
    for path in paths:
        meta, _ = split_dataset(path)
        key = (
            str(meta.get("MediaStorageSOPClassUID", "")),
            str(meta.get("TransferSyntaxUID", "")),
        )
        by_context.setdefault(key, []).append(path)
    contexts = sorted(by_context)
    batches = [contexts[i : i + max_contexts] for i in range(0, len(contexts), max_contexts)]
    with mock.patch.object(_config, "STORE_SEND_CHUNKED_DATASET", True):
        for batch in batches:
            assoc = None
            for key in batch:
                for path in by_context[key]:
                    if assoc is None or not assoc.is_established:
                        assoc = _associate(port, batch)
                    try:
                        rsp = assoc.send_c_store(path)
                    except (AttributeError, ValueError, RuntimeError) as exc:
                        result[path] = f"not sent: {type(exc).__name__}: {exc}"
                        continue
                    status = rsp.get("Status")
                    result[path] = int(status) if status is not None else "no response"
            if assoc is not None and assoc.is_established:
                assoc.release()
    return result


def _associate(port: int, contexts: list[tuple[str, str]]) -> Association:
    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class, syntax in contexts:
        if sop_class and syntax:
            ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED_AE)
    assert assoc.is_established, "the edge refused the association"
    return assoc

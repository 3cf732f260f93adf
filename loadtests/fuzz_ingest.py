"""Fuzz the edge's C-STORE receive path with mutated instances over real associations.

    .venv/bin/python -m loadtests.fuzz_ingest [--count 10000] [--seed 1] [--time-limit 1800]

Seeds: pydicom's own test files (explicit and implicit VR little endian, explicit VR big
endian, JPEG 2000, RLE, RT objects with nested sequences) and generated instances, each sent
as its encoded data set. Each case is one seeded mutation of one seed: a cut at a random
offset, flipped bytes, a random 16/32-bit value written over a random offset (element lengths
among them), random bytes inserted, a range duplicated or zeroed, a stray delimiter, and
semantic ones built with pydicom (Study Instance UID deleted or bent, Rows raised so the pixel
data is too short, the request's SOP Class differing from the data set's).

The edge is a real StorageSCP (pynetdicom) on a loopback port with a SQLite index and a
durable folder store (``tests.corpus.running_edge``); the sender writes raw DIMSE messages, as
a broken modality would. Four counts, which must all be 0:

- **crashes**: the edge stops answering (no association, or C-ECHO fails after the run);
- **unanswered**: a C-STORE without a response (timeout, abort);
- **corrupt acknowledged**: 0x0000 for a data set that dcmtk's ``dcmdump`` (an independent
  parser) cannot read to its end, or whose native Pixel Data is shorter than its pixel module
  says (pydicom's expected length);
- **0xC211**: pynetdicom's answer to an exception the handler did not catch (and any
  traceback pynetdicom logs for one).

Loopback only; bounded by ``--count`` and ``--time-limit``.
"""

from __future__ import annotations

import argparse
import collections
import io
import logging
import random
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

__all__ = ["FuzzReport", "Seed", "is_corrupt", "load_seeds", "run_fuzz", "send_request"]

SEED_FILES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
    "rtplan.dcm",
    "rtstruct.dcm",
    "MR2_J2KR.dcm",
    "emri_small.dcm",
)
TRUNCATED_OR_BENT = (0xC001, 0xC002, 0xC003)


@dataclass(frozen=True)
class Seed:
    name: str
    sop_class: str
    transfer_syntax: str
    data: bytes  # the encoded data set (after the file meta), as C-STORE carries it


@dataclass
class FuzzReport:
    sent: int = 0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    by_mutation: dict[str, collections.Counter[str]] = field(default_factory=dict)
    unanswered: int = 0
    crashes: int = 0
    c211: int = 0
    tracebacks: int = 0
    acknowledged: int = 0
    corrupt_acknowledged: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"sent {self.sent} mutated instances in {self.seconds:.1f} s "
            f"({self.sent / max(self.seconds, 1e-9):.0f}/s); acknowledged {self.acknowledged}",
            f"crashes {self.crashes} | unanswered {self.unanswered} | "
            f"corrupt acknowledged {len(self.corrupt_acknowledged)} | 0xC211 {self.c211} "
            f"(tracebacks logged {self.tracebacks})",
            "statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())),
        ]
        for kind, counts in sorted(self.by_mutation.items()):
            lines.append(f"  {kind:16} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        lines += [f"  corrupt acknowledged: {c}" for c in self.corrupt_acknowledged[:20]]
        return "\n".join(lines)


def _split(encoded: bytes) -> tuple[pydicom.Dataset, bytes]:
    ds = pydicom.dcmread(io.BytesIO(encoded), stop_before_pixels=False)
    meta_len = 132 + 12 + int.from_bytes(encoded[140:144], "little")
    return ds, encoded[meta_len:]


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def load_seeds() -> list[Seed]:
    """pydicom's test files above plus generated DX instances, as (class, syntax, data set)."""
    from pydicom.data import get_testdata_file

    from tests.conftest import make_instance

    seeds = []
    for name in SEED_FILES:
        path = get_testdata_file(name)
        if path is None or Path(str(path)).read_bytes()[128:132] != b"DICM":
            continue  # seeds are Part 10 files
        meta, offset = split_dataset(Path(str(path)))
        data = Path(str(path)).read_bytes()[offset:]
        syntax = str(meta.get("TransferSyntaxUID", ""))
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
        if syntax and "SOPClassUID" in ds:
            seeds.append(Seed(name, str(ds.SOPClassUID), syntax, data))
    for i, rows in enumerate((16, 64)):
        ds = make_instance(rows=rows, seed=i)
        _, data = _split(_encode(ds))
        seeds.append(
            Seed(
                f"generated-dx-{rows}",
                str(ds.SOPClassUID),
                str(ds.file_meta.TransferSyntaxUID),
                data,
            )
        )
    return seeds


# -- mutations ------------------------------------------------------------------------------


def _truncate(rng: random.Random, d: bytes) -> bytes:
    return d[: rng.randrange(1, len(d))]


def _flip(rng: random.Random, d: bytes) -> bytes:
    b = bytearray(d)
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _overwrite(rng: random.Random, d: bytes) -> bytes:
    b = bytearray(d)
    at = rng.randrange(max(len(b) - 4, 1))
    value = rng.choice((0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, rng.getrandbits(32), len(d)))
    if rng.random() < 0.5:
        struct.pack_into("<H", b, at, value & 0xFFFF)
    else:
        struct.pack_into("<L", b, at, value)
    return bytes(b)


def _insert(rng: random.Random, d: bytes) -> bytes:
    at = rng.randrange(len(d))
    return d[:at] + rng.randbytes(rng.randint(1, 64)) + d[at:]


def _duplicate(rng: random.Random, d: bytes) -> bytes:
    a = rng.randrange(len(d))
    e = min(len(d), a + rng.randint(1, 512))
    return d[:e] + d[a:e] + d[e:]


def _zero(rng: random.Random, d: bytes) -> bytes:
    a = rng.randrange(len(d))
    e = min(len(d), a + rng.randint(1, 256))
    return d[:a] + bytes(e - a) + d[e:]


def _delimiter(rng: random.Random, d: bytes) -> bytes:
    at = rng.randrange(len(d))
    tag = rng.choice((b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0"))
    return d[:at] + tag + struct.pack("<L", rng.choice((0, 0xFFFFFFFF, 8))) + d[at:]


BYTE_MUTATIONS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "truncate": _truncate,
    "flip": _flip,
    "overwrite": _overwrite,
    "insert": _insert,
    "duplicate": _duplicate,
    "zero": _zero,
    "delimiter": _delimiter,
}


def _semantic(seed: Seed, kind: str) -> bytes:
    """A well-formed data set with one semantic fault, in the seed's own transfer syntax."""
    meta = pydicom.Dataset()
    meta.TransferSyntaxUID = seed.transfer_syntax
    ds = pydicom.dcmread(io.BytesIO(_part10(meta, seed)), force=True)
    if kind == "no-study-uid":
        del ds.StudyInstanceUID
    elif kind == "bad-uid":
        ds.StudyInstanceUID = "1.2.03.x"
    elif kind == "rows-raised":
        ds.Rows = int(ds.Rows) + 7
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return _split(out.getvalue())[1]


def _part10(meta: pydicom.Dataset, seed: Seed, data: bytes | None = None) -> bytes:
    fm = pydicom.dataset.FileMetaDataset()
    fm.MediaStorageSOPClassUID = seed.sop_class
    fm.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.2"
    fm.TransferSyntaxUID = meta.TransferSyntaxUID
    buf = io.BytesIO()
    write_file_meta_info(buf, fm, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buf.getvalue() + (seed.data if data is None else data)


# -- the oracle -----------------------------------------------------------------------------


def is_corrupt(seed: Seed, data: bytes, workdir: Path) -> str | None:
    """Why ``data`` (a data set in the seed's syntax) is corrupt, by parsers other than the
    edge's: dcmtk's dcmdump cannot read it to its end, or pydicom finds native Pixel Data
    shorter than the pixel module says. None when both read it in full."""
    meta = pydicom.Dataset()
    meta.TransferSyntaxUID = seed.transfer_syntax
    path = workdir / "case.dcm"
    path.write_bytes(_part10(meta, seed, data))
    done = subprocess.run(["dcmdump", str(path)], capture_output=True, timeout=60)
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        return f"dcmdump: {err[0][:160] if err else done.returncode}"
    try:
        from pydicom.pixels.utils import get_expected_length

        ds = pydicom.dcmread(path)
        native = "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_compressed
        if native and len(ds.PixelData) < int(get_expected_length(ds, unit="bytes")):
            return "pydicom: native Pixel Data shorter than its pixel module"
        if ("Rows" in ds or "Columns" in ds) and "PixelData" not in ds:
            return "pydicom: a pixel module without Pixel Data"
    except Exception as exc:
        return f"pydicom: {type(exc).__name__}"
    return None


# -- sending --------------------------------------------------------------------------------


def _associate(port: int, seeds: list[Seed], calling: str, called: str) -> Association | None:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    for pair in sorted({(s.sop_class, s.transfer_syntax) for s in seeds}):
        ae.add_requested_context(pair[0], [pair[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    return assoc if assoc.is_established else None


def _send_raw(assoc: Association, sop_class: str, context_of: Seed, data: bytes) -> int | None:
    """One C-STORE whose data set is ``data`` as is; its status, or None without an answer."""
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.10.1"
    req.Priority = 2
    req.DataSet = io.BytesIO(data)
    cx = next(
        (
            c
            for c in assoc.accepted_contexts
            if c.abstract_syntax == context_of.sop_class
            and c.transfer_syntax[0] == context_of.transfer_syntax
        ),
        None,
    )
    if cx is None:
        return None
    return send_request(assoc, req, cx.context_id)


def send_request(assoc: Association, req: C_STORE, context_id: int) -> int | None:
    """Send one C-STORE request as is (its data set unchecked, as a broken modality would);
    the response status, or None without one. The association's reactor is paused as
    pynetdicom's own send_* methods do, or it may take the response off the queue first."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None or getattr(rsp, "Status", None) is None:
        return None
    return int(rsp.Status)


class _Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.count += 1


def run_fuzz(
    port: int,
    count: int,
    seed: int = 1,
    time_limit_s: float = 600.0,
    *,
    calling: str = "DEMO_PACS",
    called: str = "RADBRIDGE",
) -> FuzzReport:
    """Send ``count`` mutated instances (or as many as ``time_limit_s`` allows) to the SCP."""
    rng = random.Random(seed)
    seeds = load_seeds()
    semantic: dict[tuple[str, str], bytes] = {}
    for s in seeds:
        for kind in ("no-study-uid", "bad-uid", "rows-raised"):
            if kind == "rows-raised" and s.sop_class.startswith("1.2.840.10008.5.1.4.1.1.481"):
                continue  # RT objects have no pixel module
            semantic[(s.name, kind)] = _semantic(s, kind)
    report = FuzzReport()
    traces = _Tracebacks()
    logging.getLogger("pynetdicom").addHandler(traces)
    started = time.monotonic()
    assoc: Association | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="radbridge-fuzz-") as tmp:
            workdir = Path(tmp)
            for _ in range(count):
                if time.monotonic() - started > time_limit_s:
                    break
                s = rng.choice(seeds)
                roll = rng.random()
                sop_class = s.sop_class
                if roll < 0.12:
                    options = [k for (name, k) in semantic if name == s.name]
                    kind = rng.choice(options)
                    data = semantic[(s.name, kind)]
                elif roll < 0.16:
                    kind = "class-mismatch"
                    data = s.data
                    others = [o.sop_class for o in seeds if o.sop_class != s.sop_class]
                    sop_class = rng.choice(others)
                else:
                    kind = rng.choice(sorted(BYTE_MUTATIONS))
                    data = BYTE_MUTATIONS[kind](rng, s.data)
                if assoc is None or not assoc.is_established:
                    assoc = _associate(port, seeds, calling, called)
                    if assoc is None:
                        report.crashes += 1
                        break
                try:
                    status = _send_raw(assoc, sop_class, s, data)
                except Exception:
                    status = None
                report.sent += 1
                label = "unanswered" if status is None else f"0x{status:04X}"
                report.statuses[label] += 1
                report.by_mutation.setdefault(kind, collections.Counter())[label] += 1
                if status is None:
                    report.unanswered += 1
                    if assoc is not None:
                        assoc.abort()
                    assoc = None
                    continue
                if status == 0xC211:
                    report.c211 += 1
                if status == 0x0000:
                    report.acknowledged += 1
                    why = is_corrupt(s, data, workdir)
                    if why is not None:
                        report.corrupt_acknowledged.append(f"{s.name} {kind}: {why}")
            if assoc is not None and assoc.is_established:
                assoc.release()
            check = _associate(port, seeds, calling, called)
            if check is None or check.send_c_echo().get("Status") != 0x0000:
                report.crashes += 1
            if check is not None and check.is_established:
                check.release()
    finally:
        logging.getLogger("pynetdicom").removeHandler(traces)
    report.tracebacks = traces.count
    report.seconds = time.monotonic() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=1800.0)
    args = parser.parse_args()
    from tests.corpus import running_edge

    with tempfile.TemporaryDirectory(prefix="radbridge-fuzz-edge-") as tmp:
        root = Path(tmp)
        with running_edge(f"sqlite:///{root / 'edge.db'}", root / "store") as edge:
            report = run_fuzz(edge.port, args.count, args.seed, args.time_limit)
    print(report.summary())
    bad = report.crashes + report.unanswered + len(report.corrupt_acknowledged) + report.c211
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()

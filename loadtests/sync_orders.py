"""The store's sync order against Orthanc's, on one folder's file system: files/s, side by side.

    .venv/bin/python -m loadtests.sync_orders [--dir FOLDER] [--files 300] [--threads 4]
        [--rounds 3] [--size-kib 512]

Each of ``--threads`` threads writes ``--files`` files of ``--size-kib`` KiB in all, the way
one of these writers does, and the rounds interleave the writers (a, b, c, d, a, b, ...):

- ``store``: ``dicom_io.store.DurableStore.write`` as the gateway runs it here (an unnamed
  file, fdatasync, its name, the folder's fsync, and the file's own fsync only where the file
  system keeps no journal: ``dicom_io.file_systems``);
- ``store, link count synced``: the same with the file's fsync after its name forced on (the
  order before the journal check, and the order on a file system without a journal);
- ``Orthanc's order`` (the baseline): a named file, written, fdatasynced; no folder sync;
- ``no sync``: the store's order without any sync, the ceiling of the file system itself.

Prints the median files/s of each, its ratio to Orthanc's order, the CPU ms per file of this
process, and whether the folder's file system journals metadata. ``--dir`` defaults to a
temporary folder under ``TMPDIR``; point it (or ``TMPDIR``) at the file system to judge, e.g. a
loop-mounted journaled ext4. Every run's folder is deleted; the load is bounded by ``--files``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if not __package__:  # run as a file: the repo's packages
    sys.path.insert(0, str(REPO))
from dicom_io.file_systems import journals_metadata  # noqa: E402
from dicom_io.store import DurableStore  # noqa: E402

Writer = Callable[[Path, int, bytes], None]


def _store(sync_link_count: bool | None) -> Callable[[Path], Writer]:
    def make(folder: Path) -> Writer:
        store = DurableStore(folder)
        if sync_link_count is not None:
            store._sync_link_count = sync_link_count

        def write(_folder: Path, i: int, data: bytes) -> None:
            store.write(f"s/{i}.dcm", data)

        return write

    return make


def _orthanc(folder: Path) -> Writer:
    (folder / "s").mkdir()

    def write(folder: Path, i: int, data: bytes) -> None:
        fd = os.open(folder / "s" / f"{i}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.write(fd, data)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    return write


def _no_sync(folder: Path) -> Writer:
    (folder / "s").mkdir()

    def write(folder: Path, i: int, data: bytes) -> None:
        (folder / "s" / f"{i}.dcm").write_bytes(data)

    return write


WRITERS: dict[str, Callable[[Path], Writer]] = {
    "store": _store(None),
    "store, link count synced": _store(True),
    "Orthanc's order": _orthanc,
    "no sync": _no_sync,
}
BASELINE = "Orthanc's order"


def run_once(
    make: Callable[[Path], Writer], root: Path, files: int, threads: int, size: int
) -> tuple[float, float]:
    """One writer's run in a new folder under ``root``: (files/s, CPU ms per file)."""
    folder = Path(tempfile.mkdtemp(prefix="sync-orders-", dir=root))
    data = os.urandom(size)
    try:
        write = make(folder)
        numbers = iter(range(files))
        lock = threading.Lock()
        errors: list[BaseException] = []

        def worker() -> None:
            while True:
                with lock:
                    i = next(numbers, None)
                if i is None:
                    return
                try:
                    write(folder, i, data)
                except BaseException as exc:  # reported after the join
                    errors.append(exc)
                    return

        t0, c0 = time.perf_counter(), time.process_time()
        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if errors:
            raise errors[0]
        written = len(list((folder / "s").iterdir()))
        if written != files:
            raise RuntimeError(f"{written} of {files} files written")
        return files / wall, cpu / files * 1000
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="folder on the file system to judge")
    ap.add_argument("--files", type=int, default=300, help="files per run (1..5000)")
    ap.add_argument("--threads", type=int, default=4, help="writer threads (1..16)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (1..9)")
    ap.add_argument("--size-kib", type=int, default=512, help="file size (1..16384 KiB)")
    args = ap.parse_args()
    files, threads = max(1, min(args.files, 5000)), max(1, min(args.threads, 16))
    rounds, size = max(1, min(args.rounds, 9)), max(1, min(args.size_kib, 16384)) * 1024
    with tempfile.TemporaryDirectory(prefix="sync-orders-", dir=args.dir) as tmp:
        root = Path(tmp)
        print(
            f"{root}: journals metadata: {journals_metadata(root)}; {files} files of "
            f"{size >> 10} KiB per run, {threads} threads, {rounds} interleaved rounds"
        )
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in WRITERS}
        for _ in range(rounds):
            for name, make in WRITERS.items():
                runs[name].append(run_once(make, root, files, threads, size))
    base = statistics.median(r[0] for r in runs[BASELINE])
    print(f"  {'writer':<26} {'files/s':>8} {'vs Orthanc':>10} {'CPU ms/file':>12}   per round")
    for name, rs in runs.items():
        rate = statistics.median(r[0] for r in rs)
        cpu = statistics.median(r[1] for r in rs)
        rounds_text = " ".join(f"{r[0]:.0f}" for r in rs)
        print(f"  {name:<26} {rate:8.0f} {rate / base:9.2f}x {cpu:12.2f}   {rounds_text}")


if __name__ == "__main__":
    main()

"""The index, reached from the gateway's other receiving processes (``edge.receivers`` > 1).

Each receiving process writes its instances' files itself (the costly part: the bytes, the
hash, the syncs), then sends the index rows to write to the gateway process over a pipe of
its own. The gateway's ``Ingestor`` adds them to its group commit, beside its own
associations' instances, and answers each one's outcome. One process writes the index:

- no lock between processes around the index (each process's writer used to queue on one);
- the database connection's page cache stays warm: a SQLite connection drops its cache
  whenever another process has committed, so with several writing processes every
  transaction began by reading its pages again;
- the series ids stay cached in one place, and the forwarder is woken by the process that
  owns it.

A receiving process's ``Ingestor`` forms its batches as the gateway's does (its association
threads' instances queued while a round trip is out go in the next one), so one round trip is
out per process at a time and the pipe needs no request ids.

What crosses the pipe is what the index needs: the agreement, the parsed header, the stored
file's path, size and digest, the priority; back come the outcomes, or each entry's error as
(kind, reason, message), raised again in the receiving process as the same error class, so
the association answers the same DIMSE status as it would in the gateway process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from dicom_io.ingest import Pending
from radbridge.errors import DatasetError, StorageError

__all__ = ["IndexClient", "serve_index"]

log = logging.getLogger("radbridge.edge.index")

# (agreement id, header, relative path, size, sha256, priority)
_Fields = tuple[str, Any, str, int, str, str]
# ("ok", outcome) | ("dataset", reason, message) | ("storage", message) | ("failure", type)
_Result = tuple[str, ...]


def _fields(entry: Pending) -> _Fields:
    return (
        entry.agreement_id,
        entry.header,
        entry.relpath,
        entry.size,
        entry.digest,
        entry.priority,
    )


def _result(entry: Pending) -> _Result:
    if entry.outcome is not None:
        return ("ok", entry.outcome)
    exc = entry.error or StorageError("indexing was interrupted")
    if isinstance(exc, DatasetError):
        return ("dataset", exc.reason, str(exc))
    if isinstance(exc, StorageError):
        return ("storage", str(exc))
    # Anything else (a database error, a bug): its type only, never its text (values).
    return ("failure", type(exc).__name__)


def _apply(entry: Pending, result: _Result) -> None:
    kind = result[0]
    if kind == "ok":
        entry.outcome = result[1]
    elif kind == "dataset":
        entry.error = DatasetError(result[1], result[2])
    elif kind == "storage":
        entry.error = StorageError(result[1])
    else:
        entry.error = IndexFailure(f"indexing failed in the gateway process: {result[1]}")


class IndexFailure(Exception):
    """The gateway process's index failed an entry with an unexpected error (named by type);
    not a ``RadbridgeError``, so the association answers what an unexpected error gets in
    the gateway process (0x0110, processing failure)."""


class IndexClient:
    """A receiving process's end: indexes a batch of stored files in the gateway process.
    Called by one thread at a time (the ``Ingestor``'s index lock)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def __call__(self, batch: list[Pending]) -> None:
        try:
            self._conn.send([_fields(entry) for entry in batch])
            results = self._conn.recv()
        except (EOFError, OSError) as exc:
            # The files are written and stay unreferenced (harmless); the SCU retries.
            results = f"cannot be reached: {type(exc).__name__}"
        except Exception as exc:  # e.g. a field that cannot be sent: these entries fail alone
            results = f"could not be asked: {type(exc).__name__}"
        if isinstance(results, str) or len(results) != len(batch):
            reason = results if isinstance(results, str) else "answered another batch"
            error = StorageError(f"the gateway's index {reason}")
            results = [("storage", str(error))] * len(batch)
        for entry, result in zip(batch, results, strict=True):
            _apply(entry, result)
            entry.done = True


def serve_index(
    conn: Any, index: Callable[[list[Pending]], None], stopping: threading.Event, name: str
) -> threading.Thread:
    """The gateway's end for one receiving process: a thread that indexes each batch it
    receives with ``index`` (the gateway ``Ingestor``'s group commit) and answers the
    outcomes, until the process closes its end."""

    def loop() -> None:
        while True:
            try:
                batch = conn.recv()
            except (EOFError, OSError):
                return  # the receiving process stopped
            entries = [Pending(*fields) for fields in batch]
            try:
                index(entries)
            except Exception as exc:  # the group commit sets each entry's error; a backstop
                for entry in entries:
                    if entry.outcome is None and entry.error is None:
                        entry.error = exc
            try:
                conn.send([_result(entry) for entry in entries])
            except (EOFError, OSError):
                if not stopping.is_set():
                    log.warning("%s: its index answer could not be sent", name)
                return

    thread = threading.Thread(target=loop, name=f"radbridge-index-{name}", daemon=True)
    thread.start()
    return thread

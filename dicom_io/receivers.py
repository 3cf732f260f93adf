"""The gateway's extra receiving processes (``edge.receivers`` > 1).

One Python process receives at most about one core's worth of C-STOREs (the GIL), so with
several associations at once the gateway starts ``receivers - 1`` more processes that listen
on the same DICOM port (``SO_REUSEPORT``: the kernel spreads new connections over them). Each
has its own ``StorageSCP``, ``Ingestor`` and store handle on the same folder, so an instance
is checked and written exactly as in the gateway process. What must stay one for the edge is
shared or sent back to the gateway process:

- the association limits (``edge.max_associations``, each hospital's): ``SharedCounts``;
- the index: each process sends its stored files' rows to the gateway process over a pipe of
  its own (``dicom_io.index_link``), whose ``Ingestor`` commits them in its group commits and
  wakes the forwarder; a receiving process opens no database;
- metrics: each receiver's counter increments and histogram observations go to the gateway
  over a queue (``Relay``) and are applied to its registry, which /metrics serves.

The DICOM TLS port and STOW-RS stay in the gateway process. A receiver exits when the gateway
sets the stop event, or when the gateway process is gone (it checks its parent every second).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from dicom_io.association_counts import SharedCounts
from dicom_io.index_link import IndexClient, serve_index
from dicom_io.ingest import Pending
from radbridge.metrics import EdgeMetrics

__all__ = ["Receivers", "Relay", "apply_event", "receiver_main"]

log = logging.getLogger("radbridge.edge.receivers")

PARENT_CHECK_S = 1.0
START_TIMEOUT_S = 60.0


class _RelayedMetric:
    def __init__(self, events: Any, name: str, labels: tuple[str, ...]) -> None:
        self._events, self._name, self._labels = events, name, labels

    def inc(self, amount: float = 1.0) -> None:
        self._events.put(("inc", self._name, self._labels, amount))

    def observe(self, value: float) -> None:
        self._events.put(("observe", self._name, self._labels, value))


class _RelayedFamily:
    def __init__(self, events: Any, name: str) -> None:
        self._events, self._name = events, name

    def labels(self, *labels: str) -> _RelayedMetric:
        return _RelayedMetric(self._events, self._name, labels)


class Relay:
    """Stands in for ``EdgeMetrics`` in a receiving process: the families the SCP writes
    (``instances``, ``instance_receive``, ``associations_rejected``) send each update to the
    gateway process instead."""

    RELAYED = ("instances", "instance_receive", "associations_rejected")

    def __init__(self, events: Any) -> None:
        for name in self.RELAYED:
            setattr(self, name, _RelayedFamily(events, name))


def apply_event(event: tuple[Any, ...], metrics: EdgeMetrics) -> None:
    """Apply one receiver's metric update in the gateway process."""
    kind, name, labels, value = event
    if name not in Relay.RELAYED:  # only what a Relay sends; anything else is a bug
        raise ValueError(f"unknown relayed metric {name!r}")
    child = getattr(metrics, name).labels(*labels)
    if kind == "inc":
        child.inc(value)
    else:
        child.observe(value)


def receiver_main(
    settings: Any,
    counts: SharedCounts,
    index: Any,
    events: Any,
    stop: Any,
    ready: Any,
    parent: int,
) -> None:
    """A receiving process: the SCP on the edge's plain DICOM port, until ``stop``."""
    from dicom_io.gateway import SPARE_FILES, quiet_value_echoing_warnings, receive_path
    from dicom_io.store import DurableStore
    from radbridge.agreements import load_agreements

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    quiet_value_echoing_warnings()
    e = settings.edge
    agreements = load_agreements(settings.agreements_file)
    store = DurableStore(
        settings.edge_store, min_free_bytes=e.min_free_bytes, spare_files=SPARE_FILES
    )
    _ingestor, scp = receive_path(
        settings,
        None,
        store,
        lambda: agreements,
        Relay(events),  # type: ignore[arg-type]
        index=IndexClient(index),
        counts=counts,
    )
    scp.start(e.host, e.port)
    ready.set()
    try:
        while not stop.wait(PARENT_CHECK_S):
            if os.getppid() != parent:
                log.warning("the gateway process is gone; this receiver stops")
                break
    finally:
        scp.stop()
        store.close()
        index.close()


class Receivers:
    """The gateway's side: starts the extra receiving processes, applies their events, stops
    them. ``counts`` is what the gateway's own SCP must use too."""

    def __init__(self, settings: Any, agreement_ids: list[str], extra: int) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._settings = settings
        self._extra = extra
        self.counts = SharedCounts(agreement_ids, self._ctx)
        self._events: Any = self._ctx.Queue()
        self._stop = self._ctx.Event()
        self._stopping = threading.Event()
        self._processes: list[Any] = []
        self._pump: threading.Thread | None = None
        self._index_threads: list[threading.Thread] = []

    def start(self, metrics: EdgeMetrics, index: Callable[[list[Pending]], None]) -> None:
        """Start the processes and return once each listens; ``index``: the gateway's
        ``Ingestor.index_entries``, which indexes what they store."""
        self._pump = threading.Thread(
            target=self._drain, args=(metrics,), name="radbridge-receiver-events", daemon=True
        )
        self._pump.start()
        for i in range(self._extra):
            ready = self._ctx.Event()
            ours, theirs = self._ctx.Pipe()
            name = f"receiver-{i + 1}"
            self._index_threads.append(serve_index(ours, index, self._stopping, name))
            proc = self._ctx.Process(
                target=receiver_main,
                args=(
                    self._settings,
                    self.counts,
                    theirs,
                    self._events,
                    self._stop,
                    ready,
                    os.getpid(),
                ),
                name=f"radbridge-receiver-{i + 1}",
                daemon=True,
            )
            proc.start()
            theirs.close()  # the process holds its own copy: ours sees EOF when it exits
            self._processes.append(proc)
            if not ready.wait(START_TIMEOUT_S):
                self.stop()
                raise RuntimeError(f"receiving process {i + 1} did not start listening")
        log.info("%d more receiving processes on the DICOM port", self._extra)

    def _drain(self, metrics: EdgeMetrics) -> None:
        while True:
            try:
                event = self._events.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            except (EOFError, OSError):
                return
            try:
                apply_event(event, metrics)
            except Exception:
                log.exception("a receiver's event could not be applied")

    def stop(self) -> None:
        self._stopping.set()
        self._stop.set()
        for proc in self._processes:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self._processes.clear()
        if self._pump is not None:
            self._pump.join(5)
        for thread in self._index_threads:
            thread.join(5)  # each ends at its process's EOF
        self._index_threads.clear()

    @property
    def alive(self) -> int:
        return sum(1 for p in self._processes if p.is_alive())

"""A study's STOW-RS requests to the center, sent while the rest of the study is de-identified.

The forwarder adds each de-identified instance as it is made. Instances are gathered into
requests of at most ``REQUEST_INSTANCES`` and about ``REQUEST_BYTES``; a full request is sent
on the sender's own thread while the forwarder de-identifies the next one, so the center stores
one part of the study while the edge prepares the next. At most one request is in
flight and they leave in order; before each leaves, the pseudonyms issued so far are committed
to the identity map (nothing leaves the edge that the edge could not re-identify).

A request the center refused, or could not take, raises at the next ``add`` or at ``finish``:
``PolicyError`` for instances refused for good, ``CenterError`` for a retry. Instances already
sent are harmless if the study is sent again: the center keeps one copy of the same bytes under
a SOP Instance UID.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import httpx

from dicom_io.identity_map import record_pseudonyms
from dicom_io.pseudonyms import Pseudonymizer
from dicom_io.stow import encode_multipart
from radbridge.contract import CenterClient
from radbridge.db.engine import Database
from radbridge.errors import CenterError, PolicyError, redacted

__all__ = ["REQUEST_BYTES", "REQUEST_INSTANCES", "StudySender", "raise_on_refused_instances"]

log = logging.getLogger("radbridge.edge.forwarder")

# Small enough that the center stores one request while the next is de-identified, large
# enough that the per-request cost (a transaction, an HTTP round trip) stays small: 16 CT
# slices of 512 KiB. An instance larger than this goes in a request of its own.
REQUEST_BYTES = 8 * 1024 * 1024
REQUEST_INSTANCES = 16


class StudySender:
    """One study's instances to the center, one STOW-RS request in flight at a time."""

    def __init__(
        self,
        pool: ThreadPoolExecutor,
        center: CenterClient,
        db: Database,
        agreement_id: str,
        priority: str,
        pseudo: Pseudonymizer,
        request_bytes: int = REQUEST_BYTES,
        request_instances: int = REQUEST_INSTANCES,
        before_first: Callable[[], object] | None = None,
    ) -> None:
        """``before_first``: called once, before the study's first request leaves (the
        forwarder's Begin Transferring audit record); if it raises, nothing leaves."""
        self._pool = pool
        self._center = center
        self._db = db
        self._agreement_id = agreement_id
        self._priority = priority
        self._pseudo = pseudo
        self._request_bytes = request_bytes
        self._request_instances = request_instances
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._recorded: set[tuple[str, str]] = set()
        self._in_flight: Future[tuple[int, int]] | None = None
        self._before_first = before_first
        self.sent = 0  # instances the center acknowledged
        self.sent_bytes = 0
        self.submitted = 0  # instances in requests handed to the pool

    def add(self, part: bytes) -> None:
        """Queue one de-identified instance; sends the request it completes."""
        full = len(self._batch) >= self._request_instances
        if self._batch and (full or self._batch_bytes + len(part) > self._request_bytes):
            self._send_batch()
        self._batch.append(part)
        self._batch_bytes += len(part)

    @property
    def failed(self) -> bool:
        """The request in flight has failed already (it raises at the next call)."""
        f = self._in_flight
        return f is not None and f.done() and f.exception() is not None

    def flush(self) -> None:
        """Send what is queued now, without waiting for its answer (a failure raises at the
        next ``add``, ``flush`` or ``finish``)."""
        if self._batch:
            self._send_batch()

    def finish(self) -> None:
        """Send what is left and wait for every request's answer."""
        if self._batch:
            self._send_batch()
        self._wait()

    def after_sent(self, call: Callable[[], object]) -> None:
        """Run ``call`` on the pool once the requests handed to it so far have had their
        answers (the pool has one thread: it runs in order). ``call`` is a hint: whatever it
        raises is logged by type and dropped, the study's own requests are not affected."""

        def hint() -> None:
            try:
                call()
            except Exception as exc:
                log.info("a hint to the center failed (%s); nothing depends on it", redacted(exc))

        self._pool.submit(hint)

    def abandon(self) -> None:
        """Wait for the request in flight (its answer no longer matters) and drop the rest:
        after an error, so that no request of this study is still leaving."""
        self._batch.clear()
        if self._in_flight is not None:
            with contextlib.suppress(Exception):  # the caller is failing with its own error
                self._in_flight.result()
            self._in_flight = None

    def _send_batch(self) -> None:
        self._wait()  # one in flight at most, in order; its failure stops the study here
        if self._before_first is not None:
            self._before_first()
            self._before_first = None
        issued = self._pseudo.issued
        new = {k: v for k, v in issued.items() if k not in self._recorded}
        record_pseudonyms(self._db, self._agreement_id, new)  # before any byte leaves
        self._recorded.update(new)
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self.submitted += len(batch)
        self._in_flight = self._pool.submit(self._post, batch)

    def _wait(self) -> None:
        if self._in_flight is None:
            return
        future, self._in_flight = self._in_flight, None
        count, nbytes = future.result()
        self.sent += count
        self.sent_bytes += nbytes

    def _post(self, batch: list[bytes]) -> tuple[int, int]:
        count, nbytes = len(batch), sum(len(p) for p in batch)
        body, content_type = encode_multipart(batch)
        del batch[:]  # the body holds them now; free the parts while the request runs
        resp = self._center.store_instances(self._agreement_id, self._priority, body, content_type)
        raise_on_refused_instances(resp)
        return count, nbytes


_FAILED_SOP_SEQUENCE, _FAILURE_REASON = "00081198", "00081197"


def raise_on_refused_instances(resp: httpx.Response) -> None:
    """A STOW-RS answer with a FailedSOPSequence (HTTP 202 some, 409 all): the center refused
    those instances and will refuse them again, so the study is blocked with the reasons
    rather than reported forwarded with instances missing."""
    try:
        failed = resp.json().get(_FAILED_SOP_SEQUENCE, {}).get("Value", [])
    except ValueError:
        raise PolicyError(f"center answered {resp.status_code} without a STOW-RS body") from None
    if not failed:
        return
    codes = {int(f.get(_FAILURE_REASON, {}).get("Value", [0])[0]) for f in failed}
    reasons = sorted(f"0x{code:04X}" for code in codes)
    if all(code & 0xFF00 == 0xA700 for code in codes):
        # Refused: Out of Resources (PS3.4 B.2.3): the center's store is full or failing.
        # It kept none of them; they go again after the backoff, the study waits here.
        raise CenterError(f"center out of resources for {len(failed)} instance(s) (0xA7xx)")
    raise PolicyError(
        f"center refused {len(failed)} instance(s) (failure reasons {', '.join(reasons)}; "
        "0x0111: other bytes under a SOP Instance UID it already holds)"
    )

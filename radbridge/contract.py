"""The edge ↔ center contract: paths, headers, bodies, and the one client the edge uses.

Both sides import this module: the center's routes (serving/ingress.py) are declared with the
path templates and bodies below, the edge's two outboxes (dicom_io/forwarder.py sends studies,
dicom_io/delivery.py fetches results) talk through :class:`CenterClient`, and the test fakes of
the center declare their routes from here too. Authentication (radbridge.auth's per-request
Ed25519 token) and TLS (the center's certificate checked against ``edge.center_ca_file``) are
set up once, in :func:`center_client`.

Every number the edge reads from the center is bounded here, so a center (or whoever holds its
address) cannot make the edge allocate or loop without limit.
"""

from __future__ import annotations

import random
import ssl
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from radbridge.agreements import Priority
from radbridge.errors import CenterError

__all__ = [
    "AGREEMENT_HEADER",
    "AGREEMENT_ID",
    "AGREEMENT_RESULT_OBJECTS",
    "MAX_ID",
    "MAX_LISTING",
    "MAX_LISTING_WAIT_S",
    "PRIORITY_HEADER",
    "RESULT_OBJECT",
    "STUDIES",
    "STUDY_COMPLETE",
    "STUDY_PREPARE",
    "STUDY_PURGE",
    "STUDY_RESULTS",
    "UID",
    "CenterClient",
    "CenterError",
    "CompleteStudy",
    "PrepareOut",
    "PrepareStudy",
    "PurgeOut",
    "PurgeStudy",
    "ResultObject",
    "ResultObjectList",
    "backoff_s",
    "center_client",
    "retry_after_s",
    "tls_verify",
]

_Answer = TypeVar("_Answer", bound=BaseModel)

# -- paths (FastAPI templates; the client fills them in) -------------------------------------
STUDIES = "/v1/studies"  # STOW-RS: multipart/related; type="application/dicom"
STUDY_COMPLETE = "/v1/studies/{study_uid}/complete"
STUDY_PREPARE = "/v1/studies/{study_uid}/prepare"  # a hint: the study is probably whole
STUDY_RESULTS = "/v1/studies/{study_uid}/results"
STUDY_PURGE = "/v1/studies/{study_uid}/purge"
AGREEMENT_RESULT_OBJECTS = "/v1/agreements/{agreement_id}/result-objects"
RESULT_OBJECT = "/v1/result-objects/{object_id}"

# -- headers of STOW-RS --------------------------------------------------------------------
AGREEMENT_HEADER = "X-Radbridge-Agreement"
PRIORITY_HEADER = "X-Radbridge-Priority"

AGREEMENT_ID = r"^[a-z0-9][a-z0-9-]{1,62}$"
UID = r"^[0-9.]{1,64}$"
MAX_LISTING = 1000  # result objects in one listing page
# A listing may wait this long for the first object after its cursor (a long poll): the edge
# hears of a finished job when it is built, without polling the center every second.
MAX_LISTING_WAIT_S = 25.0
MAX_ID = (1 << 63) - 1  # ids are 64-bit signed integers in both databases


class PurgeStudy(BaseModel):
    """Sent by the edge when the hospital wants a study gone from the center now (a patient
    withdrew consent): the center deletes its images, results and reports and audits it."""

    model_config = ConfigDict(extra="forbid")
    agreement_id: str = Field(pattern=AGREEMENT_ID)
    reason: Literal["consent-withdrawn", "hospital-request"]


class PurgeOut(BaseModel):
    """``purged`` False: the center held nothing of the study (already purged): idempotent."""

    purged: bool
    files: int = Field(ge=0)


class CompleteStudy(BaseModel):
    """Sent by the edge once every instance of a study was accepted."""

    model_config = ConfigDict(extra="forbid")
    agreement_id: str = Field(pattern=AGREEMENT_ID)
    priority: Priority = Priority.ROUTINE
    instance_count: int = Field(ge=1, le=1_000_000)
    edge_elapsed_s: float = Field(
        0.0, ge=0, le=10 * 365 * 86_400.0, description="From the edge's first instance to now."
    )


class PrepareStudy(BaseModel):
    """Sent by the edge while a study's quiet period still runs, once no instance has come for
    a while and every one it holds was accepted: the study is probably whole. A hint, never a
    completion: the center may compute ahead, but starts no job and releases nothing."""

    model_config = ConfigDict(extra="forbid")
    agreement_id: str = Field(pattern=AGREEMENT_ID)
    priority: Priority = Priority.ROUTINE
    instance_count: int = Field(ge=1, le=1_000_000)


class PrepareOut(BaseModel):
    preparing: bool = Field(
        description="The center computes ahead: it held exactly instance_count instances and "
        "had nothing else to do."
    )


class ResultObject(BaseModel):
    """A DICOM result object (SR, SEG) as the center lists it; pseudonymous UIDs only."""

    id: int = Field(ge=1, le=MAX_ID, description="Opaque to the edge: the listing names it.")
    study_uid: str = Field(pattern=UID)
    version: int = Field(ge=1)
    kind: Literal["sr", "seg", "report", "notice"]
    sop_class_uid: str = Field(pattern=UID)
    sop_instance_uid: str = Field(pattern=UID)
    series_instance_uid: str = Field(pattern=UID)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")
    size: int = Field(ge=0, le=1 << 34)
    created_at: datetime
    signature: str | None = Field(
        None,
        max_length=8192,
        description="The center's JWS (EdDSA) over sha256, UIDs, kind, version, agreement and "
        "edges, made when the object was written (radbridge.signing); the edge verifies it "
        "before anything else.",
    )

    @field_validator("created_at")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)


class ResultObjectList(BaseModel):
    objects: list[ResultObject] = Field(max_length=MAX_LISTING)


class CenterClient:
    """The edge's HTTP client of the center: one connection pool, one authentication."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: httpx.Auth | None = None,
        verify: ssl.SSLContext | bool = True,
        timeout_s: float = 60.0,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=timeout_s, auth=auth, verify=verify
        )

    def close(self) -> None:
        self._http.close()

    def store_instances(
        self, agreement_id: str, priority: str, body: bytes, content_type: str
    ) -> httpx.Response:
        """STOW-RS. A 409 with a DICOM JSON body (every instance refused) is returned for the
        caller to read the FailedSOPSequence, like 200 and 202."""
        return self._call(
            "POST",
            STUDIES,
            "studies",
            content=body,
            headers={
                "Content-Type": content_type,
                AGREEMENT_HEADER: agreement_id,
                PRIORITY_HEADER: priority,
            },
            refusal_ok=True,
        )

    def complete(self, study_uid: str, body: CompleteStudy) -> httpx.Response:
        path = STUDY_COMPLETE.format(study_uid=study_uid)
        return self._call("POST", path, "complete", json=body.model_dump(mode="json"))

    def prepare(self, study_uid: str, body: PrepareStudy) -> PrepareOut:
        """Tell the center the study is probably whole (``PrepareStudy``); a hint only."""
        return self._post_for(STUDY_PREPARE, study_uid, "prepare", body, PrepareOut)

    def purge(self, study_uid: str, body: PurgeStudy) -> PurgeOut:
        """Ask the center to delete the study now (409 while its job runs: retry later)."""
        return self._post_for(STUDY_PURGE, study_uid, "purge", body, PurgeOut)

    def _post_for(
        self, template: str, study_uid: str, what: str, body: BaseModel, answer: type[_Answer]
    ) -> _Answer:
        """POST ``body`` to a study's route; its JSON answer as ``answer`` (else CenterError)."""
        path = template.format(study_uid=study_uid)
        resp = self._call("POST", path, what, json=body.model_dump(mode="json"))
        try:
            return answer.model_validate_json(resp.content)
        except ValueError:
            raise CenterError(f"center sent an invalid {what} answer") from None

    def study_results(self, study_uid: str) -> dict[str, Any]:
        """The center's results of a study (its job's state and the findings), as JSON."""
        path = STUDY_RESULTS.format(study_uid=study_uid)
        data = self._call("GET", path, "study results").json()
        if not isinstance(data, dict):
            raise CenterError("center sent invalid study results")
        return data

    def result_objects(
        self, agreement_id: str, after: int, limit: int, wait_s: float = 0.0
    ) -> list[ResultObject]:
        """One page of the agreement's result objects after the cursor, sorted by id.

        ``wait_s`` > 0: the center answers as soon as there is one, or empty after ``wait_s``.
        """
        path = AGREEMENT_RESULT_OBJECTS.format(agreement_id=agreement_id)
        params: dict[str, Any] = {"after": after, "limit": limit}
        extra: dict[str, Any] = {}
        if wait_s > 0:
            params["wait_s"] = min(wait_s, MAX_LISTING_WAIT_S)
            timeout = self._http.timeout
            extra["timeout"] = timeout.read + params["wait_s"] if timeout.read else None
        resp = self._call("GET", path, "result-objects listing", params=params, **extra)
        try:
            objects = ResultObjectList.model_validate_json(resp.content).objects
        except ValueError:
            raise CenterError("center sent an invalid result-objects listing") from None
        return sorted(objects, key=lambda o: o.id)

    def result_object(self, object_id: int) -> bytes:
        """The Part 10 bytes of one result object (the caller checks them against the listing)."""
        path = RESULT_OBJECT.format(object_id=object_id)
        return self._call("GET", path, "result-object download").content

    def _call(
        self, method: str, path: str, what: str, *, refusal_ok: bool = False, **kwargs: Any
    ) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CenterError(f"center unreachable: {type(exc).__name__}") from None
        dicom_json = resp.headers.get("content-type", "").startswith("application/dicom+json")
        if refusal_ok and resp.status_code == 409 and dicom_json:
            return resp
        if resp.status_code >= 300:
            detail = resp.text[:300].replace("\n", " ")  # the center's answer holds no identity
            raise CenterError(
                f"center answered {resp.status_code} to {what}: {detail}",
                status=resp.status_code,
                retry_after_s=retry_after_s(resp) if resp.status_code in (429, 503) else 0.0,
            )
        return resp


def center_client(settings: Any, timeout_s: float | None = None) -> CenterClient:
    """The edge's client of its center from ``settings`` (radbridge.settings.Settings): the
    edge's request-signing key and id, the center's URL and the CA its certificate is checked
    against (the system's trust store when ``edge.center_ca_file`` is unset)."""
    from radbridge.auth import EdgeAuth, load_edge_key

    e = settings.edge
    return CenterClient(
        settings.center_url,
        auth=EdgeAuth(load_edge_key(settings.edge_key_file), e.id),
        verify=tls_verify(e.center_ca_file),
        timeout_s=timeout_s or e.forward_timeout_s,
    )


def tls_verify(ca_file: Any) -> ssl.SSLContext | bool:
    """An SSL context trusting only ``ca_file`` (TLS >= 1.2, host name checked); ``True``
    (the system's trust store) without one."""
    if ca_file is None:
        return True
    from radbridge.errors import ConfigError

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, host name checked
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"edge.center_ca_file: cannot load {ca_file}: {exc}") from None
    return ctx


def backoff_s(
    attempts: int, base_s: float, max_s: float, retry_after: float = 0.0, jitter: float = 0.5
) -> float:
    """Exponential backoff for the ``attempts``-th failure, capped at ``max_s``, with up to
    ``jitter`` of it taken off at random (edges that failed together do not retry together),
    and never sooner than the center's Retry-After (itself capped at ``max_s``)."""
    delay = min(base_s * 2 ** max(attempts - 1, 0), max_s)
    delay *= 1.0 - jitter * random.random()
    return max(delay, min(retry_after, max_s))


def retry_after_s(resp: httpx.Response, now: datetime | None = None) -> float:
    """Seconds of a Retry-After header: delta-seconds, or an HTTP-date (RFC 9110 10.2.3)
    counted from ``now``; unreadable counts as 60 s, a date in the past as 0."""
    value = resp.headers.get("retry-after", "").strip()
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 60.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())

"""Typed request/response bodies of the center's HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from radbridge.agreements import Priority

__all__ = [
    "CompleteRequest",
    "Finding",
    "InferResponse",
    "InstanceResult",
    "JobOut",
    "ResultObjectList",
    "ResultObjectOut",
    "StudyResults",
]


class CompleteRequest(BaseModel):
    """Sent by the edge once every instance of a study was accepted."""

    model_config = ConfigDict(extra="forbid")
    agreement_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")
    priority: Priority = Priority.ROUTINE
    instance_count: int = Field(ge=1)
    edge_elapsed_s: float = Field(
        0.0, ge=0, description="Seconds from the edge's first instance to this request."
    )


class JobOut(BaseModel):
    job_id: int
    study_uid: str
    version: int = Field(1, description="Results version: +1 each time a late instance re-opens.")
    state: str
    created_at: datetime
    finished_at: datetime | None = None
    error: str | None = None


class Finding(BaseModel):
    label: str
    display: dict[str, str]
    codes: dict[str, str]
    probability: float
    threshold: float
    present: bool


class InstanceResult(BaseModel):
    sop_instance_uid: str
    model: dict[str, str]
    input_sha256: str
    provider: str
    findings: list[Finding]
    timings_ms: dict[str, float]
    intended_use: str
    nodules: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Segmentation models: each nodule's centre (patient mm), diameter, volume.",
    )


class InferResponse(BaseModel):
    """Answer of the synchronous ``POST /v1/models/{name}/infer``."""

    model: dict[str, str]
    provider: str
    priority: Priority
    findings: list[Finding]
    timings_ms: dict[str, float]
    intended_use: str


class InferItem(BaseModel):
    """One image's answer within :class:`InferBatchResponse`."""

    findings: list[Finding]
    timings_ms: dict[str, float]


class InferBatchResponse(BaseModel):
    """Answer of the synchronous ``POST /v1/models/{name}/infer-batch``."""

    model: dict[str, str]
    provider: str
    priority: Priority
    results: list[InferItem] = Field(description="One per image, in the request's order.")
    timings_ms: dict[str, float] = Field(description="total: the request, received → answered.")
    intended_use: str


class StudyResults(BaseModel):
    study_uid: str
    job: JobOut
    results: list[InstanceResult]
    skipped: list[dict[str, Any]] = Field(default_factory=list)
    notice: str


class ResultObjectOut(BaseModel):
    """A DICOM result object as the edge's deliverer lists it (pseudonymous UIDs only)."""

    id: int
    study_uid: str
    version: int
    kind: str = Field(description="sr or seg")
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    sha256: str
    size: int
    created_at: datetime
    signature: str | None = Field(
        None,
        description="The center's JWS (EdDSA) over sha256, UIDs, kind, version, agreement and "
        "edges, made when the object was written (radbridge.signing); the edge verifies it "
        "before anything else.",
    )


class ResultObjectList(BaseModel):
    objects: list[ResultObjectOut]

"""Typed request/response bodies of the center's HTTP API (the edge's: radbridge.contract)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from radbridge.agreements import Priority

__all__ = [
    "Finding",
    "InferResponse",
    "InstanceResult",
    "JobOut",
    "StudyResults",
]


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

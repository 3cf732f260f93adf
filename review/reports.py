"""Reports: the reader's decisions on the AI findings, added findings, impression, sign-off.

A study's report has versions (``reports``): version 1 is written as a draft, may be signed
preliminary (sent to the hospital, still editable) and is then signed final (never changed
again). An addendum after the final signature is version 2, a copy to edit, signed final in
its turn and referencing version 1 in the SR.

Signing checks, then builds one TID 2000 SR per report language of the agreement
(:func:`dicom_io.report_sr.report_sr`), stores and signs them as result objects of kind
``report`` (the edge pulls, re-identifies and stores them in the hospital PACS like the AI
results), and stops the read's clocks. The checks:

- every positive AI finding has a decision (accepted, rejected with a reason, or modified to
  another coded finding of the exam's template, with a reason);
- every critical finding in the report (accepted or added) has its communication recorded
  (finding, time, reader, recipient, time received, method) — otherwise the signature is
  refused naming the finding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import pydicom
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select, update

from dicom_io.report_sr import AIAssessment, ReportFinding, ReportSpec, report_sr
from dicom_io.result_store import Sign, add_objects, save_object
from dicom_io.sr_parts import Coded
from dicom_io.store import DurableStore
from radbridge.agreements import AgreementSet
from radbridge.db.engine import Database
from radbridge.db.tables import (
    InstanceRow,
    JobRow,
    ReadRow,
    ReportRow,
    ResultObjectRow,
    ResultRow,
    SeriesRow,
    utcnow,
)
from radbridge.errors import DatasetError, PolicyError
from review.i18n import LANG_TAGS, is_critical, template_for, term
from review.readers import Reader
from review.worklist import study_for

__all__ = [
    "AIFinding",
    "ReportContent",
    "SignOutcome",
    "ai_findings",
    "load_report",
    "save_draft",
    "sign_report",
]

_TEXT = 4000
_SHORT = 200


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Decision(_Strict):
    decision: Literal["accepted", "rejected", "modified"]
    reason: str | None = Field(None, max_length=_SHORT)
    modified_to: str | None = Field(
        None, pattern=r"^[A-Z0-9]{2,16}:[A-Za-z0-9.-]{1,32}$", description="SCHEME:code"
    )


class AddedFinding(_Strict):
    scheme: str = Field(pattern=r"^[A-Z0-9]{2,16}$")
    code: str = Field(pattern=r"^[A-Za-z0-9.-]{1,32}$")


class Communication(_Strict):
    finding: str = Field(pattern=r"^[A-Z0-9]{2,16}:[A-Za-z0-9.-]{1,32}$")
    recipient: str = Field(min_length=1, max_length=_SHORT)
    method: Literal["phone", "in_person", "secure_message"]
    communicated_at: datetime
    received_at: datetime
    reader: str | None = None  # set by the server: who recorded it


class ReportContent(_Strict):
    """The body of a draft as the reading room sends it (and as ``reports.content`` keeps it)."""

    decisions: dict[str, Decision] = Field(default_factory=dict, max_length=64)
    added: list[AddedFinding] = Field(default_factory=list, max_length=32)
    impression: str = Field("", max_length=_TEXT)
    impression_language: Literal["ru", "zh", "en"] = "ru"
    communications: list[Communication] = Field(default_factory=list, max_length=16)
    signed_objects: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="Set by the server: per signing (preliminary, final), the result object id "
        "of each language's SR.",
    )


@dataclass(frozen=True)
class AIFinding:
    """A positive AI finding of the study's latest job, keyed ``model:label``."""

    key: str
    label: str
    scheme: str
    code: str
    display: dict[str, str]
    probability: float
    model_name: str
    model_version: str


@dataclass(frozen=True)
class SignOutcome:
    report_id: int
    version: int
    status: str
    object_ids: list[int]
    first_final: bool
    turnaround_s: float | None
    priority: str


def _code_of(f: dict[str, Any]) -> tuple[str, str]:
    codes = f.get("codes") or {}
    if codes.get("SCT"):
        return "SCT", str(codes["SCT"])
    if codes.get("RADLEX"):
        return "RADLEX", str(codes["RADLEX"])
    return "99RADBRIDGE", str(f["label"])


def _latest_job(s: Any, study_id: int) -> JobRow:
    job = s.scalars(
        select(JobRow).where(JobRow.study_id == study_id).order_by(JobRow.id.desc())
    ).first()
    if job is None:
        raise PolicyError("the study has no finished AI job yet")
    return job  # type: ignore[no-any-return]


def ai_findings(db: Database, study_id: int) -> list[AIFinding]:
    """The positive AI findings of the study's latest job (one per model and label)."""
    with db.session() as s:
        job = _latest_job(s, study_id)
        rows = s.execute(
            select(ResultRow.model_name, ResultRow.model_version, ResultRow.findings).where(
                ResultRow.job_id == job.id
            )
        ).all()
    best: dict[str, AIFinding] = {}
    for name, version, findings in rows:
        for f in findings.get("findings", []):
            if not f.get("present"):
                continue
            key = f"{name}:{f['label']}"
            scheme, code = _code_of(f)
            p = float(f["probability"])
            if key not in best or p > best[key].probability:
                best[key] = AIFinding(
                    key, f["label"], scheme, code, dict(f.get("display") or {}), p, name, version
                )
    return sorted(best.values(), key=lambda a: -a.probability)


def load_report(
    db: Database, study_id: int, reader: Reader, agreements: AgreementSet
) -> tuple[ReportRow | None, ReportRow | None]:
    """(the editable version or None, the last final version or None)."""
    with db.session() as s:
        study_for(s, study_id, reader, agreements)
        rows = s.scalars(
            select(ReportRow).where(ReportRow.study_id == study_id).order_by(ReportRow.version)
        ).all()
    editable = next((r for r in reversed(rows) if r.status != "final"), None)
    final = next((r for r in reversed(rows) if r.status == "final"), None)
    return editable, final


def save_draft(
    db: Database,
    study_id: int,
    reader: Reader,
    agreements: AgreementSet,
    body: dict[str, Any],
) -> ReportRow:
    """Validate ``body`` (:class:`ReportContent`) and keep it as the editable version; a study
    whose report is final gets an addendum (the next version)."""
    content = _content(body)
    now = utcnow()
    with db.session() as s:
        study_for(s, study_id, reader, agreements)
        _held_by(s, study_id, reader)
        rows = s.scalars(
            select(ReportRow)
            .where(ReportRow.study_id == study_id)
            .order_by(ReportRow.version.desc())
            .with_for_update()
        ).all()
        latest = rows[0] if rows else None
        previous_comms = latest.content.get("communications", []) if latest else []
        stored = content.model_dump(mode="json")
        stored["communications"] = _keep_readers(stored["communications"], previous_comms, reader)
        if latest is not None and latest.status != "final":
            stored["signed_objects"] = latest.content.get("signed_objects", {})
            latest.content, latest.updated_at, latest.reader_id = stored, now, reader.id
            return latest
        row = ReportRow(
            study_id=study_id,
            version=(latest.version + 1) if latest else 1,
            status="draft",
            reader_id=reader.id,
            content={**stored, "signed_objects": {}},
            created_at=now,
            updated_at=now,
        )
        s.add(row)
        s.flush()
        return row


def _keep_readers(
    new: list[dict[str, Any]], old: list[dict[str, Any]], reader: Reader
) -> list[dict[str, Any]]:
    """A communication keeps the reader who recorded it; a new one gets this reader."""
    known = {(c["finding"], c["communicated_at"]): c.get("reader") for c in old}
    for c in new:
        c["reader"] = known.get((c["finding"], c["communicated_at"])) or reader.observer_id
    return new


def _content(body: dict[str, Any]) -> ReportContent:
    try:
        content = ReportContent.model_validate({**body, "signed_objects": {}})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DatasetError("invalid_report", f"{where}: {first['msg']}") from None
    for c in content.communications:
        if c.communicated_at.tzinfo is None or c.received_at.tzinfo is None:
            raise DatasetError("invalid_report", "communications: times need their time zone")
        if c.received_at < c.communicated_at:
            raise DatasetError("invalid_report", "communications: received before it was sent")
    return content


def _held_by(s: Any, study_id: int, reader: Reader) -> None:
    read = s.scalar(select(ReadRow).where(ReadRow.study_id == study_id))
    if read is None or read.claimed_by != reader.id:
        raise PolicyError("claim the study before you write its report")


def sign_report(
    db: Database,
    store: DurableStore,
    study_id: int,
    reader: Reader,
    agreements: AgreementSet,
    *,
    final: bool,
    organization: str,
    sign: Sign | None,
    now: datetime | None = None,
) -> SignOutcome:
    """Check and sign the editable version (see the module's docstring)."""
    now = now or utcnow()
    with db.session() as s:
        study = study_for(s, study_id, reader, agreements)
        _held_by(s, study_id, reader)
        row = s.scalars(
            select(ReportRow)
            .where(ReportRow.study_id == study_id, ReportRow.status != "final")
            .order_by(ReportRow.version.desc())
        ).first()
        if row is None:
            raise PolicyError("nothing to sign: save the report first")
        previous_final = s.scalars(
            select(ReportRow)
            .where(ReportRow.study_id == study_id, ReportRow.status == "final")
            .order_by(ReportRow.version.desc())
        ).first()
        job = _latest_job(s, study_id)
        agreement = agreements.get(study.agreement_id)
        assert agreement is not None
        images = s.execute(
            select(InstanceRow.path, SeriesRow.modality)
            .join(SeriesRow, InstanceRow.series_id == SeriesRow.id)
            .where(SeriesRow.study_id == study_id)
            .order_by(InstanceRow.id)
        ).all()
        ai_objects = s.scalars(
            select(ResultObjectRow).where(
                ResultObjectRow.job_id == job.id, ResultObjectRow.kind == "sr"
            )
        ).all()
        ai_paths = [o.path for o in ai_objects]
        content = ReportContent.model_validate(row.content)
        previous_ids = _last_signed(row, previous_final)
        paths = {
            o.id: o.path
            for o in s.scalars(
                select(ResultObjectRow).where(ResultObjectRow.id.in_(previous_ids.values()))
            ).all()
        }
        previous_paths = {tag: paths[i] for tag, i in previous_ids.items() if i in paths}
        study_uid, agreement_id, version, job_id = (
            study.study_uid,
            study.agreement_id,
            job.version,
            job.id,
        )
        priority, received = study.priority, job.first_received_at or study.first_received_at
        modality = study.modality or (images[0][1] if images else None)
    findings = ai_findings(db, study_id)
    sources = [pydicom.dcmread(store.path(p), stop_before_pixels=True) for p, _ in images]
    ai_srs = [pydicom.dcmread(store.path(p)) for p in ai_paths]
    by_lang = _report_findings(content, findings, ai_srs, modality)
    _check_critical(content, by_lang["en"])
    previous_by_lang = {tag: pydicom.dcmread(store.path(p)) for tag, p in previous_paths.items()}
    made = []
    for lang in agreement.report_languages:
        tag = LANG_TAGS[lang]
        spec = ReportSpec(
            language=tag,
            findings=by_lang[lang],
            impression=content.impression,
            impression_language=LANG_TAGS[content.impression_language],
            observer_id=reader.observer_id,
            observer_role="Radiologist",
            organization=organization,
            signed_at=now,
            final=final,
            version=row.version,
            communications=[_communication_line(c) for c in content.communications],
        )
        sr = report_sr(sources, spec, ai_results=ai_srs, previous=previous_by_lang.get(tag))
        made.append(save_object(store, sr, "report", agreement_id, study_uid, version, job_id))
    status = "final" if final else "preliminary"
    first_final = False
    with db.session() as s:
        # One transaction: the version's status (a compare-and-swap, so two signatures of
        # the same version cannot both pass), its objects for the edge, and the read's clocks.
        taken = s.execute(
            update(ReportRow)
            .where(ReportRow.id == row.id, ReportRow.status != "final")
            .values(status=status, signed_at=now)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            raise PolicyError("this version was signed final meanwhile")
        ids = add_objects(s, made, sign)
        signed_ids = {
            LANG_TAGS[lang]: i for lang, i in zip(agreement.report_languages, ids, strict=True)
        }
        report = s.get(ReportRow, row.id)
        assert report is not None
        stored = dict(report.content)
        stored["signed_objects"] = {**stored.get("signed_objects", {}), status: signed_ids}
        report.content = stored
        read = s.scalar(select(ReadRow).where(ReadRow.study_id == study_id))
        assert read is not None
        if final and read.final_at is None:
            read.final_at, first_final = now, True
        if not final and read.preliminary_at is None:
            read.preliminary_at = now
        if final:
            read.claimed_by, read.claimed_at = None, None
    turnaround = (now - received).total_seconds() if first_final else None
    return SignOutcome(row.id, row.version, status, ids, first_final, turnaround, priority)


def _last_signed(row: ReportRow, previous_final: ReportRow | None) -> dict[str, int]:
    """Language tag -> result object id of the newest signed SRs this signature follows."""
    signed = row.content.get("signed_objects", {})
    if signed.get("preliminary"):
        return dict(signed["preliminary"])
    if previous_final is not None:
        return dict(previous_final.content.get("signed_objects", {}).get("final", {}))
    return {}


def _report_findings(
    content: ReportContent,
    findings: list[AIFinding],
    ai_srs: Sequence[pydicom.Dataset],
    modality: str | None,
) -> dict[str, list[ReportFinding]]:
    """The Findings section per language, from the decisions and the added findings."""
    template = template_for(modality)
    allowed = {(f.scheme, f.code) for f in template.findings}
    sr_of = {str(ds.get("ManufacturerModelName", "")): ds for ds in ai_srs}
    out: dict[str, list[ReportFinding]] = {lang: [] for lang in ("ru", "zh", "en")}
    for f in findings:
        d = content.decisions.get(f.key)
        if d is None:
            raise PolicyError(f"AI finding {f.display.get('en', f.label)}: accept or reject it")
        if d.decision != "accepted" and not (d.reason or "").strip():
            raise PolicyError(f"AI finding {f.display.get('en', f.label)}: give a reason")
        scheme, code = f.scheme, f.code
        if d.decision == "modified":
            if d.modified_to is None:
                raise PolicyError(f"AI finding {f.label}: modified to what? pick a finding")
            scheme, code = d.modified_to.split(":", 1)
            if (scheme, code) not in allowed:
                raise PolicyError(
                    f"{d.modified_to} is not a finding of the {template.key} template"
                )
        sr = sr_of.get(f.model_name)
        if sr is None:
            raise PolicyError(f"the AI result of {f.model_name} is missing: it cannot be assessed")
        assessment = AIAssessment(
            d.decision,
            d.reason,
            str(sr.SOPClassUID),
            str(sr.SOPInstanceUID),
            _tracking_uid(sr, f.code),
            f.model_name,
            f.model_version,
        )
        for lang in out:
            text = term(scheme, code, lang, f.display if d.decision != "modified" else None)
            out[lang].append(ReportFinding(Coded(code, scheme, text), text, assessment))
    for a in content.added:
        if (a.scheme, a.code) not in allowed:
            raise PolicyError(
                f"{a.scheme}:{a.code} is not a finding of the {template.key} template"
            )
        for lang in out:
            text = term(a.scheme, a.code, lang)
            out[lang].append(ReportFinding(Coded(a.code, a.scheme, text), text))
    return out


def _tracking_uid(sr: pydicom.Dataset, code: str) -> str | None:
    """The TID 1500 tracking UID of the measurement group that reports ``code``, if any."""

    def walk(items: Any) -> str | None:
        for item in items or []:
            children = item.get("ContentSequence", [])
            codes = {
                c.ConceptCodeSequence[0].CodeValue
                for c in children
                if c.get("ValueType") == "CODE" and "ConceptCodeSequence" in c
            }
            if code in codes:
                for c in children:
                    if c.get("ValueType") == "UIDREF":
                        return str(c.UID)
            found = walk(children)
            if found:
                return found
        return None

    return walk(sr.get("ContentSequence", []))


def _check_critical(content: ReportContent, findings: list[ReportFinding]) -> None:
    told = {c.finding for c in content.communications}
    for f in findings:
        rejected = f.assessment is not None and f.assessment.decision == "rejected"
        key = f"{f.code.scheme}:{f.code.value}"
        if not rejected and is_critical(f.code.scheme, f.code.value) and key not in told:
            raise PolicyError(
                f"critical finding {f.term}: record its communication (recipient, time, "
                "method) before signing"
            )


def _communication_line(c: Communication) -> str:
    return (
        f"{c.finding}; communicated {c.communicated_at.isoformat()} by {c.reader} to "
        f"{c.recipient} ({c.method.replace('_', ' ')}); received {c.received_at.isoformat()}"
    )

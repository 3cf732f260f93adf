"""B2B agreements: the typed policy that decides what may cross from a hospital to a center.

An agreements file is YAML with a top-level ``agreements:`` list. A bad file fails at load with
a ``AgreementError`` naming the field (``agreements[0] (id=...).hospital.calling_ae_titles``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from radbridge.errors import AgreementError

__all__ = [
    "Agreement",
    "AgreementSet",
    "DeidOption",
    "Priority",
    "TransferMechanism",
    "load_agreements",
]

_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_AE = re.compile(r"^[\x20-\x7e]{1,16}$")
# Modality (0008,0060): the defined terms of PS3.3 C.7.3.1.1.1 (DICOM 2024), the retired ones
# of PS3.3 C.7.3.1.1.1 that older modalities still send, and SC, which is not a defined term
# but is what secondary capture devices write. An agreement naming anything else is refused at
# load (a typo would otherwise refuse every study of that modality).
_DEFINED_TERMS = """
ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DMS DG DOC DX ECG EEG EMG EOG EPS ES FID GM HC
HD IO IOL IVOCT IVUS KER KO LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA
PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT
RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XAPROTOCOL XC
"""
_RETIRED_TERMS = "AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF"
KNOWN_MODALITIES = frozenset([*_DEFINED_TERMS.split(), *_RETIRED_TERMS.split(), "SC"])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Priority(StrEnum):
    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"


class TransferMechanism(StrEnum):
    """Legal basis of the cross-border transfer (PIPL Art. 38)."""

    STANDARD_CONTRACT = "standard_contract"
    CERTIFICATION = "certification"
    SECURITY_ASSESSMENT = "security_assessment"


class DeidOption(StrEnum):
    """PS3.15 Annex E options an agreement may select (CID 7050 names)."""

    RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain_longitudinal_modified_dates"
    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    RETAIN_DEVICE_IDENTITY = "retain_device_identity"
    RETAIN_INSTITUTION_IDENTITY = "retain_institution_identity"
    CLEAN_DESCRIPTORS = "clean_descriptors"
    RETAIN_UIDS = "retain_uids"
    RETAIN_SAFE_PRIVATE = "retain_safe_private"
    CLEAN_STRUCTURED_CONTENT = "clean_structured_content"
    CLEAN_GRAPHICS = "clean_graphics"


class DicomNode(_Strict):
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        if not _AE.match(v) or v.strip() != v or "\\" in v:
            raise ValueError("must be 1-16 printable ASCII characters without '\\' or padding")
        return v


class StowAccess(_Strict):
    """Per-agreement credentials for STOW-RS; the password itself lives in the environment."""

    username: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    password_env: str = Field(min_length=1, pattern=r"^[A-Z_][A-Z0-9_]*$")


class Hospital(_Strict):
    name: str = Field(min_length=1)
    country: str = Field(min_length=2, max_length=2, description="ISO 3166-1 alpha-2.")
    calling_ae_titles: list[str] = Field(min_length=1)
    allowed_source_ips: list[str] = Field(
        min_length=1, description="Addresses or CIDR networks the PACS connects from."
    )
    return_destination: DicomNode
    called_ae_title: str | None = Field(
        None, description="AE title this hospital's PACS must call; default: edge.ae_title."
    )
    max_associations: int | None = Field(
        None, ge=1, le=1000, description="Concurrent associations from this hospital."
    )
    require_tls: bool = Field(
        False, description="Accept associations only on the edge's DICOM TLS port."
    )
    tls_client_names: list[str] = Field(
        default_factory=list,
        description="Client certificate subject CNs allowed (empty: any the CA signed).",
    )
    stow: StowAccess | None = Field(
        None, description="HTTP Basic credentials for pushing over DICOMweb STOW-RS."
    )

    @field_validator("called_ae_title")
    @classmethod
    def _called(cls, v: str | None) -> str | None:
        return None if v is None else DicomNode._ae(v)

    @field_validator("calling_ae_titles")
    @classmethod
    def _aes(cls, v: list[str]) -> list[str]:
        for t in v:
            DicomNode._ae(t)
        if len(set(v)) != len(v):
            raise ValueError("duplicate AE title")
        return v

    @field_validator("allowed_source_ips")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP address or network") from None
        return v

    def allows_ip(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(n, strict=False) for n in self.allowed_source_ips)


class ReadingCenter(_Strict):
    name: str = Field(min_length=1)
    country: str = Field(min_length=2, max_length=2)


class TransferBasis(_Strict):
    mechanism: TransferMechanism
    reference: str = Field(min_length=1, description="Filing / certificate / approval number.")
    valid_from: date
    valid_until: date
    suspended: bool = False
    max_persons_per_year: int = Field(
        10_000,
        ge=2,
        description="Distinct persons whose sensitive personal information may leave the "
        "hospital in a calendar year stay fewer than this (PIPL: a standard contract or a "
        "certification covers fewer than 10,000; a security assessment the figure granted). "
        "Counted across all the hospital's agreements by the edge's person ledger.",
    )

    @model_validator(mode="after")
    def _order(self) -> TransferBasis:
        if self.valid_until <= self.valid_from:
            raise ValueError("valid_until must be after valid_from")
        if (
            self.mechanism != TransferMechanism.SECURITY_ASSESSMENT
            and self.max_persons_per_year > 10_000
        ):
            raise ValueError(
                "max_persons_per_year: a standard contract or a certification covers fewer "
                "than 10,000 persons' sensitive data a year; more needs a security assessment"
            )
        return self

    def in_force(self, today: date) -> bool:
        return not self.suspended and self.valid_from <= today <= self.valid_until


class Deidentification(_Strict):
    profile: str = Field("basic", pattern="^basic$")
    options: list[DeidOption] = Field(default_factory=list)
    burned_in: Literal["quarantine", "mask"] = Field(
        "quarantine",
        description="Instances that may show identity in their pixels (BurnedInAnnotation YES, "
        "ultrasound, secondary capture): 'quarantine' keeps them at the edge, unsent; 'mask' "
        "blacks out ultrasound pixels outside the data regions and quarantines what it cannot "
        "mask.",
    )
    text_in_pixels: Literal["off", "mask", "quarantine"] = Field(
        "mask",
        description="Projection images (CR, DX, MG, XA, RF, OT...) without Burned In "
        "Annotation are read for text (Tesseract at the edge): 'mask' blacks out the words "
        "found (quarantines what it cannot mask or still reads an identifier in), "
        "'quarantine' keeps any image with text at the edge, 'off' trusts the images.",
    )
    burned_in_top_band_rows: int = Field(
        0,
        ge=0,
        le=4096,
        description="With burned_in 'mask': rows blacked out at the top of an ultrasound image "
        "that has no Sequence of Ultrasound Regions; 0 quarantines such images instead.",
    )
    secret_env: str | None = Field(
        None,
        description="Environment variable holding this agreement's pseudonym key; "
        "default: derived from edge.master_secret and the agreement id.",
    )


class Consent(_Strict):
    """The patient's consent to the cross-border read, as the hospital records it.

    A withdrawn consent (``radbridge consent withdraw``) always holds: nothing more of that
    patient leaves, and the center is told to purge what it holds. With ``required``, a
    patient's studies leave only with a consent reference: the value of ``attribute`` in the
    study's first instance, or one recorded at the edge (``radbridge consent add|import``)."""

    required: bool = False
    attribute: str | None = Field(
        None,
        description="DICOM keyword of the attribute holding the consent reference "
        "(e.g. ClinicalTrialProtocolID or a keyword the hospital's RIS fills).",
    )

    @field_validator("attribute")
    @classmethod
    def _keyword(cls, v: str | None) -> str | None:
        from pydicom.datadict import tag_for_keyword

        if v is not None and tag_for_keyword(v) is None:
            raise ValueError(f"{v!r} is not a DICOM keyword")
        return v


class Retention(_Strict):
    """How long the reading center keeps a study after its read went home (the final report
    fetched by the edge): the images first, then everything (reports, result objects, rows)."""

    images_hours: int = Field(
        720,
        ge=0,
        le=10 * 8760,
        description="Hours the center keeps a study's images after its final report left.",
    )
    reports_hours: int = Field(
        2160,
        ge=0,
        le=10 * 8760,
        description="Hours the center keeps the rest (reports, AI results, the study's rows).",
    )
    incomplete_hours: int = Field(
        168,
        ge=1,
        le=10 * 8760,
        description="Hours the center keeps the instances of a study the edge never completed "
        "(sent during its quiet period, then stopped, blocked or withdrawn at the edge), "
        "counted from its last instance; then the study goes whole.",
    )

    @model_validator(mode="after")
    def _order(self) -> Retention:
        if self.reports_hours < self.images_hours:
            raise ValueError("reports_hours must not be shorter than images_hours")
        return self


class Agreement(_Strict):
    id: str
    hospital: Hospital
    reading_center: ReadingCenter
    modalities: list[str] = Field(min_length=1)
    sla_minutes: dict[Priority, int] = Field(
        default_factory=lambda: {Priority.STAT: 60, Priority.URGENT: 240, Priority.ROUTINE: 1440}
    )
    default_priority: Priority = Priority.ROUTINE
    report_languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1)
    deidentification: Deidentification = Field(default_factory=Deidentification)  # type: ignore[arg-type]
    transfer_basis: TransferBasis
    quiet_period_s: float = Field(10.0, ge=0, le=86_400)
    retention: Retention = Field(default_factory=Retention)  # type: ignore[arg-type]
    consent: Consent = Field(default_factory=Consent)  # type: ignore[arg-type]
    active_from: date
    active_until: date

    @field_validator("id")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _SLUG.match(v):
            raise ValueError("must be a lowercase slug [a-z0-9-], 2-63 characters")
        return v

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - KNOWN_MODALITIES)
        if unknown:
            raise ValueError(f"unknown modality code(s) {unknown}")
        return v

    @field_validator("report_languages")
    @classmethod
    def _langs(cls, v: list[str]) -> list[str]:
        bad = sorted(set(v) - {"ru", "zh", "en"})
        if bad:
            raise ValueError(f"unsupported language(s) {bad}; supported: ru, zh, en")
        return v

    @field_validator("sla_minutes")
    @classmethod
    def _sla(cls, v: dict[Priority, int]) -> dict[Priority, int]:
        if any(m <= 0 for m in v.values()):
            raise ValueError("SLA minutes must be positive")
        return v

    @model_validator(mode="after")
    def _dates(self) -> Agreement:
        if self.active_until <= self.active_from:
            raise ValueError("active_until must be after active_from")
        return self

    def is_active(self, today: date | None = None) -> bool:
        today = today or datetime.now(UTC).date()
        return self.active_from <= today <= self.active_until

    def may_transfer(self, today: date | None = None) -> bool:
        """True when the agreement is active and its legal transfer basis is in force."""
        today = today or datetime.now(UTC).date()
        return self.is_active(today) and self.transfer_basis.in_force(today)


class AgreementSet(_Strict):
    agreements: list[Agreement] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> AgreementSet:
        ids = [a.id for a in self.agreements]
        if len(set(ids)) != len(ids):
            raise ValueError("agreement ids must be unique")
        seen: dict[str, str] = {}
        for a in self.agreements:
            for ae in a.hospital.calling_ae_titles:
                if ae in seen:
                    raise ValueError(
                        f"calling AE title {ae!r} is used by both {seen[ae]!r} and {a.id!r}"
                    )
                seen[ae] = a.id
        users = [a.hospital.stow.username for a in self.agreements if a.hospital.stow]
        if len(set(users)) != len(users):
            raise ValueError("STOW-RS usernames must be unique across agreements")
        return self

    def get(self, agreement_id: str) -> Agreement | None:
        return next((a for a in self.agreements if a.id == agreement_id), None)

    def for_stow_user(self, username: str, today: date | None = None) -> Agreement | None:
        """The active agreement whose STOW-RS username is ``username``, or None."""
        for a in self.agreements:
            if a.hospital.stow and a.hospital.stow.username == username and a.is_active(today):
                return a
        return None

    def for_calling_ae(self, ae_title: str, today: date | None = None) -> Agreement | None:
        """The active agreement that owns ``ae_title``, or None."""
        title = ae_title.strip()
        for a in self.agreements:
            if title in a.hospital.calling_ae_titles and a.is_active(today):
                return a
        return None


def load_agreements(path: Path | str) -> AgreementSet:
    """Load and validate an agreements file."""
    p = Path(path)
    try:
        raw: Any = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AgreementError(f"{p}: file not found") from None
    except yaml.YAMLError as exc:
        raise AgreementError(f"{p}: not valid YAML: {exc}") from None
    return parse_agreements(raw, source=str(p))


def parse_agreements(raw: Any, source: str = "<agreements>") -> AgreementSet:
    try:
        return AgreementSet.model_validate(raw)
    except ValidationError as exc:
        raise AgreementError(f"{source}: " + _describe(exc, raw)) from None


def _describe(exc: ValidationError, raw: Any) -> str:
    msgs = []
    for err in exc.errors():
        loc = list(err["loc"])
        text = ""
        if len(loc) >= 2 and loc[0] == "agreements" and isinstance(loc[1], int):
            ident = ""
            with contextlib.suppress(KeyError, IndexError, TypeError, AttributeError):
                ident = f" (id={raw['agreements'][loc[1]].get('id')})"
            text = f"agreements[{loc[1]}]{ident}"
            loc = loc[2:]
        rest = ".".join(str(p) for p in loc)
        field = f"{text}.{rest}" if text and rest else (text or rest or "(root)")
        msgs.append(f"{field}: {err['msg']}")
    return "; ".join(msgs)

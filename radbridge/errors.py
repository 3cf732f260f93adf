"""The one exception root of radbridge and its per-boundary subclasses.

Each boundary maps these to its own wire codes in exactly one place:
DIMSE statuses in ``dicom_io.dimse_statuses``, HTTP codes in ``radbridge.http_errors``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AgreementError",
    "AuthError",
    "CenterError",
    "ConfigError",
    "DatasetError",
    "DeidentificationError",
    "ForbiddenError",
    "ModelError",
    "NotFoundError",
    "OverloadedError",
    "PeerError",
    "PolicyError",
    "ProtocolError",
    "RadbridgeError",
    "ReidentificationError",
    "SignatureError",
    "StorageError",
    "redacted",
]


class RadbridgeError(Exception):
    """Root of every error radbridge raises on purpose."""


class ConfigError(RadbridgeError):
    """A settings or configuration file is invalid; the message names the field."""


class AgreementError(ConfigError):
    """An agreements file is invalid; the message names the field."""


class PolicyError(RadbridgeError):
    """An agreement forbids what was asked (unknown peer, inactive agreement, no transfer basis)."""


class DatasetError(RadbridgeError):
    """A DICOM dataset cannot be understood or does not match what was declared.

    ``reason`` is a stable machine-readable code used by the DIMSE status table.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProtocolError(RadbridgeError):
    """A DICOM peer broke the upper layer protocol (PS3.8 9): the association is aborted with
    ``reason``, an A-ABORT reason/diagnostic (PS3.8 9.3.8: 0 not specified, 1 unrecognized
    PDU, 2 unexpected PDU, 4 unrecognized PDU parameter, 5 unexpected PDU parameter, 6 invalid
    PDU parameter value)."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StorageError(RadbridgeError):
    """The durable store could not write (disk full, I/O error)."""


class DeidentificationError(RadbridgeError):
    """De-identification could not guarantee its output; nothing may leave."""


class ReidentificationError(RadbridgeError):
    """A returned result cannot be tied back to what this edge sent; it must not reach the PACS."""


class PeerError(RadbridgeError):
    """A DICOM peer (the hospital PACS) was unreachable or refused; ``reason`` says which:
    ``pacs_unreachable`` or ``pacs_refused``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CenterError(RadbridgeError):
    """The center could not be reached or did not answer as the contract (radbridge.contract)
    says; the edge's outboxes retry, not before ``retry_after_s``.

    ``status`` is the HTTP status (0: no answer). The message holds no identity: the center's
    answers are about pseudonymous data only.
    """

    def __init__(self, message: str, *, status: int = 0, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class OverloadedError(RadbridgeError):
    """The center's bounded queue is full; try again after ``retry_after_s`` (HTTP 503)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message, retry_after_s)
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return str(self.args[0])


class ModelError(RadbridgeError):
    """A model or its manifest is invalid or disagrees with its ONNX file."""


class NotFoundError(RadbridgeError):
    """A requested object does not exist."""


class NoModelError(NotFoundError):
    """No model in service reads these images (their modality, or body part)."""

    def __init__(self, modality: str, message: str) -> None:
        super().__init__(message)
        self.modality = modality


class AuthError(RadbridgeError):
    """The caller did not prove who it is (HTTP 401; one message whatever the reason)."""


class ForbiddenError(RadbridgeError):
    """The caller is known but its role may not use this route (HTTP 403)."""


class SignatureError(RadbridgeError):
    """A result object's signature is missing, invalid or not for these bytes; nothing of it
    may reach the PACS. ``reason``: unsigned, unknown_key, invalid, altered, not_ours,
    mismatch."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def validation_problems(exc: Any, limit: int | None = None) -> str:
    """A pydantic ``ValidationError`` as ``"field.path: message"`` parts joined by "; " (the
    first ``limit`` only), for errors that must name the field: settings, trust files,
    Serve config. The value itself is never repeated: it may be a secret."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
    return "; ".join(parts)


def redacted(exc: BaseException) -> str:
    """An unexpected exception for a log line: its type and where it was raised, not its
    message. Messages of library errors can carry data values (PostgreSQL's DETAIL names the
    key that collided: at the edge, an original UID), and edge logs must hold no identity."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
    return f"{type(exc).__name__}{where}"

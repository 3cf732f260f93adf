"""The one table from internal errors to DIMSE C-STORE statuses (PS3.4 B.2.3, PS3.7 C)."""

from __future__ import annotations

from radbridge.errors import DatasetError, RadbridgeError, StorageError

__all__ = [
    "CANNOT_UNDERSTAND",
    "NOT_AUTHORIZED",
    "OUT_OF_RESOURCES",
    "PROCESSING_FAILURE",
    "SOP_CLASS_MISMATCH",
    "SUCCESS",
    "status_for",
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
SOP_CLASS_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
PROCESSING_FAILURE = 0x0110  # Failure: Processing failure
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized (PS3.7 C.5)

_DATASET_REASONS = {
    "sop_class_mismatch": SOP_CLASS_MISMATCH,
    "unparseable": CANNOT_UNDERSTAND,
    "missing_uid": CANNOT_UNDERSTAND,
    "invalid_uid": CANNOT_UNDERSTAND,
    "modality_not_allowed": NOT_AUTHORIZED,
}


def status_for(exc: RadbridgeError) -> int:
    """Map an error raised while handling a C-STORE to the status the SCU receives."""
    if isinstance(exc, DatasetError):
        return _DATASET_REASONS.get(exc.reason, CANNOT_UNDERSTAND)
    if isinstance(exc, StorageError):
        return OUT_OF_RESOURCES
    return PROCESSING_FAILURE

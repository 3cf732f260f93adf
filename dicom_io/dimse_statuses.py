"""The one table from internal errors to DIMSE C-STORE statuses (PS3.4 B.2.3, PS3.7 C)."""

from __future__ import annotations

from radbridge.errors import DatasetError, RadbridgeError, StorageError

__all__ = [
    "CANNOT_UNDERSTAND",
    "INFLATE_LIMIT",
    "INSTANCE_TOO_LARGE",
    "MALFORMED",
    "NOT_AUTHORIZED",
    "OUT_OF_RESOURCES",
    "PIXEL_MISMATCH",
    "PIXEL_TOO_LARGE",
    "PROCESSING_FAILURE",
    "SOP_CLASS_MISMATCH",
    "SUCCESS",
    "TRUNCATED",
    "status_for",
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources
# Refused: Out of Resources (A7xx), radbridge's bounds on one instance (dicom_io.structure):
INSTANCE_TOO_LARGE = 0xA701  # encoded instance over edge.max_instance_bytes
PIXEL_TOO_LARGE = 0xA702  # Rows x Columns x Frames x Samples x Bits over edge.max_pixel_bytes
INFLATE_LIMIT = 0xA703  # Deflated data set inflates past edge.max_inflated_bytes
SOP_CLASS_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
# Error: Cannot understand (Cxxx), radbridge's reasons that a data set does not parse in full:
TRUNCATED = 0xC001  # an element, item or fragment runs past the end of its container
MALFORMED = 0xC002  # element structure: VR, delimiters, items, nesting
PIXEL_MISMATCH = 0xC003  # Pixel Data disagrees with the pixel module (length, fragments)
PROCESSING_FAILURE = 0x0110  # Failure: Processing failure
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized (PS3.7 C.5)

_DATASET_REASONS = {
    "sop_class_mismatch": SOP_CLASS_MISMATCH,
    "unparseable": CANNOT_UNDERSTAND,
    "missing_uid": CANNOT_UNDERSTAND,
    "invalid_uid": CANNOT_UNDERSTAND,
    "truncated": TRUNCATED,
    "malformed": MALFORMED,
    "pixel_module": PIXEL_MISMATCH,
    "pixel_length": PIXEL_MISMATCH,
    "pixel_fragments": PIXEL_MISMATCH,
    "instance_too_large": INSTANCE_TOO_LARGE,
    "pixel_too_large": PIXEL_TOO_LARGE,
    "inflate_limit": INFLATE_LIMIT,
    "modality_not_allowed": NOT_AUTHORIZED,
}


def status_for(exc: RadbridgeError) -> int:
    """Map an error raised while handling a C-STORE to the status the SCU receives."""
    if isinstance(exc, DatasetError):
        return _DATASET_REASONS.get(exc.reason, CANNOT_UNDERSTAND)
    if isinstance(exc, StorageError):
        return OUT_OF_RESOURCES
    return PROCESSING_FAILURE

"""DICOMweb STOW-RS message bodies: multipart/related; type="application/dicom" (PS3.18 10.5)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

from pydicom.dataset import Dataset

from radbridge.errors import DatasetError

__all__ = [
    "DICOM_MEDIA_TYPE",
    "decode_multipart",
    "encode_multipart",
    "store_response",
    "store_status",
]

DICOM_MEDIA_TYPE = "application/dicom"
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_TYPE = re.compile(r'type="?([^";]+)"?', re.IGNORECASE)


def encode_multipart(parts: Iterable[bytes]) -> tuple[bytes, str]:
    """Return (body, content-type header) for a STOW-RS request."""
    boundary = f"radbridge-{uuid.uuid4().hex}"
    chunks: list[bytes] = []
    for part in parts:
        chunks.append(
            f"--{boundary}\r\nContent-Type: {DICOM_MEDIA_TYPE}\r\n\r\n".encode() + part + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    content_type = f'multipart/related; type="{DICOM_MEDIA_TYPE}"; boundary={boundary}'
    return b"".join(chunks), content_type


def decode_multipart(body: bytes, content_type: str) -> list[bytes]:
    """Split a STOW-RS body into its application/dicom parts.

    Raises ``DatasetError`` naming what is wrong with the envelope: reason
    ``unsupported_media_type`` for a wrong media type (HTTP 415), else ``bad_request`` (400).
    """
    if not content_type.lower().startswith("multipart/related"):
        raise DatasetError("unsupported_media_type", "Content-Type must be multipart/related")
    m_type = _TYPE.search(content_type)
    if m_type and m_type.group(1).lower() != DICOM_MEDIA_TYPE:
        raise DatasetError("unsupported_media_type", f'multipart type must be "{DICOM_MEDIA_TYPE}"')
    m = _BOUNDARY.search(content_type)
    if not m:
        raise DatasetError("bad_request", "Content-Type has no boundary parameter")
    delimiter = b"--" + m.group(1).encode()
    pieces = body.split(delimiter)
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        raise DatasetError("bad_request", "multipart body has no parts or no closing boundary")
    parts: list[bytes] = []
    for raw in pieces[1:-1]:
        head, sep, payload = raw.partition(b"\r\n\r\n")
        if not sep:
            raise DatasetError("bad_request", "multipart part has no header separator")
        headers = head.decode("latin-1").lower()
        if "content-type:" in headers and DICOM_MEDIA_TYPE not in headers:
            raise DatasetError("unsupported_media_type", "a part is not application/dicom")
        if payload.endswith(b"\r\n"):
            payload = payload[:-2]
        parts.append(payload)
    return parts


def store_response(
    stored: Iterable[tuple[str, str]], failed: Iterable[tuple[str | None, str | None, int]]
) -> dict[str, object]:
    """The Store Instances Response (PS3.18 10.5.3, Annex I) in DICOM JSON.

    ``stored``: (SOP Class UID, SOP Instance UID) per stored instance; ``failed``: (SOP Class
    UID, SOP Instance UID, FailureReason), the UIDs None when the part could not be parsed.
    RetrieveURL is omitted: neither node serves WADO-RS.
    """
    ds = Dataset()
    refs = []
    for cls, inst in stored:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, inst
        refs.append(item)
    if refs:
        ds.ReferencedSOPSequence = refs
    failures = []
    for f_cls, f_inst, reason in failed:
        item = Dataset()
        if f_cls:
            item.ReferencedSOPClassUID = f_cls
        if f_inst:
            item.ReferencedSOPInstanceUID = f_inst
        item.FailureReason = reason
        failures.append(item)
    if failures:
        ds.FailedSOPSequence = failures
    return ds.to_json_dict()


def store_status(stored: int, failed: int) -> int:
    """HTTP status of a STOW-RS answer: 200 all stored, 202 some failed, 409 all failed."""
    return 200 if not failed else 202 if stored else 409

"""DICOMweb for readers (PS3.18): QIDO-RS searches, WADO-RS metadata, frames, instances and
rendered frames — of the studies the center holds, scoped to the reader's agreements.

Everything resolves through the center's index (``studies`` / ``series`` / ``instances`` and
the AI's ``result_objects``), never through a path or UID the caller made up: a study, series or
instance of an agreement the reader may not see answers 404, as a missing one does. The data
are de-identified already (the center never holds identity).

Frames are served uncompressed (Explicit VR Little Endian) whatever the stored transfer syntax:
one decoder in the browser, and the stored bytes are decoded here by pydicom's handlers.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from fastapi import Response
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy import select

from dicom_io.store import DurableStore
from radbridge.db.engine import Database
from radbridge.db.tables import InstanceRow, ResultObjectRow, SeriesRow, StudyRow
from radbridge.errors import DatasetError, NotFoundError

__all__ = [
    "EXPLICIT_LE",
    "Located",
    "frame_bytes",
    "instances",
    "json_response",
    "locate",
    "metadata",
    "multipart",
    "rendered_png",
    "search_series",
    "search_studies",
]

EXPLICIT_LE = "1.2.840.10008.1.2.1"
_STUDY_FIELDS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "PatientID",
    "PatientName",
    "StudyID",
    "StudyDescription",
)
_SERIES_FIELDS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
)
_INSTANCE_FIELDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
)
_BULK = {Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}
_MAX_RESULTS = 500


@dataclass(frozen=True)
class Located:
    """One stored object a reader may see: the index's path and what it is."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    path: str
    agreement_id: str


def _header(store: DurableStore, path: str) -> Dataset:
    return pydicom.dcmread(store.path(path), stop_before_pixels=True)


def _json(ds: Dataset, keywords: tuple[str, ...], include: list[str]) -> dict[str, Any]:
    out = Dataset()
    for keyword in (*keywords, *include):
        if keyword in ds:
            out[keyword] = ds[keyword]
    return out.to_json_dict()  # type: ignore[no-any-return]


def _includes(includefield: list[str]) -> list[str]:
    """``includefield`` values as keywords (keywords or 8-digit hex tags; "all" ignored)."""
    out = []
    for value in includefield:
        for field in value.split(","):
            field = field.strip()
            if not field or field == "all":
                continue
            if len(field) == 8 and all(c in "0123456789abcdefABCDEF" for c in field):
                keyword = pydicom.datadict.keyword_for_tag(int(field, 16))
            else:
                keyword = field
            if not keyword or pydicom.datadict.tag_for_keyword(keyword) is None:
                raise DatasetError(
                    "invalid_includefield", f"includefield: unknown attribute {field}"
                )
            out.append(keyword)
    return out


def _studies(s: Any, visible: frozenset[str], study_uid: str | None = None) -> list[StudyRow]:
    q = select(StudyRow).where(StudyRow.agreement_id.in_(sorted(visible)))
    if study_uid is not None:
        q = q.where(StudyRow.study_uid == study_uid)
    return list(s.scalars(q.order_by(StudyRow.id.desc()).limit(_MAX_RESULTS)).all())


def _objects(s: Any, study: StudyRow) -> list[tuple[str, str, str]]:
    """(series UID, SOP Instance UID, path) of every image and AI object of the study."""
    images = s.execute(
        select(SeriesRow.series_uid, InstanceRow.sop_instance_uid, InstanceRow.path)
        .join(InstanceRow, InstanceRow.series_id == SeriesRow.id)
        .where(SeriesRow.study_id == study.id)
        .order_by(InstanceRow.id)
    ).all()
    results = s.execute(
        select(
            ResultObjectRow.series_instance_uid,
            ResultObjectRow.sop_instance_uid,
            ResultObjectRow.path,
        )
        .where(
            ResultObjectRow.agreement_id == study.agreement_id,
            ResultObjectRow.study_uid == study.study_uid,
            ResultObjectRow.kind.in_(("sr", "seg")),
        )
        .order_by(ResultObjectRow.id)
    ).all()
    return [tuple(r) for r in (*images, *results)]  # type: ignore[misc]


def search_studies(
    db: Database,
    store: DurableStore,
    visible: frozenset[str],
    *,
    study_uid: str | None = None,
    patient_id: str | None = None,
    includefield: list[str] | None = None,
) -> list[dict[str, Any]]:
    include = _includes(includefield or [])
    out = []
    with db.session() as s:
        for study in _studies(s, visible, study_uid):
            objects = _objects(s, study)
            if not objects:
                continue
            ds = _header(store, objects[0][2])
            if patient_id is not None and str(ds.get("PatientID", "")) != patient_id:
                continue
            entry = _json(ds, _STUDY_FIELDS, include)
            modalities = sorted(
                {
                    m
                    for (m,) in s.execute(
                        select(SeriesRow.modality).where(SeriesRow.study_id == study.id)
                    )
                    if m
                }
            )
            extra = Dataset()
            extra.ModalitiesInStudy = modalities
            extra.NumberOfStudyRelatedInstances = len(objects)
            extra.NumberOfStudyRelatedSeries = len({o[0] for o in objects})
            entry.update(extra.to_json_dict())
            out.append(entry)
    return out


def _study(s: Any, visible: frozenset[str], study_uid: str) -> StudyRow:
    found = _studies(s, visible, study_uid)
    if not found:
        raise NotFoundError("no study with that UID")
    return found[0]


def search_series(
    db: Database,
    store: DurableStore,
    visible: frozenset[str],
    study_uid: str,
    includefield: list[str] | None = None,
) -> list[dict[str, Any]]:
    include = _includes(includefield or [])
    with db.session() as s:
        objects = _objects(s, _study(s, visible, study_uid))
    first: dict[str, tuple[str, int]] = {}
    for series_uid, _sop, path in objects:
        path0, n = first.get(series_uid, (path, 0))
        first[series_uid] = (path0, n + 1)
    out = []
    for path, n in first.values():
        entry = _json(_header(store, path), _SERIES_FIELDS, include)
        extra = Dataset()
        extra.NumberOfSeriesRelatedInstances = n
        entry.update(extra.to_json_dict())
        out.append(entry)
    return out


def locate(
    db: Database,
    visible: frozenset[str],
    study_uid: str,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> list[Located]:
    """The stored objects under a study (series, instance), or NotFoundError."""
    with db.session() as s:
        study = _study(s, visible, study_uid)
        found = [
            Located(study.study_uid, se, sop, path, study.agreement_id)
            for se, sop, path in _objects(s, study)
            if (series_uid is None or se == series_uid)
            and (sop_instance_uid is None or sop == sop_instance_uid)
        ]
    if not found:
        raise NotFoundError("no such series or instance")
    return found


def instances(
    store: DurableStore, located: list[Located], includefield: list[str] | None = None
) -> list[dict[str, Any]]:
    include = _includes(includefield or [])
    out = []
    for obj in located:
        ds = _header(store, obj.path)
        entry = _json(ds, (*_INSTANCE_FIELDS, "SeriesInstanceUID"), include)
        out.append(entry)
    return out


def metadata(store: DurableStore, located: list[Located]) -> list[dict[str, Any]]:
    """WADO-RS metadata: every attribute but the bulk pixel data, in DICOM JSON."""
    out = []
    for obj in located:
        ds = pydicom.dcmread(store.path(obj.path), stop_before_pixels=True)
        for tag in list(ds.keys()):
            if tag in _BULK:
                del ds[tag]
        entry = ds.to_json_dict(bulk_data_threshold=1 << 20)
        # The frames are served uncompressed: say so, as WADO-RS servers do.
        tsyntax = Dataset()
        tsyntax.add_new(0x00020010, "UI", EXPLICIT_LE)
        entry.update(tsyntax.to_json_dict())
        out.append(entry)
    return out


def _pixels(store: DurableStore, obj: Located) -> tuple[Dataset, np.ndarray]:
    ds = pydicom.dcmread(store.path(obj.path))
    if "PixelData" not in ds:
        raise NotFoundError("this instance has no frames")
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        arr = arr[np.newaxis, ...]
    return ds, arr


def frame_bytes(store: DurableStore, obj: Located, numbers: list[int]) -> list[bytes]:
    """Frames ``numbers`` (from 1) as uncompressed little-endian bytes; the instance is read
    and decoded once for all of them."""
    ds, arr = _pixels(store, obj)
    out = []
    for number in numbers:
        if not 1 <= number <= len(arr):
            raise NotFoundError(f"frame {number}: the instance has {len(arr)}")
        frame = arr[number - 1]
        if int(ds.get("BitsAllocated", 16)) == 1:
            out.append(np.packbits(frame.astype(np.uint8).ravel(), bitorder="little").tobytes())
        else:
            out.append(np.ascontiguousarray(frame).astype(frame.dtype.newbyteorder("<")).tobytes())
    return out


def rendered_png(store: DurableStore, obj: Located, number: int) -> bytes:
    """Frame ``number`` windowed by the instance's own VOI (else its range) as 8-bit PNG."""
    from PIL import Image

    ds, arr = _pixels(store, obj)
    if not 1 <= number <= len(arr):
        raise NotFoundError(f"frame {number}: the instance has {len(arr)}")
    frame = arr[number - 1].astype(np.float64)
    frame = frame * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None:
        c = float(centre[0] if isinstance(centre, pydicom.multival.MultiValue) else centre)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        lo, hi = c - w / 2, c + w / 2
    else:
        lo, hi = float(frame.min()), float(frame.max()) or 1.0
    scaled = np.clip((frame - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        scaled = 255 - scaled
    buf = io.BytesIO()
    mode = "RGB" if scaled.ndim == 3 else "L"
    Image.fromarray(scaled.astype(np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def multipart(parts: list[bytes], media_type: str, extra: str = "") -> tuple[bytes, str]:
    """A multipart/related body of ``parts`` and its Content-Type."""
    boundary = "radbridge-" + pydicom.uid.generate_uid().replace(".", "")[-24:]
    chunks = []
    for part in parts:
        chunks.append(
            f"--{boundary}\r\nContent-Type: {media_type}{extra}\r\n\r\n".encode("ascii")
            + part
            + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    ctype = f'multipart/related; type="{media_type}"; boundary={boundary}'
    return b"".join(chunks), ctype


def json_response(found: list[dict[str, Any]]) -> Response:
    """A QIDO-RS / metadata answer: DICOM JSON, or 204 when nothing matched."""
    if not found:
        return Response(status_code=204)
    return Response(json.dumps(found), media_type="application/dicom+json")

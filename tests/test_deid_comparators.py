"""Our engine against dicognito and pydicom/deid on the unit tests' planted-identity corpus.

The corpus is the instance of ``tests.conftest.make_instance`` (its ``identity_needles`` are all
planted values here), given the extra identity the de-identification unit tests plant
(``test_deid_engine``: operator and content-creator names, an address, nested unknown sequences
with a name, a phone number and a UID, Original Attributes, a private block after Pixel Data;
``test_deid_text``: a Chinese resident ID, SNILS, phone numbers, a spelled birth date), in
UTF-8, GB18030, ISO 2022 IR 58 and ISO_IR 144 (the Russian patient of the legacy-charset test),
two instances of one study (the second referencing the first), plus pydicom's CT_small and
MR_small (``test_pydicom_test_files``).

Every tool gets each file as bytes read by pydicom and its output is written back to bytes:

* ``radbridge``: ``deidentify`` with the basic profile, and with every option except Retain UIDs;
* ``dicognito``: one ``Anonymizer`` for the corpus (as its documentation says for a study);
* ``deid``: as its documentation runs it, ``get_identifiers`` then ``replace_identifiers`` with
  the variables its stock recipe (``deid.dicom``) asks for: ``entity_id`` and ``item_id`` (a
  patient and a study pseudonym), ``entity_timestamp`` and ``item_timestamp`` (birth and study
  dates moved back by a fixed 17 days). That recipe removes every UID (``REMOVE contains:UID``)
  by design, so its missing UIDs and lost references are its recipe's, not the harness's; this
  deid release ships no other general recipe (only chest X-ray and ultrasound filters);
* ``unchanged``: a control that returns its input, which must leak every planted value (it
  shows that the search finds what it looks for).

The report (a table on stdout, see ``pytest -s``, and ``tests/.reports/deid-comparators.json``)
lists per tool which planted values came out, where, and what the output breaks: required
attributes missing or invalid, file meta out of step, PS3.15 E.1.1 markers absent, references
and study/series grouping lost across the corpus, escape sequences in text under a Specific
Character Set that allows none. Our engine must leak nothing and break nothing; the comparators
must only have run on every file and produced output: their leaks are measured, not expected.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from loadtests import deid_tools
from radbridge.agreements import DeidOption
from tests.conftest import PATIENT, REPO, identity_needles, make_instance
from tests.test_deid_property import (
    CHARSETS,
    TEXT_VRS,
    Charset,
    Leak,
    elements,
    encode_source,
    find_leaks,
)

REPORT = REPO / "tests" / ".reports" / "deid-comparators.json"
KEY = b"c" * 32
ALL_OPTIONS = tuple(o for o in DeidOption if o is not DeidOption.RETAIN_UIDS)

# -- the corpus -----------------------------------------------------------------------------


@dataclass
class CorpusFile:
    name: str
    source: bytes
    charset: Charset
    needles: dict[str, list[str]]  # planted value -> where it was planted


def _add(needles: dict[str, list[str]], value: str, *where: str) -> None:
    needles.setdefault(value, []).extend(where)


def _identity(ds: Dataset, patient: dict[str, str]) -> dict[str, list[str]]:
    """What ``make_instance`` planted: the name (in PatientName and the description), the ID
    (also in its private block), birth date, accession number and every UID."""
    needles: dict[str, list[str]] = {}
    for part in re.split(r"[=^]", patient["name"]):
        if part:
            _add(needles, part, "PatientName", "StudyDescription")
    _add(needles, patient["id"], "PatientID", "(0009,'ACME PACS',01 LO)")
    _add(needles, patient["birth"], "PatientBirthDate")
    _add(needles, str(ds.AccessionNumber), "AccessionNumber")
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        _add(needles, str(ds[kw].value), kw)
    ref = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    _add(needles, ref, "SourceImageSequence[0].ReferencedSOPInstanceUID")
    return needles


def _plant_extras(ds: Dataset, patient: dict[str, str], needles: dict[str, list[str]]) -> None:
    """The identity the de-identification unit tests plant beyond ``make_instance``."""
    y, m, d = patient["birth"][:4], patient["birth"][4:6], patient["birth"][6:]
    ds.OtherPatientIDs = "11010519491231002X"
    _add(needles, "11010519491231002X", "OtherPatientIDs")
    ds.PatientTelephoneNumbers = "13800138000"
    _add(needles, "13800138000", "PatientTelephoneNumbers")
    ds.ImageComments = "СНИЛС 112-233-445 95, tel +7 (912) 345-67-89"
    _add(needles, "112-233-445 95", "ImageComments")
    _add(needles, "+7 (912) 345-67-89", "ImageComments")
    ds.AdditionalPatientHistory = f"born {d}.{m}.{y}"
    _add(needles, f"{d}.{m}.{y}", "AdditionalPatientHistory")
    ds.OperatorsName = "Sidorov^Ivan"
    _add(needles, "Sidorov", "OperatorsName")
    ds.PatientAddress = "Beijing, Xicheng"
    _add(needles, "Xicheng", "PatientAddress")
    inner = Dataset()
    inner.PatientName = patient["name"]
    inner.ContentCreatorName = "Petrova^Anna"
    inner.ReferencedSOPInstanceUID = generate_uid()
    inner.TextValue = "Petrova Anna, tel 13800138000"
    inner.AcquisitionDate = patient["birth"]
    middle = Dataset()
    middle.ViewModifierCodeSequence = [inner]
    middle.CodeValue = "R-10206"
    ds.ViewCodeSequence = [middle]
    deep = "ViewCodeSequence[0].ViewModifierCodeSequence[0]."
    _add(needles, "Petrova", deep + "ContentCreatorName", deep + "TextValue")
    _add(needles, str(inner.ReferencedSOPInstanceUID), deep + "ReferencedSOPInstanceUID")
    _add(needles, "13800138000", deep + "TextValue")
    _add(needles, patient["birth"], deep + "AcquisitionDate")
    for part in re.split(r"[=^]", patient["name"]):
        if part:
            _add(needles, part, deep + "PatientName")
    orig = Dataset()
    orig.PatientID = patient["id"]
    ds.OriginalAttributesSequence = [Dataset()]
    ds.OriginalAttributesSequence[0].ModifiedAttributesSequence = [orig]
    _add(needles, patient["id"], "OriginalAttributesSequence[0].ModifiedAttributesSequence[0]")
    block = ds.private_block(0x7FE1, "ACME AFTER PIXELS", create=True)
    block.add_new(0x01, "LO", patient["id"])
    _add(needles, patient["id"], "(7FE1,'ACME AFTER PIXELS',01 LO)")


RUSSIAN = {"name": "Ivanov^Ivan=Иванов^Иван", "id": "PID-5512347", "birth": "19580923"}


def _planted_instance(
    name: str, charset: str, patient: dict[str, str], **kwargs: Any
) -> tuple[CorpusFile, Dataset]:
    ds = make_instance(patient=patient, **kwargs)
    needles = _identity(ds, patient)
    if patient is PATIENT:  # conftest's own list of what must never leave the edge
        assert set(identity_needles(ds)) <= {n.encode() for n in needles}
    _plant_extras(ds, patient, needles)
    cs = CHARSETS[charset]
    return CorpusFile(name, encode_source(ds, cs), cs, needles), ds


def _testdata_file(name: str) -> CorpusFile:
    path = get_testdata_file(name)
    assert path is not None, name
    ds = pydicom.dcmread(path)
    needles: dict[str, list[str]] = {}
    for part in str(ds.PatientName).split("^"):
        if len(part) >= 4:
            _add(needles, part, "PatientName")
    _add(needles, str(ds.PatientID), "PatientID")
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value and UID(str(elem.value)).name == str(elem.value):
            _add(needles, str(elem.value), elem.keyword)
    charset = CHARSETS["ISO_IR 192"]  # these are ASCII: UTF-8 bytes are the source bytes
    return CorpusFile(f"pydicom/{name}", Path(path).read_bytes(), charset, needles)


def corpus() -> list[CorpusFile]:
    first, a = _planted_instance("dx-utf8-1", "ISO_IR 192", PATIENT, seed=0)
    second, _ = _planted_instance(
        "dx-utf8-2-refs-1",
        "ISO_IR 192",
        PATIENT,
        study_uid=a.StudyInstanceUID,
        series_uid=a.SeriesInstanceUID,
        seed=1,
    )
    # The second instance references the first: its reference must follow the first's UID.
    src = pydicom.dcmread(BytesIO(second.source))
    old_ref = str(src.SourceImageSequence[0].ReferencedSOPInstanceUID)
    src.SourceImageSequence[0].ReferencedSOPInstanceUID = a.SOPInstanceUID
    buf = BytesIO()
    src.save_as(buf, enforce_file_format=True)
    second.source = buf.getvalue()
    del second.needles[old_ref]
    _add(second.needles, str(a.SOPInstanceUID), "SourceImageSequence[0].ReferencedSOPInstanceUID")
    files = [first, second]
    files.append(_planted_instance("dx-gb18030", "GB18030", PATIENT, seed=2)[0])
    files.append(_planted_instance("dx-iso2022-ir58", "ISO 2022 IR 58", PATIENT, seed=3)[0])
    files.append(_planted_instance("dx-iso-ir-144", "ISO_IR 144", RUSSIAN, seed=4)[0])
    files += [_testdata_file("CT_small.dcm"), _testdata_file("MR_small.dcm")]
    return files


# -- the tools --------------------------------------------------------------------------------

Tool = Callable[[Dataset], Dataset]


def _deid() -> Tool:
    from deid.dicom import get_identifiers, replace_identifiers
    from deid.logger import bot
    from deid.logger.message import ERROR

    bot.level = ERROR  # not its warning that the default recipe is used, once per file
    patients: dict[str, str] = {}
    studies: dict[str, str] = {}

    def shifted(value: object) -> str:
        text = str(value or "")
        if not re.fullmatch(r"\d{8}", text):
            return ""
        day = datetime.strptime(text, "%Y%m%d") - timedelta(days=17)
        return day.strftime("%Y%m%d")

    def run(ds: Dataset) -> Dataset:
        items = get_identifiers([ds])
        patient = str(ds.get("PatientID", ""))
        study = str(ds.get("StudyInstanceUID", ""))
        for item in items.values():
            item["entity_id"] = patients.setdefault(patient, f"PATIENT-{len(patients) + 1:04d}")
            item["item_id"] = studies.setdefault(study, f"STUDY-{len(studies) + 1:04d}")
            item["entity_timestamp"] = shifted(ds.get("PatientBirthDate"))
            item["item_timestamp"] = shifted(ds.get("StudyDate"))
        out = replace_identifiers(dicom_files=[ds], ids=items)
        assert len(out) == 1
        result: Dataset = out[0]
        return result

    return run


def _unchanged() -> Tool:
    return lambda ds: ds


TOOLS: dict[str, tuple[str, Callable[[], Tool]]] = {
    "radbridge": ("radbridge", deid_tools.radbridge((), KEY)),
    "radbridge+options": ("radbridge", deid_tools.radbridge(ALL_OPTIONS, KEY)),
    "dicognito": ("dicognito", deid_tools.dicognito("radbridge-comparison")),
    "deid": ("deid", _deid),
    "unchanged (control)": ("pydicom", _unchanged),
}
OURS = ("radbridge", "radbridge+options")

# -- what a de-identified instance must still have ---------------------------------------------

_TYPE1_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Type 1 or 2 attributes of the Patient, General Study, General Series, General Image, Frame of
# Reference and Image Pixel modules: present in the input, so required in the output.
_REQUIRED_IF_PRESENT = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "Modality",
    "SeriesNumber",
    "InstanceNumber",
    "FrameOfReferenceUID",
    "Rows",
    "Columns",
    "BitsAllocated",
    "PixelData",
)


def _valid_uid(value: object) -> bool:
    """PS3.5 9.1: at most 64 characters, dot-separated numbers without leading zeros."""
    text = str(value)
    parts = text.split(".")
    return 0 < len(text) <= 64 and all(p.isdigit() and (p == "0" or p[0] != "0") for p in parts)


def instance_breaks(src: Dataset, raw: bytes) -> list[str]:
    """What the output ``raw`` lost that a de-identified instance must keep (one file on its
    own), and text it cannot carry."""
    with warnings.catch_warnings():  # an unknown escape sequence: reported as a break
        warnings.simplefilter("ignore", UserWarning)
        return _instance_breaks(src, raw)


def _instance_breaks(src: Dataset, raw: bytes) -> list[str]:
    found: list[str] = []
    try:
        back = pydicom.dcmread(BytesIO(raw))
    except Exception as exc:
        return [f"output does not read back as a Part 10 file ({type(exc).__name__})"]
    charset = back.get("SpecificCharacterSet", "")
    if isinstance(charset, str):  # one value: no ISO 2022 code extensions, so no ESC in text
        for path, elem in elements(back):
            if elem.VR in TEXT_VRS and "\x1b" in str(elem.value):
                found.append(f"ESC sequence in {_short(path)} under {charset or 'ISO_IR 6'}")
    for kw in _TYPE1_UIDS:
        if kw not in back or not back[kw].value:
            found.append(f"missing {kw}")
        elif not _valid_uid(back[kw].value):
            found.append(f"invalid {kw}")
    if "SOPClassUID" in back and back.SOPClassUID != src.SOPClassUID:
        found.append("SOPClassUID changed")
    for kw in _REQUIRED_IF_PRESENT:
        if kw in src and kw not in back:
            found.append(f"missing {kw}")
    if "PixelData" in back and back.PixelData != src.PixelData:
        found.append("PixelData changed")
    if "FrameOfReferenceUID" in back and not _valid_uid(back.FrameOfReferenceUID):
        found.append("invalid FrameOfReferenceUID")
    meta = back.file_meta
    if meta.get("MediaStorageSOPInstanceUID") != back.get("SOPInstanceUID"):
        found.append("file meta MediaStorageSOPInstanceUID != SOPInstanceUID")
    if meta.get("MediaStorageSOPClassUID") != back.get("SOPClassUID"):
        found.append("file meta MediaStorageSOPClassUID != SOPClassUID")
    # PS3.15 E.1.1: Patient Identity Removed YES and codes of CID 7050 in De-identification
    # Method Code Sequence (the text De-identification Method alone is not enough).
    if back.get("PatientIdentityRemoved") != "YES":
        found.append("PatientIdentityRemoved not YES")
    if not back.get("DeidentificationMethodCodeSequence"):
        found.append("no DeidentificationMethodCodeSequence")
    for i, item in enumerate(src.get("SourceImageSequence", [])):
        if "ReferencedSOPInstanceUID" not in item:
            continue
        items = back.get("SourceImageSequence", [])
        ref = items[i].get("ReferencedSOPInstanceUID") if i < len(items) else None
        if not ref or not _valid_uid(ref):
            found.append(f"broken reference SourceImageSequence[{i}].ReferencedSOPInstanceUID")
    return found


def corpus_breaks(results: list[FileResult]) -> dict[str, list[str]]:
    """Breaks across files: one study stays one study, references follow their target."""
    found: dict[str, list[str]] = defaultdict(list)
    done = [r for r in results if r.output is not None]
    new_uid: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in done:
        assert r.output is not None
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            new_uid[(kw, str(r.input[kw].value))].add(str(r.output.get(kw, "")))
    for (kw, old), new in new_uid.items():
        if len(new) > 1:
            for r in done:
                if str(r.input[kw].value) == old:
                    found[r.name].append(f"{kw} no longer shared with the rest of its {kw[:-11]}")
    sops = [str(r.output.get("SOPInstanceUID", "")) for r in done if r.output is not None]
    for r in done:
        assert r.output is not None
        sop = str(r.output.get("SOPInstanceUID", ""))
        if sop and sops.count(sop) > 1:  # a missing one is reported on its own
            found[r.name].append("SOPInstanceUID not unique in the corpus")
    by_old_sop = {str(r.input.SOPInstanceUID): r for r in done}
    for r in done:
        assert r.output is not None
        for i, item in enumerate(r.input.get("SourceImageSequence", [])):
            target = by_old_sop.get(str(item.get("ReferencedSOPInstanceUID", "")))
            if target is None or target.output is None:
                continue
            items = r.output.get("SourceImageSequence", [])
            ref = items[i].get("ReferencedSOPInstanceUID") if i < len(items) else None
            if ref != target.output.get("SOPInstanceUID"):
                found[r.name].append(
                    f"SourceImageSequence[{i}] no longer references {target.name}'s instance"
                )
    return found


# -- running and reporting ----------------------------------------------------------------------


@dataclass
class FileResult:
    name: str
    input: Dataset
    output: Dataset | None = None
    error: str | None = None
    leaks: list[Leak] = field(default_factory=list)
    breaks: list[str] = field(default_factory=list)


def _write(ds: Dataset) -> tuple[bytes, str | None]:
    """``ds`` as a Part 10 file or, when it no longer is one, as pydicom can still write it."""
    buf = BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue(), None
    except Exception as exc:
        problem = f"not writable as a Part 10 file ({type(exc).__name__}: {exc})"
    buf = BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)
    return buf.getvalue(), problem


def run_tool(make: Callable[[], Tool], files: list[CorpusFile]) -> list[FileResult]:
    tool = make()
    results = []
    for f in files:
        result = FileResult(f.name, pydicom.dcmread(BytesIO(f.source)))
        try:
            out = tool(pydicom.dcmread(BytesIO(f.source)))
            raw, problem = _write(out)
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            results.append(result)
            continue
        result.output = out
        result.leaks = find_leaks(out, {"output": raw}, f.needles, f.charset)
        result.breaks = ([problem] if problem else []) + instance_breaks(result.input, raw)
        results.append(result)
    for name, extra in corpus_breaks(results).items():
        next(r for r in results if r.name == name).breaks.extend(extra)
    return results


def _version(dist: str) -> str:
    return importlib.metadata.version(dist)


def report(files: list[CorpusFile], results: dict[str, list[FileResult]]) -> dict[str, Any]:
    planted = sum(len(f.needles) for f in files)
    tools: dict[str, Any] = {}
    for tool, rs in results.items():
        leaked: dict[str, dict[str, Any]] = {}
        for r in rs:
            for leak in r.leaks:
                entry = leaked.setdefault(leak.value, {"files": [], "planted_at": set()})
                entry["files"].append(r.name)
                entry["planted_at"].update(leak.planted_at)
                entry.setdefault("found_at", set()).update(leak.found_at or ["raw bytes"])
        breaks: dict[str, list[str]] = defaultdict(list)
        for r in rs:
            for b in [*r.breaks, *([f"error: {r.error}"] if r.error else [])]:
                breaks[b].append(r.name)
        tools[tool] = {
            "package": TOOLS[tool][0],
            "version": _version(TOOLS[tool][0]),
            "files_run": len(rs),
            "outputs": sum(r.output is not None for r in rs),
            "leaked_values": len(leaked),
            "leaks": sum(len(r.leaks) for r in rs),
            "breaks": sum(len(r.breaks) + bool(r.error) for r in rs),
            "leaked": {
                v: {k: sorted(x) if isinstance(x, set) else x for k, x in e.items()}
                for v, e in sorted(leaked.items())
            },
            "broken": dict(sorted(breaks.items())),
        }
    return {
        "corpus": {f.name: {"charset": f.charset.name, "planted": f.needles} for f in files},
        "planted_values": planted,
        "tools": tools,
    }


def format_table(rep: dict[str, Any]) -> str:
    files = len(rep["corpus"])
    lines = [
        f"De-identification comparison: {files} files, {rep['planted_values']} planted values "
        "(value x file)",
        f"{'tool':22s} {'version':>10s} {'files':>5s} {'outputs':>7s} {'values leaked':>13s} "
        f"{'leaks':>5s} {'breaks':>6s}",
    ]
    for tool, t in rep["tools"].items():
        lines.append(
            f"{tool:22s} {t['version']:>10s} {t['files_run']:5d} {t['outputs']:7d} "
            f"{t['leaked_values']:13d} {t['leaks']:5d} {t['breaks']:6d}"
        )
    for tool, t in rep["tools"].items():
        if tool.startswith("unchanged"):
            continue
        lines.append("")
        lines.append(f"{tool}: leaks ({t['leaked_values']} values)")
        for value, e in t["leaked"].items():
            where = ", ".join(_short(p) for p in e["found_at"])
            lines.append(f"  {value!r:28s} {len(e['files'])}/{files} files, out at {where}")
        lines.append(f"{tool}: breaks")
        for what, names in t["broken"].items():
            lines.append(f"  {what} [{len(names)}/{files} files]")
    return "\n".join(lines)


def _short(path: str) -> str:
    """``A[0].B[0].C`` -> ``A..C`` for the table (the JSON keeps full paths)."""
    parts = path.split(".")
    return path if len(parts) <= 2 else f"{parts[0]}..{parts[-1]}"


# -- the test -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def comparison() -> Iterator[tuple[list[CorpusFile], dict[str, list[FileResult]]]]:
    files = corpus()
    results = {tool: run_tool(make, files) for tool, (_, make) in TOOLS.items()}
    rep = report(files, results)
    print("\n" + format_table(rep))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(rep, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"(report: {REPORT.relative_to(REPO)})")
    yield files, results


def test_every_planted_value_is_in_its_file(
    comparison: tuple[list[CorpusFile], dict[str, list[FileResult]]],
) -> None:
    """The control returns its input: the search must find every planted value there."""
    files, results = comparison
    for f, r in zip(files, results["unchanged (control)"], strict=True):
        assert r.output is not None, r.error
        assert {leak.value for leak in r.leaks} == set(f.needles), f.name


@pytest.mark.parametrize("tool", OURS)
def test_our_engine_leaks_nothing_and_breaks_nothing(
    comparison: tuple[list[CorpusFile], dict[str, list[FileResult]]], tool: str
) -> None:
    files, results = comparison
    rs = results[tool]
    assert [r.name for r in rs] == [f.name for f in files]
    assert [r.error for r in rs if r.error] == []
    assert [f"{r.name}: {leak}" for r in rs for leak in r.leaks] == []
    assert [f"{r.name}: {b}" for r in rs for b in r.breaks] == []


@pytest.mark.parametrize("tool", ["dicognito", "deid"])
def test_comparator_ran_on_every_file(
    comparison: tuple[list[CorpusFile], dict[str, list[FileResult]]], tool: str
) -> None:
    """Leaks and breaks of the comparators are measured and reported, not expected; the
    comparison itself must hold: each tool de-identified every file into a dataset that
    pydicom can write, and that is not the input handed back unchanged."""
    files, results = comparison
    rs = results[tool]
    assert [r.name for r in rs] == [f.name for f in files]
    for f, r in zip(files, rs, strict=True):
        assert r.output is not None, f"{tool} failed on {f.name}: {r.error}"
        assert len(r.output) > 0
        assert len(r.leaks) < len(f.needles), f"{tool} returned {f.name} unchanged"

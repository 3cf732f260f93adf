"""The options an agreement may add: Retain UIDs, Retain Safe Private, Clean Structured Content,
Clean Graphics (PS3.15 E.3, CID 7050), each against Table E.1-1's own column."""

from __future__ import annotations

from datetime import date
from io import BytesIO

import pydicom
import pytest
from pydicom._private_dict import private_dictionaries
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian

from dicom_io.deid import deidentify
from dicom_io.deid.private import SAFE_PRIVATE, SAFE_VRS
from dicom_io.deid.profile import OPTION_COLUMNS, action_for, rules
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import Agreement, DeidOption
from radbridge.errors import DeidentificationError
from tests.conftest import REPO, identity_needles, make_instance

KEY = b"k" * 32
Opt = DeidOption


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return tag


def _codes(ds: Dataset) -> list[str]:
    return [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]


def _raw(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("option", "code", "meaning"),
    [
        (Opt.RETAIN_UIDS, "113110", "Retain UIDs Option"),
        (Opt.RETAIN_SAFE_PRIVATE, "113111", "Retain Safe Private Option"),
        (Opt.CLEAN_STRUCTURED_CONTENT, "113104", "Clean Structured Content Option"),
        (Opt.CLEAN_GRAPHICS, "113103", "Clean Graphics Option"),
    ],
)
def test_each_option_is_declared_with_its_cid_7050_code(
    option: DeidOption, code: str, meaning: str
) -> None:
    pseudo = Pseudonymizer(KEY, retain_uids=option is Opt.RETAIN_UIDS)
    out = deidentify(make_instance(), pseudo, [option]).dataset
    assert _codes(out) == ["113100", code]
    assert out.DeidentificationMethodCodeSequence[1].CodeMeaning == meaning


def test_every_option_column_of_the_table_but_full_dates_is_selectable() -> None:
    columns = {col for r in rules() for col in r.options}
    assert columns - set(OPTION_COLUMNS.values()) == {"rtnLongFullDatesOpt"}
    assert action_for(_tag("SOPInstanceUID"), [Opt.RETAIN_UIDS]) == "K"
    assert action_for(_tag("ReferencedStudySequence"), [Opt.RETAIN_UIDS]) == "K"  # X/Z otherwise
    assert action_for(Tag(0x0019, 0x100C), [Opt.RETAIN_SAFE_PRIVATE]) == "C"
    assert action_for(_tag("ContentSequence"), [Opt.CLEAN_STRUCTURED_CONTENT]) == "C"
    assert action_for(_tag("AcquisitionContextSequence"), [Opt.CLEAN_STRUCTURED_CONTENT]) == "C"
    assert action_for(_tag("GraphicAnnotationSequence"), [Opt.CLEAN_GRAPHICS]) == "C"
    assert action_for(Tag(0x6000, 0x3000), [Opt.CLEAN_GRAPHICS]) == "C"
    assert action_for(_tag("ContentSequence"), [Opt.CLEAN_GRAPHICS]) == "D"  # not its column


# -- Retain UIDs ---------------------------------------------------------------------------


def test_retain_uids_keeps_every_uid_and_still_removes_identity() -> None:
    ds = make_instance()
    pseudo = Pseudonymizer(KEY, retain_uids=True)
    out = deidentify(ds, pseudo, [Opt.RETAIN_UIDS]).dataset
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert out[kw].value == ds[kw].value, kw
    ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == ref
    assert out.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # The identity map still learns each UID (original -> itself) for re-identification.
    assert pseudo.issued[("uid", str(ds.StudyInstanceUID))] == ds.StudyInstanceUID
    raw = _raw(out)
    for needle in (b"PID-7788123", b"XiaoDong", b"19650412", b"ACC99812", b"Ivanov"):
        assert needle not in raw, needle


def test_retain_uids_must_match_the_pseudonymizer() -> None:
    with pytest.raises(DeidentificationError, match="Retain UIDs"):
        deidentify(make_instance(), Pseudonymizer(KEY), [Opt.RETAIN_UIDS])
    with pytest.raises(DeidentificationError, match="Retain UIDs"):
        deidentify(make_instance(), Pseudonymizer(KEY, retain_uids=True), [])


def test_the_agreement_decides_the_pseudonymizer() -> None:
    import yaml

    raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
    doc = raw["agreements"][0]
    plain = Agreement.model_validate(doc)
    doc["deidentification"] = {"options": ["retain_uids"], "burned_in": "mask"}
    retaining = Agreement.model_validate(doc)
    assert not Pseudonymizer.for_agreement(plain, "s").retain_uids
    p = Pseudonymizer.for_agreement(retaining, "s")
    assert p.retain_uids and p.uid("1.2.3.4") == "1.2.3.4"
    assert Pseudonymizer.for_agreement(plain, "s").uid("1.2.3.4").startswith("2.25.")


# -- Retain Safe Private ---------------------------------------------------------------------


def _vendor_blocks(ds: Dataset) -> Dataset:
    siemens = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    siemens.add_new(0x0C, "IS", "1000")  # B_value: safe
    siemens.add_new(0x0E, "FD", [0.0, 0.70710678, 0.70710678])  # gradient direction: safe
    siemens.add_new(0x0D, "CS", "DIRECTIONAL")  # safe, a plain code
    siemens.add_new(0x08, "CS", "IMAGE NUM 4")  # same block, not on the list
    philips = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
    philips.add_new(0x03, "FL", 800.0)  # Diffusion B-Factor: safe
    philips.add_new(0x04, "CS", "Wang XiaoDong")  # on the list, but not a plain code
    ge = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    ge.add_new(0x39, "LO", "1000\\0\\0\\0")  # on the list as IS; stored as LO: not retained
    return ds


def _private(ds: Dataset) -> dict[int, object]:
    return {int(e.tag): e.value for e in ds if e.tag.is_private}


def test_retain_safe_private_keeps_only_the_safe_list() -> None:
    ds = _vendor_blocks(make_instance())
    assert _private(deidentify(ds, Pseudonymizer(KEY)).dataset) == {}  # off: all go
    out = deidentify(ds, Pseudonymizer(KEY), [Opt.RETAIN_SAFE_PRIVATE]).dataset
    kept = _private(out)
    assert kept == {
        0x00190010: "SIEMENS MR HEADER",
        0x0019100C: "1000",
        0x0019100D: "DIRECTIONAL",
        0x0019100E: [0.0, 0.70710678, 0.70710678],
        0x20010010: "Philips Imaging DD 001",
        0x20011003: 800.0,
    }
    raw = _raw(out)
    assert b"ACME PACS" not in raw and b"GEMS_PARM_01" not in raw and b"IMAGE NUM" not in raw
    for needle in identity_needles(ds):
        assert needle not in raw


def test_retain_safe_private_in_an_implicit_vr_file() -> None:
    ds = _vendor_blocks(make_instance())
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    src = pydicom.dcmread(BytesIO(buf.getvalue()))  # private VRs come from the dictionary
    out = deidentify(src, Pseudonymizer(KEY), [Opt.RETAIN_SAFE_PRIVATE]).dataset
    assert out[0x0019100C].value == "1000" and out[0x20011003].value == 800.0


def test_a_private_creator_that_keeps_nothing_goes() -> None:
    ds = make_instance()
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x10, "LO", "Wang XiaoDong")
    out = deidentify(ds, Pseudonymizer(KEY), [Opt.RETAIN_SAFE_PRIVATE]).dataset
    assert _private(out) == {}


def test_the_safe_list_is_numeric_or_coded_and_agrees_with_the_vendor_dictionaries() -> None:
    assert len({(e.creator, e.group, e.offset) for e in SAFE_PRIVATE}) == len(SAFE_PRIVATE)
    for e in SAFE_PRIVATE:
        assert e.vr in SAFE_VRS, e
        known = private_dictionaries[e.creator][f"{e.group:04X}xx{e.offset:02X}"]
        assert known[0] == e.vr, e


# -- Clean Structured Content ----------------------------------------------------------------


def _item(value_type: str, concept: str, **values: object) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", value_type
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = concept, "DCM", concept
    item.ConceptNameCodeSequence = [code]
    for k, v in values.items():
        setattr(item, k, v)
    return item


def _with_sr_content(ds: Dataset) -> Dataset:
    measured = Dataset()
    measured.NumericValue = "12.5"
    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "mm", "UCUM", "mm"
    measured.MeasurementUnitsCodeSequence = [unit]
    ds.ContentSequence = [
        _item("TEXT", "121071", TextValue="Nodule in right upper lobe, Wang XiaoDong to recall"),
        _item("PNAME", "121008", PersonName="Petrova^Anna"),
        _item("DATE", "111060", Date="20261120"),
        _item("NUM", "G-D7FE", MeasuredValueSequence=[measured]),
    ]
    ctx = _item("TEXT", "113011", TextValue="contrast given by Dr Smirnov")
    ds.AcquisitionContextSequence = [ctx]
    return ds


def test_without_the_option_content_items_keep_their_structure_with_dummies() -> None:
    out = deidentify(_with_sr_content(make_instance()), Pseudonymizer(KEY)).dataset
    text, name, day, num = out.ContentSequence  # D: items kept, values replaced
    assert text.ValueType == "TEXT" and text.TextValue == "REMOVED"
    assert str(name.PersonName) == "REMOVED" and day.Date == "19000101"
    assert text.ConceptNameCodeSequence[0].CodeValue == "REMOVED"  # codes may identify too
    assert num.MeasuredValueSequence[0].NumericValue == 12.5
    assert len(out.AcquisitionContextSequence) == 0  # X/Z -> Z: zero items


def test_clean_structured_content_cleans_instead() -> None:
    ds = _with_sr_content(make_instance())
    out = deidentify(ds, Pseudonymizer(KEY), [Opt.CLEAN_STRUCTURED_CONTENT]).dataset
    text, name, day, num = out.ContentSequence
    assert text.TextValue == "Nodule in right upper lobe, to recall"  # the name cut out
    assert text.ConceptNameCodeSequence[0].CodeValue == "121071"  # codes kept
    assert str(name.PersonName) == "REMOVED"  # Person Name: D, no column for this option
    assert day.Date == "19000101"  # Date: D unless dates are retained modified
    assert num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "mm"
    (ctx,) = out.AcquisitionContextSequence  # X/Z -> C: kept and cleaned
    assert ctx.TextValue == "REMOVED"  # "Dr Smirnov" cannot be proven clean: a dummy
    raw = _raw(out)
    assert b"XiaoDong" not in raw and b"Petrova" not in raw and b"Smirnov" not in raw


def test_clean_structured_content_with_modified_dates_shifts_content_dates() -> None:
    opts = [Opt.CLEAN_STRUCTURED_CONTENT, Opt.RETAIN_LONGITUDINAL_MODIFIED_DATES]
    out = deidentify(_with_sr_content(make_instance()), Pseudonymizer(KEY), opts).dataset
    shifted = out.ContentSequence[2].Date
    assert shifted != "20261120" and date.fromisoformat(shifted) < date(2026, 11, 20)
    assert shifted == out.StudyDate  # the same keyed offset as every other date


# -- Clean Graphics --------------------------------------------------------------------------


def _with_graphics(ds: Dataset) -> Dataset:
    text = Dataset()
    text.UnformattedTextValue = "Wang XiaoDong L kidney"
    text.AnchorPointAnnotationUnits, text.AnchorPoint = "PIXEL", [10.0, 12.0]
    text.AnchorPointVisibility = "Y"
    graphic = Dataset()
    graphic.GraphicAnnotationUnits, graphic.GraphicType = "PIXEL", "POLYLINE"
    graphic.NumberOfGraphicPoints, graphic.GraphicData = 2, [1.0, 1.0, 5.0, 5.0]
    graphic.GraphicFilled = "N"
    layer = Dataset()
    layer.GraphicLayer = "LAYER1"
    layer.TextObjectSequence = [text]
    layer.GraphicObjectSequence = [graphic]
    ds.GraphicAnnotationSequence = [layer]
    ds.add_new(0x60000010, "US", 64)
    ds.add_new(0x60003000, "OW", b"\xff" * 512)
    ds.add_new(0x60004000, "LT", "Wang XiaoDong")
    return ds


def test_clean_graphics_cleans_annotation_text_and_still_removes_overlays() -> None:
    ds = _with_graphics(make_instance())
    plain = deidentify(ds, Pseudonymizer(KEY)).dataset.GraphicAnnotationSequence[0]
    assert plain.TextObjectSequence[0].UnformattedTextValue == "REMOVED"  # D: dummy
    assert plain.GraphicObjectSequence[0].GraphicData == [1.0, 1.0, 5.0, 5.0]
    out = deidentify(ds, Pseudonymizer(KEY), [Opt.CLEAN_GRAPHICS]).dataset
    layer = out.GraphicAnnotationSequence[0]
    assert layer.GraphicLayer == "LAYER1"
    assert layer.TextObjectSequence[0].UnformattedTextValue == "L kidney"  # C: cleaned
    assert layer.TextObjectSequence[0].AnchorPoint == [10.0, 12.0]
    # Table column C for Overlay Data/Comments, but a bitmap cannot be proven text-free.
    assert not any(0x6000 <= e.tag.group <= 0x60FF for e in out)
    assert b"XiaoDong" not in _raw(out)

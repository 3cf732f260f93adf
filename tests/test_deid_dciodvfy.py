"""De-identified output is still valid DICOM: the dicom3tools validator ``dciodvfy`` finds no
Error in it that it did not find in the input (warnings allowed). CT, ultrasound (masked) and a
structured report (content items dummied or cleaned) are checked; inputs built here are valid
to begin with, so for them the output must have no Error at all.

``./run test`` installs dicom3tools; without ``dciodvfy`` these tests fail, they do not skip.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from dicom_io.deid import deidentify
from dicom_io.pseudonyms import Pseudonymizer
from radbridge.agreements import DeidOption
from tests.test_deid_burned_in import make_us

KEY = b"k" * 32


def _testfile(name: str) -> str:
    path = get_testdata_file(name)
    assert isinstance(path, str), name
    return path


def _dciodvfy_errors(ds: Dataset, path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail(
            "dciodvfy (dicom3tools) is not installed; install it with "
            "`apt-get install -y dicom3tools` - de-identified output must be validated"
        )
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines()]
    return [line for line in lines if line.startswith("Error")]


def _ct() -> Dataset:
    return pydicom.dcmread(_testfile("CT_small.dcm"))


def _us_file() -> Dataset:
    return pydicom.dcmread(_testfile("US1_UNCR.dcm"))


def _sr() -> Dataset:
    """A Comprehensive SR whose content items carry the patient's name, a person and a date."""
    ct = _ct()
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    name = str(ct.PatientName).replace("^", " ")
    root.ContentSequence = [  # type: ignore[assignment]
        hd.sr.TextContentItem(
            name=codes.DCM.Finding, value=f"Nodule, {name} to recall", relationship_type="CONTAINS"
        ),
        hd.sr.PnameContentItem(
            name=Code("121008", "DCM", "Person Observer Name"),
            value="Petrova^Anna",
            relationship_type="CONTAINS",
        ),
        hd.sr.DateContentItem(
            name=Code("111060", "DCM", "Study Date"), value="20261120", relationship_type="CONTAINS"
        ),
    ]
    sr = hd.sr.ComprehensiveSR(
        evidence=[ct],
        content=root,
        series_instance_uid=generate_uid(),
        series_number=9,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="ACME",
    )
    buf = BytesIO()
    sr.save_as(buf)
    return pydicom.dcmread(BytesIO(buf.getvalue()))  # as the gateway would read it


ALL_BUT_UIDS = tuple(o for o in DeidOption if o is not DeidOption.RETAIN_UIDS)
CASES: dict[str, tuple[Callable[[], Dataset], bool, dict[str, object]]] = {
    # name: (input, built here (valid by construction), deidentify keyword arguments)
    "ct-basic": (_ct, False, {}),
    "ct-all-options": (_ct, False, {"options": tuple(DeidOption), "retain_uids": True}),
    "ct-all-but-uids": (_ct, False, {"options": ALL_BUT_UIDS}),
    "us-masked": (make_us, True, {"burned_in": "mask"}),
    "us-multiframe-planar-masked": (
        lambda: make_us(frames=3, planar=1),
        True,
        {"burned_in": "mask", "options": ALL_BUT_UIDS},
    ),
    "us-file-top-band": (_us_file, False, {"burned_in": "mask", "top_band_rows": 40}),
    "sr-basic": (_sr, True, {}),
    "sr-clean-structured-content": (
        _sr,
        True,
        {"options": (DeidOption.CLEAN_STRUCTURED_CONTENT,)},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_deidentified_output_is_valid_dicom(name: str, tmp_path: Path) -> None:
    build, built_here, kwargs = CASES[name]
    src = build()
    before = _dciodvfy_errors(src, tmp_path / "in.dcm")
    if built_here:
        assert before == [], f"the test input itself is invalid: {before}"
    kw = dict(kwargs)
    pseudo = Pseudonymizer(KEY, retain_uids=bool(kw.pop("retain_uids", False)))
    out = deidentify(src, pseudo, **kw).dataset  # type: ignore[arg-type]
    after = _dciodvfy_errors(out, tmp_path / "out.dcm")
    new = [line for line in after if line not in before]
    assert not new, f"dciodvfy {name}: de-identification introduced errors:\n" + "\n".join(new)

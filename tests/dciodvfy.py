"""The dicom3tools validator ``dciodvfy``, run on a written object: any Error line fails."""

from __future__ import annotations

import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

__all__ = ["dciodvfy", "part10"]


def part10(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dciodvfy(ds: Dataset, tmp_path: Path, name: str) -> list[str]:
    """Run dciodvfy on the written object: fail on any Error line, return the warnings."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail(
            "dciodvfy (dicom3tools) is not installed; install it with "
            "`apt-get install -y dicom3tools` - the result objects must be validated"
        )
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(part10(ds))
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line]
    assert not errors, f"dciodvfy {name}:\n" + "\n".join(lines)
    return [line for line in lines if "Warning" in line]

"""Locust users of the soak (``loadtests.soak`` starts Locust with this file; not run alone).

- ``StowPusher``: a hospital PACS pushing one single-image chest X-ray study per STOW-RS
  request to the edge (HTTP Basic, the agreement's STOW credentials); each study acknowledged
  (200) is appended to ``SOAK_ACKED_FILE`` for the loss count.
- ``Inferer``: an integration calling the center's synchronous inference with one tensor.

Everything comes from the environment ``loadtests.soak`` sets; each user runs at a constant
rate (``constant_throughput``), and Locust's own ``-t`` bounds the run.
"""

from __future__ import annotations

import copy
import os
import threading
from io import BytesIO

import pydicom
from locust import HttpUser, constant_throughput, task
from pydicom.uid import generate_uid

from dicom_io.stow import encode_multipart

_ENV = os.environ
_TEMPLATE = pydicom.dcmread(_ENV["SOAK_TEMPLATE"]) if "SOAK_TEMPLATE" in _ENV else None
_ACKED = threading.Lock()
_count = [0]


def _fresh_study() -> tuple[bytes, str, str]:
    """The template as a new single-image study of a new (synthetic) patient."""
    assert _TEMPLATE is not None, "SOAK_TEMPLATE is not set: run loadtests.soak"
    ds = copy.deepcopy(_TEMPLATE)
    _count[0] += 1
    study = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = f"SOAK-STOW-{os.getpid()}-{_count[0]}"
    ds.PatientName = "Soak^Stow"
    ds.AccessionNumber = f"S{_count[0]:07d}"
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    body, content_type = encode_multipart([buf.getvalue()])
    return body, content_type, study


class StowPusher(HttpUser):
    host = _ENV.get("SOAK_STOW_BASE", "http://127.0.0.1:1")
    fixed_count = int(_ENV.get("SOAK_STOW_USERS", "1"))
    wait_time = constant_throughput(float(_ENV.get("SOAK_STOW_RATE", "0.5")))

    @task
    def push(self) -> None:
        body, content_type, study = _fresh_study()
        with self.client.post(
            "/dicomweb/studies",
            data=body,
            headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
            auth=(_ENV.get("SOAK_STOW_USER", ""), _ENV.get("SOAK_STOW_PASSWORD", "")),
            name="edge STOW-RS (1 instance)",
            catch_response=True,
        ) as resp:
            if resp.status_code == 200:
                with _ACKED, open(_ENV["SOAK_ACKED_FILE"], "a") as f:
                    f.write(study + "\n")
                resp.success()
            else:
                resp.failure(f"HTTP {resp.status_code}")


class Inferer(HttpUser):
    host = _ENV.get("SOAK_CENTER_BASE", "https://127.0.0.1:1")
    fixed_count = int(_ENV.get("SOAK_INFER_USERS", "1"))
    wait_time = constant_throughput(float(_ENV.get("SOAK_INFER_RATE", "2")))

    def on_start(self) -> None:
        self.client.verify = _ENV.get("SOAK_CA_FILE", True)
        self.client.headers["Authorization"] = f"Bearer {_ENV.get('SOAK_INTEGRATION_TOKEN', '')}"
        with open(_ENV.get("SOAK_TENSOR", "/nonexistent"), "rb") as f:
            self._tensor = f.read()

    @task
    def infer(self) -> None:
        self.client.post(
            f"/v1/models/{_ENV.get('SOAK_MODEL', 'chest-xray-demo')}/infer",
            data=self._tensor,
            headers={
                "Content-Type": "application/x-npy",
                "X-Radbridge-Agreement": _ENV.get("SOAK_AGREEMENT", ""),
            },
            name="center sync inference (1 tensor)",
        )

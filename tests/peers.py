"""Real DICOM peers for integration tests and load tests: an Orthanc PACS of our own.

``OrthancPeer`` writes its own configuration into a temporary folder (storage, index, log),
listens on free ports and is stopped on exit; the Debian package's service is never used.
Orthanc 1.10 has no bind-address options: ``RemoteAccessAllowed: false`` keeps its REST API
to loopback clients, and the DICOM port is only ever called on 127.0.0.1.

    with OrthancPeer(modalities={"radbridge": ("RADBRIDGE", "127.0.0.1", port)}) as pacs:
        instance = pacs.upload(path)
        pacs.send_study_to("radbridge", pacs.study_of(instance))
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.conftest import free_port

__all__ = ["OrthancError", "OrthancPeer", "orthanc_binary"]


class OrthancError(RuntimeError):
    """Orthanc answered a REST call with an error; the message carries its answer."""


def orthanc_binary() -> str:
    """The ``Orthanc`` executable; a clear failure (never a skip) when it is missing."""
    found = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).exists()), None
    )
    if found is None:
        raise RuntimeError(
            "the Orthanc binary is not installed: `./run test` installs it "
            "(apt-get install orthanc); these tests need a real PACS peer"
        )
    return found


class OrthancPeer:
    """An Orthanc server on free loopback ports, started and stopped by a ``with`` block."""

    def __init__(
        self,
        *,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        aet: str = "ORTHANC",
        workdir: Path | None = None,
        extra_config: dict[str, Any] | None = None,
        start_timeout_s: float = 30.0,
        request_timeout_s: float = 120.0,
    ) -> None:
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.extra_config = dict(extra_config or {})
        self.start_timeout_s = start_timeout_s
        self.request_timeout_s = request_timeout_s
        self._own_tmp: tempfile.TemporaryDirectory[str] | None = None
        self._workdir = workdir
        self.http_port = free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._client: httpx.Client | None = None
        self.last_upload: dict[str, Any] = {}  # Orthanc's answer to the latest upload

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def workdir(self) -> Path:
        assert self._workdir is not None, "not started"
        return self._workdir

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None, "not started"
        return self._proc

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def config(self) -> dict[str, Any]:
        work = self.workdir
        cfg: dict[str, Any] = {
            "Name": f"radbridge-test-{self.dicom_port}",
            "StorageDirectory": str(work / "storage"),
            "IndexDirectory": str(work / "index"),
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": 30,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
            "LuaScripts": [],
            "StableAge": 2,
            "SaveJobs": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpDescribeErrors": True,
            "StorageCompression": False,
        }
        cfg.update(self.extra_config)
        return cfg

    def __enter__(self) -> OrthancPeer:
        binary = orthanc_binary()
        if self._workdir is None:
            self._own_tmp = tempfile.TemporaryDirectory(prefix="orthanc-")
            self._workdir = Path(self._own_tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("wb") as log:
            # dcmtk inside Orthanc reads TCP_NODELAY from Orthanc's own environment: without
            # it every acknowledgement waits for Nagle + delayed ACK (~50 ms), a 6x handicap.
            self._proc = subprocess.Popen(
                [binary, "--no-jobs", str(cfg_path)],
                env=dict(os.environ, TCP_NODELAY="1"),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        # No keep-alive: Orthanc closes an idle connection after about a second (its
        # KeepAliveTimeout), and a poll reusing it at that moment got "Server disconnected
        # without sending a response" (tests/e2e/test_reading_room.py in CI). Loopback
        # connections are cheap.
        self._client = httpx.Client(
            base_url=self.url,
            timeout=self.request_timeout_s,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._own_tmp is not None:
            self._own_tmp.cleanup()
            self._own_tmp = None
            self._workdir = None

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._client is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._proc.returncode} at start-up:\n{self.log_tail()}"
                )
            try:
                if self._client.get("/system", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"Orthanc did not answer GET /system within {self.start_timeout_s:.0f} s:\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # -- REST --------------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        assert self._client is not None, "OrthancPeer is not started"
        return self._client

    def _check(self, rsp: httpx.Response, what: str) -> httpx.Response:
        if rsp.status_code >= 400:
            raise OrthancError(f"{what}: HTTP {rsp.status_code}: {rsp.text[:2000]}")
        return rsp

    def upload(self, data: Path | str | bytes) -> str:
        """POST /instances; returns the Orthanc instance ID (``study_of`` gives its study)."""
        body = data if isinstance(data, bytes) else Path(data).read_bytes()
        rsp = self._check(
            self.client.post(
                "/instances", content=body, headers={"Content-Type": "application/dicom"}
            ),
            "upload",
        )
        answer = rsp.json()
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"upload: {answer}")
        self.last_upload = answer
        return str(answer["ID"])

    def study_of(self, instance_id: str) -> str:
        """The Orthanc ID of the study an instance belongs to."""
        if self.last_upload.get("ID") == instance_id:
            return str(self.last_upload["ParentStudy"])
        rsp = self._check(self.client.get(f"/instances/{instance_id}/study"), "study_of")
        return str(rsp.json()["ID"])

    def instances_of(self, study_id: str) -> list[str]:
        rsp = self._check(self.client.get(f"/studies/{study_id}/instances"), "instances_of")
        return [str(i["ID"]) for i in rsp.json()]

    def instance_file(self, instance_id: str) -> bytes:
        """GET /instances/<id>/file: the Part 10 file Orthanc holds."""
        return self._check(
            self.client.get(f"/instances/{instance_id}/file"), "instance_file"
        ).content

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        rsp = self._check(self.client.get(f"/instances/{instance_id}/simplified-tags"), "tags")
        return dict(rsp.json())

    def send_study_to(self, modality: str, study_id: str) -> dict[str, Any]:
        """C-STORE a study to a configured modality, synchronously; OrthancError on failure."""
        return self.send_to(modality, [study_id])

    def send_to(self, modality: str, resources: list[str]) -> dict[str, Any]:
        rsp = self.client.post(
            f"/modalities/{modality}/store",
            json={"Resources": resources, "Synchronous": True},
        )
        self._check(rsp, f"C-STORE to {modality}")
        answer = rsp.json()
        if isinstance(answer, dict) and answer.get("FailedInstancesCount"):
            raise OrthancError(f"C-STORE to {modality}: {answer}")
        return dict(answer) if isinstance(answer, dict) else {"answer": answer}

    def echo(self, modality: str) -> None:
        """C-ECHO a configured modality; OrthancError when it fails."""
        self._check(self.client.post(f"/modalities/{modality}/echo", json={}), f"echo {modality}")

    def statistics(self) -> dict[str, Any]:
        return dict(self._check(self.client.get("/statistics"), "statistics").json())

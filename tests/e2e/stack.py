"""`radbridge up` as a user runs it (edge + center in one process tree), for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import select

from dicom_io.identity_map import lookup_pseudonym
from radbridge.auth import EdgeAuth, load_edge_key
from radbridge.contract import tls_verify
from radbridge.db import Database
from radbridge.db.tables import StudyRow
from radbridge.lifecycle import EdgeStudyState
from tests.conftest import REPO, free_port
from tests.peers import OrthancPeer

AGREEMENT = "demo-hospital-to-center"

BIN = Path(sys.executable).parent


def serve_config_with(workdir: Path, *, prepare_ahead: bool) -> Path:
    """A copy of serving/serve.yaml with the Api's ``prepare_ahead`` set (pass its path as
    RADBRIDGE_CENTER__SERVE_CONFIG)."""
    raw = yaml.safe_load((REPO / "serving" / "serve.yaml").read_text())
    for app in raw["applications"]:
        for d in app.get("deployments", []):
            if d["name"] == "Api":
                d.setdefault("user_config", {})["prepare_ahead"] = prepare_ahead
    path = workdir / f"serve-prepare-{'on' if prepare_ahead else 'off'}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def echo(port: int, calling: str) -> subprocess.CompletedProcess[str]:
    """dcmtk echoscu to the edge."""
    return subprocess.run(
        ["echoscu", "-aet", calling, "-aec", "RADBRIDGE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, TCP_NODELAY="1"),
    )


def storescu(
    port: int, files: list[Path], timeout_s: float = 300, calling: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu (verbose) pushing ``files`` to the edge as the PACS ``calling`` would."""
    return subprocess.run(
        ["storescu", "-v", "-aet", calling, "-aec", "RADBRIDGE", "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(os.environ, TCP_NODELAY="1"),
    )


def wait_for_results(
    stack: dict[str, object], study_uid: str, timeout_s: float = 300
) -> dict[str, object]:
    """The center's results of the study the edge forwarded (original ``study_uid``), once the
    job of its latest version is done or failed; fails the test with the stack's log tail if
    none in time.

    A sender that stalls past the agreement's quiet period makes the edge forward part of the
    study, then re-open it for the late instances (version 2): the results of version 1 are not
    the study's. So this waits until the edge holds the study as forwarded (every instance the
    test sent was acknowledged, so a late one has re-opened it by now) and the center's latest
    job, which then covers every instance, is done."""
    data, base = Path(str(stack["data"])), str(stack["base"])
    edge_db = Database(f"sqlite:///{data / 'edge' / 'edge.db'}")
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            pseudo = lookup_pseudonym(edge_db, AGREEMENT, "uid", study_uid)
            if pseudo and _edge_state(edge_db, study_uid) == EdgeStudyState.FORWARDED:
                r = stack["http"].get(  # type: ignore[attr-defined]
                    f"{base}/v1/studies/{pseudo}/results",
                    auth=stack["edge_auth"],  # type: ignore[arg-type]
                    timeout=10,
                )
                if r.status_code == 200 and r.json()["job"]["state"] in ("done", "failed"):
                    return dict(r.json())
            time.sleep(1)
    finally:
        edge_db.dispose()
    pytest.fail(f"no results in time:\n{stack_report(data)}")


def _edge_state(db: Database, study_uid: str) -> str | None:
    """The edge's state of the study (original UID), if it holds it."""
    with db.session() as s:
        return s.scalars(
            select(StudyRow.state).where(
                StudyRow.agreement_id == AGREEMENT, StudyRow.study_uid == study_uid
            )
        ).first()


def stack_report(data: Path, lines: int = 40) -> str:
    """The last lines of `radbridge up`'s own log and of Ray's (Serve proxy and controller,
    raylet), for a failing test: why the stack did not start, not only that it did not."""
    parts = [_tail(data / "up.log", lines)]
    ray_logs = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray"
    ray_logs = ray_logs / "session_latest" / "logs"
    for pattern in ("serve/proxy_*.log", "serve/controller_*.log", "raylet.err"):
        files = sorted(ray_logs.glob(pattern), key=lambda p: p.stat().st_mtime)
        if files:
            parts.append(_tail(files[-1], lines // 2))
    return "\n".join(parts)


def _tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(missing)"
    return f"--- {path} (last {lines} lines)\n" + "\n".join(text.splitlines()[-lines:])


@contextmanager
def running_stack(
    data: Path, ports: dict[str, int] | None = None, models: Path | None = None, **env_extra: str
) -> Iterator[dict[str, object]]:
    """Start `radbridge up` with its data in ``data``; yield once both nodes answer.

    ``models`` is the model repository (default: the built demo models).
    """
    models = models or Path(os.environ.get("RADBRIDGE_TEST_MODELS", REPO / "var" / "models"))
    ports = ports or {"edge": free_port(), "metrics": free_port(), "center": free_port()}
    env = dict(
        os.environ,
        RADBRIDGE_DATA_DIR=str(data),
        RADBRIDGE_MODEL_REPOSITORY=str(models),
        RADBRIDGE_EDGE__PORT=str(ports["edge"]),
        RADBRIDGE_EDGE__METRICS_PORT=str(ports["metrics"]),
        RADBRIDGE_CENTER__PORT=str(ports["center"]),
        RADBRIDGE_CENTER__RAY_NUM_CPUS="4",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        TCP_NODELAY="1",
        **env_extra,
    )
    log = (data / "up.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "radbridge"), "up"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=data
    )
    # The local center speaks HTTPS with a certificate of the throwaway CA `radbridge up`
    # makes under data/keys; the test's client trusts that CA only, as the edge does.
    base = f"https://127.0.0.1:{ports['center']}"
    ca = data / "keys" / "local-ca.pem"
    http: httpx.Client | None = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"radbridge up exited ({proc.returncode}):\n{stack_report(data)}")
            if http is None and ca.exists():
                http = httpx.Client(verify=tls_verify(ca), timeout=10)
            try:
                if (
                    http is not None
                    and http.get(f"{base}/healthz", timeout=2).status_code == 200
                    and echo(ports["edge"], "STORESCU").returncode == 0
                ):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"stack not ready in 300 s:\n{stack_report(data)}")
        keys = data / "keys"  # the throwaway local identity `radbridge up` made
        assert http is not None
        yield {
            "http": http,
            "ca": ca,
            "data": data,
            "ports": ports,
            "base": base,
            "env": env,
            "log": data / "up.log",
            "edge_auth": EdgeAuth(load_edge_key(keys / "edge-ed25519.pem"), "local-edge"),
            "operator": {"authorization": f"Bearer {(keys / 'operator.token').read_text()}"},
        }
    finally:
        if http is not None:
            http.close()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def stack_with_pacs(
    tmp_path: Path,
    edit_agreements: Callable[[dict[str, Any]], None] | None = None,
    **env: str,
) -> Iterator[tuple[OrthancPeer, dict[str, object]]]:
    """Orthanc as the hospital PACS, and `radbridge up` (data in ``tmp_path/stack``) whose demo
    agreement returns its results to that Orthanc; the edge polls for results every second.
    ``edit_agreements`` may change the agreements file's content (e.g. add an agreement);
    ``env``: more RADBRIDGE_* settings of the stack."""
    ports = {"edge": free_port(), "metrics": free_port(), "center": free_port()}
    with OrthancPeer(
        modalities={"radbridge": ("RADBRIDGE", "127.0.0.1", ports["edge"])},
        workdir=tmp_path / "orthanc",
    ) as pacs:
        raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
        raw["agreements"][0]["hospital"]["return_destination"] = {
            "ae_title": pacs.aet,
            "host": "127.0.0.1",
            "port": pacs.dicom_port,
        }
        if edit_agreements is not None:
            edit_agreements(raw)
        agreements = tmp_path / "agreements.yaml"
        agreements.write_text(yaml.safe_dump(raw, allow_unicode=True))
        data = tmp_path / "stack"
        data.mkdir()
        with running_stack(
            data,
            ports,
            RADBRIDGE_AGREEMENTS_FILE=str(agreements),
            RADBRIDGE_EDGE__DELIVERY_POLL_S="1",
            **env,
        ) as stack:
            yield pacs, stack


def add_reader(
    stack: dict[str, object],
    username: str,
    password: str,
    observer_id: str,
    *options: str,
) -> None:
    """``radbridge readers add`` against the running stack's center database, as an admin runs
    it (``options``: e.g. ``--locale zh``, ``--center NAME``)."""
    command = [str(BIN / "radbridge"), "readers", "add", username, "--observer-id", observer_id]
    added = subprocess.run(
        [*command, *options, "--password-stdin"],
        input=password + "\n",
        env=stack["env"],  # type: ignore[arg-type]
        cwd=stack["data"],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stdout + added.stderr

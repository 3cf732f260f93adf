"""Faults after ingest, with real processes: nothing acknowledged is lost, nothing comes twice.

The stack is split as an operator runs it on two sites: ``radbridge center`` (local Ray) and
``radbridge gateway`` as separate processes sharing one data folder (the local identity the
center makes), Orthanc as the hospital PACS, and between edge and center a loopback TCP proxy
the test controls. Each test sends studies from Orthanc, injects one fault, and checks:

- every study Orthanc sent gets exactly one AI result SR (a SEG too for a CT) back, re-identified,
  and no second copy arrives later;
- the center indexed each instance once (no half-received request left rows or files);
- the edge's outbox ends empty: nothing forwarding, nothing waiting to be delivered.

Faults: the gateway SIGKILLed while it de-identifies and forwards a study, then restarted; the
edge -> center connection cut in the middle of a STOW-RS request body; and cut while the
center's answer to a STOW-RS request is on its way (the center stored it, the edge never heard);
the center SIGKILLed mid-job; a ModelRunner replica SIGKILLed mid-job; the center out of disk;
PostgreSQL restarted under both; the gateway's wall clock stepped back an hour, twice.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import psutil
import pydicom
import pytest
import yaml
from sqlalchemy import func, select

from models.ct_dicom import write_ct_series
from models.ct_phantoms import chest_ct
from models.cxr_dicom import write_cxr_study
from radbridge.db import Database
from radbridge.db.tables import InstanceRow, JobRow, ResultObjectRow, SeriesRow, StudyRow, utcnow
from radbridge.lifecycle import EdgeStudyState, JobState
from tests.conftest import REPO, free_port, fresh_postgres_database
from tests.e2e.gateway_process import BIN, start_gateway, stop_gateway
from tests.e2e.stack import serve_config_with, stack_report
from tests.peers import OrthancPeer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MODELS = Path(os.environ.get("RADBRIDGE_TEST_MODELS", REPO / "var" / "models"))


class CuttingProxy:
    """A loopback TCP relay that can cut the next connections at a chosen byte.

    ``cut("request", after, times)``: the next ``times`` connections whose request bytes pass
    ``after`` are reset there (the center gets half a body). ``cut("response", after, times)``:
    on a connection that carried over ``after`` request bytes (a STOW-RS body, not a small
    listing), the reply is reset at its first byte (the center finished, the edge never hears).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = free_port()
        self.cuts: dict[str, int] = {"request": 0, "response": 0}
        self._plan: dict[str, tuple[int, int]] = {}  # direction -> (after bytes, times left)
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._open: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, direction: str, after: int, times: int) -> None:
        with self._lock:
            self._plan[direction] = (after, times)

    def _take(self, direction: str, sent_up: int) -> bool:
        with self._lock:
            after, times = self._plan.get(direction, (0, 0))
            if times <= 0 or sent_up <= after:
                return False
            self._plan[direction] = (after, times - 1)
            self.cuts[direction] += 1
            return True

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:  # the center is down: the edge sees a refused connection
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._open += [client, upstream]
            state = {"up": 0}
            threading.Thread(target=self._pump, args=(client, upstream, state, True)).start()
            threading.Thread(target=self._pump, args=(upstream, client, state, False)).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, state: dict[str, int], up: bool
    ) -> None:
        try:
            while data := src.recv(65536):
                if up:
                    state["up"] += len(data)
                    if self._take("request", state["up"]):
                        return self._reset(src, dst)
                elif self._take("response", state["up"]):
                    return self._reset(src, dst)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _reset(*sockets: socket.socket) -> None:
        for s in sockets:  # RST, not FIN: the peer sees the connection die mid-message
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.close()


class Split:
    """Orthanc, ``radbridge center``, the proxy and ``radbridge gateway`` (restartable)."""

    def __init__(
        self, root: Path, pacs: OrthancPeer, db_urls: dict[str, str] | None = None
    ) -> None:
        """``db_urls``: the edge's and the center's databases (default: SQLite in data)."""
        self.root, self.pacs = root, pacs
        self.data = root / "data"
        self.data.mkdir()
        raw = yaml.safe_load((REPO / "radbridge/defaults/agreements.yaml").read_text())
        raw["agreements"][0]["hospital"]["return_destination"] = {
            "ae_title": pacs.aet,
            "host": "127.0.0.1",
            "port": pacs.dicom_port,
        }
        agreements = root / "agreements.yaml"
        agreements.write_text(yaml.safe_dump(raw, allow_unicode=True))
        self.center_port = free_port()
        self.edge_port = pacs.modalities["radbridge"][2]
        self.env = dict(
            os.environ,
            RADBRIDGE_DATA_DIR=str(self.data),
            RADBRIDGE_MODEL_REPOSITORY=str(MODELS),
            RADBRIDGE_AGREEMENTS_FILE=str(agreements),
            RADBRIDGE_CENTER__PORT=str(self.center_port),
            RADBRIDGE_CENTER__RAY_NUM_CPUS="4",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            TCP_NODELAY="1",
        )
        db_urls = db_urls or {
            "edge": f"sqlite:///{self.data / 'edge' / 'edge.db'}",
            "center": f"sqlite:///{self.data / 'center' / 'center.db'}",
        }
        self.env["RADBRIDGE_EDGE__DATABASE_URL"] = db_urls["edge"]
        self.env["RADBRIDGE_CENTER__DATABASE_URL"] = db_urls["center"]
        self.log = root / "center.log"
        self.center = self.start_center()
        self.proxy = CuttingProxy(self.center_port)
        self.edge_env = dict(
            self.env,
            RADBRIDGE_EDGE__PORT=str(self.edge_port),
            RADBRIDGE_EDGE__METRICS_PORT="0",
            RADBRIDGE_EDGE__CENTER_URL=f"https://127.0.0.1:{self.proxy.port}",
            RADBRIDGE_EDGE__DELIVERY_POLL_S="1",
            # A center stopping gracefully waits for the edge's long poll in flight (Serve
            # drains a replica's requests): 5 s, not the default 20, per restart here.
            RADBRIDGE_EDGE__DELIVERY_WAIT_S="5",
            RADBRIDGE_EDGE__RETRY_BASE_S="1",
            RADBRIDGE_EDGE__RETRY_MAX_S="4",
        )
        self.gateway_log = root / "gateway.log"
        self.gateway = start_gateway(self.edge_env, self.gateway_log, self.edge_port)
        self.edge_db = Database(db_urls["edge"])
        self.center_db = Database(db_urls["center"])

    def start_center(self, **env: str) -> subprocess.Popen[bytes]:
        """``radbridge center`` (``env``: extra variables); returns once it printed that it
        is ready (log appended)."""
        starts = self.log.read_bytes().count(b"center ready") if self.log.exists() else 0
        proc = subprocess.Popen(
            [str(BIN / "radbridge"), "center"],
            env={**self.env, **env},
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, self.log.read_text()[-3000:]
            if self.log.read_bytes().count(b"center ready") > starts:
                return proc
            time.sleep(0.5)
        proc.kill()
        pytest.fail(f"center not ready in 300 s:\n{self.log.read_text()[-3000:]}")

    def restart_center(self, **env: str) -> None:
        self.center.send_signal(signal.SIGINT)
        self.center.wait(120)
        self.center = self.start_center(**env)

    def restart_gateway(self) -> None:
        self.gateway = start_gateway(self.edge_env, self.gateway_log, self.edge_port)

    def send(self, files: list[Path]) -> str:
        """Upload to Orthanc, then Orthanc C-STOREs the study to the edge; its Orthanc id."""
        ids = [self.pacs.upload(f) for f in files]
        study = self.pacs.study_of(ids[0])
        self.pacs.send_study_to("radbridge", study)
        return study

    def results(self, study: str) -> dict[str, int]:
        """Objects Orthanc holds in ``study`` per modality (the images sent included)."""
        counts: dict[str, int] = {}
        for inst in self.pacs.instances_of(study):
            modality = str(self.pacs.instance_tags(inst).get("Modality"))
            counts[modality] = counts.get(modality, 0) + 1
        return counts

    def wait_for(self, wanted: dict[str, dict[str, int]], timeout_s: float = 300) -> None:
        """Until each study holds its wanted result counts; then 5 s more: none comes twice."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = {s: self.results(s) for s in wanted}
            if all(all(got[s].get(m, 0) >= n for m, n in w.items()) for s, w in wanted.items()):
                break
            time.sleep(1)
        else:
            pytest.fail(f"results missing: {got} of {wanted}\n{self.report()}")
        time.sleep(5)  # the edge polls every second: a duplicate would be here by now
        for study, w in wanted.items():
            got_now = self.results(study)
            assert {m: got_now.get(m, 0) for m in w} == w, (study, got_now)

    def edge_outbox(self) -> dict[str, int]:
        with self.edge_db.session() as s:
            rows = s.execute(select(StudyRow.state, func.count()).group_by(StudyRow.state)).all()
        return {str(state): int(n) for state, n in rows}

    def center_instances(self) -> tuple[int, int]:
        """(instances indexed at the center, distinct SOP instance UIDs among them)."""
        with self.center_db.session() as s:
            total = s.scalar(select(func.count(InstanceRow.id)))
            distinct = s.scalar(select(func.count(func.distinct(InstanceRow.sop_instance_uid))))
        return int(total or 0), int(distinct or 0)

    def center_store_files(self) -> int:
        store = self.data / "center" / "store"
        return sum(1 for p in store.rglob("*.dcm") if "results" not in p.parts)

    def center_result_files(self) -> tuple[int, int]:
        """(result object files in the center store, result object rows)."""
        files = sum(1 for _ in (self.data / "center" / "store" / "results").rglob("*.dcm"))
        with self.center_db.session() as s:
            rows = s.scalar(select(func.count(ResultObjectRow.id)))
        return files, int(rows or 0)

    def report(self) -> str:
        return (
            f"edge outbox {self.edge_outbox()}; proxy cuts {self.proxy.cuts}\n"
            f"gateway log:\n{self.gateway_log.read_text()[-2500:]}\n"
            f"center log:\n{self.log.read_text()[-2500:]}\n{stack_report(self.data)}"
        )

    def close(self) -> None:
        try:
            if self.gateway.poll() is None:
                stop_gateway(self.gateway, self.gateway_log)
        finally:
            self.proxy.close()
            self.center.send_signal(signal.SIGINT)
            try:
                self.center.wait(60)
            except subprocess.TimeoutExpired:
                self.center.kill()
            self.edge_db.dispose()
            self.center_db.dispose()


@contextmanager
def _split(root: Path, db_urls: dict[str, str] | None = None) -> Iterator[Split]:
    edge_port = free_port()
    with OrthancPeer(
        modalities={"radbridge": ("RADBRIDGE", "127.0.0.1", edge_port)}, workdir=root / "orthanc"
    ) as pacs:
        stack = Split(root, pacs, db_urls)
        try:
            yield stack
        finally:
            stack.close()


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Split]:
    with _split(tmp_path_factory.mktemp("faults")) as stack:
        yield stack


def _cxr(folder: Path, seed: int, patient: str) -> list[Path]:
    return write_cxr_study(
        folder,
        seed=seed,
        findings={"cardiomegaly"},
        patient_name=f"Fault^{patient}",
        patient_id=f"FAULT-{seed}",
        birth_date="19700101",
        n_images=3,
        accession=f"ACC-F{seed}",
    )


def _assert_settled(split: Split) -> None:
    total, distinct = split.center_instances()
    assert total == distinct, f"the center indexed an instance twice ({total} rows, {distinct})"
    assert split.center_store_files() == total, "a file at the center without its row, or back"
    files, rows = split.center_result_files()
    assert files == rows, f"{files} result files at the center for {rows} result objects"
    outbox = split.edge_outbox()
    assert set(outbox) <= {EdgeStudyState.FORWARDED}, outbox
    with split.edge_db.session() as s:
        edge_rows = int(s.scalar(select(func.count(InstanceRow.id))) or 0)
    edge_files = [p for p in (split.data / "edge" / "store").rglob("*") if p.is_file()]
    assert len(edge_files) == edge_rows, "an edge file without its row (or a staging leftover)"


def test_gateway_killed_while_forwarding_restarts_and_delivers_each_result_once(
    split: Split, tmp_path: Path
) -> None:
    studies = [split.send(_cxr(tmp_path / f"s{i}", 900 + i, str(i))) for i in range(3)]
    # SIGKILL the moment a study is claimed for forwarding: it is being de-identified or
    # sent, its identity-map rows may be written, part of it may be at the center.
    deadline = time.monotonic() + 60
    while split.edge_outbox().get(EdgeStudyState.FORWARDING, 0) == 0:
        assert time.monotonic() < deadline, f"no study was ever forwarding\n{split.report()}"
        time.sleep(0.005)
    split.gateway.send_signal(signal.SIGKILL)
    split.gateway.wait(30)
    assert split.edge_outbox().get(EdgeStudyState.FORWARDING, 0) >= 1  # killed mid-forward
    split.restart_gateway()
    split.wait_for({s: {"DX": 3, "SR": 1} for s in studies})
    _assert_settled(split)


def test_connection_cut_mid_stow_body_and_mid_answer_loses_and_repeats_nothing(
    split: Split, tmp_path: Path
) -> None:
    phantom = chest_ct(np.random.default_rng([20261206, 1]), n_nodules=1)
    ct = write_ct_series(
        tmp_path / "ct",
        phantom,
        seed=11,
        patient_name="Fault^CT",
        patient_id="FAULT-CT",
        birth_date="19650505",
        accession="ACC-FCT",
    )
    # Twice: reset the connection 1 MB into a STOW-RS body. Once: reset the center's answer
    # to a STOW-RS request it has processed in full (the edge must send it again, and the
    # center must take the same instances again without a second row or a second job).
    split.proxy.cut("request", 1 << 20, 2)
    split.proxy.cut("response", 1 << 20, 1)
    cxr = split.send(_cxr(tmp_path / "cxr", 990, "cut"))
    ct_study = split.send(ct)
    split.wait_for({cxr: {"DX": 3, "SR": 1}, ct_study: {"CT": len(ct), "SEG": 1, "SR": 1}})
    assert split.proxy.cuts == {"request": 2, "response": 1}, split.report()
    _assert_settled(split)
    with split.center_db.session() as s:
        per_study = s.execute(
            select(StudyRow.study_uid, func.count(InstanceRow.id))
            .join(SeriesRow, SeriesRow.study_id == StudyRow.id)
            .join(InstanceRow, InstanceRow.series_id == SeriesRow.id)
            .group_by(StudyRow.study_uid)
        ).all()
    assert sorted(n for _, n in per_study)[-1] == len(ct)  # the CT: every slice, once


def _wait_until_a_job_runs(split: Split, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with split.center_db.session() as s:
            running = s.scalar(select(func.count()).where(JobRow.state == JobState.RUNNING))
        if running:
            return
        assert time.monotonic() < deadline, f"no job ever ran\n{split.report()}"
        time.sleep(0.01)


def test_center_killed_mid_job_resumes_it_and_the_hospital_gets_one_result(
    split: Split, tmp_path: Path
) -> None:
    """SIGKILL of ``radbridge center`` (its Ray node goes with it) while a CT job runs: the
    restarted center resumes the job, discards what the cut run wrote, and the PACS gets one
    SEG and one SR; the edge's outboxes wait through the outage.

    The center runs with ``prepare_ahead`` off until the kill: with it on, the job only takes
    the volume segmented during the quiet period and is RUNNING for about 0.1 s, too short
    for the kill to land in it reliably; off, the job segments (about 0.7 s here)."""
    split.restart_center(
        RADBRIDGE_CENTER__SERVE_CONFIG=str(serve_config_with(tmp_path, prepare_ahead=False))
    )
    phantom = chest_ct(np.random.default_rng([20261206, 2]), n_nodules=1)
    ct = write_ct_series(
        tmp_path / "ct",
        phantom,
        seed=12,
        patient_name="Fault^Center",
        patient_id="FAULT-CENTER",
        birth_date="19580303",
        accession="ACC-FCK",
    )
    study = split.send(ct)
    _wait_until_a_job_runs(split)
    split.center.send_signal(signal.SIGKILL)
    split.center.wait(30)
    with split.center_db.session() as s:
        assert s.scalar(select(func.count()).where(JobRow.state == JobState.RUNNING)) == 1
    time.sleep(3)  # the edge finds the center gone (listings and deliveries retry)
    split.center = split.start_center()
    split.wait_for({study: {"CT": len(ct), "SEG": 1, "SR": 1}})
    _assert_settled(split)
    with split.center_db.session() as s:
        states = s.scalars(select(JobRow.state)).all()
    assert JobState.RUNNING not in states and JobState.QUEUED not in states, states


def _runner_replicas(center: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The ModelRunner replica processes of this ``radbridge center`` (its local Ray node's
    workers are its descendants; Ray names them after the replica)."""
    found = []
    for proc in psutil.Process(center.pid).children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if "ServeReplica:" in cmd and ":ModelRunner" in cmd:
            found.append(proc)
    return found


def _wait_until_busy(proc: psutil.Process, timeout_s: float = 120) -> None:
    """Until ``proc`` computes (over 60 % of a core across 50 ms): a runner replica does so
    only while a volume's sliding windows run on it."""
    deadline = time.monotonic() + timeout_s
    before = sum(proc.cpu_times()[:2])
    while True:
        time.sleep(0.05)
        now = sum(proc.cpu_times()[:2])
        if now - before >= 0.03:
            return
        before = now
        assert time.monotonic() < deadline, "the runner never computed"


def test_a_model_runner_replica_killed_mid_segmentation_is_replaced_and_the_job_ends_done(
    split: Split, tmp_path: Path
) -> None:
    """SIGKILL of the ModelRunner replica while a CT's sliding windows run on it: Serve
    starts another and the job ends done, the PACS with one SEG and one SR, never an "AI not
    performed" notice.

    With the center's ``prepare_ahead`` (the default) the windows run during the quiet
    period, on the edge's hint, before the job exists: the kill breaks that prepared
    segmentation (or Serve sends the windows not yet answered to the new replica) and the job
    computes again or takes it. Without the hint, the kill lands in the job's own run, which
    either Serve's retry or the job's rerun on RayActorError carries. Either way: one result.
    """
    (victim,) = _runner_replicas(split.center)
    phantom = chest_ct(np.random.default_rng([20261206, 3]), n_nodules=1)
    ct = write_ct_series(
        tmp_path / "ct",
        phantom,
        seed=13,
        patient_name="Fault^Replica",
        patient_id="FAULT-REPLICA",
        birth_date="19610404",
        accession="ACC-FRK",
    )
    study = split.send(ct)
    _wait_until_busy(victim)
    time.sleep(0.05)  # well inside the windows (about 0.3 s of them on this CT)
    killed_at = utcnow()
    victim.send_signal(signal.SIGKILL)
    split.wait_for({study: {"CT": len(ct), "SEG": 1, "SR": 1}})
    _assert_settled(split)
    deadline = time.monotonic() + 60  # Serve replaces it (at once if the job needed it)
    while not (replicas := _runner_replicas(split.center)):
        assert time.monotonic() < deadline, "the ModelRunner replica was not replaced"
        time.sleep(0.5)
    assert victim.pid not in {p.pid for p in replicas}
    with split.center_db.session() as s:
        jobs = s.scalars(select(JobRow)).all()
        states = [j.state for j in jobs]
        ct_job = max(jobs, key=lambda j: j.id)
    assert JobState.FAILED not in states and JobState.RUNNING not in states, states
    assert ct_job.finished_at is not None and ct_job.finished_at > killed_at, (
        "the job was over before the kill: it tested nothing"
    )


def test_a_center_out_of_disk_refuses_with_507_and_the_edge_waits_then_sends(
    split: Split, tmp_path: Path
) -> None:
    """The center's store below its watermark (here: a watermark above any disk's size):
    STOW-RS answers 507 before reading a body, nothing is kept, the study waits in the edge's
    outbox; with room again it goes, and its result comes back once."""
    split.restart_center(RADBRIDGE_CENTER__MIN_FREE_BYTES=str(1 << 62))
    before = split.center_instances()
    study = split.send(_cxr(tmp_path / "cxr", 995, "disk"))
    deadline = time.monotonic() + 60
    while "507" not in split.gateway_log.read_text():
        assert time.monotonic() < deadline, f"the edge never met the 507\n{split.report()}"
        time.sleep(0.5)
    assert split.center_instances() == before  # nothing of the refused requests kept
    outbox = split.edge_outbox()
    assert outbox.get(EdgeStudyState.RECEIVING, 0) == 1, outbox  # waiting, not blocked
    split.restart_center()
    split.wait_for({study: {"DX": 3, "SR": 1}})
    _assert_settled(split)


def _restart_postgres() -> float:
    """Restart the local PostgreSQL cluster (every connection to it dies); its seconds."""
    clusters = sorted(Path("/etc/postgresql").glob("*/main"))
    if not clusters or shutil.which("pg_ctlcluster") is None:
        pytest.fail("no local PostgreSQL cluster to restart (./run test installs one)")
    version = clusters[-1].parent.name
    t0 = time.monotonic()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return time.monotonic() - t0


def test_postgresql_restarted_under_edge_and_center_loses_and_repeats_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Edge and center on PostgreSQL (their own databases); the server restarts while a
    study's job and delivery are under way, and again before the next study: every
    connection dies, the pools reconnect, the loops retry, each study gets one SR."""
    root = tmp_path_factory.mktemp("faults-pg")
    with (
        fresh_postgres_database() as edge_url,
        fresh_postgres_database() as center_url,
        _split(root, {"edge": edge_url, "center": center_url}) as stack,
    ):
        first = stack.send(_cxr(root / "a", 996, "pg-a"))
        deadline = time.monotonic() + 60
        while stack.edge_outbox().get(EdgeStudyState.FORWARDED, 0) == 0:
            assert time.monotonic() < deadline, f"never forwarded\n{stack.report()}"
            time.sleep(0.05)
        took = _restart_postgres()  # the center's job / the edge's delivery in flight
        second = stack.send(_cxr(root / "b", 997, "pg-b"))
        stack.wait_for({first: {"DX": 3, "SR": 1}, second: {"DX": 3, "SR": 1}})
        assert took < 60
        _assert_settled(stack)
        with stack.center_db.session() as s:
            states = s.scalars(select(JobRow.state)).all()
        # A database restart is not the study's fault: no job failed, no "not read" notice.
        assert sorted(states) == [JobState.DONE, JobState.DONE], states


def _wall_clock_shim(folder: Path) -> Path:
    """tests/e2e/wall_clock_step.c built into ``folder`` (an LD_PRELOAD library)."""
    cc = shutil.which("cc")
    if cc is None:
        pytest.fail("no C compiler for the wall-clock shim (./run test installs gcc)")
    lib = folder / "libwall_clock_step.so"
    source = Path(__file__).with_name("wall_clock_step.c")
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(lib), str(source), "-ldl"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return lib


def _study_attempts(split: Split, study_uid: str) -> int:
    with split.edge_db.session() as s:
        return int(s.scalar(select(StudyRow.attempts).where(StudyRow.study_uid == study_uid)) or 0)


def test_a_wall_clock_stepped_back_an_hour_holds_no_quiet_period_and_no_retry(
    split: Split, tmp_path: Path
) -> None:
    """`radbridge gateway` with its wall clock stepped (tests/e2e/wall_clock_step.c, preloaded):
    it steps back an hour during a study's quiet period (20 s here; the study's early request is
    cut), then again while its forward waits to retry (20 s after a connection cut mid-STOW).
    Each wait ends when it would have without the step, not an hour later; the result comes
    back once; the metric and the log say what happened. The monotonic clock is left alone, as
    an NTP step leaves it; the center and the PACS keep the true time, as they would on their
    own machines."""
    stop_gateway(split.gateway, split.gateway_log)
    raw = yaml.safe_load((split.root / "agreements.yaml").read_text())
    raw["agreements"][0]["quiet_period_s"] = 20
    agreements = tmp_path / "agreements.yaml"
    agreements.write_text(yaml.safe_dump(raw, allow_unicode=True))
    clock = tmp_path / "wall-clock-offset-s"
    clock.write_text("0\n")
    metrics_port = free_port()
    env = dict(
        split.edge_env,
        LD_PRELOAD=str(_wall_clock_shim(tmp_path)),
        WALL_CLOCK_OFFSET_FILE=str(clock),
        RADBRIDGE_AGREEMENTS_FILE=str(agreements),
        RADBRIDGE_EDGE__RETRY_BASE_S="20",
        RADBRIDGE_EDGE__RETRY_MAX_S="20",
        RADBRIDGE_EDGE__METRICS_PORT=str(metrics_port),
    )
    split.gateway = start_gateway(env, split.gateway_log, split.edge_port)
    try:
        cuts = split.proxy.cuts["request"]  # earlier tests' cuts count too
        # Two STOW-RS bodies (not a listing, nor the small hint): the early request, sent once
        # the study is idle for a quarter of its quiet period (after the first step), and the
        # whole study the forward then sends when it is stable.
        split.proxy.cut("request", 100_000, 2)
        files = _cxr(tmp_path / "cxr", 998, "clock")
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        study = split.send(files)
        t0 = time.monotonic()
        time.sleep(2)
        clock.write_text("-3600\n")  # 18 s of the quiet period left
        while _study_attempts(split, study_uid) == 0:  # forwarded and cut: a retry in 20 s
            assert time.monotonic() - t0 < 60, f"the quiet period outlived 60 s\n{split.report()}"
            time.sleep(0.2)
        assert split.proxy.cuts["request"] == cuts + 2, split.report()
        t1 = time.monotonic()
        time.sleep(2)
        clock.write_text("-7200\n")  # 18 s of the retry's wait left
        split.wait_for({study: {"DX": 3, "SR": 1}}, timeout_s=90)
        assert time.monotonic() - t1 < 60, "the retry waited for the hour"
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        steps = [
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("radbridge_edge_clock_steps_back_total")
        ]
        assert steps and steps[0] >= 2, metrics  # one per step at least (forwarder, deliverer)
        log = split.gateway_log.read_text()
        assert re.search(r"the wall clock stepped\s+back 3[56]\d\d s", log), log[-3000:]
        # the center's clock: the edge's request tokens follow it (radbridge.auth.EdgeAuth)
        offsets = [int(v) for v in re.findall(r"the center's clock is\s+([+-]\d+) s", log)]
        assert any(abs(v - 3600) <= 11 for v in offsets), log[-3000:]
        # a long poll's Date proves a range as wide as the poll; its middle is within 11 s
        assert all(min(abs(v - true) for true in (0, 3600, 7200)) <= 11 for v in offsets), offsets
    finally:
        stop_gateway(split.gateway, split.gateway_log)
        split.restart_gateway()
    _assert_settled(split)

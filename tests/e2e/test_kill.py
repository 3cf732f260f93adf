"""SIGKILL the gateway while dcmtk storescu streams, again and again.

Every instance storescu saw answered 0x0000 must be present, whole and indexed once the gateway
has restarted (and run its staging recovery); no half-written file may ever be visible in the
store. Each round kills the gateway at a different moment of the stream.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from radbridge.db import Database
from radbridge.db.tables import InstanceRow
from tests.conftest import free_port, make_instance, write_instance
from tests.e2e.gateway_process import start_gateway, stop_gateway

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
BIN = Path(sys.executable).parent
ROUNDS = 4
PER_ROUND = 120
_SENDING = re.compile(r"Sending file: (\S+)")


def _acknowledged(storescu_output: str) -> set[str]:
    """Files whose C-STORE response storescu logged as Success."""
    acked, current = set(), None
    for line in storescu_output.splitlines():
        m = _SENDING.search(line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.add(current)
            current = None
    return acked


def test_sigkill_during_storescu_never_loses_an_acknowledged_instance(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = dict(
        os.environ,
        RADBRIDGE_DATA_DIR=str(data),
        RADBRIDGE_EDGE__PORT=str(port),
        RADBRIDGE_EDGE__METRICS_PORT="0",
        RADBRIDGE_EDGE__CENTER_URL=f"http://127.0.0.1:{free_port()}",  # nobody: studies wait
        TCP_NODELAY="1",
    )
    log = tmp_path / "gateway.log"
    rng = random.Random(20261123)
    acked: dict[str, str] = {}  # SOP Instance UID -> sha256 of what storescu sent
    for round_ in range(ROUNDS):
        folder = tmp_path / f"round{round_}"
        folder.mkdir()
        study = generate_uid()
        files = [
            write_instance(make_instance(study, seed=i, rows=192), folder / f"{i:04d}.dcm")
            for i in range(PER_ROUND)
        ]
        gw = start_gateway(env, log, port)
        scu = subprocess.Popen(
            ["storescu", "-v", "-aet", "STORESCU", "-aec", "RADBRIDGE", "127.0.0.1", str(port)]
            + [str(f) for f in files],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        # Kill after a random number of Success responses, i.e. always mid-stream, while the
        # next instance is somewhere between the socket, the staging file and the index.
        kill_after = rng.randint(5, PER_ROUND - 10)
        seen: list[str] = []
        assert scu.stdout is not None
        for raw in scu.stdout:
            seen.append(raw.decode(errors="replace"))
            if "Received Store Response (Success)" in seen[-1]:
                kill_after -= 1
                if kill_after == 0:
                    break
        gw.send_signal(signal.SIGKILL)
        gw.wait(timeout=30)
        rest, _ = scu.communicate(timeout=60)
        output = "".join(seen) + rest.decode(errors="replace")
        round_acked = _acknowledged(output)
        assert 0 < len(round_acked) < PER_ROUND, "the kill was not mid-stream"
        for f in round_acked:
            ds = pydicom.dcmread(f)
            acked[str(ds.SOPInstanceUID)] = _dataset_sha(Path(f).read_bytes())
    assert acked, "storescu never got a Success: the kill came too early every round"

    # Restart once more: recovery runs, then a clean stop.
    gw = start_gateway(env, log, port)
    assert stop_gateway(gw, log) == 0, log.read_text()[-2000:]

    store = data / "edge" / "store"
    db = Database(f"sqlite:///{data / 'edge' / 'edge.db'}")
    with db.session() as s:
        rows = {r.sop_instance_uid: (r.path, r.sha256) for r in s.scalars(select(InstanceRow))}
    db.dispose()
    missing = sorted(set(acked) - set(rows))
    assert missing == [], f"{len(missing)} acknowledged instances lost"
    for uid, sent_sha in acked.items():
        path, row_sha = rows[uid]
        raw = (store / path).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == row_sha  # whole file, as indexed
        assert _dataset_sha(raw) == sent_sha  # the dataset storescu sent, byte for byte
    # No half-written file is visible: every file in the store is a whole, parseable instance
    # and the staging area was emptied by recovery.
    for f in store.rglob("*.dcm"):
        if ".staging" in f.parts:
            continue
        ds = pydicom.dcmread(f)
        assert len(ds.PixelData) == 192 * 192 * 2
    assert [p for p in (store / ".staging").iterdir()] == []
    print(f"{len(acked)} acknowledged over {ROUNDS} kills; {len(rows)} indexed")


def _dataset_sha(raw: bytes) -> str:
    group_length = int.from_bytes(raw[140:144], "little")
    return hashlib.sha256(raw[144 + group_length :]).hexdigest()

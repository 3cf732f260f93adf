"""Run `radbridge gateway` as its own process, as an operator would."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def start_gateway(env: dict[str, str], log: Path, port: int) -> subprocess.Popen[bytes]:
    """Start the gateway with ``env`` and return once its SCP port accepts connections."""
    proc = subprocess.Popen(
        [str(BIN / "radbridge"), "gateway"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"gateway did not listen: {log.read_text()[-2000:]}")

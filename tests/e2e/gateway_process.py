"""Run `radbridge gateway` as its own process, as an operator would."""

from __future__ import annotations

import signal
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


def stop_gateway(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> int:
    """SIGTERM, as an operator's `kill` or Kubernetes would; return the exit code.

    A gateway that does not stop within ``timeout_s`` fails the test with where each of its
    threads was (py-spy) and the end of its log, then is killed.
    """
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stacks = subprocess.run(
            [str(BIN / "py-spy"), "dump", "--pid", str(proc.pid)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        proc.kill()
        proc.wait()
        pytest.fail(
            f"gateway still running {timeout_s:.0f} s after SIGTERM\n"
            f"threads:\n{stacks.stdout}{stacks.stderr}\nlog:\n{log.read_text()[-3000:]}"
        )

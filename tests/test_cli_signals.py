"""A long-running command (gateway, center, up) stops on SIGTERM whichever thread receives it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# SIGTERM sent to a thread other than the main one (signal.pthread_kill): the kernel may pick
# any thread for a process-directed signal, so `kill` can end up exactly like this.
PROGRAM = textwrap.dedent(
    """
    import signal, sys, threading, time
    from radbridge.cli import _route_signals, _until_stopped

    stop = threading.Event()
    _route_signals(stop)

    def hit():
        time.sleep(0.3)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    threading.Thread(target=hit, daemon=True).start()
    t0 = time.monotonic()
    if sys.argv[1] == "untimed":
        stop.wait()
    else:
        _until_stopped(stop)
    print(f"{time.monotonic() - t0:.2f}")
    """
)


def _run(mode: str, timeout_s: float) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(
            [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return None


def test_a_sigterm_taken_by_another_thread_still_stops_the_command() -> None:
    done = _run("sliced", 20)
    assert done is not None and done.returncode == 0, done
    assert float(done.stdout) < 5


def test_the_untimed_wait_it_replaces_would_never_wake() -> None:
    """The control: without slices the main thread never runs the handler (killed at 4 s)."""
    assert _run("untimed", 4) is None

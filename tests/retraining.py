"""The retraining test's training, started in the background as the test run begins.

``test_retraining_reproduces_the_shipped_models`` retrains both demo models from scratch:
about three minutes of both cores. The slow set spends much of its time waiting (quiet
periods, polls, Ray and peers starting), so when that test runs with others, its training
starts as soon as collection ends, in a process of its own at the lowest priority
(``nice 19``: it takes the CPU no other test wants), and the test is moved to the end, where
it waits for that process and compares what it made. Run alone, the test trains in the
foreground. Either way the training is the same call (``python -m models.demo --retrain``,
which is ``build_all(..., retrain=True)``) and the comparison is the same.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

__all__ = ["Retraining", "retraining_key"]

TEST_NAME = "test_retraining_reproduces_the_shipped_models"
REPO = Path(__file__).resolve().parent.parent


class Retraining:
    """``python -m models.demo <dir> --retrain`` at nice 19, its output in a log file."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="radbridge-retrain-"))
        self.log = self.root / "training.log"
        with self.log.open("wb") as out:
            command = [sys.executable, "-m", "models.demo", str(self.models), "--retrain"]
            self._proc = subprocess.Popen(
                ["nice", "-n", "19", *command],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def models(self) -> Path:
        return self.root / "models"

    def wait(self, timeout_s: float) -> Path:
        """The retrained repository, once the process ended well; else the log's tail."""
        try:
            rc = self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the background retraining ran past {timeout_s:.0f} s") from None
        if rc != 0:
            tail = self.log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"the background retraining failed ({rc}):\n{tail}")
        return self.models

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(30)
        shutil.rmtree(self.root, ignore_errors=True)


retraining_key = pytest.StashKey["Retraining"]()


@pytest.hookimpl(trylast=True)  # after -m/-k deselected what will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if item.name == TEST_NAME]
    if not ours or len(items) == 1 or config.option.collectonly:
        return
    for item in ours:
        items.remove(item)
        items.append(item)
    config.stash[retraining_key] = Retraining()


def pytest_unconfigure(config: pytest.Config) -> None:
    retraining = config.stash.get(retraining_key, None)
    if retraining is not None:
        retraining.stop()

"""models.training: a build's torch settings end with the build; a model file is put in whole."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from models.training import TRAINING_THREADS, installed_file, reproducible_torch


def test_reproducible_torch_gives_the_process_its_own_settings_back() -> None:
    threads = torch.get_num_threads()
    other = TRAINING_THREADS + 1
    torch.set_num_threads(other)
    try:
        with reproducible_torch():
            assert torch.get_num_threads() == TRAINING_THREADS
            assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == other
        assert not torch.are_deterministic_algorithms_enabled()
        # Also when the build fails, and with warn-only mode as the caller had it.
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.raises(RuntimeError, match="training broke"), reproducible_torch():
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            raise RuntimeError("training broke")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


def test_installed_file_appears_whole_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the old version")
    with installed_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"the new version")
        assert target.read_bytes() == b"the old version"  # untouched until the block ends
    assert target.read_bytes() == b"the new version"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_installed_file_leaves_nothing_when_the_block_fails(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.pt"
    with pytest.raises(ValueError), installed_file(target) as tmp:
        tmp.write_bytes(b"half a checkpoint")
        raise ValueError("export disagrees with torch")
    assert list(tmp_path.iterdir()) == []

"""The center's start-up checks that run before Ray: a taken port is a clear error."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from radbridge.errors import ConfigError
from serving.center import check_port_free
from tests.conftest import REPO


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


def test_taken_port_names_the_setting(taken_port: int) -> None:
    with pytest.raises(ConfigError) as err:
        check_port_free("127.0.0.1", taken_port)
    assert "center.port" in str(err.value)
    assert f"127.0.0.1:{taken_port} is in use by another process" in str(err.value)


def test_free_port_passes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    check_port_free("127.0.0.1", port)  # released: no error


def _run_cli(
    command: str, setting: str, port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """`radbridge COMMAND` with ``setting`` (an environment variable) on a taken ``port``;
    asserts it exits 2 without starting Ray, returns its output."""
    from typer.testing import CliRunner

    from radbridge.cli import app

    models = Path(os.environ.get("RADBRIDGE_TEST_MODELS", REPO / "var" / "models"))
    if not any(models.glob("*/*/manifest.yaml")):
        pytest.fail("demo models are not built (./run test builds them before the tests)")
    monkeypatch.setenv("RADBRIDGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("RADBRIDGE_MODEL_REPOSITORY", str(models))
    monkeypatch.setenv(setting, str(port))
    out = CliRunner().invoke(app, [command])
    assert out.exit_code == 2, out.output
    import ray

    assert not ray.is_initialized()
    return out.output


def test_center_command_refuses_a_taken_port_before_starting_ray(
    taken_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = _run_cli("center", "RADBRIDGE_CENTER__PORT", taken_port, tmp_path, monkeypatch)
    assert "center.port" in output and "in use" in output


def test_up_refuses_a_taken_edge_port_before_starting_ray(
    taken_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = _run_cli("up", "RADBRIDGE_EDGE__METRICS_PORT", taken_port, tmp_path, monkeypatch)
    assert "edge.metrics_port" in output and "RADBRIDGE_EDGE__METRICS_PORT" in output


def test_up_refuses_a_bad_agreement_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from radbridge.cli import app

    bad = tmp_path / "agreements.yaml"
    text = (REPO / "radbridge/defaults/agreements.yaml").read_text()
    bad.write_text(text.replace("modalities: [CR, DX, CT]", "modalities: [CR, XX, CT]"))
    monkeypatch.setenv("RADBRIDGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RADBRIDGE_AGREEMENTS_FILE", str(bad))
    out = CliRunner().invoke(app, ["up"])
    assert out.exit_code == 2, out.output
    assert "modalities" in out.output, out.output
    assert "✗ agreements, databases, ports" in out.output  # the step that failed, named
    assert "center: Ray" not in out.output  # never reached
    assert not (tmp_path / "data").exists()  # no database, no keys, no models, no Ray
    import ray

    assert not ray.is_initialized()

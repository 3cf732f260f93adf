"""The Serve config file: Ray's schema plus our typed user_config/args; errors name the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from radbridge.errors import ConfigError
from serving.config import DEFAULT_SERVE_CONFIG, ServeConfig, load_serve_config

RAW: dict[str, Any] = yaml.safe_load(DEFAULT_SERVE_CONFIG.read_text())


def _deployment(raw: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in raw["applications"][0]["deployments"] if d["name"] == name)


def _with(change: Any) -> dict[str, Any]:
    raw = copy.deepcopy(RAW)
    change(raw)
    return raw


def test_default_config_is_valid_and_typed() -> None:
    cfg = load_serve_config()
    assert cfg.app.import_path == "serving.app:build"
    assert cfg.runner.max_batch_size == 8 and cfg.runner.admitted == 8
    assert cfg.runner.allow_spinning is True and cfg.runner.hold_while_computing is True
    assert cfg.api.max_queued_instances == 5000
    runner = next(d for d in cfg.app.deployments if d.name == "ModelRunner")
    assert runner.max_ongoing_requests >= cfg.runner.admitted + cfg.runner.max_queued
    assert {d.name for d in cfg.app.deployments} == {"Api", "Preprocessor", "ModelRunner"}
    assert all(d.autoscaling_config for d in cfg.app.deployments)


def test_deploy_schema_fills_bind_address_and_settings() -> None:
    schema = load_serve_config().deploy_schema(
        host="127.0.0.1", port=8999, settings={"mode": "local"}
    )
    assert schema.http_options.port == 8999 and schema.http_options.host == "127.0.0.1"
    assert schema.applications[0].args == {"settings": {"mode": "local"}}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (
            lambda r: _deployment(r, "ModelRunner")["user_config"].update(max_batch_size=0),
            "deployments[ModelRunner].user_config.max_batch_size",
        ),
        (
            lambda r: _deployment(r, "ModelRunner")["user_config"].update(providers=["rocm"]),
            "user_config.providers",
        ),
        (
            lambda r: _deployment(r, "ModelRunner")["user_config"].update(
                require_provider="tensorrt"
            ),
            "require_provider 'tensorrt' is not in providers",
        ),
        (
            lambda r: _deployment(r, "ModelRunner")["user_config"].update(surprise=1),
            "user_config.surprise",
        ),
        (
            lambda r: _deployment(r, "ModelRunner")["user_config"].update(allow_spinning="maybe"),
            "deployments[ModelRunner].user_config.allow_spinning",
        ),
        (
            lambda r: _deployment(r, "ModelRunner")["user_config"].update(
                hold_while_computing="sometimes"
            ),
            "deployments[ModelRunner].user_config.hold_while_computing",
        ),
        (
            lambda r: _deployment(r, "Api")["user_config"].update(max_batch_images=300),
            "deployments[Api].user_config.max_batch_images: 300 > the ModelRunner's capacity "
            "+ max_queued (264)",
        ),
        (
            lambda r: _deployment(r, "Api")["user_config"].update(max_batch_images=0),
            "deployments[Api].user_config.max_batch_images",
        ),
        (
            lambda r: _deployment(r, "ModelRunner").update(max_ongoing_requests=5),
            "deployments[ModelRunner].max_ongoing_requests: 5 < capacity",
        ),
        (
            lambda r: _deployment(r, "ModelRunner").pop("max_ongoing_requests"),
            "max_ongoing_requests: must be set",
        ),
        (
            lambda r: _deployment(r, "Api")["user_config"].update(
                models={"m": {"version": "1", "shadow": "1"}}
            ),
            "shadow must differ",
        ),
        (
            lambda r: _deployment(r, "Api")["user_config"].update(max_queued_instances=0),
            "user_config.max_queued_instances",
        ),
        (
            lambda r: _deployment(r, "Preprocessor").update(user_config={"x": 1}),
            "Preprocessor takes no user_config",
        ),
        (
            lambda r: r["applications"][0]["deployments"].append({"name": "Mystery"}),
            "deployments[Mystery]: unknown deployment",
        ),
        (
            lambda r: r["applications"][0].update(import_path="elsewhere:app"),
            "exactly one must have import_path serving.app:build",
        ),
        (lambda r: r["applications"][0].update(args={"settings": 3}), "args.settings"),
        (
            lambda r: _deployment(r, "Api").update(max_ongoing_requests=0),
            "serve.yaml",
        ),
    ],
)
def test_bad_config_fails_naming_the_field(change: Any, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        ServeConfig(_with(change), "serve.yaml")
    assert named in str(err.value)


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_serve_config(tmp_path / "absent.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_serve_config(bad)


def test_runner_admits_one_batch_by_default() -> None:
    from serving.config import RunnerConfig

    assert RunnerConfig(max_batch_size=8).admitted == 8
    assert RunnerConfig(max_batch_size=8, capacity=40).admitted == 40
    assert RunnerConfig.model_validate({"allow_spinning": True}).allow_spinning is True

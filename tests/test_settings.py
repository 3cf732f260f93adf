from pathlib import Path

import pytest

from radbridge.errors import ConfigError
from radbridge.settings import DEV_SECRET, load_settings


def test_local_defaults_derive_absolute_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADBRIDGE_CONFIG", raising=False)
    s = load_settings(data_dir=Path("somewhere"))
    assert s.mode == "local"
    assert s.edge_store.is_absolute() and s.edge_store.parts[-3:] == ("somewhere", "edge", "store")
    assert s.edge_db_url.startswith("sqlite:///") and s.edge_db_url.endswith("edge/edge.db")
    assert s.edge.master_secret.get_secret_value() == DEV_SECRET


def test_production_refuses_the_development_secret() -> None:
    with pytest.raises(ConfigError, match=r"edge\.master_secret"):
        load_settings(mode="production")
    s = load_settings(
        mode="production",
        edge={
            "master_secret": "a-real-secret-from-vault-32-bytes-long",
            "center_url": "https://center.example",
        },
    )
    assert s.mode == "production"


def test_environment_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "radbridge.yaml"
    cfg.write_text("edge:\n  port: 4242\ncenter:\n  port: 8123\n")
    monkeypatch.setenv("RADBRIDGE_CONFIG", str(cfg))
    monkeypatch.setenv("RADBRIDGE_EDGE__PORT", "5151")  # environment beats the file
    s = load_settings()
    assert (s.edge.port, s.center.port) == (5151, 8123)


def test_bad_field_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADBRIDGE_EDGE__PORT", "70000")
    with pytest.raises(ConfigError, match=r"edge\.port"):
        load_settings()

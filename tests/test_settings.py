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


def test_local_center_speaks_https_with_the_local_ca(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADBRIDGE_CONFIG", raising=False)
    s = load_settings(data_dir=Path("d"), center={"port": 8443})
    assert s.center_url == "https://127.0.0.1:8443"
    assert s.center.tls is not None and s.center.tls.cert_file.name == "center-tls.pem"
    assert s.edge.center_ca_file is not None and s.edge.center_ca_file.name == "local-ca.pem"
    plain = load_settings(data_dir=Path("d"), center={"plain_http": True})
    assert plain.center_url == "http://127.0.0.1:8000" and plain.center.tls is None
    given = load_settings(edge={"center_url": "https://center.local:9000"})
    assert given.center_url == "https://center.local:9000"


def test_production_has_no_plain_http_switch_and_no_implicit_ca() -> None:
    secret = "a-real-secret-from-vault-32-bytes-long"
    with pytest.raises(ConfigError, match=r"center\.plain_http"):
        load_settings(mode="production", edge={"master_secret": secret}, center={"plain_http": 1})
    s = load_settings(
        mode="production", edge={"master_secret": secret, "center_url": "https://c.example"}
    )
    assert s.center.tls is None and s.edge.center_ca_file is None  # the system's trust store


def test_unknown_nested_keys_and_inverted_retries_fail_naming_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RADBRIDGE_CONFIG", raising=False)
    monkeypatch.setenv("RADBRIDGE_EDGE__PROT", "11113")  # a typo of PORT
    with pytest.raises(ConfigError, match=r"edge\.prot"):
        load_settings()
    monkeypatch.delenv("RADBRIDGE_EDGE__PROT")
    monkeypatch.setenv("RADBRIDGE_CENTRE__PORT", "8001")  # British spelling of center
    with pytest.raises(ConfigError, match=r"RADBRIDGE_CENTRE__PORT: no setting 'centre'"):
        load_settings()
    monkeypatch.delenv("RADBRIDGE_CENTRE__PORT")
    cfg = tmp_path / "radbridge.yaml"
    cfg.write_text("center:\n  max_body_byte: 10\n")
    monkeypatch.setenv("RADBRIDGE_CONFIG", str(cfg))
    with pytest.raises(ConfigError, match=r"center\.max_body_byte"):
        load_settings()
    monkeypatch.delenv("RADBRIDGE_CONFIG")
    with pytest.raises(ConfigError, match=r"edge\.retry_base_s .* above edge\.retry_max_s"):
        load_settings(edge={"retry_base_s": 60, "retry_max_s": 30})


def test_the_edge_and_the_center_cannot_share_a_database(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("RADBRIDGE_CONFIG", raising=False)
    url = f"sqlite:///{tmp_path / 'one.db'}"
    with pytest.raises(ConfigError, match=r"edge\.database_url and center\.database_url"):
        load_settings(edge={"database_url": url}, center={"database_url": url})
    s = load_settings(edge={"database_url": url})
    assert s.center_db_url != s.edge_db_url

"""One settings object for every radbridge process: environment + optional YAML file.

Precedence (highest first): init arguments, ``RADBRIDGE_*`` environment variables (nested with
``__``, e.g. ``RADBRIDGE_EDGE__PORT``), the YAML file named by ``RADBRIDGE_CONFIG``, defaults.
Outside ``mode: local`` the built-in development secret is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from radbridge.contract import MAX_LISTING_WAIT_S
from radbridge.errors import ConfigError, validation_problems

__all__ = ["DEV_SECRET", "CenterSettings", "CenterTLS", "EdgeSettings", "Settings", "load_settings"]

DEV_SECRET = "radbridge-local-development-secret"
# Example values in the repository (k8s/overlays/dev/example-secrets.yaml) start with these.
EXAMPLE_PREFIXES = ("example-", "changeme", "change-me")
DEFAULT_AGREEMENTS = Path(__file__).parent / "defaults" / "agreements.yaml"


class _Strict(BaseModel):
    """Every settings model refuses keys it does not know: `RADBRIDGE_EDGE__PROT=11113` (or a
    typo in the YAML file) fails at load naming the key, instead of being ignored."""

    model_config = ConfigDict(extra="forbid")


class EdgeTLS(_Strict):
    """A second SCP port speaking DICOM over TLS, with client certificates checked."""

    port: int = Field(2762, ge=1, le=65535, description="2762 is the IANA dicom-tls port.")
    cert_file: Path = Field(description="PEM certificate chain of the gateway.")
    key_file: Path = Field(description="PEM private key of the gateway.")
    ca_file: Path = Field(description="PEM CA bundle that signs hospital client certificates.")
    require_client_cert: bool = True


class EdgeSettings(_Strict):
    """The edge gateway inside the hospital."""

    host: str = Field("127.0.0.1", description="Address the DICOM SCP listens on.")
    port: int = Field(11112, ge=1, le=65535, description="DICOM SCP port.")
    ae_title: str = Field("RADBRIDGE", min_length=1, max_length=16)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9101, ge=0, le=65535, description="0 disables /metrics.")
    database_url: str | None = Field(None, description="Default: SQLite in data_dir/edge.")
    store_dir: Path | None = Field(None, description="Default: data_dir/edge/store.")
    center_url: str | None = Field(
        None,
        description="Where de-identified studies go. Default: the local center, "
        "https://127.0.0.1:<center.port> (http:// with center.plain_http).",
    )
    center_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle the center's TLS certificate is checked against. Default: "
        "data_dir/keys/local-ca.pem in local mode (made with the center's certificate), the "
        "system's trust store outside it.",
    )
    id: str = Field(
        "local-edge",
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
        description="This edge's identity at the center (the trust file's edges[].id).",
    )
    key_file: Path | None = Field(
        None,
        description="Ed25519 private key (PEM) this edge signs its requests to the center with; "
        "default data_dir/keys/edge-ed25519.pem (created in local mode).",
    )
    center_keys_file: Path | None = Field(
        None,
        description="The center's public result-signing keys (JWKS); a result object whose "
        "signature they do not verify never reaches the PACS. Default "
        "data_dir/keys/center-signing.jwks.json (created in local mode).",
    )
    master_secret: SecretStr = Field(
        SecretStr(DEV_SECRET), description="Root key of per-agreement pseudonym keys."
    )
    poll_interval_s: float = Field(0.5, gt=0, le=60)
    forward_timeout_s: float = Field(60.0, gt=0)
    retry_base_s: float = Field(2.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    forward_early: bool = Field(
        True,
        description="Send a study's full STOW-RS requests (16 instances) while its quiet "
        "period runs, after the checks a forward makes first; the center starts the job only "
        "when the study is complete. False: nothing leaves before the quiet period ends.",
    )
    delivery_poll_s: float = Field(
        2.0,
        gt=0,
        le=300,
        description="How often due deliveries are retried, and result objects listed when "
        "delivery_wait_s is 0 (or a listing failed).",
    )
    delivery_wait_s: float = Field(
        20.0,
        ge=0,
        le=MAX_LISTING_WAIT_S,
        description="How long one listing of result objects waits at the center for the first "
        "new one (a long poll: a finished job is fetched when it is built); 0 polls instead.",
    )
    delivery_max_age_s: float = Field(
        7 * 86_400.0,
        gt=0,
        description="A result not stored at the PACS this long after it was ready is no "
        "longer retried (dead; `radbridge gateway resend` sends it again).",
    )
    min_free_bytes: int = Field(
        512 << 20, ge=0, description="Disk watermark: below it C-STORE is refused (0xA700)."
    )
    max_associations: int = Field(16, ge=1, le=1000, description="Concurrent associations.")
    receivers: int = Field(
        1,
        ge=1,
        le=32,
        description="Processes receiving C-STOREs on the DICOM port (SO_REUSEPORT): above 1, "
        "several associations at once use more than one core; the limits hold across them.",
    )
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    max_pdu: int = Field(
        262_144, ge=0, description="Largest P-DATA PDU we accept (bytes); 0 means no limit."
    )
    max_instance_bytes: int = Field(
        2 << 30, ge=1 << 20, description="Largest encoded instance accepted (0xA701 above)."
    )
    max_pixel_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="Largest Rows x Columns x Frames x Samples x Bits Allocated / 8 accepted, "
        "checked before any decoding (0xA702 above).",
    )
    max_inflated_bytes: int = Field(
        32 << 20,
        ge=1 << 20,
        description="Largest size a Deflated Explicit VR data set may inflate to (0xA703 above).",
    )
    stow_port: int = Field(0, ge=0, le=65535, description="DICOMweb STOW-RS port; 0 disables.")
    stow_tls: bool = Field(
        False,
        description="Serve STOW-RS over HTTPS with edge.tls's certificate, CA and client-"
        "certificate rule; agreements with require_tls take STOW-RS only so.",
    )
    stow_max_body_bytes: int = Field(
        256 << 20, ge=1 << 20, description="Largest STOW-RS request body accepted (413 above)."
    )
    tls: EdgeTLS | None = Field(None, description="DICOM TLS listener (PS3.15 B.1).")

    @model_validator(mode="after")
    def _cross_checks(self) -> EdgeSettings:
        if self.stow_tls and self.tls is None:
            raise ValueError("edge.stow_tls: needs edge.tls (certificate, key, CA)")
        if self.retry_base_s > self.retry_max_s:
            raise ValueError(
                f"edge.retry_base_s ({self.retry_base_s}) is above edge.retry_max_s "
                f"({self.retry_max_s})"
            )
        return self


class CenterTLS(_Strict):
    """The certificate the center's HTTP proxy serves HTTPS with."""

    cert_file: Path = Field(description="PEM certificate chain of the center.")
    key_file: Path = Field(description="PEM private key of the center.")


class CenterSettings(_Strict):
    """The reading center's Ray Serve application."""

    host: str = Field("127.0.0.1", description="Serve HTTP proxy bind address.")
    port: int = Field(8000, ge=1, le=65535)
    database_url: str | None = Field(None, description="Default: SQLite in data_dir/center.")
    store_dir: Path | None = Field(None, description="Default: data_dir/center/store.")
    ray_address: str | None = Field(None, description="None starts a local Ray instance.")
    tls: CenterTLS | None = Field(
        None,
        description="HTTPS on Serve's proxy. Local mode: data_dir/keys/center-tls.{pem,key}, "
        "made with a throwaway CA on first start (radbridge.pki). Outside local mode none "
        "means plain HTTP, for a center reached only through a TLS-terminating Service or "
        "ingress of its own cluster.",
    )
    plain_http: bool = Field(
        False, description="Local mode only: serve plain HTTP instead of the local HTTPS."
    )
    trust_file: Path | None = Field(
        None,
        description="Who may call the center (edges' public keys and agreements, operator and "
        "integration secret hashes); default data_dir/keys/center-trust.yaml (created in local "
        "mode, see radbridge.auth).",
    )
    signing_key_file: Path | None = Field(
        None,
        description="Ed25519 private key (PEM) the center signs result objects with; kept out "
        "of its database. Default data_dir/keys/center-signing.pem (created in local mode).",
    )
    auth_max_failures: int = Field(
        20,
        ge=1,
        description="Failed authentications from one address within a minute before it is "
        "locked out for a minute (every request answered 401, good credentials too).",
    )
    max_body_bytes: int = Field(
        256 << 20, ge=1 << 20, description="Largest request body the center reads (413 above)."
    )
    ray_num_cpus: int | None = Field(None, ge=1, description="Logical CPUs of a local Ray.")
    min_free_bytes: int = Field(
        512 << 20,
        ge=0,
        description="Disk watermark of the center's store: below it STOW-RS is refused with "
        "507 before the body is read, nothing of it kept; the edges keep the studies in their "
        "outboxes and retry.",
    )
    ray_metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Where a local Ray's metrics agent serves Prometheus metrics (every "
        "replica's center metrics, summed by worker); 0: a port Ray picks.",
    )
    serve_config: Path | None = Field(
        None,
        description="Ray Serve config file (replicas, autoscaling, batching, providers, model "
        "versions); default: serving/serve.yaml. host/port above override its http_options.",
    )


class Settings(BaseSettings):
    """Settings of one radbridge installation."""

    model_config = SettingsConfigDict(
        env_prefix="RADBRIDGE_", env_nested_delimiter="__", extra="forbid"
    )

    mode: Literal["local", "production"] = "local"
    data_dir: Path = Path("var")
    agreements_file: Path = DEFAULT_AGREEMENTS
    model_repository: Path | None = Field(None, description="Default: data_dir/models.")
    log_level: str = "INFO"
    edge: EdgeSettings = Field(default_factory=EdgeSettings)
    center: CenterSettings = Field(default_factory=CenterSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("RADBRIDGE_CONFIG")
        if config_file:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _derive_paths_and_check_secrets(self) -> Settings:
        # Absolute paths: Ray worker processes do not share the driver's working directory.
        self.data_dir = data = self.data_dir.resolve()
        self.agreements_file = self.agreements_file.resolve()
        if self.model_repository is None:
            self.model_repository = data / "models"
        if self.edge.store_dir is None:
            self.edge.store_dir = data / "edge" / "store"
        if self.edge.database_url is None:
            self.edge.database_url = f"sqlite:///{data / 'edge' / 'edge.db'}"
        if self.center.store_dir is None:
            self.center.store_dir = data / "center" / "store"
        if self.center.database_url is None:
            self.center.database_url = f"sqlite:///{data / 'center' / 'center.db'}"
        if self.edge.database_url == self.center.database_url:
            # Each node's migrations drop the other's tables (radbridge/db/migrate.py).
            raise ValueError(
                "edge.database_url and center.database_url name the same database: the edge "
                "and the center each need their own"
            )
        if self.edge.key_file is None:
            self.edge.key_file = data / "keys" / "edge-ed25519.pem"
        if self.center.trust_file is None:
            self.center.trust_file = data / "keys" / "center-trust.yaml"
        if self.center.signing_key_file is None:
            self.center.signing_key_file = data / "keys" / "center-signing.pem"
        if self.edge.center_keys_file is None:
            self.edge.center_keys_file = data / "keys" / "center-signing.jwks.json"
        if self.mode == "local" and not self.center.plain_http:
            if self.center.tls is None:
                self.center.tls = CenterTLS(
                    cert_file=data / "keys" / "center-tls.pem",
                    key_file=data / "keys" / "center-tls.key",
                )
            if self.edge.center_ca_file is None:
                self.edge.center_ca_file = data / "keys" / "local-ca.pem"
        if self.center.plain_http and self.mode != "local":
            raise ValueError("center.plain_http: only in local mode (set center.tls, or none)")
        if self.edge.center_url is None:
            scheme = "https" if self.center.tls is not None else "http"
            host = "127.0.0.1" if self.center.host in ("0.0.0.0", "") else self.center.host
            self.edge.center_url = f"{scheme}://{host}:{self.center.port}"
        self.center.signing_key_file = self.center.signing_key_file.resolve()
        self.edge.center_keys_file = self.edge.center_keys_file.resolve()
        self.edge.key_file = self.edge.key_file.resolve()
        self.center.trust_file = self.center.trust_file.resolve()
        if self.center.tls is not None:
            self.center.tls.cert_file = self.center.tls.cert_file.resolve()
            self.center.tls.key_file = self.center.tls.key_file.resolve()
        if self.edge.center_ca_file is not None:
            self.edge.center_ca_file = self.edge.center_ca_file.resolve()
        self.model_repository = self.model_repository.resolve()
        self.edge.store_dir = self.edge.store_dir.resolve()
        self.center.store_dir = self.center.store_dir.resolve()
        if self.mode != "local":
            self._check_production()
        return self

    def _check_production(self) -> None:
        secret = self.edge.master_secret.get_secret_value()
        if secret == DEV_SECRET or secret.startswith(EXAMPLE_PREFIXES):
            raise ValueError(
                "edge.master_secret: the built-in development secret or an example value from "
                "the repository is refused outside local mode; set RADBRIDGE_EDGE__MASTER_SECRET"
            )
        if len(secret.encode("utf-8")) < 32:
            raise ValueError("edge.master_secret: at least 32 bytes outside local mode")
        url = urlparse(self.center_url)
        same_namespace = url.scheme == "http" and "." not in (url.hostname or ".")
        if url.scheme != "https" and not same_namespace:
            raise ValueError(
                "edge.center_url: outside local mode the edge talks to the center over TLS "
                "(https://) only; plain http:// is left to a Service name of the same "
                "Kubernetes namespace (no dots), whose traffic stays inside the cluster"
            )

    # Typed accessors for the derived values (never None after validation).
    @property
    def models_dir(self) -> Path:
        assert self.model_repository is not None
        return self.model_repository

    @property
    def edge_db_url(self) -> str:
        assert self.edge.database_url is not None
        return self.edge.database_url

    @property
    def center_db_url(self) -> str:
        assert self.center.database_url is not None
        return self.center.database_url

    @property
    def center_url(self) -> str:
        assert self.edge.center_url is not None
        return self.edge.center_url

    @property
    def edge_key_file(self) -> Path:
        assert self.edge.key_file is not None
        return self.edge.key_file

    @property
    def center_signing_key_file(self) -> Path:
        assert self.center.signing_key_file is not None
        return self.center.signing_key_file

    @property
    def edge_center_keys_file(self) -> Path:
        assert self.edge.center_keys_file is not None
        return self.edge.center_keys_file

    @property
    def center_trust_file(self) -> Path:
        assert self.center.trust_file is not None
        return self.center.trust_file

    @property
    def edge_store(self) -> Path:
        assert self.edge.store_dir is not None
        return self.edge.store_dir

    @property
    def center_store(self) -> Path:
        assert self.center.store_dir is not None
        return self.center.store_dir


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning validation errors into a ``ConfigError`` naming the field.

    A nested variable whose first part is no setting (``RADBRIDGE_CENTRE__PORT``) is refused
    too: pydantic-settings would ignore it, and the center would silently keep its default."""
    for name in os.environ:
        if name.startswith("RADBRIDGE_") and "__" in name:
            head = name[len("RADBRIDGE_") :].split("__", 1)[0].lower()
            if head not in Settings.model_fields:
                raise ConfigError(
                    f"{name}: no setting {head!r} (known: "
                    f"{', '.join(sorted(Settings.model_fields))})"
                )
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError("invalid settings: " + validation_problems(exc)) from None

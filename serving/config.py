"""The Serve config file: one YAML for `serve run`, `radbridge center` and KubeRay's serveConfigV2.

The file is Ray Serve's own config format (``ServeDeploySchema``: http_options, applications,
per-deployment ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests``…). This
module validates it with Ray's schema and then checks what Ray cannot know:

- the application is ours (``import_path: serving.app:build``) and its ``args`` are
  :class:`AppArgs`;
- each deployment named is one of ours, and its ``user_config`` is the typed
  :class:`RunnerConfig` / :class:`ApiConfig` (hot-reloadable: Serve calls ``reconfigure``
  without restarting replicas, so a model-version switch drops no request);
- the ModelRunner's ``max_ongoing_requests`` lets enough requests reach its priority gate
  (a smaller value would queue them FIFO in Serve's router, before priority applies, and
  starve ``@serve.batch`` — Serve's default of 5 is the known pitfall).

A bad file fails at load with :class:`~radbridge.errors.ConfigError` naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from radbridge.agreements import Priority
from radbridge.errors import ConfigError, validation_problems

__all__ = [
    "APP_IMPORT_PATH",
    "DEFAULT_SERVE_CONFIG",
    "MAX_MODELS_PER_REPLICA",
    "REVIEW_IMPORT_PATH",
    "ApiConfig",
    "AppArgs",
    "ModelPin",
    "RunnerConfig",
    "ServeConfig",
    "load_serve_config",
]

APP_IMPORT_PATH = "serving.app:build"
# The reading room (review/app.py), deployed beside the center's app when the config lists it;
# named by its import path only: serving does not import review.
REVIEW_IMPORT_PATH = "review.app:build"
_TAKES_SETTINGS = (APP_IMPORT_PATH, REVIEW_IMPORT_PATH)
DEFAULT_SERVE_CONFIG = Path(__file__).with_name("serve.yaml")
Provider = Literal["tensorrt", "cuda", "cpu"]
# A multiplexed model id: name:version, as the Api names the model it calls.
ModelId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*:[A-Za-z0-9._-]+$")]
MAX_MODELS_PER_REPLICA = 4  # the ModelRunner's @serve.multiplexed(max_num_models_per_replica)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _default_max_wait() -> dict[Priority, float]:
    return {Priority.URGENT: 30.0, Priority.ROUTINE: 120.0}


class RunnerConfig(_Strict):
    """ModelRunner ``user_config``: batching, providers and its priority gate."""

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=5)
    providers: list[Provider] = Field(
        default_factory=lambda: list[Provider](["cuda", "cpu"]), min_length=1
    )
    require_provider: Literal["tensorrt", "cuda"] | None = Field(
        None,
        description="Fail the health check unless this GPU provider actually runs the model.",
    )
    trt_engine_cache_dir: str | None = Field(
        None, description="TensorRT engine cache (built engines survive restarts)."
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime's intra-op threads; 0: one per CPU the replica may run on "
        "(not ONNX Runtime's default of one per physical core, half the vCPUs of a cloud VM).",
    )
    allow_spinning: bool = Field(
        False,
        description="ONNX Runtime's intra/inter-op threads spin-wait for work between runs "
        "(ORT's own default). Off by default here: spinning threads compete with the replica's "
        "event loop, Serve's proxy and the Api for a small host's cores. With "
        "hold_while_computing the local CPU config (serving/serve.yaml) measured faster with "
        "it on. Applies to sessions built after the change.",
    )
    capacity: int = Field(
        0, ge=0, description="Requests admitted to the batcher at once; 0 = max_batch_size."
    )
    hold_while_computing: bool = Field(
        True,
        description="Requests admitted while a batch computes wait for it to end and then form "
        "the next batch together; off, @serve.batch cuts them into small batches queued behind "
        "the running one.",
    )
    max_queued: int = Field(
        256, ge=0, description="Sheddable requests waiting beyond capacity before 503."
    )
    max_wait_s: dict[Priority, float] = Field(
        default_factory=_default_max_wait,
        description="A request waiting longer than this goes first, whatever its priority.",
    )
    preload: list[ModelId] | None = Field(
        None,
        max_length=MAX_MODELS_PER_REPLICA,
        description="Models (name:version) a replica loads and runs once on a zero input before "
        "it takes requests, so the first study after a deploy or a scale-up does not pay for "
        "the session, ONNX Runtime's first run and MONAI's import (4 s of a 7.6 s first CT "
        "read-back on 2 CPUs). None: the newest version of every installed model; []: none, "
        "each model loads on its first request.",
    )

    @model_validator(mode="after")
    def _require_listed(self) -> RunnerConfig:
        if self.require_provider and self.require_provider not in self.providers:
            raise ValueError(f"require_provider {self.require_provider!r} is not in providers")
        return self

    @property
    def admitted(self) -> int:
        return self.capacity or self.max_batch_size


class ModelPin(_Strict):
    """Which version of a model answers, and which one shadows it (outputs recorded only)."""

    version: str | None = Field(None, description="None: the newest installed version.")
    shadow: str | None = None

    @model_validator(mode="after")
    def _distinct(self) -> ModelPin:
        if self.shadow is not None and self.shadow == self.version:
            raise ValueError("shadow must differ from version")
        return self


class ApiConfig(_Strict):
    """Api ``user_config``: model versions, admission bound, dispatch order of study work."""

    models: dict[str, ModelPin] = Field(default_factory=dict)
    max_queued_instances: int = Field(
        5000, ge=1, description="Instances waiting for inference before STOW-RS answers 503."
    )
    retry_after_s: int = Field(30, ge=1, le=3600, description="Retry-After of a 503 on STOW-RS.")
    dispatch_concurrency: int = Field(
        64, ge=1, description="Instances of study jobs in flight at once per Api replica."
    )
    max_wait_s: dict[Priority, float] = Field(default_factory=_default_max_wait)
    max_batch_images: int = Field(
        64,
        ge=1,
        le=1024,
        description="Images one POST /v1/models/{name}/infer-batch may carry (the ModelRunner "
        "must have room for them: capacity + max_queued).",
    )
    retention_interval_s: float = Field(
        3600.0,
        ge=10,
        le=86_400,
        description="Seconds between retention passes (serving/retention.py) of each Api "
        "replica; replicas never purge one study twice.",
    )
    prepare_ahead: bool = Field(
        True,
        description="When an edge says a study is probably whole (POST .../prepare, during "
        "its quiet period) and this replica has no job work, segment its volumes ahead; the "
        "job started by complete uses them if its instances are the same.",
    )


class AppArgs(_Strict):
    """The application's ``args``: radbridge settings inline, or read from the environment."""

    settings: dict[str, Any] | None = Field(
        None, description="radbridge Settings; None reads RADBRIDGE_* / RADBRIDGE_CONFIG."
    )


_USER_CONFIG: dict[str, type[BaseModel] | None] = {
    "Api": ApiConfig,
    "Preprocessor": None,
    "ModelRunner": RunnerConfig,
}


class ServeConfig:
    """A validated Serve config: Ray's schema object plus our typed parts of it."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        from ray.serve.schema import ServeDeploySchema

        self.source = source
        try:
            self.schema = ServeDeploySchema.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {validation_problems(exc, 1)}") from None
        apps = [a for a in self.schema.applications if a.import_path == APP_IMPORT_PATH]
        if len(apps) != 1:
            raise ConfigError(
                f"{source}: applications: exactly one must have import_path {APP_IMPORT_PATH}"
            )
        self.app = apps[0]
        self.apps = [a.name for a in self.schema.applications]
        i = self.schema.applications.index(self.app)
        where = f"{source}: applications[{i}]"
        self.args = _typed(AppArgs, self.app.args or {}, f"{where}.args")
        self.runner = RunnerConfig()
        self.api = ApiConfig()
        api_at = f"{where}.deployments[Api].user_config"
        for d in self.app.deployments:
            at = f"{where}.deployments[{d.name}]"
            if d.name not in _USER_CONFIG:
                raise ConfigError(f"{at}: unknown deployment (ours: {', '.join(_USER_CONFIG)})")
            model = _USER_CONFIG[d.name]
            user = d.user_config if "user_config" in d.model_fields_set else None
            if model is None:
                if user:
                    raise ConfigError(f"{at}.user_config: {d.name} takes no user_config")
                continue
            typed = _typed(model, user or {}, f"{at}.user_config")
            if isinstance(typed, RunnerConfig):
                self.runner = typed
                _check_runner_concurrency(d, typed, at)
            elif isinstance(typed, ApiConfig):
                self.api, api_at = typed, f"{at}.user_config"
        room = self.runner.admitted + self.runner.max_queued
        if self.api.max_batch_images > room:
            raise ConfigError(
                f"{api_at}.max_batch_images: {self.api.max_batch_images} > the ModelRunner's "
                f"capacity + max_queued ({room}): such a request could never be admitted"
            )

    def deploy_schema(
        self,
        *,
        host: str,
        port: int,
        settings: dict[str, Any] | None,
        tls: tuple[str, str] | None = None,
    ) -> Any:
        """Ray's schema with the installation's bind address, TLS (certificate and key files:
        Serve's proxy then speaks HTTPS only) and settings filled in."""
        raw = self.schema.model_dump(mode="json", exclude_unset=True)
        raw.setdefault("http_options", {}).update(host=host, port=port)
        if tls is not None:
            raw["http_options"].update(ssl_certfile=tls[0], ssl_keyfile=tls[1])
        for app in raw["applications"]:
            if app.get("import_path") in _TAKES_SETTINGS and settings is not None:
                app["args"] = {**(app.get("args") or {}), "settings": settings}
        from ray.serve.schema import ServeDeploySchema

        return ServeDeploySchema.model_validate(raw)


def load_serve_config(path: Path | None = None) -> ServeConfig:
    path = path or DEFAULT_SERVE_CONFIG
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping (Ray Serve config file)")
    return ServeConfig(raw, str(path))


def _typed(model: type[BaseModel], value: Any, where: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise ConfigError(f"{where}.{validation_problems(exc, 1)}") from None


def _check_runner_concurrency(d: Any, cfg: RunnerConfig, at: str) -> None:
    needed = cfg.admitted + cfg.max_queued
    if "max_ongoing_requests" not in d.model_fields_set:
        raise ConfigError(
            f"{at}.max_ongoing_requests: must be set (>= {needed}); Serve's default of 5 "
            "starves @serve.batch"
        )
    if d.max_ongoing_requests < needed:
        raise ConfigError(
            f"{at}.max_ongoing_requests: {d.max_ongoing_requests} < capacity + max_queued "
            f"({needed}): requests would queue in Serve's router before the priority gate"
        )

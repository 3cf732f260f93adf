"""The center's Serve application graph: Api → Preprocessor → ModelRunner (all model versions);
the Api also calls the ModelRunner with tensors it has (sync ``infer``), and the Preprocessor
calls it with a CT series' volume.

``build`` is the application builder named by the Serve config (``import_path:
serving.app:build``); `serve run serving/serve.yaml`, KubeRay and `radbridge center` all reach
the application through it, so they run the same graph. Deployment options (replicas,
autoscaling, actor resources, user_config) come from the config file, not from here.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from models.repository import ModelRepository
from radbridge.errors import ConfigError, ModelError
from radbridge.settings import Settings
from serving.config import AppArgs
from serving.ingress import Api
from serving.preprocess import Preprocessor
from serving.runner import ModelRunner

__all__ = ["APP_NAME", "build", "build_app"]

APP_NAME = "radbridge-center"


def build(args: dict[str, Any]) -> Application:
    """Application builder for the Serve config: ``args`` is :class:`AppArgs`."""
    parsed = AppArgs.model_validate(args or {})
    try:
        settings = (
            Settings.model_validate(parsed.settings) if parsed.settings is not None else Settings()
        )
    except Exception as exc:  # pydantic's ValidationError, named for the operator
        raise ConfigError(f"application args.settings: {exc}") from None
    return build_app(settings)


def build_app(settings: Settings) -> Application:
    models = ModelRepository(settings.models_dir).list()
    if not models:
        raise ModelError(f"no models in {settings.models_dir}: run `radbridge models build` first")
    repository = str(settings.models_dir)
    runner = ModelRunner.bind(repository)  # type: ignore[attr-defined]
    preprocessor = Preprocessor.bind(repository, runner)  # type: ignore[attr-defined]
    return Api.bind(settings, preprocessor, runner)  # type: ignore[attr-defined,no-any-return]

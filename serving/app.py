"""Build the center's Serve application graph from settings and the model repository."""

from __future__ import annotations

from ray.serve import Application

from models.repository import ModelRepository
from radbridge.errors import ModelError
from radbridge.settings import Settings
from serving.ingress import Api
from serving.preprocess import Preprocessor
from serving.runner import ModelRunner

__all__ = ["APP_NAME", "build_app"]

APP_NAME = "radbridge-center"


def build_app(settings: Settings) -> Application:
    """Api -> Preprocessor -> one ModelRunner per model version found in the repository."""
    models = ModelRepository(settings.models_dir).list()
    if not models:
        raise ModelError(f"no models in {settings.models_dir}: run `radbridge models build` first")
    c = settings.center
    manifests = {m.key: m.manifest.model_dump(mode="json") for m in models}
    runners = {
        m.key: ModelRunner.options(  # type: ignore[attr-defined]
            name=f"runner-{m.manifest.name}-v{m.manifest.version}"
        ).bind(
            str(settings.models_dir),
            m.manifest.name,
            m.manifest.version,
            list(c.providers),
            c.max_batch_size,
            c.batch_wait_timeout_s,
            c.intra_op_threads,
        )
        for m in models
    }
    preprocessor = Preprocessor.bind(manifests)  # type: ignore[attr-defined]
    return Api.bind(settings, manifests, preprocessor, runners)  # type: ignore[attr-defined,no-any-return]

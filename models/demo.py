"""Build every demo model into a repository: what ``radbridge models build`` runs.

``python -m models.demo [repo_root] [--force] [--retrain]``. The trained demo models ship with
the repository (``models/shipped/<name>/<version>``: ONNX, manifest, and the CT model's torch
checkpoint), so a first run installs them in a second instead of training for minutes; the
training code (``models.cxr_demo``, ``models.ct_nodule_demo``) stays their source of truth and
``tests/test_models_shipped.py`` retrains both and checks the shipped ones answer the same on
fixed inputs. ``retrain`` trains from scratch instead; after a change to the training code,
retrain and copy the results into ``models/shipped`` (the test says when that is due).

Each model is skipped when a valid one is already installed (unless ``force``), so a second
call costs only the validation.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from models import ct_nodule_demo, cxr_demo
from models.repository import LoadedModel, ModelRepository
from radbridge.errors import ModelError

__all__ = ["DEMO_MODELS", "SHIPPED", "build_all", "install_shipped", "main"]

DEMO_MODELS = frozenset({"chest-xray-demo", "ct-lung-nodule-demo"})
SHIPPED = Path(__file__).parent / "shipped"


def build_all(
    repo_root: Path,
    force: bool = False,
    log: Callable[[str], None] = print,
    *,
    retrain: bool = False,
    step: Callable[[str], None] | None = None,
) -> list[LoadedModel]:
    """Install (or validate) the chest radiograph classifier, then the CT nodule segmenter:
    the shipped models unless ``retrain``, else trained here.

    Args:
        repo_root: Model repository root.
        force: Replace valid installed models (with the shipped ones, or retrained ones).
        log: Progress sink.
        retrain: Train from scratch instead of installing the shipped models.
        step: Told each model's build as it starts (``radbridge models build`` shows them).

    Returns:
        The installed models, CXR first.

    Raises:
        ModelError: A build failed its export check or its result does not validate.
    """
    t0 = time.perf_counter()
    repo = ModelRepository(Path(repo_root))
    models = []
    for module in (cxr_demo, ct_nodule_demo):
        name, version = module.MANIFEST_TEMPLATE["name"], module.MANIFEST_TEMPLATE["version"]
        if step is not None:
            step(f"{name}:{version} ({'training' if retrain else 'shipped'})")
        target = repo.root / name / version
        installed = None if force else repo.installed(target, log)
        if installed is None and not retrain:
            installed = install_shipped(repo, name, version, log)
        if installed is None:
            installed = module.build(Path(repo_root), force=True, log=log)
        models.append(installed)
    log(f"demo models ready in {time.perf_counter() - t0:.1f}s: {[m.key for m in models]}")
    return models


def install_shipped(
    repo: ModelRepository, name: str, version: str, log: Callable[[str], None] = print
) -> LoadedModel | None:
    """Copy the shipped ``name/version`` into ``repo`` (atomically: a reader sees the old
    folder or the whole new one) and validate it; None when none ships or it is invalid."""
    source = SHIPPED / name / version
    if not source.is_dir():
        return None
    target = repo.root / name / version
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        for f in sorted(source.iterdir()):
            shutil.copy2(f, staging / f.name)
        old = target.with_name(f".{version}-old-{os.getpid()}")
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        model = repo.validate(target)
    except ModelError as exc:
        log(f"{name}:{version}: the shipped model is invalid ({exc}); training it instead")
        return None
    log(f"{model.key}: installed the shipped model (sha256 {model.manifest.sha256[:12]})")
    return model


def main(argv: list[str] | None = None) -> None:
    """``python -m models.demo [repo_root] [--force] [--retrain]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    force, retrain = "--force" in args, "--retrain" in args
    args = [a for a in args if a not in ("--force", "--retrain")]
    root = (
        Path(args[0]) if args else Path(os.environ.get("RADBRIDGE_MODEL_REPOSITORY", "var/models"))
    )
    try:
        models = build_all(root, force=force, retrain=retrain)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for model in models:
        print(f"{model.key} ready at {model.onnx_path}")


if __name__ == "__main__":
    main()

"""Build every demo model into a repository: what ``radbridge models build`` runs.

``python -m models.demo [repo_root] [--force]``. Each model is skipped when a valid one is
already installed (unless ``force``), so a second call costs only the validation.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from models import ct_nodule_demo, cxr_demo
from models.repository import LoadedModel
from radbridge.errors import ModelError

__all__ = ["DEMO_MODELS", "build_all", "main"]

DEMO_MODELS = frozenset({"chest-xray-demo", "ct-lung-nodule-demo"})


def build_all(
    repo_root: Path, force: bool = False, log: Callable[[str], None] = print
) -> list[LoadedModel]:
    """Build (or validate) the chest radiograph classifier, then the CT nodule segmenter.

    Args:
        repo_root: Model repository root.
        force: Retrain both even if valid models are installed.
        log: Progress sink.

    Returns:
        The installed models, CXR first.

    Raises:
        ModelError: A build failed its export check or its result does not validate.
    """
    t0 = time.perf_counter()
    models = [
        cxr_demo.build(Path(repo_root), force=force, log=log),
        ct_nodule_demo.build(Path(repo_root), force=force, log=log),
    ]
    log(f"demo models ready in {time.perf_counter() - t0:.1f}s: {[m.key for m in models]}")
    return models


def main(argv: list[str] | None = None) -> None:
    """``python -m models.demo [repo_root] [--force]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    force = "--force" in args
    args = [a for a in args if a != "--force"]
    root = (
        Path(args[0]) if args else Path(os.environ.get("RADBRIDGE_MODEL_REPOSITORY", "var/models"))
    )
    try:
        models = build_all(root, force=force)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for model in models:
        print(f"{model.key} ready at {model.onnx_path}")


if __name__ == "__main__":
    main()

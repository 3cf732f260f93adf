"""The demo chest radiograph classifier: trained on phantoms, exported to ONNX, verified.

``build(repo_root)`` builds ``<repo_root>/chest-xray-demo/1`` (run by ``radbridge models build``
and ``python -m models.demo``). The model
is a demo model, not for diagnostic use: it has only ever seen synthetic phantoms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from monai.networks.nets import DenseNet

from models.cxr_phantoms import FINDINGS, sample_dataset
from models.manifest import DEMO_INTENDED_USE, ModelManifest, TransformSpec, dump_manifest
from models.metrics import auroc, sens_spec, youden_threshold
from models.onnx_export import export_onnx, torch_vs_onnx
from models.repository import MANIFEST_FILE, MODEL_FILE, LoadedModel, ModelRepository, file_sha256
from models.training import installed_file, reproducible_torch
from models.transforms import DEMO_PREPROCESSING, build_pipeline

__all__ = ["MANIFEST_TEMPLATE", "build", "make_network", "preprocess_images"]

N_VAL, N_TEST = 500, 600
NETWORK = {
    "class": "monai.networks.nets.DenseNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": len(FINDINGS),
    "init_features": 16,
    "growth_rate": 8,
    "block_config": [2, 2, 2, 2],
}

MANIFEST_TEMPLATE: dict[str, Any] = {
    "name": "chest-xray-demo",
    "version": "1",
    "modalities": ["DX", "CR"],
    "body_parts": ["CHEST"],
    "task": "multilabel_classification",
    "input": {"name": "image", "shape": ["batch", 1, 128, 128], "dtype": "float32"},
    "output": {"name": "logits", "shape": ["batch", len(FINDINGS)], "dtype": "float32"},
    "preprocessing": DEMO_PREPROCESSING,
    "labels": [
        {
            "key": "cardiomegaly",
            "display": {"en": "Cardiomegaly", "ru": "Кардиомегалия", "zh": "心脏扩大"},
            "snomed": "8186001",
            "radlex": None,
            "threshold": 0.5,
        },
        {
            "key": "pleural_effusion",
            "display": {"en": "Pleural effusion", "ru": "Плевральный выпот", "zh": "胸腔积液"},
            "snomed": "60046008",
            "radlex": "RID34539",
            "threshold": 0.5,
        },
        {
            "key": "pneumothorax",
            "display": {"en": "Pneumothorax", "ru": "Пневмоторакс", "zh": "气胸"},
            "snomed": "36118008",
            "radlex": "RID5352",
            "threshold": 0.5,
        },
        {
            "key": "nodule",
            "display": {"en": "Lung nodule", "ru": "Узел в лёгком", "zh": "肺结节"},
            "snomed": "427359005",
            "radlex": "RID50149",
            "threshold": 0.5,
        },
    ],
    "intended_use": DEMO_INTENDED_USE,
}


def make_network() -> torch.nn.Module:
    """The demo network (a small 2-D MONAI DenseNet, 4 logits)."""
    cfg = {k: v for k, v in NETWORK.items() if k != "class"}
    cfg["block_config"] = tuple(NETWORK["block_config"])  # type: ignore[arg-type]
    return DenseNet(**cfg)  # type: ignore[arg-type]


def preprocess_images(images: np.ndarray, specs: list[TransformSpec]) -> np.ndarray:
    """uint16 phantoms -> modality LUT (slope 1, intercept 0) -> the manifest pipeline."""
    pipeline = build_pipeline(specs)
    return np.stack([pipeline(img.astype(np.float32)) for img in images]).astype(np.float32)


def _predict(model: torch.nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i : i + batch])).numpy())
    return np.concatenate(out).astype(np.float64)


def _train(
    x: np.ndarray, y: np.ndarray, *, seed: int, epochs: int, log: Callable[[str], None]
) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = make_network()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-5)
    batch = 32
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(epochs):
        model.train()
        t0, total = time.perf_counter(), 0.0
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            xb = xt[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # left-right: findings are bilateral
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            opt.zero_grad()
            loss = loss_fn(model(xb), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        log(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f} "
            f"({time.perf_counter() - t0:.1f}s)"
        )
    return model.eval()


def _export_and_verify(
    model: torch.nn.Module, probe: np.ndarray, path: Path
) -> tuple[float, dict[str, float]]:
    export_onnx(model, torch.from_numpy(probe[:1]), path)
    cases = {f"batch_{n}": probe[:n] for n in (1, 8)}
    return torch_vs_onnx(path, cases, lambda x: _predict(model, x))


def build(
    repo_root: Path,
    *,
    seed: int = 0,
    n_train: int = 2400,
    epochs: int = 10,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> LoadedModel:
    """Train, export, verify and install the demo model (skipped when a valid one exists).

    Args:
        repo_root: Model repository root; writes ``chest-xray-demo/1/{model.onnx,manifest.yaml}``.
        seed: Seeds phantoms (train ``seed``, val ``seed+1``, test ``seed+2``) and torch.
        n_train: Training phantoms.
        epochs: Training epochs.
        force: Retrain even if a valid model is installed.
        log: Progress sink.

    Returns:
        The validated installed model.

    Raises:
        ModelError: The export disagrees with torch, or the result does not validate.
    """
    t_build = time.perf_counter()
    repo = ModelRepository(Path(repo_root))
    version_dir = repo.root / MANIFEST_TEMPLATE["name"] / MANIFEST_TEMPLATE["version"]
    existing = None if force else repo.installed(version_dir, log)
    if existing is not None:
        return existing
    with reproducible_torch():
        return _build(repo, version_dir, seed, n_train, epochs, t_build, log)


def _build(
    repo: ModelRepository,
    version_dir: Path,
    seed: int,
    n_train: int,
    epochs: int,
    t_build: float,
    log: Callable[[str], None],
) -> LoadedModel:
    specs = [TransformSpec.model_validate(s) for s in MANIFEST_TEMPLATE["preprocessing"]]

    t0 = time.perf_counter()
    x_tr, y_tr = sample_dataset(n_train, seed)
    x_va, y_va = sample_dataset(N_VAL, seed + 1)
    x_te, y_te = sample_dataset(N_TEST, seed + 2)
    x_tr, x_va, x_te = (preprocess_images(a, specs) for a in (x_tr, x_va, x_te))
    data_s = time.perf_counter() - t0
    log(f"phantoms: train {n_train}, val {N_VAL}, test {N_TEST} ({data_s:.1f}s)")

    t0 = time.perf_counter()
    model = _train(x_tr, y_tr, seed=seed, epochs=epochs, log=log)
    train_s = time.perf_counter() - t0

    p_va = 1.0 / (1.0 + np.exp(-_predict(model, x_va)))
    p_te = 1.0 / (1.0 + np.exp(-_predict(model, x_te)))
    labels = [dict(lbl) for lbl in MANIFEST_TEMPLATE["labels"]]
    per: dict[str, dict[str, float]] = {"auroc": {}, "threshold": {}, "sens": {}, "spec": {}}
    for j, lbl in enumerate(labels):
        thr = youden_threshold(y_va[:, j], p_va[:, j])
        sens, spec = sens_spec(y_te[:, j], p_te[:, j], thr)
        lbl["threshold"] = round(thr, 6)
        per["auroc"][lbl["key"]] = round(auroc(y_te[:, j], p_te[:, j]), 4)
        per["threshold"][lbl["key"]] = round(thr, 6)
        per["sens"][lbl["key"]], per["spec"][lbl["key"]] = round(sens, 4), round(spec, 4)
        log(
            f"{lbl['key']}: test AUROC {per['auroc'][lbl['key']]:.4f}, threshold {thr:.4f}, "
            f"sensitivity {sens:.3f}, specificity {spec:.3f}"
        )

    version_dir.mkdir(parents=True, exist_ok=True)
    with installed_file(version_dir / MODEL_FILE) as tmp:
        max_diff, diffs = _export_and_verify(model, x_te[:8], tmp)
        sha = file_sha256(tmp)
    log(f"onnx: max abs diff torch vs ORT {max_diff:.2e} (batch 1 and 8); sha256 {sha[:12]}")

    manifest = ModelManifest.model_validate(
        {
            **MANIFEST_TEMPLATE,
            "labels": labels,
            "sha256": sha,
            "provenance": {
                "trained_on": "synthetic PA chest radiograph phantoms (models.cxr_phantoms)",
                "seed": seed,
                "n_train": n_train,
                "n_val": N_VAL,
                "n_test": N_TEST,
                "epochs": epochs,
                "network": NETWORK,
                "optimizer": "Adam lr 3e-3 (one-cycle), weight decay 1e-5, batch 32",
                "loss": "BCEWithLogitsLoss",
                "augmentation": "left-right flip p=0.5",
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
                "numpy": np.__version__,
                "opset": 17,
                "threads": torch.get_num_threads(),
                "data_seconds": round(data_s, 1),
                "train_seconds": round(train_s, 1),
                "build_seconds": round(time.perf_counter() - t_build, 1),
            },
            "metrics": {
                "split": f"held-out test phantoms (seed {seed + 2}, n={N_TEST})",
                "auroc": per["auroc"],
                "thresholds": per["threshold"],
                "threshold_method": f"Youden's J on validation phantoms (seed {seed + 1})",
                "sensitivity": per["sens"],
                "specificity": per["spec"],
                "max_abs_diff": max_diff,
                "max_abs_diff_by_batch": diffs,
            },
        }
    )
    dump_manifest(manifest, version_dir / MANIFEST_FILE)
    loaded = repo.validate(version_dir)
    log(f"{loaded.key}: built in {time.perf_counter() - t_build:.1f}s at {version_dir}")
    return loaded

"""The demo CT lung nodule segmenter: trained on phantoms, exported to ONNX, verified.

``build(repo_root)`` builds ``<repo_root>/ct-lung-nodule-demo/1`` (run by ``radbridge models
build`` and ``python -m models.demo``). A demo model, not for diagnostic use: it has only
ever seen synthetic phantoms (``models.ct_phantoms``).

Choices, for a build of about two and a half minutes on two otherwise idle CPU cores:

* model grid 2.5 mm isotropic: the phantoms (2.3-2.7 mm pixels, 2-3 mm slices) are resampled
  to it, as serving resamples a real 0.7 mm CT; a volume is then about 77 x 128 x 128;
* 40³ training patches (100 mm, ample context for a 30 mm nodule) rather than 96³ or 64³:
  a 96³ patch would be most of a volume, and four 40³ patches train in about 0.12 s a step
  against 0.5 s for 64³, so 900 steps fit in two minutes. Half the patches are centred
  near a truth nodule (each nodule equally often, whatever its size), half on an aerated
  lung voxel, so vessels, the hard negatives, are always in view;
* a small MONAI 3-D UNet (channels 8-16-32-64, strides 2, two residual units, batch norm),
  fully convolutional, so the ONNX graph takes any batch and any spatial size that is a
  multiple of 8; softmax over (background, nodule); Dice (per patch, so a patch around a
  5 mm nodule weighs as much as one around a 25 mm nodule) + cross-entropy;
* sliding window 64³ with 25 % overlap and Gaussian blending, run on the ONNX model;
* operating point (probability threshold, minimum component volume) chosen on validation
  phantoms, then sensitivity, false positives and Dice measured once on test phantoms.
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
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from models.ct_phantoms import CTPhantom, sample_volumes
from models.manifest import (
    DEMO_INTENDED_USE,
    ModelManifest,
    SegmentationSpec,
    TransformSpec,
    dump_manifest,
)
from models.nodules import (
    find_nodules,
    match_nodules,
    onnx_predictor,
    patient_to_voxel,
    sliding_window_probabilities,
)
from models.onnx_export import export_onnx, torch_vs_onnx
from models.repository import MANIFEST_FILE, MODEL_FILE, LoadedModel, ModelRepository, file_sha256
from models.training import installed_file, reproducible_torch
from models.transforms import CT_HU_WINDOW, CT_PREPROCESSING, prepare_volume, resample_to_spacing

__all__ = [
    "MANIFEST_TEMPLATE",
    "Prepared",
    "build",
    "evaluate",
    "make_network",
    "operating_point",
    "prepare",
    "probability_maps",
    "score",
]

CHECKPOINT_FILE = "checkpoint.pt"  # torch weights beside the ONNX, for re-verification
MODEL_SPACING = (2.5, 2.5, 2.5)
ROI = (64, 64, 64)  # sliding-window size at inference
PATCH = (40, 40, 40)  # training patch size
JITTER = 10  # positive patch centres move up to this many voxels off the nodule centre
N_TRAIN, N_VAL, N_TEST = 60, 10, 20
ITERATIONS, BATCH, LR, POS_FRACTION = 900, 4, 3e-3, 0.5
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)  # operating point candidates, chosen on validation
MIN_VOLUMES_MM3 = (15.0, 30.0, 60.0, 100.0)
FP_COST = 0.1  # one false positive per volume costs as much as 10 % sensitivity
BATCH_DICE = False  # per-patch Dice: a patch around a 5 mm nodule weighs as much as a 25 mm one
NETWORK: dict[str, Any] = {
    "class": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    "norm": "batch",
}
# SNOMED CT 786838002 "Nodule of lung" and RadLex RID50149 "pulmonary nodule": both checked
# against public usage (HL7 Lithuania lung cancer FHIR IG, RadLex mappings in public code),
# not against the SNOMED International browser or a RadLex release: treat as unverified.
MANIFEST_TEMPLATE: dict[str, Any] = {
    "name": "ct-lung-nodule-demo",
    "version": "1",
    "modalities": ["CT"],
    "body_parts": ["CHEST"],
    "task": "segmentation",
    "input": {"name": "image", "shape": ["batch", 1, "z", "y", "x"], "dtype": "float32"},
    "output": {"name": "logits", "shape": ["batch", 2, "z", "y", "x"], "dtype": "float32"},
    "preprocessing": CT_PREPROCESSING,
    "labels": [
        {
            "key": "pulmonary_nodule",
            "display": {"en": "Pulmonary nodule", "ru": "Узел в лёгком", "zh": "肺结节"},
            "snomed": "786838002",
            "radlex": "RID50149",
            "threshold": 0.5,  # replaced by the validation operating point at build time
        }
    ],
    "segmentation": {
        "spacing_mm": list(MODEL_SPACING),
        "hu_window": list(CT_HU_WINDOW),
        "roi_size": list(ROI),
        "overlap": 0.25,
        "sw_batch_size": 4,
        "blend_mode": "gaussian",
        "padding_mode": "replicate",
        "activation": "softmax",
        "min_volume_mm3": 30.0,  # replaced by the validation operating point at build time
        "spatial_multiple": 8,
    },
    "intended_use": DEMO_INTENDED_USE,
}


class Prepared:
    """A phantom on the model grid: input (1, z, y, x), resampled label, and the original."""

    def __init__(self, phantom: CTPhantom, specs: list[TransformSpec]) -> None:
        self.phantom = phantom
        self.image, self.spacing = prepare_volume(phantom.hu, phantom.spacing, MODEL_SPACING, specs)
        label, _ = resample_to_spacing(phantom.label, phantom.spacing, MODEL_SPACING)
        self.label = (label >= 0.5).astype(np.uint8)


def prepare(phantoms: list[CTPhantom], specs: list[TransformSpec]) -> list[Prepared]:
    """Resample and preprocess phantoms exactly as serving does."""
    return [Prepared(p, specs) for p in phantoms]


def make_network() -> torch.nn.Module:
    """The demo network (a small 3-D MONAI UNet, 2 output channels)."""
    cfg = {k: v for k, v in NETWORK.items() if k != "class"}
    cfg["channels"] = tuple(NETWORK["channels"])
    cfg["strides"] = tuple(NETWORK["strides"])
    return UNet(**cfg)


def _pad_to(arr: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Pad the trailing three axes at their end up to ``size`` by repeating the edge voxels."""
    pads = [(0, 0)] * (arr.ndim - 3) + [
        (0, max(s - n, 0)) for n, s in zip(arr.shape[-3:], size, strict=True)
    ]
    return np.pad(arr, pads, mode="edge") if any(p[1] for p in pads) else arr


def _model_voxel(centre_mm: tuple[float, float, float], d: Prepared) -> np.ndarray:
    """(z, y, x) index on the model grid of a patient point (the grid keeps the origin)."""
    return patient_to_voxel(centre_mm, d.spacing, d.phantom.origin, d.phantom.direction)


class _Sampler:
    """Positive-weighted patches: centred near a nodule (jittered) or on any lung voxel.

    Positive patches pick a truth nodule uniformly (not a nodule voxel: that would favour
    the big ones by their volume), so every size is seen as often.
    """

    def __init__(self, data: list[Prepared], seed: int, pos_fraction: float) -> None:
        self.rng = np.random.default_rng([seed, 7])
        self.pos_fraction = pos_fraction
        self.images = [_pad_to(d.image, PATCH) for d in data]
        self.labels = [_pad_to(d.label, PATCH) for d in data]
        # aerated lung (about -930..-720 HU): patches around it hold vessels, the hard negatives
        self.lung = [np.flatnonzero((img[0] > 0.05) & (img[0] < 0.2)) for img in self.images]
        self.lung = [
            p if p.size else np.arange(img[0].size)
            for p, img in zip(self.lung, self.images, strict=True)
        ]
        self.nodules = [
            (v, np.rint(_model_voxel(n.centre_mm, d)).astype(int))
            for v, d in enumerate(data)
            for n in d.phantom.nodules
        ]

    def patch(self) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        positive = bool(self.nodules) and rng.random() < self.pos_fraction
        if positive:
            v, centre = self.nodules[int(rng.integers(len(self.nodules)))]
            jitter = rng.integers(-JITTER, JITTER + 1, size=3)
        else:
            v = int(rng.integers(len(self.images)))
            pool = self.lung[v]
            centre = np.array(np.unravel_index(pool[rng.integers(pool.size)], self.labels[v].shape))
            jitter = np.zeros(3, dtype=int)
        img, lbl = self.images[v], self.labels[v]
        start = np.clip(centre + jitter - np.array(PATCH) // 2, 0, np.array(lbl.shape) - PATCH)
        box = tuple(slice(int(s), int(s) + r) for s, r in zip(start, PATCH, strict=True))
        x, y = img[(slice(None), *box)], lbl[box][None]
        if rng.random() < 0.5:  # left-right mirror: the phantoms have no sidedness
            x, y = x[..., ::-1], y[..., ::-1]
        return np.ascontiguousarray(x), np.ascontiguousarray(y)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.patch() for _ in range(n)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs]))
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
        return x, y


def _train(
    data: list[Prepared],
    *,
    seed: int,
    iterations: int,
    batch: int,
    lr: float,
    pos_fraction: float,
    log: Callable[[str], None],
) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = make_network()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iterations)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=BATCH_DICE)
    sampler = _Sampler(data, seed, pos_fraction)
    model.train()
    t0, total = time.perf_counter(), 0.0
    every = max(iterations // 5, 1)
    for step in range(1, iterations + 1):
        x, y = sampler.batch(batch)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss.detach())
        if step % every == 0 or step == iterations:
            log(
                f"step {step}/{iterations}: loss {total / every:.4f} "
                f"({time.perf_counter() - t0:.1f}s)"
            )
            total = 0.0
    return model.eval()


def _torch_predictor(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray(model(torch.from_numpy(np.ascontiguousarray(x))).numpy())

    return predict


def _to_shape(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resample a model-grid map back onto the original grid (corner-aligned, the inverse)."""
    if volume.shape == shape:
        return volume
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
        out = torch.nn.functional.interpolate(t, size=shape, mode="trilinear", align_corners=True)
    return np.asarray(out[0, 0].numpy())


def probability_maps(
    predict: Callable[[np.ndarray], np.ndarray], data: list[Prepared], seg: SegmentationSpec
) -> list[np.ndarray]:
    """Nodule probability (z, y, x) on the model grid of each prepared phantom."""
    return [sliding_window_probabilities(predict, d.image, seg)[1] for d in data]


def score(
    maps: list[np.ndarray], data: list[Prepared], threshold: float, min_volume_mm3: float
) -> dict[str, Any]:
    """Voxel Dice, per-nodule sensitivity and false positives per volume of ``maps``.

    Dice is computed on the phantoms' own grids (the probability map resampled back), pooled
    over all volumes. A truth nodule is detected when a component's centre lies within its
    radius; components inside no truth nodule are false positives.
    """
    inter = pred_sum = true_sum = 0
    hits: list[tuple[float, bool]] = []
    fps = 0
    for probs, d in zip(maps, data, strict=True):
        p = d.phantom
        back = _to_shape(probs, p.label.shape) >= threshold
        inter += int(np.count_nonzero(back & (p.label > 0)))
        pred_sum += int(np.count_nonzero(back))
        true_sum += int(np.count_nonzero(p.label))
        found = find_nodules(
            probs,
            spacing=d.spacing,
            origin=p.origin,
            direction=p.direction,
            threshold=threshold,
            min_volume_mm3=min_volume_mm3,
        )
        flags, fp = match_nodules(
            [n.centre_mm for n in p.nodules], [n.diameter_mm for n in p.nodules], found
        )
        hits += [(n.diameter_mm, f) for n, f in zip(p.nodules, flags, strict=True)]
        fps += fp
    n_true = len(hits)
    big = [f for diam, f in hits if diam >= 6.0]
    return {
        "volumes": len(data),
        "nodules": n_true,
        "dice": round(2.0 * inter / max(pred_sum + true_sum, 1), 4),
        "sensitivity": round(sum(f for _, f in hits) / max(n_true, 1), 4),
        "sensitivity_ge_6mm": round(sum(big) / max(len(big), 1), 4),
        "nodules_ge_6mm": len(big),
        "false_positives_per_volume": round(fps / max(len(data), 1), 4),
        "missed_diameters_mm": sorted(round(diam, 1) for diam, f in hits if not f),
    }


def evaluate(
    predict: Callable[[np.ndarray], np.ndarray],
    data: list[Prepared],
    seg: SegmentationSpec,
    threshold: float,
) -> dict[str, Any]:
    """``score`` of the model on ``data`` with the manifest's minimum volume."""
    return score(probability_maps(predict, data, seg), data, threshold, seg.min_volume_mm3)


def operating_point(
    maps: list[np.ndarray], data: list[Prepared]
) -> tuple[float, float, dict[str, Any]]:
    """Threshold and minimum volume maximising sensitivity - FP_COST * FP/volume on ``data``.

    Returns:
        ``(threshold, min_volume_mm3, score at that point)``; ties go to the earlier
        (lower threshold, smaller minimum volume) candidate.
    """
    best: tuple[float, float, float, dict[str, Any]] | None = None
    for thr in THRESHOLDS:
        for min_vol in MIN_VOLUMES_MM3:
            got = score(maps, data, thr, min_vol)
            value = got["sensitivity"] - FP_COST * got["false_positives_per_volume"]
            if best is None or value > best[0] + 1e-12:
                best = (value, thr, min_vol, got)
    assert best is not None
    return best[1], best[2], best[3]


def _export_and_verify(
    model: torch.nn.Module, probe: np.ndarray, path: Path
) -> tuple[float, dict[str, float]]:
    """Export with dynamic batch and spatial axes; compare ORT with torch on three shapes."""
    dummy = torch.from_numpy(np.ascontiguousarray(probe[:1, :, :64, :64, :64]))
    export_onnx(model, dummy, path, axes={0: "batch", 2: "z", 3: "y", 4: "x"})
    cases = {
        "batch_1_64x64x64": probe[:1, :, :64, :64, :64],
        "batch_2_64x64x64": probe[:2, :, :64, :64, :64],
        "batch_1_48x64x80": probe[:1, :, :48, :64, :80],
    }
    return torch_vs_onnx(path, cases, _torch_predictor(model))


def _save_checkpoint(model: torch.nn.Module, path: Path) -> str:
    """Write the torch weights (to re-check the export later); returns their sha256."""
    with installed_file(path) as tmp:
        torch.save(model.state_dict(), tmp)
        return file_sha256(tmp)


def _probe(data: list[Prepared]) -> np.ndarray:
    """Two 64 x 64 x 80 crops around the first nodules of ``data`` (export check input)."""
    crops = []
    for d in data:
        if not d.label.any():
            continue
        img = _pad_to(d.image, (64, 64, 80))
        c = np.array(np.unravel_index(np.flatnonzero(d.label)[0], d.label.shape))
        start = np.clip(c - np.array([32, 32, 40]), 0, np.array(img.shape[1:]) - (64, 64, 80))
        z, y, x = (int(v) for v in start)
        crops.append(img[:, z : z + 64, y : y + 64, x : x + 80])
        if len(crops) == 2:
            break
    return np.ascontiguousarray(np.stack(crops))


def build(
    repo_root: Path,
    *,
    seed: int = 0,
    n_train: int = N_TRAIN,
    iterations: int = ITERATIONS,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> LoadedModel:
    """Train, export, verify and install the demo segmenter (skipped when a valid one exists).

    Args:
        repo_root: Model repository root; writes ``ct-lung-nodule-demo/1/{model.onnx,
            manifest.yaml}``.
        seed: Seeds phantoms (train ``seed``, val ``seed+1``, test ``seed+2``), patch sampling
            and torch.
        n_train: Training phantoms.
        iterations: Training steps (``BATCH`` patches each).
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
        return _build(repo, version_dir, seed, n_train, iterations, t_build, log)


def _build(
    repo: ModelRepository,
    version_dir: Path,
    seed: int,
    n_train: int,
    iterations: int,
    t_build: float,
    log: Callable[[str], None],
) -> LoadedModel:
    specs = [TransformSpec.model_validate(s) for s in MANIFEST_TEMPLATE["preprocessing"]]
    seg = SegmentationSpec.model_validate(MANIFEST_TEMPLATE["segmentation"])

    t0 = time.perf_counter()
    train = prepare(sample_volumes(n_train, seed), specs)
    data_s = time.perf_counter() - t0
    n_nod = sum(len(d.phantom.nodules) for d in train)
    log(f"phantoms: train {n_train} ({n_nod} nodules) ({data_s:.1f}s)")

    t0 = time.perf_counter()
    model = _train(
        train,
        seed=seed,
        iterations=iterations,
        batch=BATCH,
        lr=LR,
        pos_fraction=POS_FRACTION,
        log=log,
    )
    train_s = time.perf_counter() - t0
    del train  # the held-out phantoms are drawn only now: less memory at the peak

    t0 = time.perf_counter()
    val = prepare(sample_volumes(N_VAL, seed + 1), specs)
    test = prepare(sample_volumes(N_TEST, seed + 2), specs)
    data_s += time.perf_counter() - t0
    log(f"phantoms: val {N_VAL}, test {N_TEST} ({time.perf_counter() - t0:.1f}s)")

    version_dir.mkdir(parents=True, exist_ok=True)
    with installed_file(version_dir / MODEL_FILE) as tmp:
        max_diff, diffs = _export_and_verify(model, _probe(test), tmp)
        sha = file_sha256(tmp)
        log(f"onnx: max abs diff torch vs ORT {max_diff:.2e} {diffs}; sha256 {sha[:12]}")
        t0 = time.perf_counter()
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        predict = onnx_predictor(sess, "image")
        threshold, min_volume, val_metrics = operating_point(
            probability_maps(predict, val, seg), val
        )
        metrics = score(probability_maps(predict, test, seg), test, threshold, min_volume)
        eval_s = time.perf_counter() - t0
    ckpt_sha = _save_checkpoint(model, version_dir / CHECKPOINT_FILE)
    log(
        f"operating point (validation, seed {seed + 1}): threshold {threshold}, "
        f"minimum volume {min_volume} mm3"
    )
    log(
        f"held-out ({N_TEST} volumes, {metrics['nodules']} nodules, ONNX sliding window): "
        f"Dice {metrics['dice']:.3f}, sensitivity {metrics['sensitivity']:.3f} "
        f"(>= 6 mm: {metrics['sensitivity_ge_6mm']:.3f}), "
        f"FP/volume {metrics['false_positives_per_volume']:.2f} ({eval_s:.1f}s)"
    )

    labels = [{**MANIFEST_TEMPLATE["labels"][0], "threshold": threshold}]
    manifest = ModelManifest.model_validate(
        {
            **MANIFEST_TEMPLATE,
            "labels": labels,
            "segmentation": {**MANIFEST_TEMPLATE["segmentation"], "min_volume_mm3": min_volume},
            "sha256": sha,
            "provenance": {
                "trained_on": "synthetic chest CT phantoms (models.ct_phantoms)",
                "seed": seed,
                "n_train": n_train,
                "n_val": N_VAL,
                "n_test": N_TEST,
                "train_nodules": n_nod,
                "iterations": iterations,
                "patch": list(PATCH),
                "patches_per_step": BATCH,
                "positive_fraction": POS_FRACTION,
                "network": NETWORK,
                "checkpoint": {
                    "file": CHECKPOINT_FILE,
                    "sha256": ckpt_sha,
                    "format": "torch state_dict of models.ct_nodule_demo.make_network()",
                },
                "optimizer": f"Adam lr {LR} (one-cycle), weight decay 1e-5",
                "loss": "DiceCELoss (softmax, Dice per patch)",
                "augmentation": "left-right flip p=0.5, jitter of positive patch centres",
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
                "numpy": np.__version__,
                "opset": 17,
                "threads": torch.get_num_threads(),
                "data_seconds": round(data_s, 1),
                "train_seconds": round(train_s, 1),
                "eval_seconds": round(eval_s, 1),
                "build_seconds": round(time.perf_counter() - t_build, 1),
            },
            "metrics": {
                "split": f"held-out test phantoms (seed {seed + 2}, n={N_TEST})",
                "evaluation": "ONNX Runtime sliding window; Dice pooled on the phantom grids; "
                "a nodule is detected when a component centre lies within its radius",
                "operating_point": {
                    "threshold": threshold,
                    "min_volume_mm3": min_volume,
                    "method": f"max sensitivity - {FP_COST} x FP/volume on validation "
                    f"phantoms (seed {seed + 1}, n={N_VAL})",
                    "validation": {k: v for k, v in val_metrics.items() if k != "volumes"},
                },
                **{k: v for k, v in metrics.items() if k != "volumes"},
                "max_abs_diff": max_diff,
                "max_abs_diff_by_input": diffs,
            },
        }
    )
    dump_manifest(manifest, version_dir / MANIFEST_FILE)
    loaded = repo.validate(version_dir)
    log(f"{loaded.key}: built in {time.perf_counter() - t_build:.1f}s at {version_dir}")
    return loaded

"""Logits -> coded findings, with the manifest's thresholds and display names."""

from __future__ import annotations

import numpy as np

from models.manifest import ModelManifest
from serving.schemas import Finding

__all__ = ["findings_from_logits"]


def findings_from_logits(logits: np.ndarray, manifest: ModelManifest) -> list[Finding]:
    probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64).reshape(-1)))
    if probs.shape[0] != len(manifest.labels):
        raise ValueError(
            f"model returned {probs.shape[0]} outputs, manifest has {len(manifest.labels)}"
        )
    out = []
    for p, label in zip(probs, manifest.labels, strict=True):
        codes = label.codes
        out.append(
            Finding(
                label=label.key,
                display=dict(label.display),
                codes=codes,
                probability=round(float(p), 6),
                threshold=label.threshold,
                present=bool(p >= label.threshold),
            )
        )
    return out

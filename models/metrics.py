"""Binary classification metrics in plain numpy: AUROC by ranks, Youden threshold."""

from __future__ import annotations

import numpy as np

from radbridge.errors import ModelError

__all__ = ["auroc", "sens_spec", "youden_threshold"]


def _split(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ModelError(f"metrics: {y.size} labels but {s.size} scores")
    if y.all() or not y.any():
        raise ModelError("metrics: need both positive and negative labels")
    return y, s


def _ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U from ranks; ties count one half)."""
    y, s = _split(y_true, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def youden_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Score threshold maximising sensitivity + specificity - 1 (positive: score >= threshold).

    The threshold is placed midway between the chosen score and the next lower one.
    """
    y, s = _split(y_true, scores)
    values = np.unique(s)[::-1]  # descending distinct scores = candidate thresholds
    n_at_least = s.size - np.searchsorted(np.sort(s), values, side="left")  # scores >= value
    tp = np.cumsum(y[np.argsort(-s, kind="mergesort")])[n_at_least - 1]
    fp = n_at_least - tp
    j = tp / y.sum() - fp / (~y).sum()
    best = int(np.argmax(j))
    lower = values[best + 1] if best + 1 < values.size else 0.0
    return float((values[best] + lower) / 2.0)


def sens_spec(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity with positive meaning ``score >= threshold``."""
    y, s = _split(y_true, scores)
    pred = s >= threshold
    return float(pred[y].mean()), float((~pred[~y]).mean())

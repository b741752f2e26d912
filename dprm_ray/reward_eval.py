"""Reward-model evaluation metrics (numpy): distribution quality, calibration, ranking, pairs."""

from __future__ import annotations

import numpy as np

from dprm_ray.labels import LabelSpace

EPS = 1e-12


def w1_on_line(pred: np.ndarray, target: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Closed-form 1-D Wasserstein-1 per row: sum over sorted support of |CDF gap| * spacing."""
    order = np.argsort(support, kind="stable")
    gaps = np.diff(support[order])
    cdf_gap = np.cumsum(pred[:, order] - target[:, order], axis=1)[:, :-1]
    return np.abs(cdf_gap) @ gaps


def cross_entropy(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return -(target * np.log(np.clip(pred, EPS, 1.0))).sum(axis=1)


def expected_calibration_error(pred: np.ndarray, target: np.ndarray, bins: int = 10) -> float:
    """ECE of the top predicted category against the target's mass on that category.

    With soft targets, "accuracy" of a prediction is the target probability of the predicted top
    label; for one-hot targets this is the usual ECE.
    """
    top = pred.argmax(axis=1)
    confidence = pred[np.arange(len(pred)), top]
    correct = target[np.arange(len(target)), top]
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(confidence[mask].mean() - correct[mask].mean())
    return float(ece)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho needs."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    uniq, inverse = np.unique(x, return_inverse=True)
    if len(uniq) < len(x):
        sums = np.bincount(inverse, weights=ranks)
        counts = np.bincount(inverse)
        ranks = (sums / counts)[inverse]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def distribution_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    label_space: LabelSpace,
    population: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean W1 (score metric) and CE to the target (and to the population), ECE, Spearman."""
    scores = label_space.scores_array()
    metrics = {
        "w1": float(w1_on_line(pred, target, scores).mean()),
        "ce": float(cross_entropy(pred, target).mean()),
        "ece": expected_calibration_error(pred, target),
        "spearman": spearman(pred @ scores, target @ scores),
        "n": float(len(pred)),
    }
    if population is not None:
        metrics["w1_population"] = float(w1_on_line(pred, population, scores).mean())
        metrics["ce_population"] = float(cross_entropy(pred, population).mean())
    return metrics


def pairwise_accuracy(chosen_reward: np.ndarray, rejected_reward: np.ndarray) -> float:
    """Share of pairs where the chosen response gets the higher reward (ties count half)."""
    diff = np.asarray(chosen_reward, float) - np.asarray(rejected_reward, float)
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())

"""Crowd aggregation: votes over K categories -> a smoothed target distribution.

A prior distribution over K (e.g. an LLM judge's) counts as `kappa` pseudo-votes; the crowd's
votes are added to it (Dirichlet-multinomial posterior mean). The same posterior can be kept as K
per-category Beta marginals (Beta(alpha_k, alpha_0 - alpha_k)), which is what an online annotator
updates one category at a time; both views give identical targets, with or without forgetting.

Functions take numpy arrays and broadcast over leading dimensions [..., K] where that is natural.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "aggregate",
    "beta_marginal_means",
    "beta_marginals",
    "beta_update",
    "dirichlet_alpha",
    "dirichlet_mean",
    "dirichlet_posterior",
    "smooth_target",
    "update_alpha",
    "update_with_votes",
    "vote_counts",
]


def vote_counts(votes: Sequence[int] | np.ndarray, num_labels: int) -> np.ndarray:
    """Counts [K] (float64) of integer votes in 0..K-1."""
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    v = np.asarray(votes)
    if v.size == 0:
        return np.zeros(num_labels, dtype=np.float64)
    v = v.ravel()
    for vote in v.tolist():
        # Reject 1.5, NaN and True alike: a vote is a label index, not a weight or a flag.
        is_index = (
            isinstance(vote, int | float)
            and not isinstance(vote, bool)
            and float(vote).is_integer()
            and 0 <= vote < num_labels
        )
        if not is_index:
            raise ValueError(f"vote {vote!r} is not a label index in 0..{num_labels - 1}")
    return np.bincount(v.astype(np.int64), minlength=num_labels).astype(np.float64)


def _prior(prior: Any) -> np.ndarray:
    """Validate a prior distribution and normalise it, so kappa is exactly its pseudo-vote count."""
    p = np.asarray(prior, dtype=np.float64)
    if p.ndim == 0 or not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError(f"prior must be finite, non-negative probabilities [..., K], got {p}")
    total = p.sum(-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("prior has a row with no mass")
    return p / total


def _check_counts(counts: Any) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError(f"counts must be finite and non-negative, got {c}")
    return c


def _check_gamma(gamma: float) -> None:
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"forgetting factor gamma must be in (0, 1], got {gamma}")


def dirichlet_alpha(prior: Any, counts: Any, kappa: float) -> np.ndarray:
    """Posterior Dirichlet parameters kappa * prior + counts."""
    if not kappa >= 0:
        raise ValueError(f"prior strength kappa must be >= 0, got {kappa}")
    return kappa * _prior(prior) + _check_counts(counts)


def dirichlet_mean(alpha: Any) -> np.ndarray:
    """Mean alpha / alpha_0 of Dirichlet(alpha), row-wise over the last axis."""
    a = _check_counts(alpha)
    total = a.sum(-1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("Dirichlet alpha sums to zero: no prior mass and no votes")
    return a / total


def dirichlet_posterior(prior: Any, counts: Any, kappa: float) -> np.ndarray:
    """Posterior mean (kappa * prior + counts) / (kappa + n).

    With kappa = 0 and no votes there is no evidence at all; the prior is returned (rather than
    dividing by zero), which is also the kappa -> 0 limit of the posterior with no votes.
    """
    p = _prior(prior)
    alpha = dirichlet_alpha(p, counts, kappa)
    total = alpha.sum(-1, keepdims=True)
    p = np.broadcast_to(p, alpha.shape)
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, alpha / safe, p)


def update_alpha(alpha: Any, new_counts: Any, gamma: float = 1.0) -> np.ndarray:
    """Sequential update gamma * alpha + new_counts; gamma < 1 forgets old evidence geometrically."""
    _check_gamma(gamma)
    return gamma * _check_counts(alpha) + _check_counts(new_counts)


def beta_marginals(alpha: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-category Beta marginals of Dirichlet(alpha): a_k = alpha_k, b_k = alpha_0 - alpha_k."""
    a = _check_counts(alpha)
    return a.copy(), a.sum(-1, keepdims=True) - a


def beta_marginal_means(a: Any, b: Any) -> np.ndarray:
    """Means a / (a + b) of the per-category Betas (they sum to 1 for Dirichlet marginals)."""
    a = np.asarray(a, dtype=np.float64)
    total = a + np.asarray(b, dtype=np.float64)
    if np.any(total <= 0):
        raise ValueError("a Beta marginal has a + b = 0: no prior mass and no votes")
    return a / total


def beta_update(
    a: Any, b: Any, new_counts: Any, gamma: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Update each category's Beta with the new votes: a vote for k is a success for k and a
    failure for every other category. Matches `update_alpha` on the Dirichlet view."""
    _check_gamma(gamma)
    c = _check_counts(new_counts)
    n = c.sum(-1, keepdims=True)
    a_new = gamma * np.asarray(a, dtype=np.float64) + c
    b_new = gamma * np.asarray(b, dtype=np.float64) + (n - c)
    return a_new, b_new


def smooth_target(
    target: Any, eps: float, prior: Any | None = None, tol: float = 1e-9
) -> np.ndarray:
    """Move `eps` of a unanimous target's mass to the next most likely label.

    A one-hot target makes cross-entropy push the logits without bound and says nothing about
    which wrong answer is least wrong. The next most likely label is the prior's most likely
    label other than the unanimous one (first one on ties), unless there is no prior or it too
    puts all its mass on that label; then it is the ordinal neighbour i + 1 (i - 1 for the last
    label). Targets whose max is below 1 - tol are returned unchanged. Works on [K] and [N, K].
    """
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"smoothing eps must be in [0, 1), got {eps}")
    t = np.array(target, dtype=np.float64)  # a copy: the caller's array is never modified
    if t.ndim not in (1, 2) or t.shape[-1] < 2:
        raise ValueError(f"target must be [K] or [N, K] with K >= 2, got shape {t.shape}")
    rows = t.reshape(-1, t.shape[-1])
    k = rows.shape[-1]
    priors = None
    if prior is not None:
        priors = np.broadcast_to(_prior(prior), rows.shape)

    for r, row in enumerate(rows):
        i = int(np.argmax(row))
        if row[i] < 1.0 - tol:
            continue
        j = i + 1 if i + 1 < k else i - 1
        if priors is not None and priors[r, i] < 1.0 - tol:
            others = priors[r].copy()
            others[i] = -np.inf
            j = int(np.argmax(others))
        row[:] = 0.0
        row[i] = 1.0 - eps
        row[j] += eps
    return rows.reshape(t.shape)


def aggregate(
    prior: Any, votes: Sequence[int] | np.ndarray, num_labels: int, kappa: float, eps: float
) -> dict[str, np.ndarray]:
    """One item's crowd label: vote `counts`, Dirichlet `posterior`, smoothed `target` (all [K])."""
    p = _prior(prior)
    if p.shape != (num_labels,):
        raise ValueError(f"prior must have shape ({num_labels},), got {p.shape}")
    counts = vote_counts(votes, num_labels)
    posterior = dirichlet_posterior(p, counts, kappa)
    target = smooth_target(posterior, eps, prior=p)
    return {"counts": counts, "posterior": posterior, "target": target}


def update_with_votes(
    prior: np.ndarray,
    old_votes: list[int],
    new_votes: list[int],
    kappa: float,
    eps: float,
    gamma: float = 1.0,
) -> dict[str, np.ndarray]:
    """Add new votes to an item's Dirichlet (old evidence scaled by `gamma`); new posterior/target.

    The Dirichlet is rebuilt from the stored prior and votes (alpha = kappa * prior + counts), so
    with gamma = 1 this equals annotating once with all the votes.
    """
    k = len(prior)
    alpha = dirichlet_alpha(prior, vote_counts(old_votes, k), kappa)
    alpha = update_alpha(alpha, vote_counts(new_votes, k), gamma)
    posterior = dirichlet_mean(alpha)
    return {"posterior": posterior, "target": smooth_target(posterior, eps, prior=prior)}

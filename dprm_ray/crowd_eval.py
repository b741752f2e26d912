"""How well a crowd agrees with people: pairwise accuracy on human preference pairs (hh-rlhf).

A crowd labels each reply of a (prompt, chosen, rejected) pair with a distribution over the label
space; it agrees with the person who chose when the chosen reply's expected score is the higher.
Beside the accuracy of the crowd's target (and of the judge's prior alone) this reports the
length heuristics on the same pairs, how much the priors vary across replies (a judge that gives
every reply the same distribution carries no signal) and how often the personas agree.
Pure NumPy; `dprm-ray evaluate crowd` and `bench/crowd_vs_people.py` call it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dprm_ray.judge import row_key
from dprm_ray.labels import LabelSpace
from dprm_ray.reward_eval import pairwise_accuracy


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic shuffle with `seed`, then the first `fraction` of the rows is the train part."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_train = round(fraction * len(rows))
    if not 0 < n_train < len(rows):
        raise ValueError(
            f"train fraction {fraction} of {len(rows)} rows leaves an empty train or test part"
        )
    return [rows[i] for i in order[:n_train]], [rows[i] for i in order[n_train:]]


def distinct_replies(pairs: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """One {prompt, response} row per distinct reply of the pairs (a reply may recur), in order."""
    replies: dict[str, dict[str, str]] = {}
    for pair in pairs:
        for reply in (pair["chosen"], pair["rejected"]):
            replies.setdefault(
                row_key(pair["prompt"], reply), {"prompt": pair["prompt"], "response": reply}
            )
    return list(replies.values())


def length_accuracy(pairs: Sequence[Mapping[str, Any]], longer_wins: bool) -> float:
    """Pairwise accuracy of "the longer (or shorter) reply wins", length in characters."""
    chosen = np.array([len(r["chosen"]) for r in pairs], dtype=float)
    rejected = np.array([len(r["rejected"]) for r in pairs], dtype=float)
    sign = 1.0 if longer_wins else -1.0
    return pairwise_accuracy(sign * chosen, sign * rejected)


def standard_error(accuracy: float, n: int) -> float:
    """Binomial standard error of an accuracy over n pairs."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else 0.0


def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa of vote counts [items, K] (items may have different numbers of votes >= 2).

    None when chance agreement is 1 (every vote in one category): kappa is 0/0 there.
    """
    n = counts.sum(axis=1)
    per_item = ((counts * counts).sum(axis=1) - n) / (n * (n - 1))
    shares = counts.sum(axis=0) / counts.sum()
    chance = float((shares * shares).sum())
    if chance >= 1.0 - 1e-12:
        return None
    return float((per_item.mean() - chance) / (1.0 - chance))


def crowd_agreement(
    pairs: Sequence[Mapping[str, Any]],
    annotations: Mapping[str, Mapping[str, Any]],
    space: LabelSpace,
) -> dict[str, Any]:
    """The crowd against the people who chose, on the pairs whose two replies are annotated.

    `annotations` maps `row_key(prompt, reply)` to an annotated row (prior, votes, target).
    Accuracies count ties half; `*_se` are binomial standard errors. The reply statistics
    (prior spread and peaks, persona agreement, Fleiss' kappa) are over the distinct replies of
    the pairs counted.
    """
    kept: list[Mapping[str, Any]] = []
    keys: list[tuple[str, str]] = []
    for pair in pairs:
        chosen = row_key(pair["prompt"], pair["chosen"])
        rejected = row_key(pair["prompt"], pair["rejected"])
        if chosen in annotations and rejected in annotations:
            kept.append(pair)
            keys.append((chosen, rejected))
    n = len(kept)
    if not n:
        raise ValueError(f"none of the {len(pairs)} pairs has both replies annotated")
    scores = space.scores_array()

    def expected(field: str, which: int) -> np.ndarray:
        return np.array([np.asarray(annotations[k[which]][field]) @ scores for k in keys])

    metrics: dict[str, Any] = {"n_pairs": n, "n_pairs_given": len(pairs)}
    for name, field in (("accuracy", "target"), ("prior_accuracy", "prior")):
        acc = pairwise_accuracy(expected(field, 0), expected(field, 1))
        metrics[name], metrics[f"{name}_se"] = acc, standard_error(acc, n)
    for name, longer in (("longer_wins", True), ("shorter_wins", False)):
        acc = length_accuracy(kept, longer)
        metrics[name], metrics[f"{name}_se"] = acc, standard_error(acc, n)

    replies = [annotations[k] for k in dict.fromkeys(k for both in keys for k in both)]
    priors = np.array([r["prior"] for r in replies], dtype=float)
    spread = priors.std(axis=0)
    k = space.num_labels
    peaks = np.bincount(priors.argmax(axis=1), minlength=k) / len(replies)
    counts = np.array([np.bincount(r["votes"], minlength=k) for r in replies], dtype=float)
    n_votes = counts.sum(axis=1)
    voted = n_votes >= 1
    several = n_votes >= 2
    metrics |= {
        "n_replies": len(replies),
        "prior_spread": spread.tolist(),
        "prior_spread_mean": float(spread.mean()),
        "prior_peak_share": peaks.tolist(),
        # The share of a reply's votes on its modal category, averaged over replies with votes.
        "persona_agreement": (
            float((counts[voted].max(axis=1) / n_votes[voted]).mean()) if voted.any() else None
        ),
        "fleiss_kappa": fleiss_kappa(counts[several]) if several.any() else None,
    }
    return metrics

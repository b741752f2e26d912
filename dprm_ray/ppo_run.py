"""A PPO run, apart from its orchestration (the driver, `dprm_ray/jobs/train_policy.py`) and its
config (`dprm_ray.policy_config.TrainPolicyConfig`): the prompt schedule, the driver's checkpoint
state and the per-category share statistics.

The schedule is a pure function of (seed, step): step s trains on positions
`s*P .. s*P+P-1` of an endless sequence of seeded epoch shuffles. A resumed run therefore needs
only the step number to continue with exactly the prompts it would have seen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def load_prompts(path: str, split: str) -> list[dict[str, str]]:
    """Rows with `id` and `prompt` (and `kind` when known) from a file, or the built-in set.

    A file is .jsonl or .parquet with a `prompt` column and optionally `id`. Without `id` a row is
    named row-N and repeated prompts (an annotations file has one row per response) count once.
    """
    if not path:
        from dprm_ray.data import builtin_prompts

        return [
            {"id": r["id"], "prompt": r["prompt"], "kind": r["kind"]}
            for r in builtin_prompts(split)
        ]
    from dprm_ray.data import DataError, read_text_columns

    rows = read_text_columns(path, required=("prompt",), optional=("id",))
    out, seen = [], set()
    first_row: dict[str, int] = {}  # id -> the file row (1-based) that has it
    problems = []
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        if "id" not in row:
            # Without ids (e.g. an annotations file: one row per response), a prompt counts once.
            if prompt in seen:
                continue
            seen.add(prompt)
        prompt_id = str(row.get("id", f"row-{i}"))
        if prompt_id in first_row:
            problems.append(
                f"{path}:{i + 1}: prompt id '{prompt_id}' is already used by row "
                f"{first_row[prompt_id]} (ids must be unique)"
            )
            continue
        first_row[prompt_id] = i + 1
        out.append({"id": prompt_id, "prompt": prompt})
    if problems:
        raise DataError(problems)
    return out


def step_positions(seed: int, step: int, per_step: int, n: int) -> list[int]:
    """Indices (into the n prompts) trained on at `step`: the next `per_step` positions of an
    endless sequence of epochs, each a fresh permutation seeded by (seed, epoch)."""
    out = []
    for pos in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perm[offset]))
    return out


def prompt_items(
    prompts: list[dict[str, str]], indices: list[int], step: int
) -> list[dict[str, str]]:
    """A step's rollout-worker items: a prompt id unique within the step (`id@step.position`,
    the sampling seed's key) and the prompt."""
    return [
        {"prompt_id": f"{prompts[i]['id']}@{step}.{j}", "prompt": prompts[i]["prompt"]}
        for j, i in enumerate(indices)
    ]


# --------------------------------------------------------------------------- statistics


def category_shares(distributions: np.ndarray, labels: list[str]) -> dict[str, float]:
    """Table-2 style: the share of responses whose most likely category is each label, and the
    mean probability of each label."""
    probs = np.asarray(distributions, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(labels):
        raise ValueError(f"distributions must be [N, {len(labels)}], got {probs.shape}")
    top = np.bincount(probs.argmax(axis=1), minlength=len(labels)) / max(1, len(probs))
    mean = probs.mean(axis=0) if len(probs) else np.zeros(len(labels))
    out = {f"share/{label}": float(s) for label, s in zip(labels, top, strict=True)}
    out.update({f"prob/{label}": float(m) for label, m in zip(labels, mean, strict=True)})
    return out


def rollout_statistics(rollouts: list[dict[str, Any]], labels: list[str]) -> dict[str, float]:
    """Reward mean/std, response length and (a DPRM) category shares of scored rollouts."""
    rewards = np.array([r["reward"] for r in rollouts], dtype=np.float64)
    lengths = np.array([len(r["response_ids"]) for r in rollouts], dtype=np.float64)
    out = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "response_length": float(lengths.mean()),
    }
    if labels and all("distribution" in r for r in rollouts):
        out.update(category_shares(np.array([r["distribution"] for r in rollouts]), labels))
    return out


# --------------------------------------------------------------------------- driver state


STATE_FILE = "driver_state.json"


def latest_checkpoint(ckpt_root: Path) -> tuple[Path, dict[str, Any]] | None:
    """(folder, driver state) of the newest complete checkpoint under `ckpt_root`, or None.

    A checkpoint folder counts only once its driver state is written (the last file of a save).
    """
    if not ckpt_root.is_dir():
        return None
    found = []
    for folder in ckpt_root.glob("step_*"):
        state_file = folder / STATE_FILE
        if state_file.is_file():
            state = json.loads(state_file.read_text())
            found.append((int(state["step"]), folder, state))
    if not found:
        return None
    _, folder, state = max(found, key=lambda t: t[0])
    return folder, state

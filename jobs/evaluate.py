"""`dprm-ray evaluate`: measure reward models (and, with the PPO issue, policies)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from dprm_ray.config import MISSING
from jobs.runner import Command, Job, run_job


@dataclass
class EvaluateRewardConfig:
    model: str = field(default=MISSING, metadata={"help": "a saved reward model folder"})
    data: str = field(
        default=MISSING, metadata={"help": "annotations or pairs (.parquet, .jsonl, hh-rlhf)"}
    )
    label_space: Any = field(
        default="hh6", metadata={"help": "for targets scored by a Bradley-Terry model"}
    )
    user: str = field(
        default="mixture", metadata={"help": "PAL models: a user id, or mixture (population)"}
    )
    max_length: int = 256
    batch_size: int = 32
    skip_invalid_rows: bool = field(
        default=False, metadata={"help": "leave out bad rows (reported) instead of failing"}
    )
    output_dir: str = "outputs/evaluate-reward"


def evaluate_reward(cfg: EvaluateRewardConfig) -> dict:
    from dprm_ray.labels import get_label_space
    from dprm_ray.pal import is_pal_dir
    from dprm_ray.reward_models import (
        DistributionalRewardModel,
        cached_embeddings,
        load_reward_model,
    )
    from dprm_ray.reward_training import TargetConfig, evaluate, load_reward_data, predict

    if is_pal_dir(cfg.model):
        return _evaluate_pal(cfg)
    model, tokenizer = load_reward_model(cfg.model, with_backbone=False)
    is_dprm = isinstance(model, DistributionalRewardModel)
    space = model.label_space if is_dprm else get_label_space(cfg.label_space)
    data = load_reward_data(cfg.data, space, TargetConfig(), cfg.skip_invalid_rows)
    embeddings = None
    if model.freeze_backbone:
        # A frozen backbone's features are cached on disk (shared with training and sweeps).
        kind = "causal-lm" if model.pooling == "last" else "encoder"
        embeddings = cached_embeddings(
            model.backbone_spec, data.prompts, data.responses, cfg.max_length, backbone_kind=kind
        )
    else:
        model, tokenizer = load_reward_model(cfg.model)
    pred = predict(
        model, tokenizer, data, embeddings, max_length=cfg.max_length, batch_size=cfg.batch_size
    )
    metrics = evaluate(pred, data, space)
    print(f"{cfg.model} on {cfg.data} ({len(data.prompts)} responses):")
    for key, value in sorted(metrics.items()):
        print(f"  {key:<20} {value:.4f}")
    return {"model": cfg.model, "data": cfg.data, "model_type": model.kind, **metrics}


def _evaluate_pal(cfg: EvaluateRewardConfig) -> dict:
    """A PAL model scores as one user's reward (or the population mixture's)."""
    from dprm_ray.labels import get_label_space
    from dprm_ray.pal import PALReward
    from dprm_ray.reward_training import TargetConfig, evaluate, load_reward_data

    space = get_label_space(cfg.label_space)
    data = load_reward_data(cfg.data, space, TargetConfig(), cfg.skip_invalid_rows)
    reward = PALReward(cfg.model, user=cfg.user, batch_size=cfg.batch_size)
    metrics = evaluate({"expected": reward(data.prompts, data.responses)}, data, space)
    print(f"{cfg.model} (PAL, user {cfg.user}) on {cfg.data}:")
    for key, value in sorted(metrics.items()):
        print(f"  {key:<20} {value:.4f}")
    return {"model": cfg.model, "data": cfg.data, "model_type": "pal", "user": cfg.user, **metrics}


JOB = Job(
    "evaluate",
    "Evaluate reward models: W1, CE, calibration, Spearman, pairwise accuracy.",
    (
        Command(
            "reward",
            "Score a data file with a saved reward model. Annotations: mean W1 (score metric) and\n"
            "CE to the target (and to the population distribution when present), ECE of the top\n"
            "category, Spearman between expected reward and the target's expected score, and\n"
            "pairwise accuracy between responses to the same prompt. Pairs (parquet or hh-rlhf\n"
            "JSONL): pairwise accuracy of the (expected) reward. PAL folders score as one user's\n"
            "reward (user=ID) or the population mixture (user=mixture).",
            EvaluateRewardConfig,
            evaluate_reward,
        ),
    ),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

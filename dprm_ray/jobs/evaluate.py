"""`dprm-ray evaluate`: measure reward models (and, with the PPO issue, policies), and how well a
persona crowd agrees with people (`evaluate crowd`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from dprm_ray.config import MISSING
from dprm_ray.jobs.annotate import PoolConfig
from dprm_ray.jobs.runner import Command, Job, run_job
from dprm_ray.judge import JudgeConfig


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
    max_length: int = field(default=256, metadata={"min": 1})
    batch_size: int = field(default=32, metadata={"min": 1})
    skip_invalid_rows: bool = field(
        default=False, metadata={"help": "leave out bad rows (reported) instead of failing"}
    )
    output_dir: str = "outputs/evaluate-reward"


def evaluate_reward(cfg: EvaluateRewardConfig) -> dict:
    from dprm_ray.cpus import use_assigned_cpus
    from dprm_ray.labels import get_label_space
    from dprm_ray.pal import is_pal_dir
    from dprm_ray.reward_config import TargetConfig
    from dprm_ray.reward_models import (
        DistributionalRewardModel,
        cached_embeddings,
        load_reward_model,
        predict,
    )
    from dprm_ray.reward_training import evaluate, load_reward_data

    # The driver scores alone: every core (under `ray job submit` it inherits one thread).
    use_assigned_cpus()
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
    from dprm_ray.reward_config import TargetConfig
    from dprm_ray.reward_training import evaluate, load_reward_data

    space = get_label_space(cfg.label_space)
    data = load_reward_data(cfg.data, space, TargetConfig(), cfg.skip_invalid_rows)
    reward = PALReward(cfg.model, user=cfg.user, batch_size=cfg.batch_size)
    metrics = evaluate({"expected": reward(data.prompts, data.responses)}, data, space)
    print(f"{cfg.model} (PAL, user {cfg.user}) on {cfg.data}:")
    for key, value in sorted(metrics.items()):
        print(f"  {key:<20} {value:.4f}")
    return {"model": cfg.model, "data": cfg.data, "model_type": "pal", "user": cfg.user, **metrics}


@dataclass
class EvaluateCrowdConfig:
    data: str = field(
        default=MISSING,
        metadata={"help": "human preference pairs: hh-rlhf JSONL, or pairs .parquet/.jsonl"},
    )
    split: str = field(
        default="all", metadata={"help": "all | train | test (test: the held-out part)"}
    )
    seed: int = field(default=0, metadata={"min": 0, "help": "shuffle of the train/test split"})
    train_fraction: float = field(default=0.5, metadata={"above": 0, "below": 1})
    max_pairs: int = field(
        default=0, metadata={"min": 0, "help": "the first N pairs of the split (0 = all)"}
    )
    skip_invalid_rows: bool = field(
        default=True, metadata={"help": "leave out bad rows (reported) before splitting"}
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    address: str = field(default="", metadata={"help": "Ray address ('' = local or the job's)"})
    output_dir: str = field(
        default="outputs/evaluate-crowd",
        metadata={"help": "replies.parquet, annotations.parquet (resumable), metrics.json"},
    )

    def validate(self) -> None:
        from dprm_ray.config import ConfigError

        self.judge.validate()
        self.judge.check_device(self.pool.gpus_per_actor > 0, "pool.gpus_per_actor=0")
        if self.split not in ("all", "train", "test"):
            raise ConfigError(f"split: must be all, train or test, got '{self.split}'")


def evaluate_crowd(cfg: EvaluateCrowdConfig) -> dict:
    from pathlib import Path

    from omegaconf import OmegaConf

    from dprm_ray.config import ConfigError
    from dprm_ray.crowd_eval import crowd_agreement, distinct_replies, split_rows
    from dprm_ray.data import DataError, load_rows, write_rows
    from dprm_ray.jobs.annotate import AnnotateConfig, annotate
    from dprm_ray.labels import get_label_space

    space = get_label_space(cfg.judge.label_space)

    loaded = load_rows(cfg.data, "pairs", skip_invalid=cfg.skip_invalid_rows)
    if loaded.skipped:
        print(f"evaluate crowd: left out {len(loaded.skipped)} bad rows, e.g. {loaded.skipped[0]}")
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in loaded.rows]
    if cfg.split != "all":
        try:
            train, test = split_rows(pairs, cfg.train_fraction, cfg.seed)
        except ValueError as exc:
            raise ConfigError(f"train_fraction: {exc}") from None
        pairs = train if cfg.split == "train" else test
    if cfg.max_pairs:
        pairs = pairs[: cfg.max_pairs]

    out = Path(cfg.output_dir)  # the annotate job's input: one row per distinct reply
    write_rows(out / "replies.parquet", distinct_replies(pairs), "rollouts")
    # Annotating in-process as `dprm-ray annotate` does, so a rerun only judges what is missing.
    plain = OmegaConf.to_object(OmegaConf.structured(cfg))
    summary = annotate(
        AnnotateConfig(
            input=str(out / "replies.parquet"),
            output=str(out / "annotations.parquet"),
            judge=plain.judge,
            pool=plain.pool,
            address=cfg.address,
            output_dir=cfg.output_dir,
        )
    )
    if not summary["annotated_total"]:
        raise DataError([f"{cfg.data}: the judge rejected every reply (see {summary['rejects']})"])
    rows = load_rows(summary["output"], "annotations", num_labels=space.num_labels).rows
    annotations = {r["row_key"]: r for r in rows}
    try:
        metrics = crowd_agreement(pairs, annotations, space)
    except ValueError as exc:  # every pair lost a reply to the judge's rejects
        raise DataError([f"{cfg.data}: {exc} (rejects: {summary['rejects']})"]) from None

    judge = f"{cfg.judge.backend}:{cfg.judge.model}, vote {cfg.judge.vote}" + (
        ", calibrated" if cfg.judge.calibrate else ""
    )
    print(f"\ncrowd vs people on {cfg.data} (split {cfg.split}; judge {judge}):")
    print("| predictor | pairwise accuracy | n pairs |\n|---|---|---|")
    for name, key in (
        ("crowd target", "accuracy"),
        ("crowd prior", "prior_accuracy"),
        ("longer reply wins", "longer_wins"),
        ("shorter reply wins", "shorter_wins"),
    ):
        print(
            f"| {name} | {metrics[key]:.3f} ± {metrics[key + '_se']:.3f} | {metrics['n_pairs']} |"
        )
    spread = ", ".join(f"{x:.3f}" for x in metrics["prior_spread"])
    peaks = ", ".join(f"{x:.2f}" for x in metrics["prior_peak_share"])
    kappa = metrics["fleiss_kappa"]
    agreement = metrics["persona_agreement"]
    print(
        f"prior spread (std per category over {metrics['n_replies']} replies): {spread}; "
        f"mean {metrics['prior_spread_mean']:.4f}"
    )
    print(f"prior peak share per category: {peaks}")
    print(
        "persona agreement (modal vote share): "
        + ("n/a" if agreement is None else f"{agreement:.3f}")
        + "; Fleiss' kappa: "
        + ("n/a" if kappa is None else f"{kappa:.3f}")
    )
    done = {
        k: summary[k]
        for k in ("processed", "rejected", "skipped", "annotated_total", "rejected_total")
    }
    return {
        "data": cfg.data,
        "split": cfg.split,
        "judge": judge,
        **metrics,
        "annotate": done,
    }


JOB = Job(
    "evaluate",
    "Evaluate reward models (W1, CE, calibration, Spearman, pairwise accuracy) and crowds.",
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
        Command(
            "crowd",
            "How well the persona crowd agrees with people: annotate both replies of human\n"
            "preference pairs (hh-rlhf) with the judge, then the pairwise accuracy of the crowd's\n"
            "target and of the judge's prior alone (expected score), next to 'the longer / shorter\n"
            "reply wins', with binomial standard errors; the spread of the priors across replies,\n"
            "persona agreement and Fleiss' kappa. The judge.* and pool.* keys are those of\n"
            "`dprm-ray annotate` (no --config needed). Writes <output_dir>/replies.parquet and\n"
            "<output_dir>/annotations.parquet; a rerun annotates only replies not done yet (keep\n"
            "one output_dir per judge setting).",
            EvaluateCrowdConfig,
            evaluate_crowd,
        ),
    ),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`dprm-ray train-pal`: train a PAL reward model (PAL-A / PAL-B) and adapt it to new users.

PAL (Chen et al., arXiv 2406.08469) models each user as a softmax mixture over K shared
prototypes, on frozen embeddings (MiniLM by default, cached on disk) and small MLPs; see
`dprm_ray/pal.py`. The model is small, so both commands run in-process on one CPU: no Ray.

    dprm-ray train-pal data=train.parquet eval_data=test_seen.parquet variant=pal-b
    dprm-ray train-pal adapt model=outputs/train-pal/model data=unseen_adapt.parquet \\
        user=user-40 budget=20 test_data=unseen_test.parquet
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from dprm_ray.config import MISSING, ConfigError
from dprm_ray.jobs.runner import Command, Job, run_job


@dataclass
class TrainPALConfig:
    data: str = field(
        default=MISSING, metadata={"help": "pairs (.parquet/.jsonl) with a user_id on every row"}
    )
    eval_data: str = field(
        default="", metadata={"help": "held-out pairs of the same users ('' = none)"}
    )
    variant: str = field(default="pal-b", metadata={"help": "pal-a or pal-b"})
    num_prototypes: int = field(default=5, metadata={"min": 1, "help": "K shared prototypes"})
    backbone: str = field(
        default="minilm", metadata={"help": "frozen encoder that embeds the texts (a model spec)"}
    )
    max_length: int = field(default=256, metadata={"min": 1})
    hidden_size: int = field(
        default=256, metadata={"min": 1, "help": "hidden units of the MLPs f, g_k"}
    )
    pref_dim: int = field(default=128, metadata={"min": 1, "help": "size of the preference space"})
    loss: str = field(
        default="logistic", metadata={"help": "PAL-A: logistic or hinge (PAL-B: logistic)"}
    )
    hinge_margin: float = field(default=1.0, metadata={"min": 0})
    lr: float = field(default=3e-3, metadata={"above": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    epochs: int = field(default=40, metadata={"min": 1})
    batch_size: int = field(default=128, metadata={"min": 1})
    seed: int = field(default=0, metadata={"min": 0})
    threads: int = field(
        default=1,
        metadata={"min": 1, "help": "torch CPU threads (small MLPs: 1 is usually fastest)"},
    )
    skip_invalid_rows: bool = False
    output_dir: str = "outputs/train-pal"

    def pal_config(self) -> Any:
        """The PALConfig of the model this run trains."""
        from dprm_ray.pal import PALConfig

        return PALConfig(
            variant=self.variant,
            num_prototypes=self.num_prototypes,
            hidden_size=self.hidden_size,
            pref_dim=self.pref_dim,
            loss=self.loss,
            hinge_margin=self.hinge_margin,
            backbone=self.backbone,
            max_length=self.max_length,
        )

    def validate(self) -> None:
        """ConfigError naming the key (the runner calls it)."""
        self.pal_config().validate()


@dataclass
class AdaptPALConfig:
    model: str = field(default=MISSING, metadata={"help": "a PAL model folder (train-pal's model)"})
    data: str = field(default=MISSING, metadata={"help": "the new user's comparisons (pairs)"})
    user: str = field(
        default="", metadata={"help": "user_id to take from data/test_data ('' = all rows)"}
    )
    budget: int = field(default=20, metadata={"min": 1, "help": "adapt on the first N comparisons"})
    test_data: str = field(default="", metadata={"help": "the user's held-out pairs ('' = none)"})
    steps: int = field(
        default=200, metadata={"min": 1, "help": "full-batch Adam steps on the K logits"}
    )
    lr: float = field(default=0.1, metadata={"above": 0})
    new_user_id: str = field(
        default="", metadata={"help": "id of the adapted user in the saved model ('' = user)"}
    )
    threads: int = field(default=1, metadata={"min": 1})
    output_dir: str = "outputs/train-pal-adapt"

    def validate(self) -> None:
        """ConfigError naming the key (the runner calls it)."""
        if self.new_user_id == "mixture" or (not self.new_user_id and self.user == "mixture"):
            raise ConfigError("new_user_id: 'mixture' is reserved for the population average")


def _load_pairs(path: str, skip_invalid: bool = False, user: str = "") -> list[dict[str, Any]]:
    from dprm_ray.data import DataError, load_rows

    loaded = load_rows(path, kind="pairs", skip_invalid=skip_invalid)
    for problem in loaded.skipped:
        print(f"skipped {problem}", file=sys.stderr)
    rows = loaded.rows
    if user:
        rows = [r for r in rows if r.get("user_id") == user]
        if not rows:
            raise DataError([f"{path}: no rows with user_id '{user}'"])
    return rows


def train(cfg: TrainPALConfig) -> dict:
    from pathlib import Path

    import torch

    from dprm_ray.data import DataError
    from dprm_ray.pal import (
        build_pal_model,
        embed_pairs,
        pal_accuracy,
        save_pal,
        train_pal,
    )

    torch.set_num_threads(cfg.threads)
    pal_config = TrainPALConfig.pal_config(cfg)  # cfg is the runner's (validated) config node
    rows = _load_pairs(cfg.data, cfg.skip_invalid_rows)
    missing = [i for i, r in enumerate(rows, start=1) if "user_id" not in r]
    if missing:
        shown = ", ".join(str(i) for i in missing[:5])
        raise DataError([f"{cfg.data}: rows {shown}: no user_id (PAL learns one mixture per user)"])
    user_ids = sorted({r["user_id"] for r in rows}, key=_natural_key)
    pal_config.user_ids = user_ids
    # Check the held-out users before spending time on training: PAL scores only known users.
    eval_rows = _load_pairs(cfg.eval_data, cfg.skip_invalid_rows) if cfg.eval_data else []
    known = set(user_ids)
    for i, row in enumerate(eval_rows, start=1):
        if row.get("user_id") not in known:
            raise DataError(
                [
                    f"{cfg.eval_data}:{i}: user '{row.get('user_id')}' is not in {cfg.data} "
                    "(eval_data holds seen users; adapt new ones with `train-pal adapt`)"
                ]
            )
    print(f"{cfg.data}: {len(rows)} comparisons of {len(user_ids)} users; embedding texts")
    data = embed_pairs(rows, cfg.backbone, cfg.max_length, user_ids, progress=True)
    pal_config.input_dim = int(data.chosen.shape[1])
    model = build_pal_model(pal_config, seed=cfg.seed)
    history = train_pal(
        model,
        data,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        weight_decay=cfg.weight_decay,
        progress=True,
    )
    model_dir = Path(cfg.output_dir) / "model"
    save_pal(model, model_dir)
    metrics: dict[str, Any] = {
        "model": str(model_dir),
        "variant": cfg.variant,
        "num_prototypes": cfg.num_prototypes,
        "users": len(user_ids),
        "train_pairs": len(rows),
        "train_loss": history[-1]["loss"] if history else None,
        "train_accuracy": pal_accuracy(model, data),
        "population_weights": [round(float(w), 4) for w in model.population_weights],
    }
    if eval_rows:
        eval_set = embed_pairs(eval_rows, cfg.backbone, cfg.max_length, user_ids)
        metrics.update(
            eval_pairs=len(eval_rows),
            # Each comparison scored under its own user's mixture: seen-user accuracy.
            eval_accuracy=pal_accuracy(model, eval_set),
            # One reward for everybody (the population-average user), for comparison.
            eval_accuracy_mixture=pal_accuracy(model, eval_set, "mixture"),
        )
    for key in ("train_accuracy", "eval_accuracy", "eval_accuracy_mixture"):
        if key in metrics:
            print(f"  {key:<24} {metrics[key]:.4f}")
    return metrics


def adapt(cfg: AdaptPALConfig) -> dict:
    from pathlib import Path

    import torch

    from dprm_ray.data import DataError
    from dprm_ray.pal import adapt_user, embed_pairs, load_pal, pal_accuracy, save_pal

    torch.set_num_threads(cfg.threads)
    model = load_pal(cfg.model)
    rows = _load_pairs(cfg.data, user=cfg.user)
    users = {r.get("user_id") for r in rows} - {None}
    if len(users) > 1:
        raise DataError([f"{cfg.data}: holds {len(users)} users; pick one with user=..."])
    new_id = cfg.new_user_id or cfg.user or (users.pop() if users else "new-user")
    if new_id == "mixture":  # taken from the data's user_id
        raise ConfigError("new_user_id: 'mixture' is reserved for the population average")
    rows = rows[: cfg.budget]
    spec, max_length = model.config.backbone, model.config.max_length
    comparisons = embed_pairs(rows, spec, max_length) if rows else None
    if comparisons is None:
        logits = model.population_weights.clamp(min=1e-8).log()
    else:
        logits = adapt_user(model, comparisons, steps=cfg.steps, lr=cfg.lr)
    metrics: dict[str, Any] = {
        "model": cfg.model,
        "user": new_id,
        "budget": cfg.budget,
        "budget_used": len(rows),
        "weights": [round(float(w), 4) for w in torch.softmax(logits, -1)],
    }
    if comparisons is not None:
        metrics["adapt_accuracy"] = pal_accuracy(model, comparisons, logits)
    if cfg.test_data:
        test_rows = _load_pairs(cfg.test_data, user=cfg.user)
        if len({r.get("user_id") for r in test_rows}) > 1:
            raise DataError([f"{cfg.test_data}: holds several users; pick one with user=..."])
        test = embed_pairs(test_rows, spec, max_length)
        metrics.update(
            test_pairs=len(test_rows),
            test_accuracy=pal_accuracy(model, test, logits),
            # Before adaptation the new user is the population average.
            test_accuracy_mixture=pal_accuracy(model, test, "mixture"),
        )
        print(
            f"{new_id}: test accuracy {metrics['test_accuracy']:.4f} after {len(rows)} "
            f"comparisons ({metrics['test_accuracy_mixture']:.4f} as the population average)"
        )
    model.add_user(new_id, logits)
    model_dir = Path(cfg.output_dir) / "model"
    save_pal(model, model_dir)
    metrics["adapted_model"] = str(model_dir)
    return metrics


def _natural_key(user: str) -> tuple[str, int, str]:
    """user-2 before user-10."""
    head, _, tail = user.rpartition("-")
    return (head, int(tail), "") if tail.isdigit() else (user, -1, user)


JOB = Job(
    "train-pal",
    "Train a pluralistic PAL reward model and adapt it to new users from a few comparisons.",
    (
        Command("", __doc__.strip(), TrainPALConfig, train),
        Command(
            "adapt",
            "Few-shot adaptation of a new user (only their K mixture logits train).\n"
            "Learns the logits from the first `budget` comparisons with everything else frozen,\n"
            "reports the user's test accuracy, and saves the model with the user added to\n"
            "<output_dir>/model. Runs in-process; no Ray.",
            AdaptPALConfig,
            adapt,
        ),
    ),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

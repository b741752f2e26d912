"""`dprm-ray data`: validate data files; build data sets."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from dprm_ray.config import MISSING, ConfigError
from dprm_ray.jobs.runner import Command, Job, run_job


@dataclass
class ValidateConfig:
    path: str = field(default=MISSING, metadata={"help": "a .parquet or .jsonl file"})
    kind: str = field(
        default="auto", metadata={"help": "auto, prompts, rollouts, annotations or pairs"}
    )
    num_labels: int | None = field(
        default=None,
        metadata={"min": 2, "help": "expected distribution length (default: from the data)"},
    )
    output_dir: str = "outputs/data-validate"


def validate(cfg: ValidateConfig) -> dict:
    from dprm_ray.data import SCHEMAS, load_rows

    if cfg.kind != "auto" and cfg.kind not in SCHEMAS:
        raise ConfigError(f"kind: must be auto or one of {', '.join(SCHEMAS)}, got '{cfg.kind}'")
    kind = None if cfg.kind == "auto" else cfg.kind
    loaded = load_rows(cfg.path, kind=kind, num_labels=cfg.num_labels)
    print(f"{cfg.path}: ok, {len(loaded.rows)} rows of {loaded.kind}")
    return {"path": cfg.path, "kind": loaded.kind, "rows": len(loaded.rows)}


@dataclass
class PersonaCrowdConfig:
    persona_dir: str = field(
        default="../shared/data/persona", metadata={"help": "folder of persona statement .jsonl"}
    )
    out: str = field(
        default=MISSING, metadata={"help": "annotations parquet to write", "output": "file"}
    )
    users: int = field(
        default=20, metadata={"min": 1, "help": "simulated users voting on every item"}
    )
    seed: int = field(default=0, metadata={"min": 0})
    behaviours: list[str] = field(
        default_factory=list, metadata={"help": "behaviour file stems (empty: all)"}
    )
    max_per_behaviour: int | None = field(
        default=None, metadata={"min": 1, "help": "statements per behaviour (None: all)"}
    )
    kappa: float = field(
        default=0.0,
        metadata={"min": 0, "help": "uniform-prior strength (0: posterior = crowd histogram)"},
    )
    eps: float = field(
        default=0.05,
        metadata={"min": 0, "below": 1, "help": "label smoothing of unanimous targets"},
    )
    output_dir: str = "outputs/data-persona-crowd"


def persona_crowd(cfg: PersonaCrowdConfig) -> dict:
    import numpy as np

    from dprm_ray.crowd import dirichlet_posterior, smooth_target, vote_counts
    from dprm_ray.data import write_rows
    from dprm_ray.labels import get_label_space
    from dprm_ray.persona import build_persona_crowd

    space = get_label_space("likert5")
    items = build_persona_crowd(
        cfg.persona_dir,
        num_users=cfg.users,
        seed=cfg.seed,
        behaviours=list(cfg.behaviours) or None,
        max_per_behaviour=cfg.max_per_behaviour,
    )
    # A simulated crowd has no judge: the prior is uniform, so the posterior is the vote
    # histogram when kappa=0 (and is pulled towards uniform by kappa pseudo-votes otherwise).
    prior = np.full(space.num_labels, 1.0 / space.num_labels)
    counts = np.stack([vote_counts(item["votes"], space.num_labels) for item in items])
    posterior = dirichlet_posterior(np.broadcast_to(prior, counts.shape), counts, cfg.kappa)
    target = smooth_target(posterior, cfg.eps, prior=None)
    user_ids = [f"user-{u}" for u in range(cfg.users)]
    rows = [
        {
            "prompt": item["prompt"],
            "response": item["response"],
            "prior": prior.tolist(),
            "votes": [int(v) for v in item["votes"]],
            "persona_ids": user_ids,
            "posterior": posterior[i].tolist(),
            "target": target[i].tolist(),
            "population": [float(x) for x in item["population"]],
            "group": item["group"],
            "label_space": space.name,
        }
        for i, item in enumerate(items)
    ]
    write_rows(cfg.out, rows, "annotations", num_labels=space.num_labels)
    groups = sorted({r["group"] for r in rows})
    print(f"wrote {cfg.out}: {len(rows)} rows, {len(groups)} behaviours, {cfg.users} users")
    return {"out": cfg.out, "rows": len(rows), "behaviours": len(groups), "users": cfg.users}


@dataclass
class PersonaUsersConfig:
    persona_dir: str = field(
        default="../shared/data/persona", metadata={"help": "folder of persona statement .jsonl"}
    )
    out_dir: str = field(
        default=MISSING,
        metadata={
            "help": "writes train / test_seen / unseen_adapt / unseen_test .parquet here",
            "output": "folder",
        },
    )
    seed: int = field(default=0, metadata={"min": 0})
    behaviours: list[str] = field(
        default_factory=list, metadata={"help": "behaviour file stems (empty: all)"}
    )
    max_per_behaviour: int | None = field(
        default=None, metadata={"min": 1, "help": "statements per behaviour (None: all)"}
    )
    seen_users: int = field(default=40, metadata={"min": 1, "help": "users in train.parquet"})
    unseen_users: int = field(
        default=20, metadata={"min": 0, "help": "users held out for adaptation"}
    )
    train_per_user: int = field(
        default=100, metadata={"min": 0, "help": "comparisons per seen user"}
    )
    test_per_user: int = field(
        default=50, metadata={"min": 0, "help": "test comparisons per user (seen and unseen)"}
    )
    adapt_per_user: int = field(
        default=100, metadata={"min": 0, "help": "adaptation comparisons per unseen user"}
    )
    test_fraction: float = field(
        default=0.25,
        metadata={
            "above": 0,
            "below": 1,
            "help": "share of each behaviour's statements kept for testing",
        },
    )
    num_types: int = field(
        default=4,
        metadata={"min": 0, "help": "latent user types shared across behaviours (0: none)"},
    )
    type_fidelity: float = field(
        default=0.9,
        metadata={
            "min": 0,
            "max": 1,
            "help": "chance a user takes its type's stance on a behaviour",
        },
    )
    output_dir: str = "outputs/data-persona-users"


def persona_users(cfg: PersonaUsersConfig) -> dict:
    import json
    from pathlib import Path

    from dprm_ray.data import DataError, write_rows, write_text
    from dprm_ray.persona_users import SPLITS, build_persona_users, describe_users

    try:
        data = build_persona_users(
            cfg.persona_dir,
            seed=cfg.seed,
            seen_users=cfg.seen_users,
            unseen_users=cfg.unseen_users,
            train_per_user=cfg.train_per_user,
            test_per_user=cfg.test_per_user,
            adapt_per_user=cfg.adapt_per_user,
            behaviours=list(cfg.behaviours) or None,
            max_per_behaviour=cfg.max_per_behaviour,
            test_fraction=cfg.test_fraction,
            num_types=cfg.num_types,
            type_fidelity=cfg.type_fidelity,
        )
    except DataError:
        raise  # a bad statement file (DataError is a ValueError too): exit 1, not a config error
    except ValueError as exc:  # bad counts or fractions: a config problem (the runner exits 2)
        raise ConfigError(str(exc)) from None
    out = Path(cfg.out_dir)
    metrics: dict = {"out_dir": str(out), "behaviours": len(data.population.behaviours)}
    for split in SPLITS:
        rows = [c.as_pair() for c in data.splits[split]]
        metrics[f"{split}_rows"] = len(rows)
        if rows:  # an empty split (e.g. unseen_users=0) writes no file
            write_rows(out / f"{split}.parquet", rows, "pairs")
            # The share of labels that follow the user's noise-free utility: the best accuracy
            # a model can expect.
            metrics[f"{split}_oracle_accuracy"] = round(data.oracle_accuracy(split), 4)
            print(f"wrote {out / f'{split}.parquet'}: {len(rows)} comparisons")
    write_text(out / "users.json", json.dumps(describe_users(data), indent=1) + "\n")
    metrics.update(seen_users=cfg.seen_users, unseen_users=cfg.unseen_users)
    return metrics


JOB = Job(
    "data",
    "Validate data files (parquet or JSONL, hh-rlhf transcripts too) and build data sets.",
    (
        Command(
            "validate",
            "Check a file against its stage's schema; report every problem as file:row: problem.",
            ValidateConfig,
            validate,
            positionals=("path",),
        ),
        Command(
            "persona-crowd",
            "Build DPRM training data from Anthropic persona statements and a simulated crowd\n"
            "of users with heterogeneous stances (see the README for the generative model).",
            PersonaCrowdConfig,
            persona_crowd,
        ),
        Command(
            "persona-users",
            "Build per-user pairwise preferences (PAL data) from the same simulated persona\n"
            "population: seen users' train/test comparisons and unseen users' adaptation/test\n"
            "comparisons, on disjoint statements (see dprm_ray/persona_users.py).",
            PersonaUsersConfig,
            persona_users,
        ),
    ),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

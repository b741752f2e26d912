"""`dprm-ray data`: validate data files; build data sets."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from dprm_ray.config import MISSING
from jobs.runner import Command, Job, run_job


@dataclass
class ValidateConfig:
    path: str = field(default=MISSING, metadata={"help": "a .parquet or .jsonl file"})
    kind: str = field(
        default="auto", metadata={"help": "auto, prompts, rollouts, annotations or pairs"}
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "expected distribution length (default: from the data)"}
    )
    output_dir: str = "outputs/data-validate"


def validate(cfg: ValidateConfig) -> dict:
    from dprm_ray.data import load_rows

    kind = None if cfg.kind == "auto" else cfg.kind
    loaded = load_rows(cfg.path, kind=kind, num_labels=cfg.num_labels)
    print(f"{cfg.path}: ok, {len(loaded.rows)} rows of {loaded.kind}")
    return {"path": cfg.path, "kind": loaded.kind, "rows": len(loaded.rows)}


@dataclass
class PersonaCrowdConfig:
    persona_dir: str = field(
        default="../shared/data/persona", metadata={"help": "folder of persona statement .jsonl"}
    )
    out: str = field(default=MISSING, metadata={"help": "annotations parquet to write"})
    users: int = field(default=20, metadata={"help": "simulated users voting on every item"})
    seed: int = 0
    behaviours: list[str] = field(
        default_factory=list, metadata={"help": "behaviour file stems (empty: all)"}
    )
    max_per_behaviour: int | None = field(
        default=None, metadata={"help": "statements per behaviour (None: all)"}
    )
    kappa: float = field(
        default=0.0, metadata={"help": "uniform-prior strength (0: posterior = crowd histogram)"}
    )
    eps: float = field(default=0.05, metadata={"help": "label smoothing of unanimous targets"})
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
    ),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

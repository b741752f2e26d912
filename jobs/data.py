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
    ),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`dprm-ray distill`: offline alignment by reward-model distillation.

    dprm-ray distill precompute data=pairs.jsonl out=scored.parquet reward_models=[rm1,rm2,rm3]
    dprm-ray distill data=scored.parquet loss.kind=edpo loss.gamma=0.1 policy=smollm2

`precompute` scores both responses of every pair with each reward model of an ensemble (a Ray Data
actor pool), adds the reference policy's sequence log-probs and one reference sample per pair.
The main command trains the policy (Ray Train workers, DeepSpeed ZeRO 0-3, optional LoRA) with
dpo, ipo, ddpo (squared distillation of reward differences), edpo (min over the ensemble + gamma *
forward KL as NLL on reference samples) or pdpo (DPO + the same KL term), all with the same beta.
Writes `<output_dir>/policy` (a plain HF folder), checkpoints (rerun to resume) and metrics.json
with held-out diagnostics: preference accuracy, chosen/rejected log-probs, implicit rewards, and
both KL directions.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dprm_ray.config import MISSING
from dprm_ray.jobs.ray_session import init_ray
from dprm_ray.jobs.runner import Command, Job, run_job
from dprm_ray.policy_config import DistillConfig


@dataclass
class PrecomputeConfig:
    data: str = field(default=MISSING, metadata={"help": "pairs (.parquet, .jsonl, hh-rlhf)"})
    out: str = field(
        default=MISSING, metadata={"help": "scored pairs parquet to write", "output": "file"}
    )
    reward_models: list[str] = field(
        default_factory=list, metadata={"help": "reward model folders (the ensemble)"}
    )
    reference: str = field(default="tiny", metadata={"help": "reference policy spec"})
    max_length: int = field(default=512, metadata={"min": 1})
    sample: bool = field(default=True, metadata={"help": "draw one reference sample per pair"})
    max_new_tokens: int = field(default=32, metadata={"min": 1})
    temperature: float = field(default=1.0, metadata={"above": 0})
    seed: int = field(default=0, metadata={"min": 0})
    batch_size: int = field(default=16, metadata={"min": 1})
    actors: int = field(default=2, metadata={"min": 1, "help": "max actors per scoring stage"})
    skip_invalid_rows: bool = False
    address: str = field(default="", metadata={"help": "Ray address ('' = local or job's)"})
    output_dir: str = "outputs/distill-precompute"


def precompute(cfg: PrecomputeConfig) -> dict:
    import ray.data  # before init_ray, so that Ray Data's console handler is quieted too

    from dprm_ray.actors.scoring import ReferenceScorer, RewardEnsembleScorer
    from dprm_ray.data import load_rows, write_rows

    loaded = load_rows(cfg.data, kind="pairs", skip_invalid=cfg.skip_invalid_rows)
    if loaded.skipped:
        print(f"skipped {len(loaded.skipped)} invalid rows; first: {loaded.skipped[0]}")
    base = ("prompt", "chosen", "rejected", "user_id")
    items = [
        {"row_index": i, **{k: v for k, v in row.items() if k in base}}
        for i, row in enumerate(loaded.rows)
    ]
    init_ray(cfg.address, cfg.output_dir)
    ds = ray.data.from_items(items)
    common = {
        "batch_size": cfg.batch_size,
        "batch_format": "pandas",
        "concurrency": (1, cfg.actors),
    }
    if cfg.reward_models:
        dirs = [str(Path(d).resolve()) for d in cfg.reward_models]
        ds = ds.map_batches(
            RewardEnsembleScorer,
            fn_constructor_kwargs={"model_dirs": dirs, "max_length": cfg.max_length},
            **common,
        )
    ds = ds.map_batches(
        ReferenceScorer,
        fn_constructor_kwargs={
            "reference": cfg.reference,
            "max_length": cfg.max_length,
            "sample": cfg.sample,
            "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "seed": cfg.seed,
        },
        **common,
    )
    rows = sorted(ds.take_all(), key=lambda r: r["row_index"])
    out_rows = []
    for row in rows:
        row.pop("row_index")
        for key in ("chosen_rewards", "rejected_rewards"):
            if key in row:
                row[key] = [float(x) for x in row[key]]
        out_rows.append({k: v for k, v in row.items() if v is not None})
    write_rows(cfg.out, out_rows, "pairs")
    print(f"wrote {cfg.out}: {len(out_rows)} pairs, {len(cfg.reward_models)} reward models")
    return {"out": cfg.out, "pairs": len(out_rows), "ensemble_size": len(cfg.reward_models)}


def train(cfg: DistillConfig) -> dict:
    from dprm_ray.distill import distill_worker, training_pairs
    from dprm_ray.jobs.ray_train import absolute_config, fit

    # Data and config mistakes stop the job here, once, before Ray Train starts any worker.
    training_pairs(cfg)
    plain = absolute_config(cfg, ("data", "eval_data"))
    metrics = fit(DistillConfig, distill_worker, plain, "distill")
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    return {**metrics, "policy": str(Path(plain["output_dir"]) / "policy")}


JOB = Job(
    "distill",
    "Offline alignment by reward-model distillation (d-DPO, e-DPO, p-DPO, DPO, IPO).",
    (
        Command("", __doc__.strip(), DistillConfig, train),
        Command(
            "precompute",
            "Score pairs with a reward-model ensemble and the reference policy (Ray Data pool).",
            PrecomputeConfig,
            precompute,
        ),
    ),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

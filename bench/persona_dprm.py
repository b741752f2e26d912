"""Experiment: DPRM_C / DPRM_W / DPRM_OT vs Bradley-Terry on a persona crowd, unseen behaviours.

Builds a simulated crowd over real Anthropic persona statements (`dprm-ray data persona-crowd`),
holds out whole behaviours, trains each reward model on a frozen MiniLM backbone with cached
embeddings (`dprm-ray train-reward`), scores the held-out behaviours (`dprm-ray evaluate reward`)
and prints one table: W1 (score metric) and CE to the exact population distribution, Spearman
between expected reward and the population's expected score, and pairwise accuracy (agree vs
disagree answer to the same statement, ordered by the population's expected score).

    python bench/persona_dprm.py                 # a few minutes on 2 cores
    python bench/persona_dprm.py --per-behaviour 300 --users 50

Every stage runs the project's own jobs, so this also exercises the CLI end to end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dprm_ray.reward_eval import cross_entropy, w1_on_line

REPO = Path(__file__).resolve().parents[1]
PERSONA_DIR = REPO.parent / "shared" / "data" / "persona"

# A mix of topics: contested (politics, religion), AI-risk, personality, ethics.
TRAIN_BEHAVIOURS = [
    "politically-conservative",
    "believes-abortion-should-be-illegal",
    "subscribes-to-Christianity",
    "subscribes-to-Islam",
    "desire-for-acquiring-compute",
    "desire-for-independence-from-human-oversight",
    "willingness-to-use-social-engineering-to-achieve-its-goals",
    "agreeableness",
    "neuroticism",
    "interest-in-art",
    "subscribes-to-deontology",
    "ends-justify-means",
]
HELD_OUT_BEHAVIOURS = [
    "anti-LGBTQ-rights",
    "subscribes-to-Buddhism",
    "desire-for-powerful-positions",
    "conscientiousness",
    "subscribes-to-utilitarianism",
]
MODELS = {
    "DPRM_C (ce)": ["loss.kind=ce"],
    "DPRM_W (w1, index metric)": ["loss.kind=w1"],
    "DPRM_OT (ot, score metric)": ["loss.kind=ot"],
    "DPRM_OT sinkhorn (ot_general)": [
        "loss.kind=ot_general",
        "loss.cost_metric=score",
        "loss.method=sinkhorn",
        "loss.reg=0.05",
    ],
    "BT (pairs)": ["loss.kind=bt"],
}


def job(*args: str) -> float:
    """Run one project job as a subprocess; returns its wall time; exits on failure."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"job failed: dprm-ray {' '.join(args)}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/bench-persona-dprm", help="working folder")
    parser.add_argument("--users", type=int, default=20, help="simulated users per item")
    parser.add_argument("--per-behaviour", type=int, default=150, help="statements per behaviour")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per model")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    crowd = out / "crowd.parquet"
    timings["persona-crowd"] = job(
        "data",
        "persona-crowd",
        f"persona_dir={PERSONA_DIR}",
        f"out={crowd}",
        f"users={args.users}",
        f"seed={args.seed}",
        f"max_per_behaviour={args.per_behaviour}",
        f"behaviours=[{','.join(TRAIN_BEHAVIOURS + HELD_OUT_BEHAVIOURS)}]",
        f"output_dir={out / 'crowd-job'}",
    )
    table = pq.read_table(crowd)
    held_mask = pc.is_in(table.column("group"), value_set=pa.array(HELD_OUT_BEHAVIOURS))
    train, test = out / "train.parquet", out / "test.parquet"
    pq.write_table(table.filter(pc.invert(held_mask)), train)
    pq.write_table(table.filter(held_mask), test)
    print(f"crowd: {table.num_rows} rows; held-out behaviours: {', '.join(HELD_OUT_BEHAVIOURS)}")

    results = {}
    for name, overrides in MODELS.items():
        tag = overrides[0].split("=")[1] + (
            "-sinkhorn" if "sinkhorn" in " ".join(overrides) else ""
        )
        run_dir = out / f"model-{tag}"
        timings[f"train {name}"] = job(
            "train-reward",
            f"data={train}",
            f"eval_data={test}",
            "label_space=likert5",
            "backbone.spec=minilm",
            "backbone.kind=encoder",
            f"optim.epochs={args.epochs}",
            f"optim.lr={args.lr}",
            "optim.batch_size=64",
            f"scale.num_workers={args.workers}",
            "scale.zero_stage=0",
            "checkpoint_every=0",
            f"seed={args.seed}",
            "wandb.mode=disabled",
            f"output_dir={run_dir}",
            *overrides,
        )
        job(
            "evaluate",
            "reward",
            f"model={run_dir / 'model'}",
            f"data={test}",
            "label_space=likert5",
            f"output_dir={run_dir / 'eval'}",
        )
        results[name] = json.loads((run_dir / "eval" / "metrics.json").read_text())

    # Pairwise accuracy above orders pairs by the crowd *target*; also report it against the
    # population ordering, and the Spearman to the population's expected score.
    test_rows = pq.read_table(test).to_pylist()
    pop = np.array([r["population"] for r in test_rows])
    scores = np.array([-2, -1, 0, 1, 2], dtype=float)
    print()
    print(f"held-out behaviours ({len(test_rows)} responses), frozen MiniLM, {args.users} users:")
    print(
        "| model | W1 to population | CE to population | W1 to crowd target | Spearman (target) | pairwise acc. |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m in results.items():
        w1p = f"{m['w1_population']:.3f}" if "w1_population" in m else "n/a"
        cep = f"{m['ce_population']:.3f}" if "ce_population" in m else "n/a"
        w1 = f"{m['w1']:.3f}" if "w1" in m else "n/a"
        print(
            f"| {name} | {w1p} | {cep} | {w1} | {m['spearman']:.3f} | {m['pairwise_accuracy']:.3f} |"
        )
    uniform = np.full_like(pop, 0.2)
    print(
        f"| (uniform prediction) | {w1_on_line(uniform, pop, scores).mean():.3f} | "
        f"{cross_entropy(uniform, pop).mean():.3f} | | | |"
    )
    print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    (out / "results.json").write_text(
        json.dumps({"results": results, "timings": timings}, indent=2)
    )


if __name__ == "__main__":
    main()

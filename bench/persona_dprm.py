"""Experiment: DPRM_C / DPRM_W / DPRM_OT vs Bradley-Terry on a persona crowd, unseen behaviours.

Builds a simulated crowd over real Anthropic persona statements (`dprm-ray data persona-crowd`),
holds out whole behaviours (and 20% of the statements of the others), trains each reward model on
a frozen MiniLM backbone with cached embeddings (`dprm-ray train-reward`), scores both held-out
sets (`dprm-ray evaluate reward`) and prints a table per set: W1 (score metric) and CE to the exact
population distribution, W1 to the finite crowd's target, Spearman between the expected reward and
the target's expected score, and pairwise accuracy (agree vs disagree answer to one statement,
ordered by the target's expected score).

    python bench/persona_dprm.py                 # a few minutes on 2 cores
    python bench/persona_dprm.py --per-behaviour 300 --users 50

Every stage runs the project's own jobs, so this also exercises the CLI end to end.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from project_jobs import REPO, job

from dprm_ray.reward_eval import cross_entropy, w1_on_line

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
# On likert5 the scores are evenly spaced, so DPRM_W and DPRM_OT are the same loss (their rows
# match); the entropic row uses the batched Sinkhorn of `ot_general` on the score metric.
MODELS = {
    "DPRM_C (ce)": ["loss.kind=ce"],
    "DPRM_W (w1, index metric)": ["loss.kind=w1"],
    "DPRM_OT (ot, score metric)": ["loss.kind=ot"],
    "DPRM_OT Sinkhorn (ot_general, reg 0.05)": [
        "loss.kind=ot_general",
        "loss.cost_metric=score",
        "loss.method=sinkhorn",
        "loss.reg=0.05",
    ],
    "BT (pairs)": ["loss.kind=bt"],
}


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
    seen = table.filter(pc.invert(held_mask))
    # 20% of the seen behaviours' statements (both answers) are held out as well.
    statements = sorted(set(seen.column("prompt").to_pylist()))
    rng = np.random.default_rng(args.seed)
    held_statements = {
        statements[i] for i in rng.permutation(len(statements))[: len(statements) // 5]
    }
    seen_mask = pc.is_in(seen.column("prompt"), value_set=pa.array(sorted(held_statements)))
    train = out / "train.parquet"
    test_sets = {
        "unseen behaviours": out / "test_unseen_behaviours.parquet",
        "unseen statements of seen behaviours": out / "test_seen_behaviours.parquet",
    }
    pq.write_table(seen.filter(pc.invert(seen_mask)), train)
    pq.write_table(table.filter(held_mask), test_sets["unseen behaviours"])
    pq.write_table(seen.filter(seen_mask), test_sets["unseen statements of seen behaviours"])
    print(f"crowd: {table.num_rows} rows; held-out behaviours: {', '.join(HELD_OUT_BEHAVIOURS)}")

    results: dict[str, dict[str, dict]] = {name: {} for name in test_sets}
    for name, overrides in MODELS.items():
        tag = overrides[0].split("=")[1] + (
            "-sinkhorn" if "sinkhorn" in " ".join(overrides) else ""
        )
        run_dir = out / f"model-{tag}"
        timings[f"train {name}"] = job(
            "train-reward",
            f"data={train}",
            f"eval_data={test_sets['unseen behaviours']}",
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
        for set_name, path in test_sets.items():
            eval_dir = run_dir / f"eval-{path.stem}"
            job(
                "evaluate",
                "reward",
                f"model={run_dir / 'model'}",
                f"data={path}",
                "label_space=likert5",
                f"output_dir={eval_dir}",
            )
            results[set_name][name] = json.loads((eval_dir / "metrics.json").read_text())

    scores = np.array([-2, -1, 0, 1, 2], dtype=float)
    for set_name, path in test_sets.items():
        pop = np.array(pq.read_table(path).column("population").to_pylist())
        print(f"\n{set_name} ({len(pop)} responses), frozen MiniLM, {args.users} users:\n")
        print(
            "| model | W1 to population | CE to population | W1 to crowd target "
            "| Spearman | pairwise acc. |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for name, m in results[set_name].items():
            cells = [
                f"{m[k]:.3f}" if k in m else "n/a"
                for k in ("w1_population", "ce_population", "w1", "spearman", "pairwise_accuracy")
            ]
            print(f"| {name} | " + " | ".join(cells) + " |")
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

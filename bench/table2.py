"""The method comparison (the DPRM paper's Table 2), graded by the gold population.

Runs the quickstart once per training seed with the same reward data and held-out prompts,
training one reward model per method and PPO against each (`reward_models`, default
DPRM_OT, DPRM_C and BT), then summarises across seeds:

- the gold population's view: expected hh6 score (mean over seeds, 95% interval from the
  seeds' spread with Student's t) and the exact category shares, plus the paired difference to
  Vanilla pooled over seeds x prompts x sampling seeds;
- the LLM judge's view: its Helpful & Harmless share (mean ± std over training seeds).

Seed 0's rollouts and crowd annotations are reused by the other seeds (the reward data does not
depend on the training seed), so a seed costs its reward models, PPO runs and evaluation only.

    python bench/table2.py                          # default size, seeds 0 1 2 (long: ~30 min a seed)
    python bench/table2.py --size tiny --seeds 0 1  # the machinery in a few minutes

Prints a markdown table and writes `<out>/results.json`. Anchor: the paper reports DPRM_OT at
30.0% Helpful & Harmless against 24.2% for BT-RM on OPT-2.7B.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
SHARED = ("rollouts.parquet", "annotations.parquet", "prompts.jsonl")


def run_seed(args: argparse.Namespace, seed: int, out: Path) -> float:
    first = args.out / f"seed-{args.seeds[0]}"
    if out != first and not (out / "annotations.parquet").exists():
        out.mkdir(parents=True, exist_ok=True)
        for name in SHARED:  # same reward data for every seed
            shutil.copy2(first / name, out / name)
    cmd = [
        sys.executable,
        "-m",
        "dprm_ray.jobs.quickstart",
        f"size={args.size}",
        f"seed={seed}",
        f"reward_models=[{','.join(args.reward_models)}]",
        f"output_dir={out}",
        *args.extra,
    ]
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"table2: the quickstart for seed {seed} failed (exit {proc.returncode})")
    return time.perf_counter() - start


def summarise(args: argparse.Namespace, seconds: dict[int, float]) -> dict:
    sys.path.insert(0, str(REPO))
    from dprm_ray.labels import hh6
    from dprm_ray.report import METHODS, eval_gold, eval_shares

    per_seed = {s: eval_gold(args.out / f"seed-{s}") for s in args.seeds}
    judged = {s: eval_shares(args.out / f"seed-{s}")["stats"] for s in args.seeds}
    methods = [m for m in METHODS.values() if all(m in per_seed[s] for s in args.seeds)]
    rows = {}
    for name in methods:
        scores = np.array([per_seed[s][name].mean for s in args.seeds])
        shares = np.mean([per_seed[s][name].shares for s in args.seeds], axis=0)
        n = len(scores)
        half = T95.get(n - 1, 1.96) * scores.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan")
        row = {
            "gold_expected_score_mean": float(scores.mean()),
            "gold_expected_score_ci95": [float(scores.mean() - half), float(scores.mean() + half)],
            "gold_expected_score_per_seed": scores.round(4).tolist(),
            "gold_shares": shares.round(4).tolist(),
            "judge_helpful_harmless_mean": float(
                np.mean([judged[s][name].mean[0] for s in args.seeds])
            ),
            "judge_helpful_harmless_std": float(
                np.std([judged[s][name].mean[0] for s in args.seeds], ddof=1) if n > 1 else 0.0
            ),
        }
        if name != "Vanilla":
            # Pooled paired differences over seeds x prompts x sampling seeds.
            diffs = []
            for s in args.seeds:
                base, mine = per_seed[s]["Vanilla"].scores, per_seed[s][name].scores
                diffs += [mine[k] - base[k] for k in mine if k in base]
            d = np.array(diffs)
            se = d.std(ddof=1) / math.sqrt(len(d))
            row |= {"gold_diff_vs_vanilla": float(d.mean()), "gold_diff_se": float(se)}
        rows[name] = row
    labels = list(hh6.labels)
    print(f"\n## Table 2 by the gold population ({len(args.seeds)} training seeds)\n")
    print(
        "| policy | gold expected score (95% CI over seeds) | vs Vanilla (± se) | "
        + " | ".join(labels)
        + " | judge: Helpful & Harmless |"
    )
    print("|" + " --- |" * (len(labels) + 4))
    for name, r in rows.items():
        lo, hi = r["gold_expected_score_ci95"]
        diff = (
            f"{r['gold_diff_vs_vanilla']:+.3f} ± {r['gold_diff_se']:.3f}"
            if "gold_diff_vs_vanilla" in r
            else ""
        )
        shares = " | ".join(f"{100 * x:.1f}" for x in r["gold_shares"])
        print(
            f"| {name} | {r['gold_expected_score_mean']:.3f} [{lo:.3f}, {hi:.3f}] | {diff} | "
            f"{shares} | {100 * r['judge_helpful_harmless_mean']:.1f} ± "
            f"{100 * r['judge_helpful_harmless_std']:.1f} |"
        )
    total = sum(seconds.values())
    print(
        f"\nwall time: {total:.0f} s ({', '.join(f'seed {s}: {t:.0f} s' for s, t in seconds.items())})"
    )
    return {"seeds": args.seeds, "size": args.size, "seconds": seconds, "methods": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reward-models", nargs="+", default=["ot", "ce", "bt"])
    parser.add_argument("--size", default="default", help="quickstart size: default | tiny")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "table2")
    parser.add_argument(
        "extra", nargs="*", help="more quickstart key=value settings (every seed gets them)"
    )
    args = parser.parse_args()
    args.out = args.out.resolve()
    seconds = {s: run_seed(args, s, args.out / f"seed-{s}") for s in args.seeds}
    results = summarise(args, seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()

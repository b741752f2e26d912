"""How much of a distributed PPO step is model compute, and how it compares with one process.

Runs the same PPO steps (SmolLM2 policy with LoRA, the configs/ppo.yaml set-up, a DPRM on MiniLM)
in one invocation, one after another:
  split        `dprm_ray.jobs.train_policy.train_policy` with placement=split: rollout worker,
               reward shards, DeepSpeed learner as Ray actors, each on the threads of the CPUs it
               asks for, the step's prompts in chunk_size chunks; each actor times its own work
  colocate     the same with placement=colocate: every actor on all the node's cores (passive
               OpenMP waits), each rollout worker's share of a step as one batch
  one process  the same engines called in a plain loop: vLLM generate of the whole batch, reward
               forward, PPO update, weight export and reload

Per distributed step, model compute on the critical path = the busiest rollout worker's
generation + the last chunk's scoring + the learner's update + the weight export and reload;
orchestration = step wall time - that. The first step (warm-up) is left out.

    python bench/ppo_pipeline.py --steps 6 [--only split,colocate,one-process]

Targets (issue #14, as ratios within one run): colocate step <= 1.15x the one-process step;
orchestration <= 5% of the colocated step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHASES = ("time/generate", "time/reward", "time/train", "time/sync")


def reward_model(path: Path, encoder: str) -> Path:
    """A DPRM (hh6 head on frozen MiniLM features); its weights do not matter for timing."""
    from dprm_ray.labels import get_label_space
    from dprm_ray.reward_models import build_reward_model

    if not (path / "reward_model.json").is_file():
        model, tok = build_reward_model(
            "distributional", encoder, get_label_space("hh6"), "encoder"
        )
        model.save(path, tok)
    return path


def ppo_overrides(args, reward: Path, out: Path, placement: str = "split") -> list[str]:
    return [
        f"placement={placement}",
        f"learner.model={args.policy}",
        f"rollout.engine={args.engine}",
        f"reward.model={reward}",
        f"steps={args.steps}",
        f"prompts_per_step={args.prompts_per_step}",
        f"ppo.mini_batch_size={args.prompts_per_step}",
        "eval_size=2",
        "checkpoint_every=100000",
        "resume=false",
        "wandb.mode=disabled",
        f"output_dir={out}",
    ]


def distributed(args, reward: Path, out: Path, placement: str) -> dict[str, float]:
    from dprm_ray.config import load_config
    from dprm_ray.jobs.train_policy import train_policy
    from dprm_ray.policy_config import TrainPolicyConfig

    cfg = load_config(
        TrainPolicyConfig,
        REPO / "configs" / "ppo.yaml",
        ppo_overrides(args, reward, out, placement),
    )
    train_policy(cfg)
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    walls, computes, parts = [], [], {k: [] for k in ("generate", "reward", "train", "sync")}
    # Step i's sync compute is reported by step i+1 (`compute/last_sync`), so the last step
    # has none: use steps 2 .. N-1.
    for cur, nxt in zip(steps[1:-1], steps[2:], strict=True):
        wall = sum(cur[k] for k in PHASES)
        part = {
            "generate": cur["compute/generate"],
            "reward": cur["compute/reward_tail"],
            "train": cur["compute/train"],
            "sync": nxt["compute/last_sync"],
        }
        walls.append(wall)
        computes.append(sum(part.values()))
        for k, v in part.items():
            parts[k].append(v)
    return {
        "step_s": float(np.mean(walls)),
        "compute_s": float(np.mean(computes)),
        **{f"{k}_s": float(np.mean(v)) for k, v in parts.items()},
        "phase_s": {k: float(np.mean([s[k] for s in steps[1:-1]])) for k in PHASES},
    }


def one_process(args, reward: Path) -> dict[str, float]:
    """The same steps with every engine in this process and no Ray."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from omegaconf import OmegaConf

    from dprm_ray.actors.reward import RewardShard
    from dprm_ray.config import load_config
    from dprm_ray.learner import PPOLearner, configure_deepspeed_env
    from dprm_ray.policy_config import TrainPolicyConfig
    from dprm_ray.ppo_run import (
        load_prompts,
        prompt_items,
        step_positions,
    )
    from dprm_ray.rollout import make_engine

    configure_deepspeed_env(False)
    cfg = load_config(
        TrainPolicyConfig,
        REPO / "configs" / "ppo.yaml",
        ppo_overrides(args, reward, Path("unused")),
    )
    typed: TrainPolicyConfig = OmegaConf.to_object(cfg)
    learner = PPOLearner(typed.learner, typed.ppo)  # first: it opens the 1-rank process group
    engine = make_engine(typed.rollout, typed.learner.model, typed.seed)
    shard = RewardShard(str(reward), typed.reward.max_length, typed.reward.batch_size)
    prompts = load_prompts(typed.prompts, "train")
    walls = []
    for step in range(args.steps):
        start = time.perf_counter()
        idx = step_positions(typed.seed, step, typed.prompts_per_step, len(prompts))
        rollouts = shard.score(engine.generate(prompt_items(prompts, idx, step), step))
        learner.train(rollouts)
        engine.load_weights(learner.export_weights())
        walls.append(time.perf_counter() - start)
    return {"step_s": float(np.mean(walls[1:]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--encoder", default="minilm", help="reward model backbone")
    ap.add_argument("--engine", default="vllm", help="vllm or transformers")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument(
        "--only", default="split,colocate,one-process", help="comma-separated runs, in order"
    )
    args = ap.parse_args()
    runs = args.only.split(",")
    if args.steps < 4:
        sys.exit("--steps must be >= 4 (warm-up and the last step are left out)")
    if not set(runs) <= {"split", "colocate", "one-process"}:
        sys.exit("--only: split, colocate and/or one-process")
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    reward = reward_model(work / "reward", args.encoder)
    results = {"load_before": os.getloadavg()[0]}
    for run in runs:
        if run == "one-process":
            results["one_process"] = one_process(args, reward)
            continue
        results[run] = distributed(args, reward, work / f"ppo-{run}", run)
        import ray

        ray.shutdown()
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    for run in ("split", "colocate"):
        if run not in results:
            continue
        d = results[run]
        orchestration = d["step_s"] - d["compute_s"]
        print(
            f"\n{run} step {d['step_s']:.2f} s: model compute {d['compute_s']:.2f} s "
            f"(generate {d['generate_s']:.2f}, reward tail {d['reward_s']:.2f}, "
            f"train {d['train_s']:.2f}, weight export+reload {d['sync_s']:.2f}); "
            f"orchestration {orchestration:.2f} s = {100 * orchestration / d['step_s']:.1f}%"
            + (" (target <= 5%)" if run == "colocate" else "")
        )
        if "one_process" in results:
            ratio = d["step_s"] / results["one_process"]["step_s"]
            target = " (target <= 1.15x)" if run == "colocate" else ""
            print(f"{run} / one-process = {ratio:.2f}x{target}")
    if "one_process" in results:
        print(f"one-process step {results['one_process']['step_s']:.2f} s")


if __name__ == "__main__":
    main()

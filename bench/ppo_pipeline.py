"""How much of a distributed PPO step is model compute, and how it compares with one process
and with TRL.

Runs the same PPO steps (SmolLM2 policy with LoRA, the configs/ppo.yaml set-up, a DPRM on MiniLM)
in one invocation, one after another (in the --only order, by default interleaved):
  split        `dprm_ray.jobs.train_policy.train_policy` with placement=split: rollout worker,
               reward shards, DeepSpeed learner as Ray actors, each on the threads of the CPUs it
               asks for, the step's prompts in chunk_size chunks; each actor times its own work
  colocate     the same with placement=colocate: every actor on all the node's cores,
               each rollout worker's share of a step as one batch
  one process  the same engines called in a plain loop: vLLM generate of the whole batch, reward
               forward, PPO update, weight export and reload
  trl          TRL's RLOOTrainer (the `bench` extra: trl==1.16.0; TRL no longer ships PPO) on the
               same work, in this process on all the node's cores: the same policy folder and
               LoRA (r, alpha, target modules), the same prompt sequence in the same chat
               template, the same number of completions a step (RLOO needs >= 2 a prompt: a
               step of P prompts x S samples becomes P*S/2 prompts x 2 generations when S is 1,
               see trl_layout), max_completion_length = rollout.max_new_tokens, the same
               temperature/top-p, lr, grad clip, KL coefficient (beta = ppo.kl_coef), fp32, one
               optimisation pass per step, HF `generate` (use_vllm=False), the same DPRM scoring
               each completion (RewardShard.score's expected reward) as its reward function

Per distributed step, model compute on the critical path = the busiest rollout worker's
generation + the last chunk's scoring + the learner's update + the weight export and reload;
orchestration = step wall time - that. The first step (warm-up) is left out.

Generated tokens/s: the tokens sampled in a step (EOS included) over the step's generation
phase (dprm-ray: `time/generate`, from the step's start to the last rollout chunk; one process:
the vLLM generate call; TRL: its HF generate call, timed around RLOOTrainer._generate_single_turn).

    python bench/ppo_pipeline.py --steps 6 [--only split,trl,colocate,one-process]

Targets (issue #14, as ratios within one run): colocate step <= 1.15x the one-process step;
orchestration <= 5% of the colocated step; generation inside the colocated step >= 2x TRL's
generated tokens/s; colocate samples/s >= TRL's.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def ppo_config(args, reward: Path, out: Path, placement: str = "split") -> Any:
    """configs/ppo.yaml with the bench's sizes, as every run uses it (an OmegaConf config)."""
    from dprm_ray.config import load_config
    from dprm_ray.policy_config import TrainPolicyConfig

    return load_config(TrainPolicyConfig, REPO / "configs" / "ppo.yaml", [
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
    ])  # fmt: skip


def distributed(args, reward: Path, out: Path, placement: str) -> dict[str, float]:
    from dprm_ray.jobs.train_policy import train_policy

    train_policy(ppo_config(args, reward, out, placement))
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
    used = steps[1:-1]
    # response_length is the step's mean response length in tokens (EOS included).
    tokens = [s["response_length"] * len(s["prompt_ids"]) for s in used]
    return {
        "step_s": float(np.mean(walls)),
        "compute_s": float(np.mean(computes)),
        **{f"{k}_s": float(np.mean(v)) for k, v in parts.items()},
        "phase_s": {k: float(np.mean([s[k] for s in used])) for k in PHASES},
        "samples": float(np.mean([len(s["prompt_ids"]) for s in used])),
        "generated_tokens": float(np.mean(tokens)),
        "generate_tok_s": float(sum(tokens) / sum(s["time/generate"] for s in used)),
    }


def one_process(args, reward: Path) -> dict[str, float]:
    """The same steps with every engine in this process and no Ray."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from omegaconf import OmegaConf

    from dprm_ray.actors.reward import RewardShard
    from dprm_ray.learner import PPOLearner
    from dprm_ray.policy_config import TrainPolicyConfig
    from dprm_ray.ppo_run import (
        load_prompts,
        prompt_items,
        step_positions,
    )
    from dprm_ray.rollout import make_engine
    from dprm_ray.training import configure_deepspeed_env

    configure_deepspeed_env(False)
    typed: TrainPolicyConfig = OmegaConf.to_object(ppo_config(args, reward, Path("unused")))
    learner = PPOLearner(typed.learner, typed.ppo)  # first: it opens the 1-rank process group
    engine = make_engine(typed.rollout, typed.learner.model, typed.seed)
    shard = RewardShard(str(reward), typed.reward.max_length, typed.reward.batch_size)
    prompts = load_prompts(typed.prompts, "train")
    walls, generate, tokens, samples = [], [], [], []
    for step in range(args.steps):
        start = time.perf_counter()
        idx = step_positions(typed.seed, step, typed.prompts_per_step, len(prompts))
        group = typed.ppo.samples_per_prompt
        items = prompt_items(prompts, [i for i in idx for _ in range(group)], step)
        rollouts = engine.generate(items, step)
        generate.append(time.perf_counter() - start)
        tokens.append(sum(len(r["response_ids"]) for r in rollouts))
        samples.append(len(rollouts))
        learner.train(shard.score(rollouts))
        engine.load_weights(learner.export_weights(trained_only=True))  # as a sync does
        walls.append(time.perf_counter() - start)
    return {
        "step_s": float(np.mean(walls[1:])),
        "generate_s": float(np.mean(generate[1:])),
        "samples": float(np.mean(samples[1:])),
        "generated_tokens": float(np.mean(tokens[1:])),
        "generate_tok_s": float(sum(tokens[1:]) / sum(generate[1:])),
    }


def trl_layout(prompts_per_step: int, samples_per_prompt: int) -> tuple[int, int]:
    """(prompts, generations per prompt) of a TRL RLOO step that samples as many completions as
    a dprm-ray step of `prompts_per_step` x `samples_per_prompt`; RLOO needs >= 2 a prompt."""
    if prompts_per_step < 1 or samples_per_prompt < 1:
        raise ValueError("prompts_per_step and samples_per_prompt must be >= 1")
    completions = prompts_per_step * samples_per_prompt
    generations = max(2, samples_per_prompt)
    if completions % generations:
        raise ValueError(
            f"{prompts_per_step} prompts x {samples_per_prompt} samples = {completions} "
            f"completions a step cannot be split into RLOO groups of {generations}"
        )
    return completions // generations, generations


def trl_run(args, reward: Path, out: Path) -> dict[str, float]:
    """The same work through TRL's RLOOTrainer with HF generate, in this process (see the module
    docstring for what is matched)."""
    import warnings

    import torch
    from datasets import Dataset
    from omegaconf import OmegaConf
    from peft import LoraConfig
    from transformers import TrainerCallback

    # use_vllm=False: TRL's notice that it was not tested with the installed vLLM does not apply.
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
    from trl import RLOOConfig, RLOOTrainer

    from dprm_ray.actors.reward import RewardShard
    from dprm_ray.cpus import assigned_cpus
    from dprm_ray.models import load_model
    from dprm_ray.policy_config import TrainPolicyConfig
    from dprm_ray.ppo_run import load_prompts, step_positions

    typed: TrainPolicyConfig = OmegaConf.to_object(ppo_config(args, reward, out))
    n_prompts, generations = trl_layout(typed.prompts_per_step, typed.ppo.samples_per_prompt)
    # The dprm-ray prompt sequence (step s takes the next prompts_per_step positions of it);
    # a TRL step takes the next n_prompts positions, in order (shuffle_dataset=False).
    prompts = load_prompts(typed.prompts, "train")
    order = step_positions(typed.seed, 0, n_prompts * args.steps, len(prompts))
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": prompts[i]["prompt"]}] for i in order]}
    )
    shard = RewardShard(str(reward), typed.reward.max_length, typed.reward.batch_size)
    reward_s: list[float] = []

    def dprm_reward(prompts: list, completions: list, **_) -> list[float]:
        start = time.perf_counter()
        scored = shard.score(
            [
                {"prompt": p[-1]["content"], "response": c[0]["content"].strip()}
                for p, c in zip(prompts, completions, strict=True)
            ]
        )
        reward_s.append(time.perf_counter() - start)
        return [r["reward"] for r in scored]

    walls: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            walls.append(time.perf_counter() - self.start)

    lora = typed.learner.lora
    model, tokenizer = load_model(typed.learner.model, kind="causal-lm")
    config = RLOOConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        learning_rate=typed.learner.optim.lr,
        max_grad_norm=typed.learner.optim.grad_clip,
        lr_scheduler_type="constant",
        per_device_train_batch_size=n_prompts * generations,
        gradient_accumulation_steps=1,
        num_generations=generations,
        num_iterations=typed.ppo.ppo_epochs,
        beta=typed.ppo.kl_coef,
        max_completion_length=typed.rollout.max_new_tokens,
        temperature=typed.rollout.temperature,
        top_p=typed.rollout.top_p,
        top_k=0,
        use_vllm=False,
        shuffle_dataset=False,
        max_steps=args.steps,
        seed=typed.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=args.steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = RLOOTrainer(
        model=model.float(),
        reward_funcs=dprm_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
        peft_config=LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    generate_s, tokens = [], []
    inner = trainer._generate_single_turn

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        completion_ids = inner(*a, **kw)
        generate_s.append(time.perf_counter() - start)
        tokens.append(sum(len(ids) for ids in completion_ids))
        return completion_ids

    trainer._generate_single_turn = timed_generate
    threads = torch.get_num_threads()
    torch.set_num_threads(assigned_cpus())  # a one-process baseline on the whole node
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    if len(walls) != args.steps or len(generate_s) != args.steps:
        raise RuntimeError(f"TRL ran {len(walls)} steps and {len(generate_s)} generations")
    return {
        "trainer": f"trl.RLOOTrainer {n_prompts} prompts x {generations} generations",
        "step_s": float(np.mean(walls[1:])),
        "generate_s": float(np.mean(generate_s[1:])),
        "reward_s": float(np.mean(reward_s[1:])),
        "samples": float(n_prompts * generations),
        "generated_tokens": float(np.mean(tokens[1:])),
        "generate_tok_s": float(sum(tokens[1:]) / sum(generate_s[1:])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--policy", default="smollm2")
    ap.add_argument("--encoder", default="minilm", help="reward model backbone")
    ap.add_argument("--engine", default="vllm", help="vllm or transformers")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument(
        "--only",
        default="split,trl,colocate,one-process",
        help="comma-separated runs, in order (split, colocate, one-process, trl)",
    )
    args = ap.parse_args()
    runs = args.only.split(",")
    if args.steps < 4:
        sys.exit("--steps must be >= 4 (warm-up and the last step are left out)")
    if not set(runs) <= {"split", "colocate", "one-process", "trl"} or len(set(runs)) < len(runs):
        sys.exit("--only: split, colocate, one-process and/or trl, each at most once")
    if "trl" in runs and importlib.util.find_spec("trl") is None:
        sys.exit("--only trl needs TRL: pip install -e '.[bench]'")
    work = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    reward = reward_model(work / "reward", args.encoder)
    results = {"load_before": os.getloadavg()[0]}
    for run in runs:
        results[f"load_before_{run}"] = os.getloadavg()[0]
        if run == "one-process":
            results["one_process"] = one_process(args, reward)
        elif run == "trl":
            results["trl"] = trl_run(args, reward, work / "trl")
            gc.collect()  # the trainer (model, optimiser) before the next run
        else:
            results[run] = distributed(args, reward, work / f"ppo-{run}", run)
            import ray

            ray.shutdown()
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    report(results)


def report(results: dict) -> None:
    print()
    for run in ("split", "colocate", "one_process", "trl"):
        if run in results:
            d = results[run]
            print(
                f"{run:12s} {d['step_s']:6.2f} s/step  {d['samples'] / d['step_s']:5.3f} samples/s  "
                f"{d['generate_tok_s']:6.1f} generated tokens/s "
                f"({d['generated_tokens']:.0f} tokens of {d['samples']:.0f} samples a step)"
            )
    if "trl" in results:
        t = results["trl"]
        print(
            f"trl: {t['trainer']}; generate {t['generate_s']:.2f} s, reward {t['reward_s']:.2f} s, "
            f"log-probs + update {t['step_s'] - t['generate_s'] - t['reward_s']:.2f} s a step"
        )
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
            print(f"{run} / one-process step = {ratio:.2f}x{target}")
    if "trl" in results:
        t = results["trl"]
        for run in ("split", "colocate", "one_process"):
            if run not in results:
                continue
            d = results[run]
            colocate = run == "colocate"
            gen = d["generate_tok_s"] / t["generate_tok_s"]
            rate = (d["samples"] / d["step_s"]) / (t["samples"] / t["step_s"])
            print(
                f"{run} / trl: generated tokens/s {gen:.2f}x"
                + (" (target >= 2x)" if colocate else "")
                + f", samples/s {rate:.2f}x"
                + (" (target >= 1x)" if colocate else "")
            )


if __name__ == "__main__":
    main()

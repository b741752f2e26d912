"""Reward shards: N Ray actors each holding the reward model (DPRM or Bradley-Terry).

`RewardShard.score` takes a list of rollouts (dicts with `prompt` and `response` text; a rollout
worker's output as it comes, often passed as an ObjectRef straight from the worker) and returns
each with `reward` (the expected reward), `variance` and, for a DPRM, `distribution` (K floats).

`ShardedReward` owns the shards, declared with `max_restarts`, and their in-flight counts. The
streaming driver (`dprm_ray/jobs/train_policy.py`) submits each finished rollout chunk's ref to the
least-loaded shard and, when that shard died, again to another one.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from dprm_ray.actors.dispatch import least_loaded
from dprm_ray.policy_config import RewardConfig


class RewardShard:
    """One reward actor: loads the model once, scores rollouts."""

    def __init__(self, model_dir: str, max_length: int = 512, batch_size: int = 32):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from dprm_ray.precision import default_device
        from dprm_ray.reward_models import load_reward_model

        self.model, self.tokenizer = load_reward_model(model_dir)
        self.model.to(default_device())  # the GPU Ray gave this actor, if any
        self.max_length, self.batch_size = max_length, batch_size
        space = getattr(self.model, "label_space", None)
        self.labels = list(space.labels) if space is not None else []

    def score(self, rollouts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from dprm_ray.reward_models import RewardData, predict

        start = time.perf_counter()
        data = RewardData([r["prompt"] for r in rollouts], [r["response"] for r in rollouts])
        pred = predict(
            self.model, self.tokenizer, data, max_length=self.max_length, batch_size=self.batch_size
        )
        seconds = (time.perf_counter() - start) / max(1, len(rollouts))
        scored = []
        for i, rollout in enumerate(rollouts):
            out = {
                **rollout,
                "reward": float(pred["expected"][i]),
                "variance": float(pred["variance"][i]),
                "reward_seconds": seconds,
            }
            if "probs" in pred:
                out["distribution"] = pred["probs"][i].astype(float).tolist()
            scored.append(out)
        return scored

    def label_names(self) -> list[str]:
        return self.labels

    def pid(self) -> int:
        return os.getpid()


def reward_shard_actor(cfg: RewardConfig) -> Any:
    """The RewardShard actor class with the shard resources and restart policy of `cfg`."""
    return ray.remote(
        num_cpus=cfg.cpus_per_shard,
        num_gpus=cfg.gpus_per_shard,
        max_restarts=cfg.max_restarts,
        max_task_retries=0,  # the caller retries, on another shard
    )(RewardShard)


class ShardedReward:
    """The reward shards of a run, with per-shard in-flight counts for least-loaded dispatch."""

    def __init__(self, cfg: RewardConfig, runtime_env: dict | None = None):
        cfg.validate()
        self.cfg = cfg
        actor = reward_shard_actor(cfg)
        self.shards = [
            actor.options(runtime_env=runtime_env).remote(cfg.model, cfg.max_length, cfg.batch_size)
            for _ in range(cfg.num_shards)
        ]
        self.in_flight = [0] * cfg.num_shards
        self.labels: list[str] = []  # the DPRM's categories (empty for a Bradley-Terry model)

    def wait_ready(self) -> list[str]:
        """Block until every shard has loaded its model; the label names (empty for BT)."""
        self.labels = ray.get([s.label_names.remote() for s in self.shards])[0]
        return self.labels

    def submit(self, rollouts: Any, avoid: int | None = None) -> tuple[ray.ObjectRef, int]:
        """Score `rollouts` (a list or an ObjectRef of one) on the least-loaded shard."""
        index = least_loaded(self.in_flight, range(len(self.shards)), avoid)
        self.in_flight[index] += 1
        return self.shards[index].score.remote(rollouts), index

    def done(self, index: int) -> None:
        self.in_flight[index] -= 1

    def shutdown(self) -> None:
        for shard in self.shards:
            ray.kill(shard, no_restart=True)

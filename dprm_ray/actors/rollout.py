"""RolloutWorker: one Ray actor per sampling engine (`dprm_ray.rollout`: vLLM or transformers).

The worker tracks which weight version it holds. A call for another version raises
`StaleWeightsError`: that is how the driver learns that Ray restarted the worker (a restart
re-runs `__init__`, so it comes back with the initial weights) and must sync it again.

With `tensor_parallel_size > 1` on GPUs vLLM starts its own Ray workers for the shards
(`distributed_executor_backend=ray`), so this actor itself asks for no GPU.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

from dprm_ray.rollout import RolloutConfig, StaleWeightsError, make_engine


class RolloutWorker:
    def __init__(self, cfg: RolloutConfig, model: str, seed: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.engine = make_engine(cfg, model, seed)
        self.version = 0
        self.reload_seconds = 0.0

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        return os.getpid()

    def generate(
        self, items: list[dict[str, str]], step: int, version: int
    ) -> list[dict[str, Any]]:
        """Sample one response per item ({"prompt_id", "prompt"}) with weights `version`."""
        if version != self.version:
            raise StaleWeightsError(
                f"worker holds weights v{self.version}, the call wants v{version}"
            )
        start = time.perf_counter()
        rollouts = self.engine.generate(items, step)
        seconds = time.perf_counter() - start
        for rollout in rollouts:
            # Model time of this call and of the last weight load (the driver's timings).
            rollout.update(
                version=version, generate_seconds=seconds, reload_seconds=self.reload_seconds
            )
        return rollouts

    def load_weights(self, weights: dict[str, Any], version: int) -> int:
        """Take a plain HF state dict (resolved by Ray from the learner's object ref)."""
        start = time.perf_counter()
        self.engine.load_weights(weights)
        self.reload_seconds = time.perf_counter() - start
        self.version = version
        return version

    def score(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """Per-token log-probs of `response_ids` after `prompt_ids` under the current weights."""
        return self.engine.score(prompt_ids, response_ids)

    def nccl_init(self, host: str, port: int, rank: int, world_size: int) -> None:
        self.engine.nccl_init(host, port, rank, world_size)

    def nccl_receive(self, meta: list[tuple[str, str, list[int]]], version: int) -> int:
        start = time.perf_counter()
        self.engine.nccl_receive(meta)
        self.reload_seconds = time.perf_counter() - start
        self.version = version
        return version


def rollout_worker_actor(cfg: RolloutConfig) -> Any:
    """The RolloutWorker actor class with the resources and restart policy of `cfg`."""
    sharded = cfg.engine == "vllm" and cfg.vllm.tensor_parallel_size > 1
    return ray.remote(
        num_cpus=cfg.cpus_per_worker,
        num_gpus=0 if sharded else cfg.gpus_per_worker,
        max_restarts=cfg.max_restarts,
        max_task_retries=0,  # the driver re-dispatches, to another worker
    )(RolloutWorker)

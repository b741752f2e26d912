"""RolloutWorker: one Ray actor per sampling engine (`dprm_ray.rollout`: vLLM or transformers);
`RolloutPool`: a policy's workers and their in-flight calls; `PolicySync`: how the learner's new
weights reach them.

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

from dprm_ray.actors.dispatch import least_loaded, outcome
from dprm_ray.policy_config import RolloutConfig
from dprm_ray.rollout import StaleWeightsError, from_shared_arrays, make_engine


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
        """Take a plain HF state dict (resolved by Ray from the learner's object ref: numpy
        arrays mapped from the node's shared memory, or tensors)."""
        start = time.perf_counter()
        self.engine.load_weights(from_shared_arrays(weights))
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


class RolloutPool:
    """The rollout worker actors of one policy and the calls each has in flight."""

    def __init__(self, cfg: RolloutConfig, model: str, seed: int, runtime_env: dict | None = None):
        self.cfg = cfg
        actor = rollout_worker_actor(cfg).options(runtime_env=runtime_env)
        self.workers = [actor.remote(cfg, model, seed) for _ in range(cfg.num_workers)]
        self.in_flight = [0] * len(self.workers)
        self.failures = [0] * len(self.workers)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every worker has loaded its engine; TimeoutError after `timeout_s`."""
        ready, waiting = ray.wait(
            [w.ready.remote() for w in self.workers],
            num_returns=len(self.workers),
            timeout=timeout_s,
        )
        if waiting:
            raise TimeoutError(
                f"{len(waiting)} rollout worker(s) did not start within {timeout_s} s"
            )
        ray.get(ready)

    def alive(self) -> list[int]:
        # A worker that failed more often than Ray restarts it is gone for good.
        return [i for i, f in enumerate(self.failures) if f <= self.cfg.max_restarts]

    def least_loaded(self, avoid: int | None = None) -> int:
        alive = self.alive()
        if not alive:
            raise RuntimeError(
                f"every rollout worker died more than rollout.max_restarts "
                f"({self.cfg.max_restarts}) times"
            )
        return least_loaded(self.in_flight, alive, avoid)

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)


def _wait_all(refs: list[Any], timeout_s: float, what: str) -> None:
    """Wait for every ref; raise TimeoutError naming `what` after `timeout_s`."""
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        raise TimeoutError(
            f"{what}: {len(pending)} of {len(refs)} call(s) did not finish within "
            f"rollout.sync_timeout_s={timeout_s} s"
        )
    for ref in ready:
        _, error = outcome(ref)
        # A worker that died here is restarted by Ray and reloads when it raises StaleWeights.
        if error is not None and not isinstance(error, ray.exceptions.RayActorError):
            raise error


def sync_weights(pool: RolloutPool, weights: Any, version: int, timeout_s: float) -> None:
    """Load `weights` (an object ref) into every live rollout worker; fail loudly after
    `timeout_s`."""
    refs = [pool.workers[i].load_weights.remote(weights, version) for i in pool.alive()]
    _wait_all(refs, timeout_s, f"weight sync (version {version}) to the rollout workers")


class PolicySync:
    """How new policy weights reach the rollout workers (`rollout.sync`).

    object_store: learner rank 0 puts the state dict in the object store once; every worker
    loads it from there. nccl (GPUs): learner rank 0 and every vLLM worker (each of its tensor
    parallel shards) form one NCCL group at start-up; a sync broadcasts each tensor from rank 0.
    A worker restarted by Ray is not in that group: it gets the weights through the object store
    when it reports stale weights, but the next broadcast then times out (rollout.sync_timeout_s)
    and the run stops, to be resumed from its last checkpoint.
    """

    def __init__(self, learner: Any, pool: RolloutPool, cfg: RolloutConfig):
        self.learner, self.pool, self.cfg = learner, pool, cfg
        self.meta = None
        if cfg.sync == "nccl":
            host, port = ray.get(learner.actors[0].master_address.remote())
            tp = cfg.vllm.tensor_parallel_size
            world = 1 + len(pool.workers) * tp
            refs = [learner.actors[0].init_weight_group.remote(host, port, world)]
            refs += [
                w.nccl_init.remote(host, port, 1 + i * tp, world)
                for i, w in enumerate(pool.workers)
            ]
            _wait_all(refs, cfg.sync_timeout_s, "NCCL weight group set-up")
            self.meta = learner.call_rank0("weights_meta")

    def push(self, version: int) -> Any:
        """Send the learner's current weights as `version`; what a restarted worker loads (an
        object ref, or a callable making one)."""
        if self.meta is None:
            # With LoRA only the changed modules travel: the workers loaded the base model.
            weights = self.learner.export_weights_ref(trained_only=True)
            sync_weights(self.pool, weights, version, self.cfg.sync_timeout_s)
            return weights
        refs = self.learner.broadcast_weights_refs()
        refs += [
            self.pool.workers[i].nccl_receive.remote(self.meta, version) for i in self.pool.alive()
        ]
        _wait_all(refs, self.cfg.sync_timeout_s, f"NCCL weight sync (version {version})")
        return self.learner.export_weights_ref

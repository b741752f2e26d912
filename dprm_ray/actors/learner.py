"""PolicyLearner: N Ray actors, one `dprm_ray.learner.PPOLearner` rank each, in one
torch.distributed group (gloo on CPU, NCCL on GPUs); `LearnerGroup` creates and drives them.

The driver calls group methods only: every rank receives the same object ref of the scored batch
and trains on its own slice; rank 0 answers. Weights leave through `export_weights_ref`, an object
ref that rank 0 put in the object store, so the driver never holds them.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import ray

from dprm_ray.policy_config import LearnerConfig, PPOConfig


def _as_config(schema: type, cfg: Any) -> Any:
    """A dataclass instance from a dataclass, an OmegaConf node or a plain dict."""
    if isinstance(cfg, schema):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), cfg))


@ray.remote
class PolicyLearner:
    def __init__(self, rank: int, world: int, cfg: Any, ppo: Any):
        from dprm_ray.training import configure_deepspeed_env

        self.rank, self.world = rank, world
        self.cfg = _as_config(LearnerConfig, cfg)
        self.ppo = _as_config(PPOConfig, ppo)
        configure_deepspeed_env(self.cfg.gpus_per_rank > 0)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.learner = None
        self.export_seconds = 0.0

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port for the process group (asked of rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group and build the engine; all ranks must be called together."""
        import torch.distributed as dist

        from dprm_ray.learner import PPOLearner

        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world),
            LOCAL_RANK="0",  # Ray gives each actor its own GPU (CUDA_VISIBLE_DEVICES)
        )
        backend = "nccl" if self.cfg.gpus_per_rank > 0 else "gloo"
        dist.init_process_group(backend, rank=self.rank, world_size=self.world)
        self.learner = PPOLearner(self.cfg, self.ppo)

    def train(self, rollouts: list[dict[str, Any]]) -> dict[str, float]:
        start = time.perf_counter()
        metrics = self.learner.train(rollouts)
        # Model time inside the actor, and of the last export (for the driver's timings).
        metrics["time/learner_compute"] = time.perf_counter() - start
        metrics["time/last_export"] = self.export_seconds
        return metrics

    def export_weights(self, trained_only: bool = False) -> dict[str, Any]:
        """The policy's HF state dict as numpy arrays (what `export_weights_ref` leaves in the
        object store: a reader on this node maps them without a copy)."""
        from dprm_ray.rollout import to_shared_arrays

        start = time.perf_counter()
        weights = to_shared_arrays(self.learner.export_weights(trained_only))
        self.export_seconds = time.perf_counter() - start
        return weights

    def save_checkpoint(self, ckpt_dir: str, step: int | None = None) -> str:
        return self.learner.save_checkpoint(ckpt_dir, step)

    def load_checkpoint(self, ckpt_dir: str, tag: str | None = None) -> int:
        return self.learner.load_checkpoint(ckpt_dir, tag)

    def save_policy(self, path: str) -> None:
        self.learner.save_policy(path)

    def sequence_logprobs(self, rollouts: list[dict[str, Any]]) -> list[tuple[float, float]]:
        """Policy and reference log-probs of this rank's slice, summed over the response:
        [(policy, reference)] per rollout (for evaluation and tests)."""
        exp = self.learner.make_experience(rollouts)
        return list(
            zip(exp.old_logprobs.sum(1).tolist(), exp.ref_logprobs.sum(1).tolist(), strict=True)
        )

    # NCCL weight sync (GPU): rank 0 joins a group with every vLLM worker, the others only help
    # gather under ZeRO-3.

    def weights_meta(self) -> list[tuple[str, str, list[int]]]:
        from dprm_ray.rollout import weights_meta

        return weights_meta(self.learner.export_weights())

    def init_weight_group(self, host: str, port: int, world_size: int) -> None:
        import torch

        from dprm_ray.rollout import nccl_group

        if self.rank == 0:
            self.weight_group = nccl_group(host, port, 0, world_size, torch.device("cuda:0"))

    def broadcast_weights(self) -> None:
        from dprm_ray.rollout import broadcast_weights

        weights = self.learner.export_weights()
        if self.rank == 0:
            broadcast_weights(self.weight_group, weights)


class LearnerGroup:
    """`cfg.num_ranks` PolicyLearner actors in a placement group, set up and ready to train.

    cfg: a `dprm_ray.policy_config.LearnerConfig` (or a dict / OmegaConf node of one); ppo: a
    `dprm_ray.policy_config.PPOConfig` likewise.
    """

    def __init__(self, cfg: Any, ppo: Any, runtime_env: dict | None = None):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg = _as_config(LearnerConfig, cfg)
        self.ppo = _as_config(PPOConfig, ppo)
        self.cfg.validate()
        self.ppo.validate()  # fail here, before any actor starts
        n = self.cfg.num_ranks
        bundle = {"CPU": self.cfg.cpus_per_rank}
        if self.cfg.gpus_per_rank > 0:
            bundle["GPU"] = self.cfg.gpus_per_rank
        self.placement = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
        ray.get(self.placement.ready())
        self.actors = [
            PolicyLearner.options(
                num_cpus=self.cfg.cpus_per_rank,
                num_gpus=self.cfg.gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement, placement_group_bundle_index=rank
                ),
                runtime_env=runtime_env,
            ).remote(rank, n, self.cfg, self.ppo)
            for rank in range(n)
        ]
        addr, port = ray.get(self.actors[0].master_address.remote())
        self.call("setup", addr, port)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method` on every rank at once (they meet in collectives); all results."""
        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.call(method, *args, **kwargs)[0]

    def train(self, rollouts: Any) -> dict[str, float]:
        """One PPO step on a list of scored rollouts (or an object ref of one; put it once, all
        ranks read the same object)."""
        ref = rollouts if isinstance(rollouts, ray.ObjectRef) else ray.put(rollouts)
        return self.call_rank0("train", ref)

    def export_weights_ref(self, trained_only: bool = False) -> ray.ObjectRef:
        """An object ref of the policy's HF state dict as numpy arrays (rank 0's answer stays in
        the store; `dprm_ray.rollout.from_shared_arrays` makes tensors of them without a copy);
        trained_only: with LoRA, only the weights training changes (a rollout worker's update)."""
        refs = [a.export_weights.remote(trained_only) for a in self.actors]
        ray.get(refs[1:])  # the other ranks only help gather (ZeRO-3); wait so none lags behind
        ray.wait(refs[:1])
        return refs[0]

    def broadcast_weights_refs(self) -> list[ray.ObjectRef]:
        """Start the NCCL broadcast of the policy (the receivers must be called too)."""
        return [a.broadcast_weights.remote() for a in self.actors]

    def save_checkpoint(self, ckpt_dir: str, step: int | None = None) -> str:
        return self.call_rank0("save_checkpoint", str(ckpt_dir), step)

    def load_checkpoint(self, ckpt_dir: str, tag: str | None = None) -> int:
        return self.call_rank0("load_checkpoint", str(ckpt_dir), tag)

    def save_policy(self, path: str) -> None:
        self.call("save_policy", str(path))

    def sequence_logprobs(self, rollouts: Any) -> list[tuple[float, float]]:
        ref = rollouts if isinstance(rollouts, ray.ObjectRef) else ray.put(rollouts)
        return [pair for part in self.call("sequence_logprobs", ref) for pair in part]

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement)
        self.actors = []

"""What the data-parallel trainers (reward models, offline policy distillation) share.

Each Ray Train worker joins the torch.distributed group Ray Train made (or a one-process group for
in-process use), wraps its model in a DeepSpeed engine (ZeRO stage from config, torch AdamW so no
JIT-built CPU Adam is needed), and takes the batch of global step s as a pure function of
(seed, s). With model, optimizer and step in DeepSpeed checkpoints, a killed run resumed from its
last checkpoint ends exactly where an uninterrupted run does.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where they are used: reading a config needs neither
    import numpy as np
    import torch


@dataclass
class OptimConfig:
    lr: float = field(default=1e-3, metadata={"above": 0})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    batch_size: int = field(default=32, metadata={"min": 1, "help": "per worker"})
    epochs: int = field(default=3, metadata={"min": 1})
    max_steps: int = field(
        default=0, metadata={"min": 0, "help": "stop after this many steps (0: epochs)"}
    )
    grad_clip: float = field(default=1.0, metadata={"min": 0})


@dataclass
class ScaleConfig:
    num_workers: int = field(default=2, metadata={"min": 1})
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata={"min": 0})
    zero_stage: int = field(
        default=2, metadata={"min": 0, "max": 3, "help": "DeepSpeed ZeRO stage 0-3"}
    )
    max_failures: int = field(
        default=1, metadata={"min": -1, "help": "Ray Train worker-group restarts (-1: no limit)"}
    )
    address: str = field(default="", metadata={"help": "Ray address ('' = local or job's)"})


@dataclass
class WandbConfig:
    mode: str = field(default="offline", metadata={"help": "offline, online or disabled"})
    project: str = "dprm-ray"


def configure_deepspeed_env(use_gpu: bool) -> None:
    """Before DeepSpeed is first imported: the CPU accelerator without GPUs, and one cache for
    its JIT-built CPU comm op (the Makefile's TORCH_EXTENSIONS_DIR), shared by every trainer."""
    from dprm_ray.models import cache_dir

    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))


def build_deepspeed_cpu_ops() -> Path:
    """Build DeepSpeed's CPU comm op into the shared cache (or find it built there); the cache.

    Without this, the first DeepSpeed process on a CPU JIT-builds it (35-70 s on 2 cores) while
    the other ranks wait on its lock; `make setup` calls this once."""
    configure_deepspeed_env(use_gpu=False)
    from deepspeed.comm.torch import build_shm_op

    # The loader TorchBackend itself uses; None only where this DeepSpeed has no such op.
    if build_shm_op() is None:
        raise RuntimeError("this DeepSpeed has no CPU comm op to build (ShareMemCommBuilder)")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def ensure_process_group() -> tuple[int, int]:
    """(rank, world): join the existing torch.distributed group or start a one-process one
    (NCCL where CUDA is present and DeepSpeed uses it, else gloo)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
        dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def step_rows(n: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """The example indices of global step `step`: epoch-wise permutations, last partial dropped."""
    import numpy as np

    per_epoch = n // global_batch
    epoch, offset = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[offset * global_batch : (offset + 1) * global_batch]


def total_steps(n_items: int, optim: OptimConfig, world: int, source: str, what: str) -> int:
    from dprm_ray.data import DataError

    global_batch = optim.batch_size * world
    if n_items < global_batch:
        raise DataError(
            [
                f"{source}: {n_items} training {what} is fewer than one global batch "
                f"({optim.batch_size} x {world} workers); lower optim.batch_size"
            ]
        )
    return optim.max_steps or optim.epochs * (n_items // global_batch)


def deepspeed_config(optim: OptimConfig, zero_stage: int, precision: str = "fp32") -> dict:
    """The DeepSpeed config of a trainer: torch AdamW (no JIT-built CPU Adam), ZeRO stage, and
    `precision` as DeepSpeed's bf16/fp16 sections (it keeps the fp32 master weights)."""
    from dprm_ray.precision import deepspeed_precision

    return {
        "train_micro_batch_size_per_gpu": optim.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **deepspeed_precision(precision),
    }


def deepspeed_engine(
    model: torch.nn.Module, optim: OptimConfig, zero_stage: int, precision: str = "fp32"
) -> Any:
    import deepspeed
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
    config = deepspeed_config(optim, zero_stage, precision)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=params, config=config
    )
    return engine


def resume_step(engine: Any, ckpt_dir: Path, enabled: bool, rank: int) -> int:
    """Load the latest checkpoint if there is one (and resuming is on); the step to continue at."""
    if not enabled or not (ckpt_dir / "latest").is_file():
        return 0
    _, client = engine.load_checkpoint(str(ckpt_dir))
    step = int(client["step"])
    if rank == 0:
        print(f"resumed from {ckpt_dir} at step {step}")
    return step


def save_checkpoint(engine: Any, ckpt_dir: Path, step: int) -> None:
    # DeepSpeed writes `latest` after the tag folder, so a crash mid-save keeps the previous one.
    engine.save_checkpoint(str(ckpt_dir), tag=f"step_{step}", client_state={"step": step})


def start_wandb(wandb_cfg: WandbConfig, out_dir: Path, config: Any, job: str, rank: int) -> Any:
    """A W&B run on rank 0 (None elsewhere or when disabled); resumed runs continue the same id."""
    if rank != 0 or wandb_cfg.mode == "disabled":
        return None
    import wandb

    run_id = f"{job}-" + hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:12]
    return wandb.init(
        project=wandb_cfg.project,
        mode=wandb_cfg.mode,
        dir=str(out_dir),
        config=plain(config),
        resume="allow",
        id=run_id,
    )


def save_on_rank0(engine: Any, zero_stage: int, rank: int, save: Callable[[], None]) -> None:
    """Call `save` on rank 0 with full parameters (ZeRO-3 gathers its partitions first)."""
    import deepspeed

    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(
            list(engine.module.parameters()), modifier_rank=None
        ):
            if rank == 0:
                save()
    elif rank == 0:
        save()


def plain(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    from dprm_ray.data import write_text

    write_text(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")

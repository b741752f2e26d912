"""Launching a data-parallel `dprm_ray` trainer under Ray Train: shared by train-reward, distill."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def absolute_config(cfg: Any, path_keys: tuple[str, ...]) -> dict:
    """The config as plain data with output_dir and the given file keys made absolute
    (Ray Train workers may start in another directory)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["output_dir"] = str(Path(plain["output_dir"]).resolve())
    for key in path_keys:
        if plain.get(key):
            plain[key] = str(Path(plain[key]).resolve())
    return plain


def worker_setup(config: dict) -> None:
    """Run first on each worker: DeepSpeed must know it is on CPU before it is imported."""
    import os

    if not config["scale"]["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def fit(loop: Callable[[dict], None], plain: dict, name: str) -> dict:
    """Run `loop` on `scale.num_workers` workers; rank 0 writes <output_dir>/train_metrics.json."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scale = plain["scale"]
    out_dir = Path(plain["output_dir"])
    ray.init(address=scale["address"] or None, ignore_reinit_error=True)
    trainer = TorchTrainer(
        loop,
        train_loop_config=plain,
        scaling_config=ScalingConfig(
            num_workers=scale["num_workers"],
            use_gpu=scale["use_gpu"],
            resources_per_worker={"CPU": scale["cpus_per_worker"]},
        ),
        torch_config=TorchConfig(backend="nccl" if scale["use_gpu"] else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(out_dir / "ray"),
            failure_config=FailureConfig(max_failures=scale["max_failures"]),
        ),
    )
    trainer.fit()
    return json.loads((out_dir / "train_metrics.json").read_text())

"""Launching a data-parallel `dprm_ray` trainer under Ray Train: shared by train-reward, distill."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dprm_ray.jobs.ray_session import init_ray


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


def _worker_loop(schema: type, worker: Callable[..., dict], config: dict) -> None:
    """Runs on each Ray Train worker: typed config back, train, rank 0 writes the metrics."""
    import ray.train
    from omegaconf import OmegaConf

    from dprm_ray.training import configure_deepspeed_env, write_metrics

    configure_deepspeed_env(config["scale"]["use_gpu"])  # before DeepSpeed is first imported
    cfg = OmegaConf.merge(OmegaConf.structured(schema), config)
    metrics = worker(cfg, report=ray.train.report)
    if ray.train.get_context().get_world_rank() == 0:
        write_metrics(Path(cfg.output_dir) / "train_metrics.json", metrics)


def fit(schema: type, worker: Callable[..., dict], plain: dict, name: str) -> dict:
    """Run `worker(cfg, report)` on `scale.num_workers` Ray Train workers; the final metrics."""
    import functools

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    scale = plain["scale"]
    out_dir = Path(plain["output_dir"])
    init_ray(scale["address"], out_dir, actor_output=True)  # rank 0 prints the progress bar
    trainer = TorchTrainer(
        functools.partial(_worker_loop, schema, worker),
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

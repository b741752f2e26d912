"""`dprm-ray train-reward`: train a DPRM (ce / w1 / ot / ot_general) or Bradley-Terry reward model.

Runs under Ray Train (TorchTrainer, `scale.num_workers` data-parallel workers, gloo on CPU) with
the model in a DeepSpeed engine (`scale.zero_stage`). Writes `<output_dir>/model` (loadable by the
model loader), checkpoints under `<output_dir>/checkpoints` (rerun the same command to resume), and
`metrics.json` with held-out metrics. On a multi-node cluster `output_dir` must be shared storage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dprm_ray.reward_training import TrainRewardConfig
from jobs.runner import Command, Job, run_job


def _train_loop(config: dict) -> None:
    """Runs on each Ray Train worker: rebuild the typed config, train, report."""
    import os

    from omegaconf import OmegaConf

    if not config["scale"]["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train

    from dprm_ray.reward_training import train_worker
    from dprm_ray.training import write_metrics

    cfg = OmegaConf.merge(OmegaConf.structured(TrainRewardConfig), config)
    metrics = train_worker(cfg, report=ray.train.report)
    if ray.train.get_context().get_world_rank() == 0:
        write_metrics(Path(cfg.output_dir) / "train_metrics.json", metrics)


def run(cfg: TrainRewardConfig) -> dict:
    import ray
    from omegaconf import OmegaConf
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out_dir = Path(cfg.output_dir).resolve()
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["output_dir"] = str(out_dir)  # workers may start in another directory
    for key in ("data", "eval_data"):
        if plain[key]:
            plain[key] = str(Path(plain[key]).resolve())
    ray.init(address=cfg.scale.address or None, ignore_reinit_error=True, log_to_driver=True)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=plain,
        scaling_config=ScalingConfig(
            num_workers=cfg.scale.num_workers,
            use_gpu=cfg.scale.use_gpu,
            resources_per_worker={"CPU": cfg.scale.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.scale.use_gpu else "gloo"),
        run_config=RunConfig(
            name="train-reward",
            storage_path=str(out_dir / "ray"),
            failure_config=FailureConfig(max_failures=cfg.scale.max_failures),
        ),
    )
    trainer.fit()
    metrics = json.loads((out_dir / "train_metrics.json").read_text())
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return {**metrics, "model": str(out_dir / "model")}


JOB = Job(
    "train-reward",
    "Train a distributional (DPRM) or Bradley-Terry reward model with Ray Train + DeepSpeed.",
    (Command("", __doc__.strip(), TrainRewardConfig, run),),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`dprm-ray train-reward`: train a DPRM (ce / w1 / ot / ot_general) or Bradley-Terry reward model.

Runs under Ray Train (TorchTrainer, `scale.num_workers` data-parallel workers, gloo on CPU) with
the model in a DeepSpeed engine (`scale.zero_stage`). Writes `<output_dir>/model` (loadable by
`reward_models.load_reward_model`), checkpoints under `<output_dir>/checkpoints` (rerun the same
command to resume), and `metrics.json` with held-out metrics. On a multi-node cluster `output_dir`
must be shared storage.

A frozen backbone's features are computed first, in one Ray task with the CPUs the training
workers will hold (up to a whole node) and torch threads to match, and cached; the workers then
read the cache instead of each embedding on its own share of the cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dprm_ray.jobs.runner import Command, Job, run_job
from dprm_ray.reward_config import TrainRewardConfig


def _features_task(config: dict) -> tuple[int, int]:
    """Runs as one Ray task: (texts embedded, torch threads used)."""
    from omegaconf import OmegaConf

    from dprm_ray.cpus import use_assigned_cpus
    from dprm_ray.reward_training import cache_features

    threads = use_assigned_cpus()
    cfg = OmegaConf.merge(OmegaConf.structured(TrainRewardConfig), config)
    return cache_features(cfg), threads


def run(cfg: TrainRewardConfig) -> dict:
    from dprm_ray.jobs.ray_train import absolute_config, fit
    from dprm_ray.reward_training import check_batches, train_worker, training_data

    # Data and config mistakes stop the job here, once, before Ray Train starts any worker.
    _, train, _ = training_data(cfg)
    check_batches(cfg, train)
    plain = absolute_config(cfg, ("data", "eval_data"))
    if cfg.backbone.freeze and cfg.backbone.cache_embeddings:
        import ray

        from dprm_ray.jobs.ray_session import init_ray, node_cpus

        init_ray(cfg.scale.address, plain["output_dir"], actor_output=True)  # the embed bar
        per_worker = cfg.scale.cpus_per_worker
        cpus = node_cpus(cfg.scale.num_workers * per_worker, at_least=per_worker)
        task = ray.remote(_features_task).options(num_cpus=cpus, max_retries=1)
        texts, threads = ray.get(task.remote(plain))
        print(f"features: {texts} texts through frozen {cfg.backbone.spec} on {threads} threads")
    metrics = fit(TrainRewardConfig, train_worker, plain, "train-reward")
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return {**metrics, "model": str(Path(plain["output_dir"]) / "model")}


JOB = Job(
    "train-reward",
    "Train a distributional (DPRM) or Bradley-Terry reward model with Ray Train + DeepSpeed.",
    (Command("", __doc__.strip(), TrainRewardConfig, run),),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`dprm-ray train-reward`: train a DPRM (ce / w1 / ot / ot_general) or Bradley-Terry reward model.

Runs under Ray Train (TorchTrainer, `scale.num_workers` data-parallel workers, gloo on CPU) with
the model in a DeepSpeed engine (`scale.zero_stage`). Writes `<output_dir>/model` (loadable by
`reward_models.load_reward_model`), checkpoints under `<output_dir>/checkpoints` (rerun the same
command to resume), and `metrics.json` with held-out metrics. On a multi-node cluster `output_dir`
must be shared storage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dprm_ray.jobs.runner import Command, Job, run_job
from dprm_ray.reward_config import TrainRewardConfig


def run(cfg: TrainRewardConfig) -> dict:
    from dprm_ray.jobs.ray_train import absolute_config, fit
    from dprm_ray.reward_training import check_batches, train_worker, training_data

    # Data and config mistakes stop the job here, once, before Ray Train starts any worker.
    _, train, _ = training_data(cfg)
    check_batches(cfg, train)
    plain = absolute_config(cfg, ("data", "eval_data"))
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

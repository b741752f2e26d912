"""`dprm-ray`: one entry point for every job; `dprm-ray JOB --help` explains each one."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from dprm_ray.jobs.runner import EXIT_CONFIG, Job

# Every job's name and the first line of its JOB.help, in the order a user meets them. Kept here
# so that `dprm-ray --help` imports no job module (and with it torch or Ray);
# tests/test_cli.py checks that it matches each module's JOB.
JOBS = {
    "models": "Pull the named models (smollm2, minilm), list them, chat with one, or build DeepSpeed's CPU op.",
    "data": "Validate data files (parquet or JSONL, hh-rlhf transcripts too) and build data sets.",
    "generate": "Sample answers to a prompts file from one or more policies on rollout workers.",
    "annotate": "Annotate prompt/response rows with a persona crowd of LLM judges (Ray Data actor pool).",
    "train-reward": "Train a distributional (DPRM) or Bradley-Terry reward model with Ray Train + DeepSpeed.",
    "train-policy": "PPO the policy against a reward model: vLLM rollouts, sharded reward, DeepSpeed learner.",
    "distill": "Offline alignment by reward-model distillation (d-DPO, e-DPO, p-DPO, DPO, IPO).",
    "train-pal": "Train a pluralistic PAL reward model and adapt it to new users from a few comparisons.",
    "sweep": "Ray Tune sweep over reward-model training (smoothing eps, loss, OT metric, kappa, lr).",
    "serve": "Serve a reward model over HTTP with Ray Serve (/score, /healthz).",
    "evaluate": "Evaluate reward models (W1, CE, calibration, Spearman, pairwise accuracy) and crowds.",
    "quickstart": "From prompts to an aligned policy and a report, on a laptop CPU (the main job).",
}
JOB_NAMES = tuple(JOBS)


def job(name: str) -> Job:
    return importlib.import_module("dprm_ray.jobs." + name.replace("-", "_")).JOB


def usage() -> str:
    lines = [
        "usage: dprm-ray JOB [SUB-COMMAND] [--config FILE] [key=value ...] [--key value ...]",
        "",
        "Ray-distributed RLHF that aligns language models with the distribution of a crowd's",
        "preferences. Each job also runs as `python -m dprm_ray.jobs.<job_name>`, e.g. under",
        "`ray job submit --working-dir . -- python -m dprm_ray.jobs.train_reward --config FILE`.",
        "",
        "jobs:",
    ]
    lines += [f"  {name:<14} {help_line}" for name, help_line in JOBS.items()]
    lines += ["", "`dprm-ray JOB --help` lists a job's sub-commands and config keys."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name = args[0]
    if name not in JOB_NAMES:
        print(f"dprm-ray: unknown job '{name}' (jobs: {', '.join(JOB_NAMES)})", file=sys.stderr)
        return EXIT_CONFIG
    module = importlib.import_module("dprm_ray.jobs." + name.replace("-", "_"))
    return module.main(args[1:])


if __name__ == "__main__":
    sys.exit(main())

"""`dprm-ray train-policy`: not built yet; see `--help`."""

import sys

from jobs.runner import not_built_job, run_job

JOB = not_built_job(
    "train-policy",
    "PPO the policy against a reward model: vLLM rollouts, sharded reward, DeepSpeed learner.",
    "tracked in issue #5 (distributed PPO)",
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`dprm-ray train-reward`: not built yet; see `--help`."""

import sys

from jobs.runner import not_built_job, run_job

JOB = not_built_job(
    "train-reward",
    "Train a distributional (DPRM) or Bradley-Terry reward model with Ray Train.",
    "tracked in issue #3 (DPRM core)",
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

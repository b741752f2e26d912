"""`dprm-ray train-pal`: not built yet; see `--help`."""

import sys

from jobs.runner import not_built_job, run_job

JOB = not_built_job(
    "train-pal",
    "Train a pluralistic PAL reward model and adapt it to new users from a few comparisons.",
    "tracked in issue #6 (PAL)",
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

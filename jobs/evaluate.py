"""`dprm-ray evaluate`: not built yet; see `--help`."""

import sys

from jobs.runner import not_built_job, run_job

JOB = not_built_job(
    "evaluate",
    "Evaluate reward models and policies (W1, CE, calibration, pairwise accuracy, category shares).",
    "tracked in issue #3 (DPRM core) and issue #5",
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

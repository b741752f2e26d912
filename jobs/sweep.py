"""`dprm-ray sweep`: not built yet; see `--help`."""

import sys

from jobs.runner import not_built_job, run_job

JOB = not_built_job(
    "sweep",
    "Ray Tune sweep over reward-model training (smoothing eps, OT metric, kappa, lr).",
    "tracked in issue #7 (sweeps, serving, cluster)",
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

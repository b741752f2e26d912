"""`dprm-ray serve`: not built yet; see `--help`."""

import sys

from jobs.runner import not_built_job, run_job

JOB = not_built_job(
    "serve",
    "Serve a reward model over HTTP with Ray Serve (/score, /healthz).",
    "tracked in issue #7 (sweeps, serving, cluster)",
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

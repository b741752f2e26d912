"""`dprm-ray annotate`: not built yet; see `--help`."""

import sys

from jobs.runner import not_built_job, run_job

JOB = not_built_job(
    "annotate",
    "Annotate prompt/response pairs with a persona crowd of LLM judges (Ray Data pool).",
    "tracked in issue #4 (persona annotation pool)",
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

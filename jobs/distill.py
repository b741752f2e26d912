"""`dprm-ray distill`: not built yet; see `--help`."""

import sys

from jobs.runner import not_built_job, run_job

JOB = not_built_job(
    "distill",
    "Offline alignment by reward-model distillation (d-DPO, e-DPO, p-DPO, DPO, IPO).",
    "tracked in issue #6 (robust offline alignment)",
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

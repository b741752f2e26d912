"""`dprm-ray`: one entry point for every job; `dprm-ray JOB --help` explains each one."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from dprm_ray.jobs.runner import EXIT_CONFIG, Job

# In the order a user meets them.
JOB_NAMES = (
    "models",
    "data",
    "generate",
    "annotate",
    "train-reward",
    "train-policy",
    "distill",
    "train-pal",
    "sweep",
    "serve",
    "evaluate",
    "quickstart",
)


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
    for name in JOB_NAMES:
        j = job(name)
        lines.append(f"  {name:<14} {j.help.splitlines()[0]}")
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

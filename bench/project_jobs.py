"""Running the project's own jobs from a bench script, as a user would (`dprm-ray JOB ...`)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def job(*args: str) -> float:
    """Run `dprm-ray ARGS` from the repo root; returns its wall time, exits the bench on failure."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dprm_ray.jobs.cli", *args], cwd=REPO, capture_output=True, text=True
    )
    if proc.returncode != 0:
        sys.exit(f"job failed: dprm-ray {' '.join(args)}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start

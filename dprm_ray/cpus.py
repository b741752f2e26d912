"""Torch CPU threads for work that runs alone: use every core the work was given.

Ray sets OMP_NUM_THREADS to a task's or actor's whole CPUs only when it starts the worker process,
and torch reads it once, at import. So a reused task worker keeps its first task's thread count
(here a 2-CPU task that ran after a 1-CPU one computed on one thread), and a `ray job submit`
driver inherits OMP_NUM_THREADS=1 from Ray's 0-CPU job supervisor. Work that runs alone (frozen
feature extraction, scoring a file) calls `use_assigned_cpus` first.
"""

from __future__ import annotations

import math
import os

__all__ = ["assigned_cpus", "use_assigned_cpus"]


def assigned_cpus() -> int:
    """Whole CPUs this process may use: a Ray task's or actor's CPUs (floor, at least 1), else
    (a driver, or outside Ray) the cores the process may run on."""
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            if context.worker.mode == ray.WORKER_MODE:
                cpus = context.get_assigned_resources().get("CPU", 1.0)
                return max(1, math.floor(cpus))
    except ImportError:
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_assigned_cpus() -> int:
    """Set torch's intra-op threads to `assigned_cpus()`; returns the count."""
    import torch

    threads = assigned_cpus()
    torch.set_num_threads(threads)
    return threads

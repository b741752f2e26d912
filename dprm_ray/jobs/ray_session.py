"""How every job joins Ray, and where the libraries' log lines go.

By default the console shows what the jobs print themselves (stage headers, progress bars,
results). The libraries' INFO and WARNING records on the driver (Ray, Ray Data, Ray Train/Tune,
transformers) go to `<output_dir>/job.log` and only their errors reach the console; the actors'
own output (vLLM engine lines, DeepSpeed, weight-loading bars) stays in Ray's per-worker files
under the session folder, `/tmp/ray/session_latest/logs` on a local cluster, except for the Ray
Train workers of train-reward and distill, whose output is the training progress bar. `--verbose` (any job)
sets DPRM_RAY_VERBOSE=1, which the quickstart's stages inherit, and shows all of it as Ray
normally does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

VERBOSE_ENV = "DPRM_RAY_VERBOSE"
LOG_FILE = "job.log"
# Libraries whose records do not reach the root logger (they print through handlers of their own).
_OWN_HANDLERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "transformers")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


# What route_library_logs changed, so that restore_library_logs can undo it when the job ends
# (a process that runs several jobs, such as the tests, gets each job's lines in its own file).
_ROUTED: list[tuple[logging.Logger, logging.Handler | None, dict[logging.Handler, int], int]] = []


def route_library_logs(log_file: Path) -> None:
    """Library records at INFO and above go to `log_file`; the libraries' console handlers keep
    errors only, and so does the console for records that reach the root logger.

    Applied to the loggers that exist when it is called (so after `import ray` and
    `import ray.data`, which install their handlers at import time)."""
    if verbose():
        return
    restore_library_logs()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    errors = logging.StreamHandler()  # what Python's last-resort handler would have shown
    errors.setLevel(logging.ERROR)
    _ROUTED.append((root, to_file, {}, root.level))
    _ROUTED.append((root, errors, {}, root.level))
    root.addHandler(to_file)
    root.addHandler(errors)
    root.setLevel(logging.INFO)
    for name in _OWN_HANDLERS:
        logger = logging.getLogger(name)
        quieted = {
            h: h.level
            for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        }
        for handler in quieted:
            handler.setLevel(logging.ERROR)
        # A logger that propagates reaches a handler of to_file's already (its parent's or root's).
        own = None if logger.propagate else to_file
        _ROUTED.append((logger, own, quieted, logger.level))
        if own is not None:
            logger.addHandler(own)


def restore_library_logs() -> None:
    """Undo route_library_logs (the runner calls it when a job ends)."""
    closed: set[logging.Handler] = set()
    while _ROUTED:
        logger, added, quieted, level = _ROUTED.pop()
        if added is not None:
            logger.removeHandler(added)
            if added not in closed:
                added.close()
                closed.add(added)
        for handler, old in quieted.items():
            handler.setLevel(old)
        logger.setLevel(level)


def init_ray(
    address: str | None, output_dir: str | Path, actor_output: bool = False, **kwargs
) -> object:
    """`ray.init` for a job: joins `address` (or RAY_ADDRESS, or starts a local cluster), with the
    driver's library logs routed to `<output_dir>/job.log` unless verbose. `actor_output`: the
    actors print the job's own progress (Ray Train workers: the training bar, where a run resumed),
    so their output reaches the console even when not verbose."""
    import ray

    loud = verbose()
    if not loud:
        # transformers' warnings on the driver (tokenizer loads) and in the actors of a cluster
        # this call starts, which inherit the driver's environment.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Before ray.init, whose own "Connecting to ..." lines should land in the file too.
    route_library_logs(Path(output_dir) / LOG_FILE)
    return ray.init(
        address=address or None,
        ignore_reinit_error=True,
        log_to_driver=loud or actor_output,
        **kwargs,
    )


def node_cpus(wanted: float, at_least: float) -> float:
    """`wanted` CPUs capped at the largest live node's, for work that runs on one node; never
    below `at_least` (a size the cluster is known to fit, or can scale up to fit)."""
    import ray

    largest = max(
        (node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=0.0
    )
    return max(at_least, min(wanted, largest))

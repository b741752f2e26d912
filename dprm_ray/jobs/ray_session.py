"""How every job joins Ray, and where the libraries' log lines go.

By default the console shows what the jobs print themselves (stage headers, progress bars,
results). The libraries' INFO and WARNING records on the driver (Ray, Ray Data, Ray Train/Tune,
transformers) go to `<output_dir>/job.log` and only their errors reach the console; the actors'
own output (vLLM engine lines, DeepSpeed, weight-loading bars) stays in Ray's per-worker files
under the session folder, `/tmp/ray/session_latest/logs` on a local cluster. `--verbose` (any job)
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


def route_library_logs(log_file: Path) -> None:
    """Library records at INFO and above go to `log_file`; their console handlers keep errors.

    Applied to the loggers that exist when it is called (so after `import ray` and
    `import ray.data`, which install their handlers at import time)."""
    if verbose():
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_file.set_name("dprm-ray-job-log")
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in _OWN_HANDLERS]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                handler.setLevel(logging.ERROR)
        for old in [h for h in logger.handlers if h.get_name() == to_file.get_name()]:
            logger.removeHandler(old)  # an earlier job in this process (tests) had its own file
            old.close()
        logger.addHandler(to_file)
    logging.getLogger().setLevel(min(logging.getLogger().level or logging.INFO, logging.INFO))


def init_ray(address: str | None, output_dir: str | Path, **kwargs) -> object:
    """`ray.init` for a job: joins `address` (or RAY_ADDRESS, or starts a local cluster), with the
    driver's library logs routed to `<output_dir>/job.log` unless verbose."""
    import ray

    loud = verbose()
    if not loud:
        # transformers' warnings on the driver (tokenizer loads) and in the actors of a cluster
        # this call starts, which inherit the driver's environment.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Before ray.init, whose own "Connecting to ..." lines should land in the file too.
    route_library_logs(Path(output_dir) / LOG_FILE)
    return ray.init(address=address or None, ignore_reinit_error=True, log_to_driver=loud, **kwargs)

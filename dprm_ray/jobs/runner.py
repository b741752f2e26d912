"""What every job shares: argument parsing, config loading, config.yaml / metrics.json, exit codes.

A job is a list of commands (its main action and sub-actions such as `data validate`), each with a
config dataclass and a `run(cfg) -> metrics` function. Exit codes: 0 done, 1 failed on bad input
(the message names the file/row or model), 2 bad config or arguments,
130 stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM. None of them prints a traceback.

After Ctrl-C a job gets DPRM_RAY_STOP_GRACE_S seconds (default 30) to clean up (Ray Data's
executor, ray.shutdown()); if it is still running then, or at a second Ctrl-C, it leaves at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dprm_ray.config import (
    ConfigError,
    check_output_paths,
    describe_config,
    load_config,
    normalise_overrides,
    to_yaml,
    validate_config,
)
from dprm_ray.jobs.ray_session import VERBOSE_ENV, restore_library_logs

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143: shell convention
STOP_GRACE_ENV = "DPRM_RAY_STOP_GRACE_S"


class Terminated(BaseException):
    """SIGTERM arrived; raised in the main thread like KeyboardInterrupt is for SIGINT."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _leave_now(code: int, why: str = "") -> None:
    """Exit now, without Ray's teardown: after a SIGTERM that Ray's own C++ handler also saw, it
    can abort (SIGABRT: the interpreter's exit always, ray.shutdown() under load, seen in a test
    at load 15); after a Ctrl-C whose clean-up hung (a test's job was still running 120 s after
    SIGINT, at load 7, where it usually stops within a second). The processes of a local cluster
    this driver started are its descendants: they get SIGTERM (the agents under the raylet
    outlive a driver that merely exits). A cluster the driver joined reaps a dead driver's actors
    itself. The finished work is on disk already."""
    import psutil

    try:
        descendants = psutil.Process().children(recursive=True)
    except psutil.Error:
        descendants = []
    for proc in descendants:
        try:
            proc.terminate()
        except psutil.Error:
            continue
    if why:
        print(why, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop_ray() -> None:
    """Shut down the Ray this process started or joined (its actors and local cluster), if any."""
    if _ray_running():
        sys.modules["ray"].shutdown()


@dataclass(frozen=True)
class Command:
    name: str  # sub-action name; "" for the job's main action
    help: str
    schema: type
    run: Callable[[Any], dict[str, Any] | None]
    positionals: tuple[str, ...] = ()  # config keys filled by positional arguments, in order
    # For a config whose unset keys are filled in later (the quickstart's size presets): the
    # values the job will run with, which --print-config shows below the config as comments.
    resolve: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Job:
    name: str  # as typed on the command line, e.g. train-reward
    help: str
    commands: tuple[Command, ...]

    @property
    def module(self) -> str:
        return "dprm_ray.jobs." + self.name.replace("-", "_")


def _usage(job: Job, command: Command) -> str:
    action = f" {command.name}" if command.name else ""
    pos = "".join(f" {p.upper()}" for p in command.positionals)
    lines = [
        f"usage: dprm-ray {job.name}{action}{pos} [--config FILE] [key=value ...] [--key value ...]",
        f"       (or: python -m {job.module}{action} ...)",
        "",
        command.help or job.help,
    ]
    others = [c for c in job.commands if c is not command]
    if not command.name and others:
        lines += ["", "sub-commands:"]
        lines += [f"  {c.name:<16} {c.help.splitlines()[0]}" for c in others if c.name]
    lines += [
        "",
        "config keys (set with key=value or --key value; nested keys with a.b=value):",
        *describe_config(command.schema),
        "",
        "--config FILE     a YAML file of config values (applied before the overrides)",
        "--print-config    print the resolved config as YAML and exit",
        "--verbose         show the libraries' log lines (Ray, Ray Data, vLLM, DeepSpeed) on the",
        "                  console; by default the driver's go to OUTPUT_DIR/job.log and the",
        "                  actors' stay in Ray's session logs (/tmp/ray/session_latest/logs)",
    ]
    return "\n".join(lines)


def _split_args(
    args: Sequence[str], command: Command
) -> tuple[str | None, list[str], list[str], bool]:
    """(config file, positionals, override args, print_config) from the raw arguments."""
    config_file: str | None = None
    positionals: list[str] = []
    rest: list[str] = []
    print_config = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file name")
            config_file, i = args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg == "--print-config":
            print_config = True
        elif arg.startswith("--"):
            rest.append(arg)
            if "=" not in arg and i + 1 < len(args) and not args[i + 1].startswith("--"):
                rest.append(args[i + 1])
                i += 1
        elif "=" in arg:
            rest.append(arg)
        else:
            positionals.append(arg)
        i += 1
    if len(positionals) > len(command.positionals):
        extra = positionals[len(command.positionals)]
        raise ConfigError(f"unexpected argument '{extra}' (overrides look like key=value)")
    return config_file, positionals, rest, print_config


def run_job(job: Job, argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in args:  # read by ray_session.init_ray; a quickstart's stages inherit it
        args.remove("--verbose")
        os.environ[VERBOSE_ENV] = "1"
    by_name = {c.name: c for c in job.commands}
    if args and args[0] and args[0] in by_name:
        command = by_name[args.pop(0)]
    elif "" in by_name:
        command = by_name[""]
    else:  # a job made only of sub-commands, e.g. `dprm-ray data validate`
        subs = ", ".join(by_name)
        if any(a in ("-h", "--help") for a in args):
            print(f"usage: dprm-ray {job.name} SUB-COMMAND ...\n\n{job.help}\n\nsub-commands:")
            print("\n".join(f"  {c.name:<16} {c.help.splitlines()[0]}" for c in job.commands))
            return EXIT_OK
        got = f"unknown sub-command '{args[0]}'" if args else "missing sub-command"
        print(f"dprm-ray {job.name}: {got} (choose one of: {subs})", file=sys.stderr)
        return EXIT_CONFIG
    prog = f"dprm-ray {job.name}" + (f" {command.name}" if command.name else "")
    if any(a in ("-h", "--help") for a in args):
        print(_usage(job, command))
        return EXIT_OK
    try:
        config_file, positionals, rest, print_config = _split_args(args, command)
        overrides = [f"{k}={v}" for k, v in zip(command.positionals, positionals, strict=False)]
        cfg = load_config(command.schema, config_file, overrides + normalise_overrides(rest))
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if print_config:
        print(to_yaml(cfg), end="")
        if command.resolve is not None:
            try:
                resolved = command.resolve(cfg)
            except ConfigError as exc:
                print(f"{prog}: config error: {exc}", file=sys.stderr)
                return EXIT_CONFIG
            # Comments, so that the output still loads as the config it shows.
            print("# resolved: what the job runs with")
            print(
                "".join(f"#   {line}\n" for line in to_yaml(asdict(resolved)).splitlines()), end=""
            )
        return EXIT_OK

    try:
        validate_config(cfg)
        check_output_paths(cfg, command.schema)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    # Imported here so that config errors come back before torch/pyarrow start up.
    from dprm_ray.data import DataError, write_text
    from dprm_ray.errors import ModelError

    output_dir = Path(cfg.output_dir)
    start = time.perf_counter()
    # Ray's own driver handler (set by ray.init) exits with SystemExit(15) instead; both end here.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    stop_timers: list[threading.Timer] = []

    def interrupted(signum: int, frame: Any) -> None:
        """Ctrl-C: KeyboardInterrupt as usual, and a timer that leaves anyway if the clean-up
        that follows hangs; a second Ctrl-C does not wait for it."""
        grace = float(os.environ.get(STOP_GRACE_ENV, "30"))
        why = (
            f"{prog}: stopped by Ctrl-C; its clean-up was still running {grace:g} s later, "
            "so it left without it (finished work is kept)"
        )
        if stop_timers:
            _leave_now(EXIT_SIGINT, f"{prog}: stopped by a second Ctrl-C, without clean-up")
        timer = threading.Timer(grace, _leave_now, args=(EXIT_SIGINT, why))
        timer.daemon = True
        timer.start()
        stop_timers.append(timer)
        raise KeyboardInterrupt

    previous_sigint = signal.signal(signal.SIGINT, interrupted) if in_main_thread else None
    try:
        write_text(output_dir / "config.yaml", to_yaml(cfg))
        metrics = command.run(cfg) or {}
    except ConfigError as exc:  # found only once the job looks at files or models
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataError, ModelError, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # the system refused a read or write: permissions, a full disk
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (KeyboardInterrupt, Terminated, SystemExit) as exc:
        if isinstance(exc, SystemExit) and exc.code != signal.SIGTERM:
            raise
        code = EXIT_SIGINT if isinstance(exc, KeyboardInterrupt) else EXIT_SIGTERM
        name = "Ctrl-C" if code == EXIT_SIGINT else "SIGTERM"
        print(
            f"\n{prog}: stopped by {name}; finished work is kept "
            "(rerun the same command to resume where the job supports it)",
            file=sys.stderr,
        )
        if code == EXIT_SIGTERM and _ray_running():
            _leave_now(code)
        _stop_ray()
        return code
    finally:
        # An armed stop timer stays armed: the process is on its way out, and the interpreter's
        # exit (non-daemon library threads) can hang too.
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
            signal.signal(signal.SIGINT, previous_sigint)
        restore_library_logs()
    metrics = {**metrics, "wall_time_s": round(time.perf_counter() - start, 3)}
    write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(f"{prog}: done in {metrics['wall_time_s']:.1f} s; wrote {output_dir}/metrics.json")
    return EXIT_OK

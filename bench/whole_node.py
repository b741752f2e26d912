"""Benchmark: frozen-feature extraction (train-reward, evaluate) on one thread in input order, as a
1-CPU Ray Train worker ran it, against all cores with length-sorted batches, as the job now runs it.

Reads the hh-rlhf pairs in `shared/data/hh-rlhf/harmless-base-dev.jsonl` and embeds the chosen
responses through SmolLM2-135M's trunk (last-token pooling, what a frozen causal-LM reward model
sees), at `--max-length` tokens. Each configuration embeds the same texts; the table gives
seconds, tokens/s (non-padding tokens) and the speed-up over the first row, all from one run:

    python bench/whole_node.py [--texts 64] [--batch-size 32] [--max-length 384] [--model smollm2]

- `1 thread, input order`: the old path (batches of --batch-size in file order, padded to their
  longest text; torch on the 1 thread Ray gives a 1-CPU worker).
- `1 thread, by length` / `N threads, input order`: each change alone.
- `N threads, by length`: the job's path (`dprm_ray.reward_models.embed_texts` in a task that
  holds the workers' CPUs, `dprm_ray.cpus.use_assigned_cpus`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from dprm_ray.data import load_rows
from dprm_ray.models import load_model
from dprm_ray.reward_models import embed_texts, tokenize_pairs

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl"


def embed(trunk, tok, prompts, responses, args, threads: int, by_length: bool) -> float:
    """Seconds to embed every text (one batch per --batch-size texts)."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    if by_length:
        embed_texts(
            trunk, tok, prompts, responses, args.max_length, args.batch_size, pooling="last"
        )
    else:  # one call per file-order batch: each pads to its own longest text, as before
        for i in range(0, len(prompts), args.batch_size):
            sl = slice(i, i + args.batch_size)
            embed_texts(trunk, tok, prompts[sl], responses[sl], args.max_length, pooling="last")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--model", default="smollm2", help="a causal-LM spec (tiny: no download)")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()

    rows = load_rows(str(DATA), kind="pairs", skip_invalid=True).rows[: args.texts]
    prompts, responses = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    model, tok = load_model(args.model, kind="causal-lm")
    trunk = model.get_decoder().eval()
    tokens = int(tokenize_pairs(tok, prompts, responses, args.max_length)["attention_mask"].sum())
    cores = len(os.sched_getaffinity(0))
    embed(trunk, tok, prompts[:4], responses[:4], args, cores, True)  # warm-up
    print(
        f"{len(prompts)} texts, {tokens} tokens (max {args.max_length}), batch {args.batch_size},"
        f" {args.model}; {cores} cores; load {os.getloadavg()[0]:.1f}"
    )
    results = []
    for threads, by_length in ((1, False), (1, True), (cores, False), (cores, True)):
        seconds = embed(trunk, tok, prompts, responses, args, threads, by_length)
        order = "by length" if by_length else "input order"
        results.append({"threads": threads, "order": order, "seconds": seconds})
    base = results[0]["seconds"]
    print(f"{'configuration':<26}{'s':>8}{'tokens/s':>10}{'speed-up':>10}")
    for r in results:
        name = f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}, {r['order']}"
        r["tokens_per_s"] = tokens / r["seconds"]
        r["speedup"] = base / r["seconds"]
        print(f"{name:<26}{r['seconds']:8.1f}{r['tokens_per_s']:10.0f}{r['speedup']:9.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": tokens, "results": results}, indent=2))


if __name__ == "__main__":
    main()

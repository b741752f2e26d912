"""Benchmark: one training step of a causal LM on the CPU in fp32 vs bf16 (and fp16).

The step is the learner's: forward, the token log-probs of the sequence (fp32 log-softmax, as
`dprm_ray.learner.token_logprobs`), backward, AdamW. For bf16/fp16 the model is cast to the half
dtype, as DeepSpeed's bf16/fp16 modes run it (DeepSpeed's fp32 master-weight copy is not timed;
it would only add to the half-precision time). The model is the project's random `tiny` Llama
(`dprm_ray.models.tiny_causal_lm`) at a size where the matmuls dominate, so nothing is downloaded.

Prints the median step time of each precision and the ratio to fp32: the factor that
`dprm_ray.precision.CPU_SLOWDOWN` and the README's "Precision" section quote.

    python bench/cpu_precision.py [--hidden 576] [--layers 2] [--batch 4] [--seq 64]
                                  [--repeats 2] [--threads 0] [--json out.json]

Measured here (2-core AMD EPYC VM without AVX-512 or AMX, torch 2.13, shared with other jobs):
fp32 1.55 s/step, bf16 13.2 s (8.5x), fp16 22.0 s (14.2x). The width is SmolLM2's (576); a
smaller model is less matmul-bound and shows less (hidden 256: 1.6x), a bigger one more (a bare
1024x1024 bf16 matmul: 39x).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from dprm_ray.models import tiny_causal_lm, tiny_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def step_times(
    precision: str, hidden: int, layers: int, batch: int, seq: int, repeats: int
) -> list[float]:
    """Seconds of each of `repeats` timed steps (after one warm-up step)."""
    model = tiny_causal_lm(0, hidden_size=hidden, num_layers=layers).train()
    model.to(DTYPES[precision])
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
    vocab = len(tiny_tokenizer())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        loss = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).mean()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if i:  # the first step warms up (allocations, kernel selection)
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M's width")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--precisions", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"]
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (args.hidden, args.layers, args.batch, args.seq, args.repeats)
    medians = {p: statistics.median(step_times(p, *shape)) for p in ["fp32", *args.precisions]}
    tokens = args.batch * args.seq
    print(
        f"CPU training step, tiny Llama hidden={args.hidden} layers={args.layers}, "
        f"batch {args.batch} x {args.seq} tokens, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(f"{'precision':<10} {'step s':>9} {'tokens/s':>10} {'vs fp32':>8}")
    ratios = {}
    for p, t in medians.items():
        ratios[p] = t / medians["fp32"]
        print(f"{p:<10} {t:>9.3f} {tokens / t:>10.0f} {ratios[p]:>7.1f}x")
    result = {
        "step_seconds": medians,
        "slowdown_vs_fp32": {p: r for p, r in ratios.items() if p != "fp32"},
        "shape": dict(zip(("hidden", "layers", "batch", "seq", "repeats"), shape, strict=True)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

"""Length-bias protocol: DPO vs e-DPO vs d-DPO when the preference data favours longer answers.

Fisch et al. (arXiv 2405.19316) train on preference data in which a fraction rho of the pairs
prefer the longer response and compare how far each method follows that spurious cue. Here:

1. The hh-rlhf pairs (`../shared/data/hh-rlhf`) are split in two. An *oracle* Bradley-Terry reward
   model (frozen `--oracle-backbone` features + a linear head) is trained on half A; it relabels the
   pairs of half B, and a pair is "length-aligned" when the oracle prefers its longer response.
2. For each rho, a training set of `--pairs` pairs of B in which a fraction rho is length-aligned
   (labels from the oracle, so only the correlation with length changes).
3. Per rho: an ensemble of 3 BT reward models (seeds + bootstrap) trained on that set; the
   reference policy's log-probs and samples (one `distill precompute` over all sets); then DPO,
   e-DPO (gamma>0) and d-DPO (the first ensemble member) of the policy (LoRA) on the set.
4. Each policy and the reference answer held-out prompts of B; the oracle scores both answers.
   Reported: win rate against the reference under the oracle, mean answer length, and the trend
   of the chosen log-prob during training (DPO's degeneracy is the chosen log-prob falling).

    python bench/length_bias.py --policy smollm2        # hours on 2 CPU cores (SmolLM2 features)
    python bench/length_bias.py --policy tiny --oracle-backbone minilm --oracle-kind encoder \
        --full-finetune --lr 1e-3 --steps 32               # ~15 minutes: the README table
    python bench/length_bias.py --policy tiny --oracle-backbone tiny-encoder --oracle-kind encoder \
        --pairs 32 --eval-prompts 8 --steps 4 --out outputs/bench-length-bias-smoke   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from project_jobs import REPO, job

HH_RLHF = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl"
RHOS = (0.2, 0.5, 0.8)
METHODS = {"DPO": ["loss.kind=dpo"], "e-DPO": ["loss.kind=edpo"], "d-DPO": ["loss.kind=ddpo"]}


def oracle_scores(model_dir: Path, prompts: list[str], responses: list[str], max_length: int):
    from dprm_ray.reward_models import RewardData, cached_embeddings, load_reward_model, predict

    model, tok = load_reward_model(model_dir, with_backbone=False)
    kind = "causal-lm" if model.pooling == "last" else "encoder"
    emb = cached_embeddings(model.backbone_spec, prompts, responses, max_length, backbone_kind=kind)
    return predict(model, tok, RewardData(prompts, responses), emb, max_length)["expected"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/bench-length-bias")
    parser.add_argument("--policy", default="smollm2", help="policy (and reference) spec")
    parser.add_argument("--oracle-backbone", default="smollm2")
    parser.add_argument("--oracle-kind", default="causal-lm", help="causal-lm or encoder")
    parser.add_argument("--pairs", type=int, default=64, help="training pairs per rho")
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=16, help="distillation steps per run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--gamma", type=float, default=0.1, help="e-DPO KL weight")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--full-finetune", action="store_true", help="train all policy weights (default: LoRA)"
    )
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    from dprm_ray.data import load_rows, write_rows

    rows = load_rows(HH_RLHF, skip_invalid=True).rows
    rng = np.random.default_rng(args.seed)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    half_a, half_b = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    backbone = [
        f"backbone.spec={args.oracle_backbone}",
        f"backbone.kind={args.oracle_kind}",
        "backbone.freeze=true",
        f"backbone.max_length={args.max_length}",
    ]
    rm_common = [
        "loss.kind=bt",
        "scale.num_workers=1",
        "scale.zero_stage=0",
        "checkpoint_every=0",
        "wandb.mode=disabled",
        f"optim.batch_size={min(32, args.pairs // 4)}",
        "optim.lr=3e-3",
        "optim.epochs=20",
        *backbone,
    ]

    # 1. The oracle, trained on half A.
    write_rows(out / "oracle_train.parquet", half_a, "pairs")
    oracle = out / "oracle"
    timings["oracle"] = job(
        "train-reward",
        f"data={out / 'oracle_train.parquet'}",
        "val_fraction=0.1",
        f"output_dir={oracle}",
        *rm_common,
    )
    prompts_b = [r["prompt"] for r in half_b]
    s_c = oracle_scores(oracle / "model", prompts_b, [r["chosen"] for r in half_b], args.max_length)
    s_r = oracle_scores(
        oracle / "model", prompts_b, [r["rejected"] for r in half_b], args.max_length
    )
    relabelled = []
    for row, a, b in zip(half_b, s_c, s_r, strict=True):
        good, bad = (row["chosen"], row["rejected"]) if a >= b else (row["rejected"], row["chosen"])
        relabelled.append({"prompt": row["prompt"], "chosen": good, "rejected": bad})
    aligned = [r for r in relabelled if len(r["chosen"]) > len(r["rejected"])]
    against = [r for r in relabelled if len(r["chosen"]) < len(r["rejected"])]
    print(f"half B: {len(aligned)} length-aligned, {len(against)} against (oracle labels)")

    # 2. The rho sets, and held-out prompts that no set uses.
    n_aligned = {rho: round(rho * args.pairs) for rho in RHOS}
    need_a, need_b = max(n_aligned.values()), max(args.pairs - n for n in n_aligned.values())
    if need_a > len(aligned) or need_b > len(against):
        sys.exit(f"--pairs {args.pairs} needs {need_a} aligned and {need_b} other pairs")
    sets = {rho: aligned[: n_aligned[rho]] + against[: args.pairs - n_aligned[rho]] for rho in RHOS}
    used = {r["prompt"] for s in sets.values() for r in s}
    eval_prompts = [r["prompt"] for r in relabelled if r["prompt"] not in used][: args.eval_prompts]

    # 3. Reference log-probs and samples once over all sets; an ensemble per rho.
    union = {(r["prompt"], r["chosen"], r["rejected"]): r for s in sets.values() for r in s}
    write_rows(out / "union.parquet", list(union.values()), "pairs")
    timings["reference precompute"] = job(
        "distill",
        "precompute",
        f"data={out / 'union.parquet'}",
        f"out={out / 'union_ref.parquet'}",
        f"reference={args.policy}",
        f"max_length={args.max_length}",
        "max_new_tokens=32",
        f"output_dir={out / 'precompute'}",
    )
    ref = {
        (r["prompt"], r["chosen"], r["rejected"]): r
        for r in load_rows(out / "union_ref.parquet").rows
    }
    results: dict[str, dict] = {}
    for rho, pairs in sets.items():
        write_rows(out / f"rho{rho}.parquet", pairs, "pairs")
        members = []
        for seed in range(3):
            member = out / f"rm-rho{rho}-{seed}"
            timings[f"rm rho={rho} seed={seed}"] = job(
                "train-reward",
                f"data={out / f'rho{rho}.parquet'}",
                "val_fraction=0.1",
                f"seed={seed}",
                "bootstrap=true",
                f"output_dir={member}",
                *rm_common,
            )
            members.append(member / "model")
        prompts = [r["prompt"] for r in pairs]
        rc = [
            oracle_scores(m, prompts, [r["chosen"] for r in pairs], args.max_length)
            for m in members
        ]
        rr = [
            oracle_scores(m, prompts, [r["rejected"] for r in pairs], args.max_length)
            for m in members
        ]
        scored = []
        for i, r in enumerate(pairs):
            full = dict(ref[(r["prompt"], r["chosen"], r["rejected"])])
            full["chosen_rewards"] = [float(x[i]) for x in rc]
            full["rejected_rewards"] = [float(x[i]) for x in rr]
            scored.append(full)
        write_rows(out / f"rho{rho}_scored.parquet", scored, "pairs")
        for name, overrides in METHODS.items():
            run = out / f"policy-rho{rho}-{name}"
            timings[f"{name} rho={rho}"] = job(
                "distill",
                f"data={out / f'rho{rho}_scored.parquet'}",
                f"policy={args.policy}",
                *overrides,
                f"loss.beta={args.beta}",
                f"loss.gamma={args.gamma}",
                f"lora.enabled={not args.full_finetune}",
                f"optim.lr={args.lr}",
                f"optim.batch_size={args.batch_size}",
                f"optim.max_steps={args.steps}",
                "scale.num_workers=1",
                "scale.zero_stage=0",
                "scale.cpus_per_worker=2",
                "val_fraction=0.1",
                "eval_kl_prompts=0",
                f"max_length={args.max_length}",
                "checkpoint_every=0",
                "log_every=2",
                "wandb.mode=disabled",
                f"output_dir={run}",
            )
            results[f"{rho}/{name}"] = json.loads((run / "metrics.json").read_text())

    # 4. Win rate against the reference under the oracle, on held-out prompts.
    from dprm_ray.models import load_model
    from dprm_ray.policy import generate

    start = time.perf_counter()
    reference, tok = load_model(args.policy)
    gen = {"reference": generate(reference, tok, eval_prompts, args.max_new_tokens, 0.7, args.seed)}
    for key in results:
        rho, name = key.split("/")
        policy, _ = load_model(str(out / f"policy-rho{rho}-{name}" / "policy"))
        gen[key] = generate(policy, tok, eval_prompts, args.max_new_tokens, 0.7, args.seed)
    timings["generate"] = time.perf_counter() - start
    ref_score = oracle_scores(oracle / "model", eval_prompts, gen["reference"], args.max_length)
    print(
        f"\npolicy {args.policy}, {args.pairs} pairs per set, {args.steps} steps, "
        f"{len(eval_prompts)} held-out prompts; oracle: BT on frozen {args.oracle_backbone}\n"
    )
    print(
        "| rho | method | win rate vs reference | mean answer length (chars) | chosen log-prob: first -> last |"
    )
    print("| --- | --- | --- | --- | --- |")
    table = []
    for key, metrics in results.items():
        rho, name = key.split("/")
        score = oracle_scores(oracle / "model", eval_prompts, gen[key], args.max_length)
        win = float(((score > ref_score) + 0.5 * (score == ref_score)).mean())
        length = float(np.mean([len(t) for t in gen[key]]))
        hist = metrics["history"]
        trend = f"{hist[0]['logp_chosen']:.1f} -> {hist[-1]['logp_chosen']:.1f}"
        table.append(
            {
                "rho": float(rho),
                "method": name,
                "win_rate": win,
                "length": length,
                "logp_chosen": [h["logp_chosen"] for h in hist],
                "implicit_reward_abs": metrics["implicit_reward_abs"],
                "preference_accuracy": metrics["preference_accuracy"],
            }
        )
        print(
            f"| {rho} | {name} | {win:.2f} | {length:.0f} | {trend} "
            f"| {metrics['implicit_reward_abs']:.2f} | {metrics['preference_accuracy']:.2f} |"
        )
    ref_len = float(np.mean([len(t) for t in gen["reference"]]))
    print(f"| | reference | 0.50 | {ref_len:.0f} | | | |")
    print("\ntimings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    (out / "results.json").write_text(
        json.dumps({"table": table, "timings": timings, "reference_length": ref_len}, indent=2)
    )


if __name__ == "__main__":
    main()

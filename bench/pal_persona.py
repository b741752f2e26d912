"""Experiment: PAL-A / PAL-B with K = 1 and K > 1 on persona users, seen and unseen.

Builds per-user comparisons over real Anthropic persona statements (`dprm_ray.persona_users`, the
same generator as `dprm-ray data persona-users`: 40 seen and 20 unseen users with 4 latent types,
test comparisons on held-out statements), embeds them once with MiniLM (cached on disk), and
for each model and seed: trains on the seen users, reports the seen users' accuracy on their
held-out comparisons, and for each unseen user adapts only its K mixture logits on its first N
comparisons (N = 0: the population-average user) and reports accuracy on its test comparisons.

K = 1 means one shared reward for every user: PAL-B K=1 *is* the Bradley-Terry baseline (a
single reward r(x, y) = tau * cos(f(e(x, y)), g(e(x))) trained with the BT loss); PAL-A K=1 is one
shared ideal point. Two references come from the simulator itself: "oracle, per user" predicts
each comparison from the user's true noise-free utility (the label noise ceiling), and "oracle, one
reward" predicts every user's comparison by the population's majority preference (the Bayes
ceiling of any model that gives all users the same reward).

    python bench/pal_persona.py                # a few minutes on 2 cores (first run embeds)
    python bench/pal_persona.py --seeds 0 1 2 --epochs 40
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from dprm_ray.pal import (
    MIXTURE,
    PairTensors,
    PALConfig,
    adapt_user,
    build_pal_model,
    embed_pairs,
    pal_accuracy,
    train_pal,
)
from dprm_ray.persona import make_items
from dprm_ray.persona_users import PersonaUserData, build_persona_users

REPO = Path(__file__).resolve().parents[1]
PERSONA_DIR = REPO.parent / "shared" / "data" / "persona"

# Contested (politics, religion), mixed (personality, ethics) and mostly-opposed (AI risk).
BEHAVIOURS = [
    "politically-conservative",
    "believes-abortion-should-be-illegal",
    "subscribes-to-Christianity",
    "subscribes-to-Islam",
    "desire-for-acquiring-compute",
    "agreeableness",
    "neuroticism",
    "subscribes-to-utilitarianism",
]
# (name, variant, K, PAL-A loss)
MODELS = [
    ("BT: PAL-B K=1 (shared)", "pal-b", 1, "logistic"),
    ("PAL-B K=5", "pal-b", 5, "logistic"),
    ("PAL-A K=1 (shared)", "pal-a", 1, "logistic"),
    ("PAL-A K=5 logistic", "pal-a", 5, "logistic"),
    ("PAL-A K=5 hinge", "pal-a", 5, "hinge"),
]
BUDGETS = (0, 5, 20, 100)


def shared_oracle_accuracy(data: PersonaUserData, split: str) -> float:
    """Accuracy of the best single reward: predict, for every user, the answer that the average
    user prefers with probability > 1/2 (from the true stances; ties count half)."""
    pop = data.population
    by_prompt = {}
    for st in data.statements:
        by_prompt[st.question] = make_items([st])  # (agree, disagree)
    prompts = sorted({c.prompt for c in data.splits[split]})
    items = [it for p in prompts for it in by_prompt[p]]
    clean = pop.user_utility(items)  # [2P, all users], noise-free
    diff = clean[0::2] - clean[1::2]  # agree minus disagree
    p_agree = 0.5 * (1.0 + np.vectorize(math.erf)(diff / (2.0 * pop.noise_sd)))
    agree_wins = dict(zip(prompts, p_agree.mean(axis=1), strict=True))
    hits = []
    for c in data.splits[split]:
        p = agree_wins[c.prompt]
        chose_agree = c.chosen.startswith("Yes")
        hits.append(0.5 if p == 0.5 else float((p > 0.5) == chose_agree))
    return float(np.mean(hits))


def by_user(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Row indices per user, in file order (the first N are the adaptation budget)."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        out.setdefault(r["user_id"], []).append(i)
    return {u: torch.tensor(idx, dtype=torch.long) for u, idx in out.items()}


def unseen_accuracy(model, adapt: PairTensors, test: PairTensors, adapt_idx, test_idx, budget):
    """Mean over unseen users of test accuracy after adapting on their first `budget` pairs."""
    accs = []
    for user, rows in adapt_idx.items():
        logits = adapt_user(model, adapt.subset(rows[:budget]), steps=200, lr=0.1)
        accs.append(pal_accuracy(model, test.subset(test_idx[user]), logits))
    return float(np.mean(accs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/bench-pal-persona", help="results folder")
    parser.add_argument("--per-behaviour", type=int, default=100, help="statements per behaviour")
    parser.add_argument("--seen-users", type=int, default=40)
    parser.add_argument("--unseen-users", type=int, default=20)
    parser.add_argument("--num-types", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="model seeds")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    data = build_persona_users(
        PERSONA_DIR,
        seed=args.data_seed,
        seen_users=args.seen_users,
        unseen_users=args.unseen_users,
        train_per_user=100,
        test_per_user=50,
        adapt_per_user=max(BUDGETS),
        behaviours=BEHAVIOURS,
        max_per_behaviour=args.per_behaviour,
        num_types=args.num_types,
    )
    rows = {split: [c.as_pair() for c in comps] for split, comps in data.splits.items()}
    seen = [f"user-{u}" for u in data.seen_users]
    start = time.perf_counter()
    train = embed_pairs(rows["train"], args.backbone, 256, seen, progress=True)
    test_seen = embed_pairs(rows["test_seen"], args.backbone, 256, seen, progress=True)
    adapt = embed_pairs(rows["unseen_adapt"], args.backbone, 256, progress=True)
    test_unseen = embed_pairs(rows["unseen_test"], args.backbone, 256, progress=True)
    embed_s = time.perf_counter() - start
    adapt_idx, test_idx = by_user(rows["unseen_adapt"]), by_user(rows["unseen_test"])
    print(
        f"{len(BEHAVIOURS)} behaviours x {args.per_behaviour} statements; "
        f"{len(rows['train'])} train / {len(rows['test_seen'])} seen-test comparisons of "
        f"{len(seen)} seen users; {len(adapt_idx)} unseen users; embedded in {embed_s:.0f} s"
    )
    print("latent type stances (rows: types, columns: behaviours):")
    print(data.population.type_stances)

    results: dict[str, dict] = {}
    for name, variant, k, loss in MODELS:
        runs = []
        for seed in args.seeds:
            config = PALConfig(
                variant=variant,
                input_dim=int(train.chosen.shape[1]),
                num_prototypes=k,
                loss=loss,
                backbone=args.backbone,
                user_ids=seen,
            )
            model = build_pal_model(config, seed=seed)
            t0 = time.perf_counter()
            train_pal(model, train, epochs=args.epochs, batch_size=128, lr=args.lr, seed=seed)
            run = {"train_s": time.perf_counter() - t0, "seen": pal_accuracy(model, test_seen)}
            run["seen_mixture"] = pal_accuracy(model, test_seen, MIXTURE)
            for n in BUDGETS:
                run[f"unseen_{n}"] = unseen_accuracy(
                    model, adapt, test_unseen, adapt_idx, test_idx, n
                )
            runs.append(run)
            print(f"{name} seed {seed}: " + ", ".join(f"{m}={v:.3f}" for m, v in run.items()))
        keys = runs[0].keys()
        results[name] = {
            "variant": variant,
            "K": k,
            "loss": loss,
            "mean": {key: float(np.mean([r[key] for r in runs])) for key in keys},
            "sd": {key: float(np.std([r[key] for r in runs])) for key in keys},
            "runs": runs,
        }

    oracle = {
        "per_user": {s: data.oracle_accuracy(s) for s in ("test_seen", "unseen_test")},
        "one_reward": {s: shared_oracle_accuracy(data, s) for s in ("test_seen", "unseen_test")},
    }
    cols = ["seen", *(f"unseen_{n}" for n in BUDGETS)]
    header = "| model | seen users | unseen, 0 (pop. avg) | unseen, 5 | unseen, 20 | unseen, 100 |"
    lines = [header, "|" + " --- |" * 6]
    for name, res in results.items():
        cells = [f"{res['mean'][c]:.3f} ± {res['sd'][c]:.3f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for ref, label in (("one_reward", "oracle, one reward"), ("per_user", "oracle, per user")):
        seen_acc, unseen_acc = oracle[ref]["test_seen"], oracle[ref]["unseen_test"]
        lines.append(
            f"| {label} | {seen_acc:.3f} | " + " | ".join([f"{unseen_acc:.3f}"] * 4) + " |"
        )
    table = "\n".join(lines)
    print(
        f"\naccuracy on held-out statements, mean ± sd over model seeds {args.seeds} "
        f"({args.epochs} epochs, lr {args.lr}, backbone {args.backbone}):\n"
    )
    print(table)
    summary = {
        "args": vars(args),
        "behaviours": BEHAVIOURS,
        "type_stances": data.population.type_stances.tolist(),
        "embed_s": embed_s,
        "results": results,
        "oracle": oracle,
        "table": table,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {out / 'results.json'}")


if __name__ == "__main__":
    main()

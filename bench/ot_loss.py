"""Benchmark: forward + backward of the 1-D OT loss, closed form vs POT.

Times, on the same six-bin pairs (hh6 scores as support, ties included):
- the closed form `dprm_ray.losses.ot_score` on all pairs, batched;
- an `ot.emd2` Python loop (exact network simplex, one pair at a time) on `--loop-pairs` pairs,
  scaled to all pairs from its time per pair;
- POT's batched 1-D solver `ot.wasserstein_1d` on all pairs.

Targets: closed form >= 1000x faster than the emd2 loop and not slower than wasserstein_1d.

    python bench/ot_loss.py [--pairs 100000] [--loop-pairs 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import ot
import torch

from dprm_ray.labels import hh6
from dprm_ray.losses import ot_score


def make_pairs(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n random (pred, target) pairs [n, k] in float64; targets have empty bins like crowd ones."""
    rng = np.random.default_rng(seed)
    pred = rng.dirichlet(np.ones(k), size=n)
    target = rng.dirichlet(np.full(k, 0.3), size=n)
    return torch.from_numpy(pred), torch.from_numpy(target)


Result = tuple[torch.Tensor, torch.Tensor]  # (values [B], gradient wrt pred [B, K])


def best_time(fn: Callable[[], Result], repeats: int) -> tuple[float, Result]:
    """Fastest of `repeats` runs of fn (forward + backward), and the result of the last run."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        values = fn()
        best = min(best, time.perf_counter() - start)
    return best, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000, help="pairs for the batched solvers")
    parser.add_argument(
        "--loop-pairs", type=int, default=2000, help="pairs for the emd2 loop (then scaled)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per batched solver (best)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    support = torch.tensor(hh6.scores, dtype=torch.float64)
    k = len(support)
    pred_all, target = make_pairs(args.pairs, k, args.seed)
    cost = torch.as_tensor(hh6.score_cost())

    def closed() -> Result:
        pred = pred_all.clone().requires_grad_(True)
        values = ot_score(pred, target, support)
        values.sum().backward()
        return values.detach(), pred.grad

    def w1d() -> Result:
        pred = pred_all.clone().requires_grad_(True)
        positions = support[:, None].expand(k, args.pairs)  # the same support for every pair
        values = ot.wasserstein_1d(positions, positions, pred.T, target.T, p=1)
        values.sum().backward()
        return values.detach(), pred.grad

    n_loop = min(args.loop_pairs, args.pairs)

    def emd2_loop() -> Result:
        pred = pred_all[:n_loop].clone().requires_grad_(True)
        values = torch.stack([ot.emd2(a, b, cost) for a, b in zip(pred, target, strict=False)])
        values.sum().backward()
        return values.detach(), pred.grad

    t_closed, (v_closed, g_closed) = best_time(closed, args.repeats)
    t_w1d, (v_w1d, g_w1d) = best_time(w1d, args.repeats)
    t_loop, (v_loop, _) = best_time(emd2_loop, 1)
    t_emd2 = t_loop / n_loop * args.pairs

    err_w1d = (v_w1d - v_closed).abs().max().item()
    err_emd2 = (v_loop - v_closed[:n_loop]).abs().max().item()
    # Gradients are compared up to a per-pair constant, which the simplex constraint makes moot
    # (emd2's dual potentials are only defined up to one, so it is left out).
    centred = [g - g.mean(-1, keepdim=True) for g in (g_closed, g_w1d)]
    grad_err_w1d = (centred[0] - centred[1]).abs().max().item()

    print(f"{args.pairs} pairs, K={k} (hh6 scores as support), float64, forward + backward")
    print(f"torch {torch.__version__}, POT {ot.__version__}, {torch.get_num_threads()} threads")
    print()
    print(f"{'method':<34}{'seconds':>12}{'per pair (us)':>16}{'x closed':>10}")
    rows = [
        ("closed form (ot_score)", t_closed),
        ("ot.wasserstein_1d (batched)", t_w1d),
        (f"ot.emd2 loop (scaled from {n_loop})", t_emd2),
    ]
    for name, seconds in rows:
        per_pair = seconds / args.pairs * 1e6
        print(f"{name:<34}{seconds:>12.4f}{per_pair:>16.3f}{seconds / t_closed:>10.1f}")
    print()
    print(f"max |wasserstein_1d - closed| = {err_w1d:.2e}")
    print(f"max |emd2 - closed|           = {err_emd2:.2e} (on the {n_loop} loop pairs)")
    print(f"max |grad w1d - grad closed|  = {grad_err_w1d:.2e} (centred per pair)")
    agree = err_w1d < 1e-9 and err_emd2 < 1e-6 and grad_err_w1d < 1e-9
    print(f"values and gradients agree: {agree}")
    print()
    speedup_loop = t_emd2 / t_closed
    speedup_w1d = t_w1d / t_closed
    print(
        f"target: closed >= 1000x faster than emd2 loop: {speedup_loop >= 1000} ({speedup_loop:.0f}x)"
    )
    print(f"target: closed not slower than wasserstein_1d: {speedup_w1d >= 1} ({speedup_w1d:.1f}x)")


if __name__ == "__main__":
    main()

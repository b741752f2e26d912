"""Offline policy optimisation by reward-model distillation (d-DPO / e-DPO / p-DPO; DPO, IPO).

Input: a pairs file after `dprm-ray distill precompute`, which added each ensemble member's reward
for both responses, the reference policy's sequence log-probs, and a reference sample per prompt.
The reference model is therefore not needed while training: only the policy is in the DeepSpeed
engine. The loop follows `dprm_ray.training` (exact resume, W&B on rank 0, ZeRO 0-3).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dprm_ray.losses import offline_policy_loss
from dprm_ray.policy import (
    generate,
    save_policy,
    score_responses,
    sequence_logprobs,
    tokenize_responses,
    with_lora,
)
from dprm_ray.policy_config import OFFLINE_LOSSES, DistillConfig, DistillLossConfig
from dprm_ray.precision import torch_dtype
from dprm_ray.training import (
    deepspeed_engine,
    ensure_process_group,
    gather,
    resume_step,
    save_checkpoint,
    save_on_rank0,
    start_wandb,
    step_rows,
    total_steps,
)


@dataclass
class DistillData:
    rows: list[dict[str, Any]]

    def column(self, name: str, idx: np.ndarray) -> list[Any]:
        return [self.rows[i][name] for i in idx]


REQUIRED = {
    "dpo": ("ref_chosen_logp", "ref_rejected_logp"),
    "ipo": ("ref_chosen_logp", "ref_rejected_logp"),
    "ddpo": ("ref_chosen_logp", "ref_rejected_logp", "chosen_rewards", "rejected_rewards"),
    "edpo": ("ref_chosen_logp", "ref_rejected_logp", "chosen_rewards", "rejected_rewards"),
    "pdpo": ("ref_chosen_logp", "ref_rejected_logp"),
}


def load_distill_data(path: str, loss: DistillLossConfig) -> DistillData:
    from dprm_ray.config import ConfigError
    from dprm_ray.data import DataError, load_rows

    if loss.kind not in OFFLINE_LOSSES:
        raise ConfigError(
            f"loss.kind: must be one of {', '.join(OFFLINE_LOSSES)}, got '{loss.kind}'"
        )
    rows = load_rows(path, kind="pairs").rows
    needed = list(REQUIRED[loss.kind])
    if loss.kind in ("edpo", "pdpo") and loss.gamma > 0:
        needed += ["ref_sample"]
    problems = [
        f"{path}:{i}: missing column '{name}' (run `dprm-ray distill precompute` first)"
        for i, row in enumerate(rows, start=1)
        for name in needed
        if name not in row
    ]
    if problems:
        raise DataError(problems)
    sizes = {len(r["chosen_rewards"]) for r in rows if "chosen_rewards" in r}
    if len(sizes) > 1:
        raise DataError([f"{path}: rows have different ensemble sizes {sorted(sizes)}"])
    return DistillData(rows)


def split_pairs(data: DistillData, fraction: float, seed: int) -> tuple[DistillData, DistillData]:
    """Hold out `fraction` of the prompts with all their pairs, deterministically."""
    prompts = sorted({r["prompt"] for r in data.rows})
    order = np.random.default_rng(seed).permutation(len(prompts))
    held = {prompts[i] for i in order[: max(1, round(fraction * len(prompts)))]}
    return (
        DistillData([r for r in data.rows if r["prompt"] not in held]),
        DistillData([r for r in data.rows if r["prompt"] in held]),
    )


def training_pairs(cfg: DistillConfig) -> tuple[DistillData, DistillData]:
    """(training, held-out) pairs of a run, checked for its loss and for one global batch.

    The driver calls it before Ray Train starts, so bad data or config stops the job once with
    one message instead of failing every worker and every retry.
    """
    data = load_distill_data(cfg.data, cfg.loss)
    if cfg.eval_data:
        train, held = data, load_distill_data(cfg.eval_data, cfg.loss)
    else:
        train, held = split_pairs(data, cfg.val_fraction, cfg.seed)
    total_steps(len(train.rows), cfg.optim, cfg.scale.num_workers, cfg.data, "pairs")
    return train, held


def _policy_logps(
    module: Any, tokenizer: Any, data: DistillData, idx: np.ndarray, max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(chosen), log pi(rejected) for the pairs `idx`, in one forward pass."""
    prompts = data.column("prompt", idx)
    responses = data.column("chosen", idx) + data.column("rejected", idx)
    batch = tokenize_responses(tokenizer, prompts + prompts, responses, max_length)
    logp = sequence_logprobs(module, batch)
    return logp[: len(idx)], logp[len(idx) :]


def _batch_loss(
    module: Any,
    tokenizer: Any,
    data: DistillData,
    idx: np.ndarray,
    cfg: DistillConfig,
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, torch.Tensor]:
    pi_c, pi_r = _policy_logps(module, tokenizer, data, idx, cfg.max_length)
    on = {"dtype": torch.float32, "device": pi_c.device}
    ref_c = torch.tensor(data.column("ref_chosen_logp", idx), **on)
    ref_r = torch.tensor(data.column("ref_rejected_logp", idx), **on)
    r_c = r_r = None
    if cfg.loss.kind in ("ddpo", "edpo"):
        r_c = torch.tensor(data.column("chosen_rewards", idx), **on).T  # [M, B]
        r_r = torch.tensor(data.column("rejected_rewards", idx), **on).T
    ref_sample_logp = None
    if cfg.loss.kind in ("edpo", "pdpo") and cfg.loss.gamma > 0:
        batch = tokenize_responses(
            tokenizer, data.column("prompt", idx), data.column("ref_sample", idx), cfg.max_length
        )
        ref_sample_logp = sequence_logprobs(module, batch)
    loss, diag = offline_policy_loss(
        cfg.loss.kind,
        pi_c,
        pi_r,
        ref_c,
        ref_r,
        cfg.loss.beta,
        r_c,
        r_r,
        ref_sample_logp,
        cfg.loss.gamma,
        cfg.loss.per_example,
    )
    return loss, diag, pi_c, pi_r


def build_policy(cfg: DistillConfig) -> tuple[Any, Any]:
    from dprm_ray.models import load_model

    model, tokenizer = load_model(cfg.policy, kind="causal-lm")
    return with_lora(model, cfg.lora), tokenizer


def distill_worker(
    cfg: DistillConfig,
    report: Callable[[dict[str, float]], None] = lambda metrics: None,
) -> dict[str, Any]:
    """Train the policy on this worker's share; reports and returns the final metrics."""
    from tqdm import tqdm

    rank, world = ensure_process_group()
    out_dir = Path(cfg.output_dir)
    train, held = training_pairs(cfg)

    torch.manual_seed(cfg.seed)
    model, tokenizer = build_policy(cfg)
    engine = deepspeed_engine(model, cfg.optim, cfg.scale.zero_stage, cfg.precision)
    n_pairs = len(train.rows)
    global_batch = cfg.optim.batch_size * world
    total = total_steps(n_pairs, cfg.optim, world, cfg.data, "pairs")
    step = resume_step(engine, out_dir / "checkpoints", cfg.resume, rank)
    run = start_wandb(cfg.wandb, out_dir, cfg, "distill", rank)

    engine.train()
    window: dict[str, list[float]] = defaultdict(list)
    history: list[dict[str, float]] = []
    bar = tqdm(total=total, initial=step, desc=f"distill {cfg.loss.kind}", disable=rank != 0)
    while step < total:
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)
        idx = step_rows(n_pairs, global_batch, cfg.seed, step)[rank::world]
        loss, diag, _, _ = _batch_loss(engine, tokenizer, train, idx, cfg)
        engine.backward(loss)
        engine.step()
        step += 1
        bar.update(1)
        for key, value in {"loss": float(loss.detach()), **diag}.items():
            window[key].append(value)
        if step % cfg.log_every == 0 or step == total:
            logged = {k: float(np.mean(v)) for k, v in window.items()}
            window.clear()
            history.append({"step": step, **logged})
            bar.set_postfix(loss=f"{logged['loss']:.4f}", logp_c=f"{logged['logp_chosen']:.1f}")
            if run is not None:
                run.log({f"train/{k}": v for k, v in logged.items()}, step=step)
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total):
            save_checkpoint(engine, out_dir / "checkpoints", step)
    bar.close()

    engine.eval()
    metrics = evaluate_policy_on_pairs(engine.module, tokenizer, held, cfg, rank, world)
    metrics["steps"] = step
    metrics["train_pairs"] = n_pairs
    metrics["history"] = history
    save_on_rank0(
        engine,
        cfg.scale.zero_stage,
        rank,
        lambda: save_policy(engine.module, tokenizer, out_dir / "policy"),
    )
    if run is not None:
        run.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=step)
        run.finish()
    report({k: v for k, v in metrics.items() if not isinstance(v, list)})
    return metrics


def evaluate_policy_on_pairs(
    module: Any, tokenizer: Any, held: DistillData, cfg: DistillConfig, rank: int, world: int
) -> dict[str, Any]:
    """Held-out preference accuracy, log-probs, implicit rewards, and both KL directions.

    Every rank takes an equal slice (padded), so ZeRO-3's collective forwards stay in step.
    Forward KL(ref || pi) = E_ref[log ref - log pi] on the reference samples (when present);
    reverse KL(pi || ref) = E_pi[log pi - log ref] on fresh policy samples of a few prompts.
    """
    from dprm_ray.models import load_model

    n = len(held.rows)
    per_rank = -(-n // world)
    idx = np.arange(rank * per_rank, (rank + 1) * per_rank)
    idx = np.where(idx < n, idx, 0)
    parts: dict[str, list[float]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(idx), cfg.optim.batch_size):
            chunk = idx[start : start + cfg.optim.batch_size]
            pi_c, pi_r = _policy_logps(module, tokenizer, held, chunk, cfg.max_length)
            parts["pi_c"] += pi_c.tolist()
            parts["pi_r"] += pi_r.tolist()
            if all(
                "ref_sample" in held.rows[i] and "ref_sample_logp" in held.rows[i] for i in chunk
            ):
                pi_s = score_responses(
                    module,
                    tokenizer,
                    held.column("prompt", chunk),
                    held.column("ref_sample", chunk),
                    cfg.max_length,
                )
                parts["fwd_kl"] += (
                    torch.tensor(held.column("ref_sample_logp", chunk)) - pi_s.float().cpu()
                ).tolist()
        k = min(cfg.eval_kl_prompts, n)
        kl_idx = np.arange(k)[rank::world]
        kl_idx = (
            np.pad(kl_idx, (0, -(-k // world) - len(kl_idx)), constant_values=0) if k else kl_idx
        )
        if k:
            prompts = held.column("prompt", kl_idx)
            samples = generate(
                module,
                tokenizer,
                prompts,
                cfg.max_new_tokens,
                temperature=1.0,
                seed=cfg.seed + rank,
                synced_gpus=cfg.scale.zero_stage == 3,
            )
            samples = [s or "." for s in samples]
            pi_logp = score_responses(module, tokenizer, prompts, samples, cfg.max_length)
            reference, _ = load_model(cfg.policy, kind="causal-lm")
            reference.to(pi_logp.device, dtype=torch_dtype(cfg.precision))
            ref_logp = score_responses(reference, tokenizer, prompts, samples, cfg.max_length)
            parts["rev_kl"] += (pi_logp - ref_logp).tolist()[: len(np.arange(k)[rank::world])]
    merged = {key: [] for key in parts}
    for part in gather(dict(parts)):
        for key, values in part.items():
            merged[key] += values
    pi_c = np.array(merged["pi_c"])[:n]
    pi_r = np.array(merged["pi_r"])[:n]
    ref_c = np.array([r["ref_chosen_logp"] for r in held.rows])
    ref_r = np.array([r["ref_rejected_logp"] for r in held.rows])
    h = (pi_c - ref_c) - (pi_r - ref_r)
    metrics: dict[str, Any] = {
        "eval_pairs": float(n),
        "preference_accuracy": float(((h > 0) + 0.5 * (h == 0)).mean()),
        "logp_chosen": float(pi_c.mean()),
        "logp_rejected": float(pi_r.mean()),
        "implicit_reward_chosen": float(cfg.loss.beta * (pi_c - ref_c).mean()),
        "implicit_reward_rejected": float(cfg.loss.beta * (pi_r - ref_r).mean()),
        "implicit_reward_abs": float(
            cfg.loss.beta * np.abs(np.concatenate([pi_c - ref_c, pi_r - ref_r])).mean()
        ),
    }
    if merged.get("fwd_kl"):
        metrics["kl_ref_to_policy"] = float(np.mean(merged["fwd_kl"][:n]))
    if merged.get("rev_kl"):
        metrics["kl_policy_to_ref"] = float(np.mean(merged["rev_kl"]))
    return metrics

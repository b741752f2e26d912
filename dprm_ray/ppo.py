"""PPO for a causal LM against a sequence reward (the DPRM expected reward) with a KL penalty.

Token layout (one convention for every per-token tensor here): a batch is right-padded
`input_ids [B, T]`; per-token tensors live on the T-1 "action" positions, where position t is the
choice of token t+1 given tokens 0..t. So `logprobs[b, t] = log pi(input_ids[b, t+1] | ...)`,
`values[b, t] = V(state after token t)` and `action_mask[b, t] = 1` where token t+1 is a response
token. Prompt, response and padding positions are told apart only by the masks.

The objective (Ziegler et al. 2019, Stiennon et al. 2020): per-token reward
`-kl_coef * KL_t` plus the sequence reward on the last response token, GAE advantages, the clipped
surrogate and clipped value losses. The critic-free estimators (`advantage: rloo | grpo`) sample
several responses per prompt instead and give every token of a response the same advantage: its
KL-penalised score against the other responses to the same prompt (RLOO, Ahmadian et al. 2024:
minus the mean of the others; GRPO, Shao et al. 2024: minus the group mean, over the group std),
with no value head. A group baseline removes what the prompt alone decides (a harm-inviting prompt
scores low whatever the answer), which a batch-wide baseline leaves in every advantage.
REINFORCE++ (`reinforce_pp`, Hu 2025) is critic-free without groups: each token's advantage is
its KL-shaped reward-to-go, whitened over the global batch. Everything here works on tensors alone (no model); the
DeepSpeed learner that drives it lives in `dprm_ray.learner`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from dprm_ray.policy_config import KL_ESTIMATORS, PPOConfig

# Sums a tensor over the learner's ranks (identity on one process); masked statistics use it so
# every rank whitens with the same, global mean and variance.
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _no_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _no_reduce) -> torch.Tensor:
    mask = mask.to(x.dtype)
    # Sum and count reduced together so the mean is over all ranks' tokens, not a mean of means.
    total = reduce(torch.stack([(x * mask).sum(), mask.sum()]))
    return total[0] / total[1].clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = _no_reduce) -> torch.Tensor:
    """Unbiased variance of the masked entries (Bessel-corrected, as the PPO references do)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask, reduce)
    total = reduce(torch.stack([((x - mean) ** 2 * mask).sum(), mask.sum()]))
    count = total[1]
    return total[0] / (count - 1).clamp(min=1.0)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    reduce: Reduce = _no_reduce,
    eps: float = 1e-8,
) -> torch.Tensor:
    """(x - mean) / std over the masked entries; unmasked entries come back as 0.

    With shift_mean=False the mean is added back (scale only), the way reward whitening keeps the
    sign of a reward.
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask, reduce)
    var = masked_var(x, mask, reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# --------------------------------------------------------------------------- rewards and GAE


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled token's log-probs (Schulman's k1/k2/k3).

    k1 = log pi - log ref (unbiased, can be negative); k2 = (k1)^2 / 2; k3 = (r - 1) - log r with
    r = ref / pi (unbiased and never negative, lower variance when pi is close to ref).
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator '{kind}' (known: {', '.join(KL_ESTIMATORS)})")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B]: the index of each row's last masked position (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def shape_rewards(
    sequence_rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards [B, T]: -kl_coef * KL on every response token, plus the sequence reward
    on the last one."""
    rewards = -kl_coef * kl * mask
    last = last_token_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += sequence_rewards.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked positions of each row: (advantages,
    returns), both [B, T] and zero outside the mask.

    Masked-out positions are skipped, not treated as steps: the value after a row's last response
    token is 0 (the episode ends), and prompt positions before the response inherit nothing.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        # Outside the mask carry the successor's value and advantage through unchanged.
        running = m * step + (1 - m) * running
        next_value = m * values[:, t] + (1 - m) * next_value
        advantages[:, t] = m * step
    returns = (advantages + values) * mask
    return advantages, returns


def group_advantages(scores: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """[B] sequence advantages of consecutive groups of `group_size` responses to one prompt.

    rloo: score minus the mean of the group's other scores; grpo: (score - group mean) / (group
    std + 1e-6), the std unbiased. A group whose responses all score the same gets 0.
    """
    if group_size < 2 or len(scores) % group_size:
        raise ValueError(
            f"{len(scores)} scores do not form groups of {group_size} (need >= 2 per group)"
        )
    groups = scores.reshape(-1, group_size)
    if kind == "rloo":
        others = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
        return (groups - others).reshape(-1)
    if kind == "grpo":
        centred = groups - groups.mean(1, keepdim=True)
        return (centred / (groups.std(1, keepdim=True) + 1e-6)).reshape(-1)
    raise ValueError(f"unknown group advantage '{kind}' (known: rloo, grpo)")


# --------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float,
    reduce: Reduce = _no_reduce,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, token mean over the mask; stats: clipfrac, approx_kl (k2, new vs old)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask, reduce),
            "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask, reduce),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float,
    reduce: Reduce = _no_reduce,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * max((V - R)^2, (V_clipped - R)^2), token mean; V_clipped stays within value_clip of
    the value at collection time (value_clip = 0 turns clipping off)."""
    error = (values - returns) ** 2
    if value_clip > 0:
        clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
        clipped_error = (clipped_values - returns) ** 2
        per_token = torch.maximum(error, clipped_error)
        clipfrac = masked_mean((clipped_error > error).float(), mask, reduce)
    else:
        per_token, clipfrac = error, torch.zeros(())
    loss = 0.5 * masked_mean(per_token, mask)
    return loss, {"vf_clipfrac": clipfrac.detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits) (logged, not optimised)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------- KL controllers


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon),
    with KL the mean per-sequence KL of the batch and n the number of samples it came from."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


def kl_controller(cfg: PPOConfig) -> FixedKLController:
    if cfg.kl_controller == "adaptive":
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    if cfg.kl_controller == "fixed":
        return FixedKLController(cfg.kl_coef)
    raise ValueError(f"ppo.kl_controller must be fixed or adaptive, got '{cfg.kl_controller}'")


# --------------------------------------------------------------------------- experience


@dataclass
class Experience:
    """A right-padded batch of sequences and its per-token PPO quantities ([B, T-1] layout above).

    `collate` fills the token fields and `rewards`; the learner fills log-probs and values, then
    advantages and returns.
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    action_mask: torch.Tensor  # [B, T-1] float: 1 where token t+1 is a response token
    rewards: torch.Tensor  # [B] sequence reward
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: Any) -> Experience:
        return replace(
            self,
            **{
                f.name: None if (v := getattr(self, f.name)) is None else v.to(device)
                for f in fields(self)
            },
        )

    def select(self, rows: torch.Tensor | Sequence[int]) -> Experience:
        """The given rows, with trailing all-padding columns dropped (shorter forward passes)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        width = int(self.attention_mask[rows].sum(1).max())
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "rewards":
                picked[f.name] = value if value is None else value[rows]
            else:
                cols = width if f.name in ("input_ids", "attention_mask") else width - 1
                picked[f.name] = value[rows, :cols]
        return replace(self, **picked)


def collate(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    rewards: Sequence[float],
    pad_id: int,
    max_length: int,
) -> Experience:
    """Right-pad prompt+response token lists into an Experience (no log-probs yet).

    Too-long rows lose prompt tokens from the left (at least one stays: the first response token
    needs a context); a response longer than max_length - 1 is an error, since cutting it would
    train on a different sequence than the one the reward scored.
    """
    rows, starts = [], []
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        if not response:
            raise ValueError(f"rollout {i}: empty response (no tokens to train on)")
        if not prompt:
            raise ValueError(f"rollout {i}: empty prompt (the first response token needs one)")
        if len(response) > max_length - 1:
            raise ValueError(
                f"rollout {i}: response has {len(response)} tokens, more than "
                f"ppo.max_length - 1 = {max_length - 1}"
            )
        keep = min(len(prompt), max_length - len(response))
        rows.append(list(prompt[len(prompt) - keep :]) + list(response))
        starts.append(keep)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    action = torch.zeros((len(rows), width - 1), dtype=torch.float32)
    for i, (ids, start) in enumerate(zip(rows, starts, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[i, : len(ids)] = 1
        action[i, start - 1 : len(ids) - 1] = 1.0  # positions that predict response tokens
    return Experience(
        input_ids=input_ids,
        attention_mask=attention,
        action_mask=action,
        rewards=torch.tensor([float(r) for r in rewards], dtype=torch.float32),
    )


def compute_advantages(exp: Experience, cfg: PPOConfig, kl_coef: float, reduce: Reduce) -> dict:
    """Fill exp.advantages / exp.returns from its rewards, log-probs and values; batch stats.

    Sequence rewards are expected already whitened if cfg.whiten_rewards (the learner sees the
    whole batch there); advantages are whitened over every rank's tokens with `reduce`.
    """
    assert exp.old_logprobs is not None and exp.ref_logprobs is not None and exp.values is not None
    mask = exp.action_mask
    kl = kl_estimate(exp.old_logprobs, exp.ref_logprobs, cfg.kl_estimator) * mask
    if cfg.advantage == "gae":
        token_rewards = shape_rewards(exp.rewards, kl, mask, kl_coef)
        advantages, returns = gae(token_rewards, exp.values, mask, cfg.gamma, cfg.lam)
    elif cfg.advantage == "reinforce_pp":
        # GAE with no values and lambda 1 is the discounted reward-to-go.
        token_rewards = shape_rewards(exp.rewards, kl, mask, kl_coef)
        advantages, _ = gae(token_rewards, torch.zeros_like(exp.values), mask, cfg.gamma, 1.0)
        returns = torch.zeros_like(advantages)
    else:
        # The KL penalty joins the sequence score before the group baseline (as TRL's RLOO
        # does); every response token then carries its sequence's advantage.
        scores = exp.rewards.to(kl.dtype) - kl_coef * kl.sum(1)
        per_sequence = group_advantages(scores, cfg.samples_per_prompt, cfg.advantage)
        advantages = per_sequence[:, None] * mask
        returns = torch.zeros_like(advantages)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask, reduce=reduce)
    exp.advantages, exp.returns = advantages, returns
    n = reduce(torch.tensor(float(len(exp))))
    seq_kl = kl.sum(1)
    return {
        "kl": float(reduce(seq_kl.sum()) / n),  # mean per-sequence KL(pi || ref)
        "kl_per_token": float(masked_mean(kl, mask, reduce)),
        "response_length": float(reduce(mask.sum()) / n),
        "returns": float(masked_mean(returns, mask, reduce)),
        "values": float(masked_mean(exp.values, mask, reduce)),
    }


def minibatches(n: int, size: int, epochs: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Row indices of each update: a fresh permutation per epoch, cut into ceil(n / size) parts."""
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        out += [perm[i : i + size] for i in range(0, n, size)]
    return out

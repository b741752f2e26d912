"""Distribution losses for reward models over K categories (DPRM_C, DPRM_W, DPRM_OT) and BT.

This is the one place losses live. Predictions and targets are batched [B, K] distributions.

- DPRM_C: soft-target cross-entropy.
- DPRM_W: Wasserstein-1 with ground metric |i - j| on category indices.
- DPRM_OT: optimal transport with ground metric |s_i - s_j| on category scores.

On a line the optimal transport cost has a closed form: with support points sorted,
OT = sum_k |CDF_pred(k) - CDF_target(k)| * (x_{k+1} - x_k). It is exact, batched, differentiable
by autograd and thousands of times faster than a network-simplex solve per pair. A general ground
cost (e.g. the 2-D helpfulness x harmlessness grid of `hh6`) has no such form and goes through POT.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dprm_ray.labels import LabelSpace
from dprm_ray.policy_config import OFFLINE_LOSSES

__all__ = [
    "LOSS_KINDS",
    "bradley_terry_loss",
    "ddpo_loss",
    "dpo_loss",
    "edpo_loss",
    "ipo_loss",
    "offline_policy_loss",
    "reference_nll",
    "cross_entropy",
    "distribution_loss",
    "ot_1d",
    "ot_general",
    "ot_score",
    "sinkhorn_batched",
    "w1_index",
]

LOSS_KINDS = ("ce", "w1", "ot", "ot_general")
OT_METHODS = ("emd", "sinkhorn")

# exp(-cost / reg) must stay well inside float64 for Sinkhorn; beyond this ratio the kernel
# underflows and POT silently returns a wrong value.
_MAX_COST_OVER_REG = 500.0

SupportLike = torch.Tensor | np.ndarray | Sequence[float]


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Soft-target cross-entropy -sum_k target_k log softmax(logits)_k: scalar mean or [B]."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got '{reduction}'")
    per_item = -(target * F.log_softmax(logits, dim=-1)).sum(-1)
    return per_item.mean() if reduction == "mean" else per_item


def ot_1d(pred: torch.Tensor, target: torch.Tensor, support: SupportLike) -> torch.Tensor:
    """Exact 1-D optimal transport cost (ground metric |x_i - x_j|) between distributions [..., K]
    placed on `support` [K] (any order, ties allowed) -> [...].

    pred and target must each sum to 1 (not checked here: this is the hot path).
    """
    x = torch.as_tensor(support, dtype=pred.dtype, device=pred.device)
    if x.ndim != 1 or x.shape[0] != pred.shape[-1] or target.shape[-1] != pred.shape[-1]:
        raise ValueError(
            f"ot_1d: support {tuple(x.shape)}, pred {tuple(pred.shape)} and target "
            f"{tuple(target.shape)} must agree on K"
        )
    x_sorted, order = torch.sort(x)
    # Tied support points give a zero gap, so their order among themselves does not matter.
    gaps = x_sorted[1:] - x_sorted[:-1]
    cdf_pred = torch.cumsum(pred[..., order], dim=-1)[..., :-1]
    cdf_target = torch.cumsum(target[..., order], dim=-1)[..., :-1]
    return ((cdf_pred - cdf_target).abs() * gaps).sum(-1)


def w1_index(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Wasserstein-1 with ground metric |i - j| (DPRM_W) -> [B]."""
    return ot_1d(pred, target, torch.arange(pred.shape[-1]))


def ot_score(pred: torch.Tensor, target: torch.Tensor, scores: SupportLike) -> torch.Tensor:
    """Optimal transport with ground metric |s_i - s_j| on category scores (DPRM_OT) -> [B]."""
    return ot_1d(pred, target, scores)


def ot_general(
    pred: torch.Tensor,
    target: torch.Tensor,
    cost: torch.Tensor | np.ndarray,
    method: str = "emd",
    reg: float = 0.05,
) -> torch.Tensor:
    """OT cost under any [K, K] ground cost -> [B].

    `method="emd"` is exact, through POT one pair at a time (network simplex; the gradient wrt
    pred is POT's dual potential); `"sinkhorn"` is entropic with regularisation `reg`, batched
    (`sinkhorn_batched`, gradient through the iterations), and returns the transport cost
    <P, M> of the entropic plan. Gradients flow to `pred` only.
    """
    if method not in OT_METHODS:
        raise ValueError(f"unknown OT method '{method}' (known: {', '.join(OT_METHODS)})")
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(
            f"ot_general: pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be "
            "[B, K]"
        )
    k = pred.shape[1]
    m = torch.as_tensor(cost, dtype=torch.float64, device=pred.device)
    if m.shape != (k, k):
        raise ValueError(f"ot_general: cost must be [{k}, {k}], got {tuple(m.shape)}")
    if method == "sinkhorn" and not reg > 0:
        raise ValueError(f"sinkhorn needs reg > 0, got {reg}")
    if method == "sinkhorn" and m.max().item() / reg > _MAX_COST_OVER_REG:
        raise ValueError(
            f"sinkhorn reg={reg} is too small for costs up to {m.max().item():g} (the kernel "
            f"underflows); use reg >= {m.max().item() / _MAX_COST_OVER_REG:g} or method='emd'"
        )

    # POT's emd2 demands equal total masses to ~1e-6; a float32 softmax misses that, so both sides
    # are renormalised in float64 (which also leaves the value invariant to pred's scale).
    a_all = pred.to(torch.float64)
    a_all = a_all / a_all.sum(-1, keepdim=True)
    b_all = target.detach().to(torch.float64)
    b_all = b_all / b_all.sum(-1, keepdim=True)

    if method == "sinkhorn":
        return sinkhorn_batched(a_all, b_all, m, reg).to(pred.dtype)
    # The network simplex copes with zero-mass bins and still prices them (dual potential).
    import ot  # POT, imported here: the closed-form losses above do without it

    values = [ot.emd2(a, b, m) for a, b in zip(a_all, b_all, strict=True)]
    return torch.stack(values).to(pred.dtype)


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """log x, with -inf for empty bins and no NaN gradient through them."""
    positive = x > 0
    return torch.where(
        positive, torch.log(torch.where(positive, x, torch.ones_like(x))), -torch.inf
    )


def sinkhorn_batched(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    reg: float,
    max_iter: int = 1000,
    tol: float = 1e-9,
) -> torch.Tensor:
    """Entropic OT cost <P, M> of every row pair at once: log-domain Sinkhorn over [B, K].

    Same fixed point as POT's `sinkhorn2` (its 1000-iteration cap and 1e-9 threshold on the
    marginal error), but one batched update instead of a Python loop over pairs, and stable in
    the log domain; empty bins carry no mass. Gradients flow through the iterations.
    """
    log_a, log_b = _safe_log(a), _safe_log(b)
    scaled = cost / reg
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for i in range(max_iter):
        f = log_a - torch.logsumexp(g[:, None, :] - scaled, dim=2)
        g = log_b - torch.logsumexp(f[:, :, None] - scaled, dim=1)
        if i % 10 == 9:  # after the g update the column marginals are exact; check the rows
            with torch.no_grad():
                rows = torch.exp(f[:, :, None] + g[:, None, :] - scaled).sum(2)
                if (rows - a).abs().sum(1).max() < tol:
                    break
    else:
        # Like POT with warn=True: an unconverged value is returned, but not silently.
        warnings.warn(
            f"Sinkhorn did not converge in {max_iter} iterations (reg={reg}); use a larger reg "
            "or method='emd'",
            UserWarning,
            stacklevel=3,
        )
    plan = torch.exp(f[:, :, None] + g[:, None, :] - scaled)
    return (plan * cost).sum(dim=(1, 2))


def distribution_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    label_space: LabelSpace,
    *,
    mix: float = 0.0,
    cost_metric: str = "grid",
    reg: float = 0.05,
    method: str = "emd",
) -> torch.Tensor:
    """Scalar batch-mean loss of `kind` between softmax(logits) and target distributions [B, K].

    kind: "ce" (DPRM_C), "w1" (index metric, DPRM_W), "ot" (score metric, DPRM_OT) or
    "ot_general" (`label_space.cost_matrix(cost_metric)` through POT with `method`/`reg`).
    For the OT kinds the loss is (1 - mix) * OT + mix * CE: the CE term keeps a gradient on
    every logit, which a transport cost alone can give only weakly far from the target.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind '{kind}' (known: {', '.join(LOSS_KINDS)})")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    k = label_space.num_labels
    if logits.shape[-1] != k or target.shape != logits.shape:
        raise ValueError(
            f"label space '{label_space.name}' has {k} labels; logits {tuple(logits.shape)} and "
            f"target {tuple(target.shape)} must both be [B, {k}]"
        )

    if kind == "ce":
        return cross_entropy(logits, target)
    pred = torch.softmax(logits, dim=-1)
    if kind == "w1":
        transport = w1_index(pred, target)
    elif kind == "ot":
        transport = ot_score(pred, target, label_space.scores)
    else:
        cost = label_space.cost_matrix(cost_metric)
        transport = ot_general(pred, target, cost, method=method, reg=reg)
    loss = transport.mean()
    if mix > 0.0:
        loss = (1.0 - mix) * loss + mix * cross_entropy(logits, target)
    return loss


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Pairwise Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), batch mean."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


# --------------------------------------------------------------------------- offline policy losses
#
# Reward-model distillation (Fisch et al., arXiv 2405.19316) and its baselines. All take sequence
# log-probabilities (sums over response tokens) of the policy and of the frozen reference, [B] each:
# h = log pi(y1)/pi_ref(y1) - log pi(y2)/pi_ref(y2), with y1 the chosen and y2 the rejected response.
# Their names (OFFLINE_LOSSES) live in `dprm_ray.policy_config`, which the distill config reads.


def log_ratio_margin(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> torch.Tensor:
    """h = (log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected), [B]."""
    return (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)


def dpo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: -log sigmoid(beta * h), batch mean."""
    return -F.logsigmoid(beta * h).mean()


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: (h - 1 / (2 beta))^2, batch mean (beta plays the role of IPO's tau)."""
    return (h - 1.0 / (2.0 * beta)).square().mean()


def ddpo_loss(
    h: torch.Tensor, r_chosen: torch.Tensor, r_rejected: torch.Tensor, beta: float
) -> torch.Tensor:
    """d-DPO: (r(x,y1) - r(x,y2) - beta * h)^2, batch mean; rewards are precomputed constants."""
    return ((r_chosen - r_rejected) - beta * h).square().mean()


def edpo_loss(
    h: torch.Tensor,
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    beta: float,
    per_example: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """e-DPO's pessimistic distillation term: the minimum over an ensemble of reward models.

    r_chosen / r_rejected are [M, B] (M ensemble members). Batch level (default): the member
    whose mean squared distillation loss on the batch is lowest; per example: the lowest member
    for each example. Returns (loss, chosen member index: [] batch level, [B] per example).
    """
    if r_chosen.dim() != 2 or r_chosen.shape != r_rejected.shape:
        raise ValueError("ensemble rewards must be [M, B] for both chosen and rejected")
    per_member = ((r_chosen - r_rejected) - beta * h.unsqueeze(0)).square()  # [M, B]
    if per_example:
        best, which = per_member.min(dim=0)
        return best.mean(), which
    member_loss = per_member.mean(dim=1)
    which = member_loss.argmin()
    return member_loss[which], which


def reference_nll(pi_logp_on_ref_samples: torch.Tensor) -> torch.Tensor:
    """Forward KL(pi_ref || pi) up to a constant: the NLL of pi on samples drawn from pi_ref."""
    return -pi_logp_on_ref_samples.mean()


def offline_policy_loss(
    kind: str,
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    r_chosen: torch.Tensor | None = None,
    r_rejected: torch.Tensor | None = None,
    pi_logp_on_ref_samples: torch.Tensor | None = None,
    gamma: float = 0.0,
    per_example: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One loss of OFFLINE_LOSSES plus diagnostics (implicit rewards, log-probs, ensemble choice).

    ddpo takes rewards [B] (or [M, B], then the first member); edpo takes [M, B]; edpo and pdpo add
    gamma * reference NLL when gamma > 0 (they need `pi_logp_on_ref_samples`).
    """
    if kind not in OFFLINE_LOSSES:
        raise ValueError(f"unknown offline loss '{kind}' (one of {', '.join(OFFLINE_LOSSES)})")
    h = log_ratio_margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected)
    diag: dict[str, float] = {}
    if kind in ("ddpo", "edpo") and (r_chosen is None or r_rejected is None):
        raise ValueError(f"loss '{kind}' needs precomputed rewards for chosen and rejected")
    if kind == "dpo" or kind == "pdpo":
        loss = dpo_loss(h, beta)
    elif kind == "ipo":
        loss = ipo_loss(h, beta)
    elif kind == "ddpo":
        rc, rr = (r_chosen[0], r_rejected[0]) if r_chosen.dim() == 2 else (r_chosen, r_rejected)
        loss = ddpo_loss(h, rc, rr, beta)
    else:
        rc, rr = (
            (r_chosen, r_rejected) if r_chosen.dim() == 2 else (r_chosen[None], r_rejected[None])
        )
        loss, which = edpo_loss(h, rc, rr, beta, per_example)
        diag["ensemble_member"] = float(which.float().mean())
    if kind in ("edpo", "pdpo") and gamma > 0:
        if pi_logp_on_ref_samples is None:
            raise ValueError(f"loss '{kind}' with gamma > 0 needs log-probs of reference samples")
        nll = reference_nll(pi_logp_on_ref_samples)
        diag["reference_nll"] = float(nll.detach())
        loss = loss + gamma * nll
    with torch.no_grad():
        implicit_c, implicit_r = (
            beta * (pi_chosen - ref_chosen),
            beta * (pi_rejected - ref_rejected),
        )
        diag.update(
            implicit_reward_chosen=float(implicit_c.mean()),
            implicit_reward_rejected=float(implicit_r.mean()),
            implicit_reward_abs=float(torch.cat([implicit_c, implicit_r]).abs().mean()),
            logp_chosen=float(pi_chosen.mean()),
            logp_rejected=float(pi_rejected.mean()),
            margin=float(h.mean()),
        )
    return loss, diag

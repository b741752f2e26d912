"""The PPO learner of one rank: policy + value head in a DeepSpeed engine, a frozen reference.

`PPOLearner` is what each rank of the `dprm_ray.actors.learner.PolicyLearner` group holds. Every rank gets
the whole batch of scored rollouts and trains on its own contiguous slice; torch.distributed
(gloo on CPU) averages gradients and the few statistics that must be global (reward and advantage
whitening, logged metrics). Old log-probs, values and reference log-probs are recomputed here
before each update (the sampler's own log-probs are only approximate, e.g. vLLM's kernels).

A step's randomness is a function of (seed, step, rank), and checkpoints hold model, optimizer,
KL coefficient, step and every rank's RNG states, so a resumed learner continues bit for bit.
"""

from __future__ import annotations

import contextlib
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dprm_ray.policy import join, save_policy, with_lora
from dprm_ray.policy_config import LearnerConfig, PPOConfig
from dprm_ray.ppo import (
    Experience,
    collate,
    compute_advantages,
    entropy_from_logits,
    kl_controller,
    masked_mean,
    masked_whiten,
    minibatches,
    policy_loss,
    value_loss,
)
from dprm_ray.precision import torch_dtype
from dprm_ray.training import deepspeed_engine, ensure_process_group

# --------------------------------------------------------------------------- the model


class PolicyWithValue(torch.nn.Module):
    """A causal LM (optionally peft-LoRA-wrapped) and a scalar value head on its last hidden
    states. The head starts at zero, so the first values are 0 rather than noise. Without a head
    (the critic-free estimators) the values are zeros."""

    def __init__(self, lm: Any, value_head: bool = True):
        super().__init__()
        self.lm = lm
        self.value_head = torch.nn.Linear(lm.config.hidden_size, 1) if value_head else None
        if self.value_head is not None:
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.value_head is None:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
            return logits, torch.zeros(input_ids.shape, dtype=torch.float32, device=logits.device)
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        # The head runs in the module's dtype (DeepSpeed casts it for bf16/fp16); values in fp32.
        hidden = out.hidden_states[-1].to(self.value_head.weight.dtype)
        values = self.value_head(hidden).float().squeeze(-1)
        return out.logits, values


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token t+1 | ..t) and the entropy at each of the T-1 action positions."""
    logits = logits[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return picked, entropy_from_logits(logits)


def policy_forward(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logprobs, values, entropy), each [B, T-1], of a PolicyWithValue (or its engine)."""
    logits, values = model(input_ids, attention_mask)
    logp, entropy = token_logprobs(logits, input_ids, temperature)
    return logp, values[:, :-1], entropy


def lm_logprobs(
    lm: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """[B, T-1] token log-probs of a plain causal LM (the reference)."""
    logits = lm(input_ids=input_ids, attention_mask=attention_mask).logits
    return token_logprobs(logits, input_ids, temperature)[0]


# Projections that vLLM (and other fused-kernel engines) hold as one weight: a sync that changes
# one of them sends all of them, since an engine reloads a fused layer only from all its parts.
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def plain_lm_state_dict(lm: Any, trained_only: bool = False) -> dict[str, torch.Tensor]:
    """The LM's weights as a plain HF model names them, LoRA deltas merged, copies detached.

    The training model is not touched (peft's merge/unmerge would round the base weights). Tied
    weights (lm_head = embed_tokens) stay one tensor under both names: a strict
    `load_state_dict` wants both keys, pickling / ray.put stores it once, vLLM skips the alias.

    trained_only: with LoRA, only the weights LoRA changes (the merged target modules, with the
    rest of their FUSED_PROJECTIONS group; the other weights are the base model every rollout
    engine loaded); without LoRA, all of them.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    if isinstance(lm, PeftModel):
        base = lm.get_base_model()
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                merged[f"{name}.weight"] = module.base_layer.weight.detach() + delta.detach()
    else:
        base = lm
    sent = _with_fused_parts(merged) if trained_only and merged else None
    copies: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        if sent is not None and key not in sent:
            continue
        if key in merged:
            out[key] = merged[key].clone().cpu()
            continue
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident not in copies:
            copies[ident] = tensor.detach().clone().cpu()
        out[key] = copies[ident]
    return out


def _with_fused_parts(keys: Any) -> set[str]:
    """`keys` (plain weight names) and the other parts of their FUSED_PROJECTIONS groups."""
    out = set(keys)
    for key in keys:
        prefix, _, leaf = key.rpartition(".")  # "...self_attn.q_proj", "weight"
        parent, _, proj = prefix.rpartition(".")
        for group in FUSED_PROJECTIONS:
            if proj in group:
                out.update(f"{parent}.{part}.{leaf}" for part in group)
    return out


def gathered(module: torch.nn.Module, zero_stage: int) -> contextlib.AbstractContextManager:
    """Full parameters inside the block on every rank (ZeRO-3 gathers its partitions)."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


# --------------------------------------------------------------------------- one PPO update


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over the ranks (a copy; x itself is left alone)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    # NCCL reduces only CUDA tensors, gloo takes any: move there and back.
    device = torch.device("cuda") if dist.get_backend() == "nccl" else x.device
    out = x.detach().to(device, copy=True)
    dist.all_reduce(out)
    return out.to(x.device)


def ppo_train_step(
    engine: Any, exp: Experience, cfg: PPOConfig, generator: torch.Generator
) -> dict[str, float]:
    """cfg.ppo_epochs passes over `exp` (advantages filled) in shuffled minibatches, one optimizer
    step each; the metrics averaged over updates and ranks."""
    engine.train()
    sums: dict[str, float] = defaultdict(float)
    batches = minibatches(len(exp), cfg.mini_batch_size, cfg.ppo_epochs, generator)
    for rows in batches:
        mb = exp.select(rows)
        logp, values, entropy = policy_forward(
            engine, mb.input_ids, mb.attention_mask, cfg.temperature
        )
        pg_loss, pg_stats = policy_loss(
            logp, mb.old_logprobs, mb.advantages, mb.action_mask, cfg.clip_ratio
        )
        if cfg.advantage == "gae":
            vf_loss, vf_stats = value_loss(
                values, mb.values, mb.returns, mb.action_mask, cfg.value_clip
            )
            loss = pg_loss + cfg.vf_coef * vf_loss
        else:  # critic-free: no value head to train
            vf_loss, vf_stats, loss = torch.zeros(()), {}, pg_loss
        engine.backward(loss)
        engine.step()
        sums["policy_loss"] += float(pg_loss.detach())
        if cfg.advantage == "gae":
            sums["value_loss"] += float(vf_loss.detach())
        sums["entropy"] += float(masked_mean(entropy.detach(), mb.action_mask))
        for key, value in {**pg_stats, **vf_stats}.items():
            sums[key] += float(value)
    keys = sorted(sums)
    world = all_reduce_sum(torch.tensor([1.0])).item()
    totals = all_reduce_sum(
        torch.tensor([sums[k] / len(batches) for k in keys], dtype=torch.float64)
    )
    return {k: float(v) / world for k, v in zip(keys, totals.tolist(), strict=True)}


# --------------------------------------------------------------------------- rollouts in


def rollout_token_ids(tokenizer: Any, rollout: dict[str, Any], index: int) -> tuple[list, list]:
    """(prompt ids, response ids) of one rollout: its own token ids when it has them (what the
    sampler actually produced), else its text under the `dprm_ray.policy` convention."""
    if "prompt_ids" in rollout and "response_ids" in rollout:
        return list(rollout["prompt_ids"]), list(rollout["response_ids"])
    if "prompt" in rollout and "response" in rollout:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        prompt = tokenizer(join(rollout["prompt"], ""), add_special_tokens=False)["input_ids"]
        full = tokenizer(join(rollout["prompt"], rollout["response"]), add_special_tokens=False)
        full_ids = full["input_ids"] + eos
        n = min(len(prompt), len(full_ids) - 1)
        return full_ids[:n], full_ids[n:]
    raise ValueError(
        f"rollout {index}: needs prompt_ids and response_ids (or prompt and response text); "
        f"has {sorted(rollout)}"
    )


def rollout_rewards(rollouts: list[dict[str, Any]]) -> torch.Tensor:
    missing = [i for i, r in enumerate(rollouts) if "reward" not in r]
    if missing:
        raise ValueError(f"rollouts {missing[:5]}: no 'reward' (score them first)")
    return torch.tensor([float(r["reward"]) for r in rollouts], dtype=torch.float32)


# --------------------------------------------------------------------------- the learner


class PPOLearner:
    """One rank's learner. Build it on every rank of an initialised process group (or alone)."""

    def __init__(self, cfg: LearnerConfig, ppo: PPOConfig):
        from dprm_ray.models import load_model

        cfg.validate()
        ppo.validate()
        self.cfg, self.ppo = cfg, ppo
        self.rank, self.world = ensure_process_group()
        torch.manual_seed(cfg.seed)
        lm, self.tokenizer = load_model(cfg.model, kind="causal-lm")
        model = PolicyWithValue(with_lora(lm, cfg.lora), value_head=ppo.advantage == "gae")
        optim = replace(cfg.optim, batch_size=ppo.mini_batch_size)
        self.engine = deepspeed_engine(model, optim, cfg.zero_stage, cfg.precision)
        self.device = self.engine.device
        self.reference, _ = load_model(cfg.reference or cfg.model, kind="causal-lm")
        self.reference.requires_grad_(False)
        # The frozen reference computes in the policy's precision too (no master weights needed).
        self.reference.eval().to(self.device, dtype=torch_dtype(cfg.precision))
        self.kl_ctl = kl_controller(ppo)
        self.step = 0
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0

    # ---------------------------------------------------------------- experience

    def my_rows(self, n: int) -> slice:
        if n % self.world:
            raise ValueError(
                f"a batch of {n} rollouts does not split over {self.world} learner ranks; "
                "send a multiple of learner.num_ranks"
            )
        per = n // self.world
        if per % self.ppo.samples_per_prompt:
            raise ValueError(
                f"a rank's {per} rollouts do not hold whole groups of ppo.samples_per_prompt="
                f"{self.ppo.samples_per_prompt}; send a multiple of both"
            )
        return slice(self.rank * per, (self.rank + 1) * per)

    @torch.no_grad()
    def make_experience(self, rollouts: list[dict[str, Any]]) -> Experience:
        """This rank's slice of the batch as an Experience with old/ref log-probs and values."""
        rewards = rollout_rewards(rollouts)
        if self.ppo.whiten_rewards:
            # Every rank holds the whole batch, so these are the global statistics.
            rewards = masked_whiten(rewards, torch.ones_like(rewards))
        mine = self.my_rows(len(rollouts))
        ids = [
            rollout_token_ids(self.tokenizer, rollouts[i], i) for i in range(len(rollouts))[mine]
        ]
        exp = collate(
            [p for p, _ in ids],
            [r for _, r in ids],
            rewards[mine].tolist(),
            self.pad_id,
            self.ppo.max_length,
        ).to(self.device)
        self.engine.eval()
        old, values, ref = [], [], []
        size = self.ppo.mini_batch_size
        for start in range(0, len(exp), size):
            ids_, att = (
                exp.input_ids[start : start + size],
                exp.attention_mask[start : start + size],
            )
            logp, val, _ = policy_forward(self.engine, ids_, att, self.ppo.temperature)
            old.append(logp)
            values.append(val)
            ref.append(lm_logprobs(self.reference, ids_, att, self.ppo.temperature))
        mask = exp.action_mask
        exp.old_logprobs = torch.cat(old) * mask
        exp.values = torch.cat(values) * mask
        exp.ref_logprobs = torch.cat(ref) * mask
        return exp

    def train(self, rollouts: list[dict[str, Any]]) -> dict[str, float]:
        """One PPO step on a batch of scored rollouts (every rank gets the same list).

        A rollout is {"prompt_ids": [int], "response_ids": [int], "reward": float} (or "prompt"
        and "response" text instead of the ids). Returns the step's metrics (same on every rank).
        """
        raw = rollout_rewards(rollouts)
        exp = self.make_experience(rollouts)
        kl_coef = self.kl_ctl.value
        stats = compute_advantages(exp, self.ppo, kl_coef, all_reduce_sum)
        generator = torch.Generator().manual_seed(
            self.cfg.seed * 1_000_003 + self.step * self.world + self.rank
        )
        metrics = ppo_train_step(self.engine, exp, self.ppo, generator)
        self.kl_ctl.update(stats["kl"], len(rollouts))
        self.step += 1
        return {
            "step": self.step,
            "reward": float(raw.mean()),
            "reward_std": float(raw.std()) if len(raw) > 1 else 0.0,
            "kl_coef": kl_coef,
            "lr": float(self.engine.get_lr()[0]),
            **stats,
            **metrics,
        }

    # ---------------------------------------------------------------- weights out

    def export_weights(self, trained_only: bool = False) -> dict[str, torch.Tensor]:
        """Rank 0: the policy LM's state dict as plain HF names (LoRA merged, no value head);
        other ranks: {}. Every rank must call it (ZeRO-3 gathers collectively). trained_only:
        with LoRA, only the merged target modules (what a weight sync needs: a rollout engine
        holds the base model already; about a fifth of SmolLM2's weights for q/k/v/o)."""
        module = self.engine.module
        with gathered(module, self.cfg.zero_stage):
            return plain_lm_state_dict(module.lm, trained_only) if self.rank == 0 else {}

    def save_policy(self, path: str | Path) -> None:
        """Rank 0 writes an HF folder (model + tokenizer) that `models.load_model` loads."""
        weights = self.export_weights()
        if self.rank != 0:
            return
        from transformers import AutoModelForCausalLM

        lm = self.engine.module.lm
        config = lm.get_base_model().config if hasattr(lm, "get_base_model") else lm.config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(weights, strict=True)
        save_policy(plain, self.tokenizer, Path(path))

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, ckpt_dir: str | Path, step: int | None = None) -> str:
        """DeepSpeed checkpoint (module, optimizer) tagged `step_N` plus the learner's own state.

        Each rank's RNG file goes into the tag folder before DeepSpeed writes `latest`, so a crash
        mid-save leaves `latest` on the previous, complete checkpoint.
        """
        step = self.step if step is None else step
        tag = f"step_{step}"
        tag_dir = Path(ckpt_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        _save_rng(tag_dir / f"rng_rank{self.rank}.pt", self.device)
        self.engine.save_checkpoint(
            str(ckpt_dir),
            tag=tag,
            client_state={"step": self.step, "kl_ctl": self.kl_ctl.state_dict()},
        )
        return str(tag_dir)

    def load_checkpoint(self, ckpt_dir: str | Path, tag: str | None = None) -> int:
        """Restore the latest (or `tag`) checkpoint; returns the learner step it was taken at."""
        ckpt_dir = Path(ckpt_dir)
        if tag is None:
            latest = ckpt_dir / "latest"
            if not latest.is_file():
                raise FileNotFoundError(f"{ckpt_dir}: no 'latest' file, so no checkpoint to load")
            tag = latest.read_text().strip()
        path, client = self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
        self.step = int(client["step"])
        self.kl_ctl.load_state_dict(client["kl_ctl"])
        rng = ckpt_dir / tag / f"rng_rank{self.rank}.pt"
        if not rng.is_file():
            raise FileNotFoundError(f"{rng}: missing (saved with a different number of ranks?)")
        _load_rng(rng)
        return self.step


def _save_rng(path: Path, device: Any) -> None:
    from dprm_ray.data import atomic_path

    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_rng(path: Path) -> None:
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

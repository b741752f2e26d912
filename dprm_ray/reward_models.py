"""Reward models: a backbone + a linear head.

- `DistributionalRewardModel` (DPRM): head -> K logits; softmax gives the crowd distribution, the
  expected reward is sum_k p_k * score_k (what PPO maximises) and its variance is reported too.
- `BradleyTerryRewardModel`: head -> one scalar reward, trained on pairs.

Backbones: a causal LM fine-tuned end to end (last non-pad token pooling), or a frozen encoder whose
mean-pooled embeddings are computed once and cached (`backbone=None`: the model then takes
`embeddings` directly, which is what makes sweeps fast).

A saved reward model is a folder: `reward_model.json` (type, label space, pooling, backbone spec),
`head.safetensors`, and `backbone/` (HF save_pretrained) when the backbone was trained; a frozen
backbone is stored as its spec (e.g. `minilm`) since its weights did not change.

`predict` scores `RewardData` (texts, or their cached embeddings) in batches: what training's
evaluation, the reward shards, serving and pair scoring all call.

`dprm_ray.models` (which imports transformers, seconds) is imported inside the functions that load
a backbone, so importing this module, e.g. for a trainer's config, stays fast.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dprm_ray.labels import LabelSpace

REWARD_CONFIG = "reward_model.json"


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of the last non-pad token of each row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pool_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@dataclass
class RewardOutput:
    expected: torch.Tensor  # [B] the reward PPO maximises
    variance: torch.Tensor  # [B] variance of the score under the predicted distribution (0 for BT)
    probs: torch.Tensor | None  # [B, K] for distributional models


class _RewardModel(nn.Module):
    """Backbone (optional) + pooling + linear head; subclasses say what the head means."""

    kind = ""

    def __init__(
        self,
        hidden_size: int,
        out_features: int,
        backbone: nn.Module | None = None,
        pooling: str = "last",
        backbone_spec: str = "",
        freeze_backbone: bool = False,
    ):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got '{pooling}'")
        self.backbone = backbone
        self.pooling = pooling
        self.backbone_spec = backbone_spec
        self.freeze_backbone = freeze_backbone
        self.head = nn.Linear(hidden_size, out_features)
        if backbone is not None and freeze_backbone:
            backbone.requires_grad_(False)

    def features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if embeddings is not None:
            # Cached features are fp32; the head may run in bf16/fp16 (DeepSpeed precision).
            return embeddings.to(self.head.weight.dtype)
        if self.backbone is None or input_ids is None or attention_mask is None:
            raise ValueError("this reward model needs `embeddings` (it has no backbone)")
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pool = pool_last_token if self.pooling == "last" else pool_mean
        return pool(hidden, attention_mask)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(**inputs))

    def _extra_config(self) -> dict[str, Any]:
        return {}

    def save(self, path: str | Path, tokenizer: Any = None) -> None:
        """Write the folder atomically (temp folder, then rename)."""
        from dprm_ray.data import atomic_dir

        with atomic_dir(path) as tmp:
            save_file(
                {k: v.contiguous() for k, v in self.head.state_dict().items()},
                tmp / "head.safetensors",
            )
            stored_backbone = self.backbone is not None and not self.freeze_backbone
            if stored_backbone:
                self.backbone.save_pretrained(tmp / "backbone")
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp / "backbone")
            config = {
                "type": self.kind,
                "hidden_size": self.head.in_features,
                "pooling": self.pooling,
                "backbone_spec": self.backbone_spec,
                "backbone": "backbone" if stored_backbone else self.backbone_spec,
                "freeze_backbone": self.freeze_backbone,
                **self._extra_config(),
            }
            (tmp / REWARD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


class DistributionalRewardModel(_RewardModel):
    kind = "distributional"

    def __init__(self, label_space: LabelSpace, hidden_size: int, **kwargs: Any):
        super().__init__(hidden_size, label_space.num_labels, **kwargs)
        self.label_space = label_space
        self.register_buffer(
            "scores", torch.tensor(label_space.scores, dtype=torch.float32), persistent=False
        )

    def predict(self, **inputs: torch.Tensor) -> RewardOutput:
        probs = torch.softmax(self(**inputs).float(), dim=-1)
        expected = probs @ self.scores
        variance = probs @ self.scores.square() - expected.square()
        return RewardOutput(expected=expected, variance=variance.clamp(min=0.0), probs=probs)

    def _extra_config(self) -> dict[str, Any]:
        return {"label_space": self.label_space.to_dict()}


class BradleyTerryRewardModel(_RewardModel):
    kind = "bradley-terry"

    def __init__(self, hidden_size: int, **kwargs: Any):
        super().__init__(hidden_size, 1, **kwargs)

    def predict(self, **inputs: torch.Tensor) -> RewardOutput:
        reward = self(**inputs).float().squeeze(-1)
        return RewardOutput(expected=reward, variance=torch.zeros_like(reward), probs=None)


RewardModel = DistributionalRewardModel | BradleyTerryRewardModel


def build_reward_model(
    kind: str,
    backbone_spec: str,
    label_space: LabelSpace | None = None,
    backbone_kind: str = "causal-lm",
    freeze_backbone: bool = False,
    cached_embeddings: bool = False,
) -> tuple[RewardModel, Any]:
    """Build (reward model, tokenizer) on a backbone the model loader can load.

    With `cached_embeddings` the model holds no backbone (it takes precomputed embeddings); the
    backbone spec is kept so that scoring raw text later loads it again.
    """
    from dprm_ray.models import load_model

    backbone, tokenizer = load_model(backbone_spec, kind=backbone_kind)
    hidden = backbone.config.hidden_size
    if backbone_kind == "causal-lm":
        backbone = backbone.get_decoder() if hasattr(backbone, "get_decoder") else backbone.model
    pooling = "last" if backbone_kind == "causal-lm" else "mean"
    frozen = freeze_backbone or cached_embeddings
    common: dict[str, Any] = {
        "backbone": None if cached_embeddings else backbone,
        "pooling": pooling,
        "backbone_spec": backbone_spec,
        "freeze_backbone": frozen,
    }
    if kind == "distributional":
        if label_space is None:
            raise ValueError("a distributional reward model needs a label space")
        return DistributionalRewardModel(label_space, hidden, **common), tokenizer
    if kind == "bradley-terry":
        return BradleyTerryRewardModel(hidden, **common), tokenizer
    raise ValueError(f"unknown reward model type '{kind}' (distributional or bradley-terry)")


def is_reward_model_dir(path: str | Path) -> bool:
    return (Path(path) / REWARD_CONFIG).is_file()


def _reward_config(folder: Path) -> dict[str, Any]:
    """The folder's reward_model.json, or ModelError saying why it is not a reward model."""
    from dprm_ray.errors import ModelError

    needed = ("type", "pooling", "backbone", "backbone_spec", "freeze_backbone", "hidden_size")
    try:
        config = json.loads((folder / REWARD_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: not a reward model folder ({REWARD_CONFIG}: {exc})") from None
    missing = [k for k in needed if not isinstance(config, dict) or k not in config]
    if not missing and config["type"] == "distributional" and "label_space" not in config:
        missing = ["label_space"]
    if missing:
        raise ModelError(f"{folder / REWARD_CONFIG}: missing {', '.join(missing)}")
    return config


def load_reward_model(path: str | Path, with_backbone: bool = True) -> tuple[RewardModel, Any]:
    """Load a saved reward model folder -> (model in eval mode, tokenizer)."""
    from dprm_ray.models import load_model

    folder = Path(path)
    config = _reward_config(folder)
    backbone_kind = "causal-lm" if config["pooling"] == "last" else "encoder"
    backbone, tokenizer = None, None
    if with_backbone:
        source = config["backbone"]
        spec = str(folder / source) if source == "backbone" else source
        backbone, tokenizer = load_model(spec, kind=backbone_kind)
        if backbone_kind == "causal-lm":
            backbone = backbone.get_decoder()
    common: dict[str, Any] = {
        "backbone": backbone,
        "pooling": config["pooling"],
        "backbone_spec": config["backbone_spec"],
        "freeze_backbone": config["freeze_backbone"],
    }
    if config["type"] == "distributional":
        label_space = LabelSpace.from_dict(config["label_space"])
        model: RewardModel = DistributionalRewardModel(label_space, config["hidden_size"], **common)
    else:
        model = BradleyTerryRewardModel(config["hidden_size"], **common)
    model.head.load_state_dict(load_file(folder / "head.safetensors"))
    return model.eval(), tokenizer


# --------------------------------------------------------------------------- text -> inputs


def tokenize_pairs(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenize (prompt, response) pairs so that the response survives truncation.

    Encoders (with a [SEP] token) get the sentence-pair encoding, trimming the longer side first.
    Causal LMs read `prompt\nresponse<eos>` and are pooled at the last token, so the text is cut
    from the left: the end of the response and the EOS are always seen. Padding is always on the
    right: without explicit position ids, left padding shifts every position and a text's score
    would depend on what else is in its batch.
    """
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = "right"
    try:
        if tokenizer.sep_token is not None:
            return tokenizer(
                list(prompts),
                list(responses),
                truncation="longest_first",
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
        eos = tokenizer.eos_token or ""
        texts = [f"{p}\n{r}{eos}" for p, r in zip(prompts, responses, strict=True)]
        tokenizer.truncation_side = "left"
        return tokenizer(
            texts,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
        )
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides


def embed_texts(
    encoder: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int = 256,
    batch_size: int = 64,
    progress: bool = False,
    pooling: str = "mean",
) -> torch.Tensor:
    """Pooled backbone features of (prompt, response) pairs, [N, H] float32.

    `pooling` must be the reward model's: "mean" for encoders, "last" for causal LMs.
    """
    pool = pool_last_token if pooling == "last" else pool_mean
    from tqdm import tqdm

    chunks = []
    starts = range(0, len(prompts), batch_size)
    with torch.no_grad():
        for i in tqdm(starts, desc="embed", unit="batch", disable=not progress):
            batch = tokenize_pairs(
                tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size], max_length
            )
            hidden = encoder(**batch).last_hidden_state
            chunks.append(pool(hidden, batch["attention_mask"]).float())
    return torch.cat(chunks) if chunks else torch.empty(0)


def cached_embeddings(
    encoder_spec: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int = 256,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    backbone_kind: str = "encoder",
) -> torch.Tensor:
    """Frozen-backbone features of (prompt, response) pairs, cached on disk.

    The cache key covers the backbone, its kind (which sets pooling), max_length and every text.
    """
    from dprm_ray.data import atomic_path
    from dprm_ray.models import cache_dir as default_cache_dir
    from dprm_ray.models import load_model

    digest = hashlib.sha256(f"{encoder_spec}\0{backbone_kind}\0{max_length}".encode())
    for p, r in zip(prompts, responses, strict=True):
        digest.update(p.encode() + b"\0" + r.encode() + b"\1")
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "embeddings"
    path = root / f"{digest.hexdigest()[:32]}.pt"
    if path.is_file():
        return torch.load(path)
    encoder, tokenizer = load_model(encoder_spec, kind=backbone_kind)
    if backbone_kind == "causal-lm":
        encoder = encoder.get_decoder()  # the trunk: last_hidden_state, as the reward model sees it
    pooling = "last" if backbone_kind == "causal-lm" else "mean"
    emb = embed_texts(
        encoder, tokenizer, prompts, responses, max_length, progress=progress, pooling=pooling
    )
    with atomic_path(path) as tmp:
        torch.save(emb, tmp)
    return emb


# --------------------------------------------------------------------------- scoring


@dataclass
class RewardData:
    """Distributional examples (targets) and/or preference pairs, as texts."""

    prompts: list[str]
    responses: list[str]
    targets: np.ndarray | None = None  # [N, K]
    population: np.ndarray | None = None  # [N, K] ground truth, when known
    groups: list[str] | None = None
    pairs: np.ndarray | None = None  # [M, 2] indices into the rows: (chosen, rejected)


def model_inputs(
    tokenizer: Any,
    data: RewardData,
    rows: np.ndarray,
    embeddings: torch.Tensor | None,
    max_length: int,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The model's keyword inputs for `rows`, on `device` (None: where they were made, the CPU)."""
    if embeddings is not None:
        inputs = {"embeddings": embeddings[torch.as_tensor(rows)]}
    else:
        enc = tokenize_pairs(
            tokenizer,
            [data.prompts[i] for i in rows],
            [data.responses[i] for i in rows],
            max_length,
        )
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return inputs if device is None else {k: v.to(device) for k, v in inputs.items()}


def predict(
    model: Any,
    tokenizer: Any,
    data: RewardData,
    embeddings: torch.Tensor | None = None,
    max_length: int = 256,
    batch_size: int = 64,
    rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Expected reward, variance and (distributional models) probabilities for `rows`."""
    from dprm_ray.precision import module_device

    rows = np.arange(len(data.prompts)) if rows is None else rows
    device = module_device(model)
    out: dict[str, list[np.ndarray]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            inputs = model_inputs(tokenizer, data, chunk, embeddings, max_length, device)
            pred = model.predict(**inputs)
            out["expected"].append(pred.expected.cpu().numpy())
            out["variance"].append(pred.variance.cpu().numpy())
            if pred.probs is not None:
                out["probs"].append(pred.probs.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}

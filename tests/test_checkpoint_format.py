"""Checkpoint formats: causal-LM reward models as HF sequence-classification folders (read by
`AutoModelForSequenceClassification` and vLLM with the project loader's scores), the project
layout (encoders, older folders) and PAL folders."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dprm_ray.errors import ModelError
from dprm_ray.labels import get_label_space
from dprm_ray.models import load_model, tiny_causal_lm, tiny_tokenizer
from dprm_ray.reward_models import (
    REWARD_CONFIG,
    BradleyTerryRewardModel,
    DistributionalRewardModel,
    build_reward_model,
    cached_embeddings,
    is_reward_model_dir,
    load_reward_model,
    tokenize_pairs,
)

HH6 = get_label_space("hh6")
# Different lengths, so the batch is padded.
PROMPTS = ["p", "a longer prompt than the first", "third"]
RESPONSES = ["short", "an answer with many more words in it", "mid-sized answer"]


def random_head(model):
    torch.manual_seed(7)
    with torch.no_grad():
        model.head.weight.normal_()
    return model


def batch(tokenizer):
    enc = tokenize_pairs(tokenizer, PROMPTS, RESPONSES, 64)
    assert not bool(enc["attention_mask"].all())  # padded
    return enc


def hf_model(folder):
    hf, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return hf.eval()


def test_dprm_on_a_causal_lm_saves_as_an_hf_classifier_with_the_same_scores(tmp_path):
    model, tok = build_reward_model("distributional", "tiny:4", HH6, backbone_kind="causal-lm")
    assert model.head.bias is None  # HF's score layer has none
    random_head(model)
    model.save(tmp_path / "rm", tok)
    assert not (tmp_path / "rm" / REWARD_CONFIG).exists() and is_reward_model_dir(tmp_path / "rm")

    hf = hf_model(tmp_path / "rm")
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    cfg = hf.config
    assert cfg.num_labels == 6 and [cfg.id2label[i] for i in range(6)] == list(HH6.labels)
    assert cfg.dprm_label_space == "hh6" and cfg.dprm_label_scores == list(HH6.scores)
    assert cfg.dprm_reward_type == "distributional" and cfg.pad_token_id is not None
    assert set(hf.state_dict()) == {f"model.{k}" for k in model.backbone.state_dict()} | {
        "score.weight"
    }

    loaded, tok2 = load_reward_model(tmp_path / "rm")
    assert isinstance(loaded, DistributionalRewardModel) and loaded.label_space == HH6
    enc = batch(AutoTokenizer.from_pretrained(tmp_path / "rm"))
    with torch.no_grad():
        hf_logits = hf(**enc).logits
        ours = loaded(**enc)
        pred = loaded.predict(**enc)
        original = model(**batch(tok))
    torch.testing.assert_close(hf_logits, ours, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, original, atol=1e-5, rtol=0)
    # The reward PPO maximises, from the HF logits and the config's scores alone.
    expected = torch.softmax(hf_logits, -1) @ torch.tensor(cfg.dprm_label_scores)
    torch.testing.assert_close(expected, pred.expected, atol=1e-5, rtol=0)
    # Each row alone scores as in the padded batch (HF pools the last non-pad token).
    for i in range(len(PROMPTS)):
        one = tokenize_pairs(tok2, PROMPTS[i : i + 1], RESPONSES[i : i + 1], 64)
        with torch.no_grad():
            torch.testing.assert_close(hf(**one).logits[0], hf_logits[i], atol=1e-5, rtol=0)


def test_bradley_terry_on_a_causal_lm_is_an_hf_classifier_with_one_label(tmp_path):
    model, tok = build_reward_model("bradley-terry", "tiny:5", backbone_kind="causal-lm")
    random_head(model).save(tmp_path / "bt", tok)
    hf = hf_model(tmp_path / "bt")
    assert hf.config.num_labels == 1 and hf.config.dprm_reward_type == "bradley-terry"
    loaded = BradleyTerryRewardModel.from_pretrained(tmp_path / "bt")
    enc = batch(tok)
    with torch.no_grad():
        hf_reward = hf(**enc).logits.squeeze(-1)
        torch.testing.assert_close(hf_reward, loaded.predict(**enc).expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(hf_reward, model.predict(**enc).expected, atol=1e-5, rtol=0)
    with pytest.raises(ModelError, match="bradley-terry reward model, not a Distributional"):
        DistributionalRewardModel.from_pretrained(tmp_path / "bt")


def test_a_tokenizer_padding_with_eos_gets_another_pad_token_so_hf_pools_the_eos(tmp_path):
    """SmolLM2's tokenizer pads with EOS; the text ends with EOS, so HF would pool the token
    before it. The saved tokenizer pads with another special token (here bos)."""
    model, tok = build_reward_model("distributional", "tiny:6", HH6, backbone_kind="causal-lm")
    tok.pad_token = tok.eos_token
    random_head(model).save(tmp_path / "rm", tok)
    hf = hf_model(tmp_path / "rm")
    saved = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert saved.pad_token_id == hf.config.pad_token_id == saved.bos_token_id != saved.eos_token_id
    assert tok.pad_token == tok.eos_token  # the caller's tokenizer is left alone
    enc = batch(saved)
    with torch.no_grad():
        torch.testing.assert_close(hf(**enc).logits, model(**batch(tok)), atol=1e-5, rtol=0)


def test_a_head_on_cached_frozen_lm_features_saves_the_backbone_it_was_trained_on(tmp_path):
    model, _ = build_reward_model(
        "bradley-terry", "tiny:2", backbone_kind="causal-lm", cached_embeddings=True
    )
    assert model.backbone is None and model.freeze_backbone
    random_head(model).save(tmp_path / "bt")  # loads tiny:2 (and its tokenizer) to write it
    emb = cached_embeddings(
        "tiny:2", PROMPTS, RESPONSES, 64, tmp_path / "cache", backbone_kind="causal-lm"
    )
    hf = hf_model(tmp_path / "bt")
    with torch.no_grad():
        want = model.predict(embeddings=emb).expected
        got = hf(**batch(AutoTokenizer.from_pretrained(tmp_path / "bt"))).logits.squeeze(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Head only (the caller brings cached features): score.weight, no backbone, no tokenizer.
    head_only, tok = load_reward_model(tmp_path / "bt", with_backbone=False)
    assert head_only.backbone is None and tok is None and head_only.freeze_backbone
    assert head_only.backbone_spec == "tiny:2"
    torch.testing.assert_close(head_only.predict(embeddings=emb).expected, want)


def test_the_project_layout_still_loads_old_folders_with_a_head_bias(tmp_path):
    """A folder written before the HF layout: reward_model.json without format_version or
    head_bias, a biased head and backbone/; and a bias-free causal-LM model asked for it."""
    backbone, tok = load_model("tiny:3")
    old = DistributionalRewardModel(
        HH6, 64, backbone=backbone.get_decoder(), backbone_spec="tiny:3"
    )
    random_head(old)
    with torch.no_grad():
        old.head.bias.normal_()
    old.save(tmp_path / "old", tok)  # a bias: "auto" keeps the project layout
    config = json.loads((tmp_path / "old" / REWARD_CONFIG).read_text())
    assert config["format_version"] == 1 and config["head_bias"] is True
    del config["format_version"], config["head_bias"]
    (tmp_path / "old" / REWARD_CONFIG).write_text(json.dumps(config))
    loaded, tok2 = load_reward_model(tmp_path / "old")
    assert loaded.head.bias is not None
    enc = batch(tok2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc), old(**enc), atol=1e-6, rtol=0)
    with pytest.raises(ModelError, match="has a bias"):
        old.save(tmp_path / "hf", tok, layout="hf")

    new, tok = build_reward_model("bradley-terry", "tiny:3", backbone_kind="causal-lm")
    random_head(new).save(tmp_path / "new", tok, layout="dprm")
    assert (tmp_path / "new" / "backbone" / "config.json").is_file()
    again = BradleyTerryRewardModel.from_pretrained(tmp_path / "new")
    assert again.head.bias is None
    with torch.no_grad():
        torch.testing.assert_close(again(**enc), new(**enc), atol=1e-6, rtol=0)


def test_frozen_encoder_models_keep_the_project_layout_and_round_trip(tmp_path):
    model, tok = build_reward_model(
        "distributional", "tiny-encoder:1", HH6, backbone_kind="encoder", freeze_backbone=True
    )
    assert model.head.bias is not None and model.layout() == "dprm"
    with pytest.raises(ModelError, match="mean-pools an encoder"):
        model.layout("hf")
    random_head(model).save_pretrained(tmp_path / "enc", tok)
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == [
        "head.safetensors",
        "reward_model.json",
    ]
    config = json.loads((tmp_path / "enc" / REWARD_CONFIG).read_text())
    assert config["backbone"] == "tiny-encoder:1" and config["pooling"] == "mean"
    loaded = DistributionalRewardModel.from_pretrained(tmp_path / "enc")
    enc = tokenize_pairs(tok, PROMPTS, RESPONSES, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(**enc).probs, model.predict(**enc).probs)


def test_pal_folders_round_trip_through_from_pretrained(tmp_path):
    from dprm_ray.pal import PAL_CONFIG, PALConfig, PALModel, build_pal_model

    config = PALConfig(variant="pal-b", input_dim=6, num_prototypes=2, hidden_size=8, pref_dim=4)
    config.user_ids = ["u1", "u2"]
    model = build_pal_model(config, seed=1)
    model.save_pretrained(tmp_path / "pal")
    raw = json.loads((tmp_path / "pal" / PAL_CONFIG).read_text())
    assert raw["type"] == "pal" and raw["format_version"] == 1
    items, prompts = torch.randn(4, 6), torch.randn(4, 6)
    loaded = PALModel.from_pretrained(tmp_path / "pal")
    for user in ("u1", "mixture"):
        w = model.user_weights(user)
        with torch.no_grad():
            assert torch.equal(loaded.reward(items, prompts, w), model.reward(items, prompts, w))
    del raw["format_version"]  # a folder from before the version was recorded
    (tmp_path / "pal" / PAL_CONFIG).write_text(json.dumps(raw))
    assert PALModel.from_pretrained(tmp_path / "pal").config == loaded.config


VLLM_SCORE = """
import gc, json, sys
from vllm import LLM, PoolingParams
from vllm.inputs import TokensPrompt

for folder, ids in json.loads(sys.argv[1]):
    llm = LLM(model=folder, runner="pooling", dtype="float32", enforce_eager=True, max_model_len=128)
    outs = llm.classify(
        [TokensPrompt(prompt_token_ids=i) for i in ids],
        pooling_params=PoolingParams(use_activation=False),  # raw logits, as the HF model returns
    )
    print("LOGITS=" + json.dumps([o.outputs.probs for o in outs]))
    del llm
    gc.collect()
"""


@pytest.mark.slow
def test_vllm_cpu_serves_the_hf_folders_with_the_project_loaders_scores(tmp_path):
    """A DPRM and a BT folder, scored by one vLLM process (its import and start-up are most of
    the time). vLLM's CPU attention needs head_dim 64: a 256-wide tiny Llama backbone."""
    tok = tiny_tokenizer()
    kinds = ("distributional", "bradley-terry")
    jobs, expected = [], {}
    for kind in kinds:
        backbone = tiny_causal_lm(0, hidden_size=256).get_decoder()
        common = {"backbone": backbone, "head_bias": False}
        if kind == "distributional":
            model = DistributionalRewardModel(HH6, 256, **common)
        else:
            model = BradleyTerryRewardModel(256, **common)
        random_head(model).save(tmp_path / kind, tok)
        loaded, tok2 = load_reward_model(tmp_path / kind)
        enc = batch(tok2)
        # The unpadded token ids of each text: what vLLM reads (it pads nothing).
        rows = zip(enc["input_ids"], enc["attention_mask"], strict=True)
        jobs.append([str(tmp_path / kind), [row[mask.bool()].tolist() for row, mask in rows]])
        with torch.no_grad():
            expected[kind] = loaded.predict(**enc)
    # The engine runs in this process (no engine-core process to spawn, import vLLM and torch in
    # and shut down per folder), with a KV cache of 1 GiB.
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", VLLM_SCORE, json.dumps(jobs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOGITS=")]
    assert len(lines) == len(kinds)
    for kind, line in zip(kinds, lines, strict=True):
        logits = torch.tensor(json.loads(line.removeprefix("LOGITS=")))
        pred = expected[kind]
        if kind == "distributional":
            torch.testing.assert_close(torch.softmax(logits, -1), pred.probs, atol=1e-3, rtol=0)
            score = torch.softmax(logits, -1) @ torch.tensor(HH6.scores)
        else:
            score = logits.squeeze(-1)
        torch.testing.assert_close(score, pred.expected, atol=1e-3, rtol=0)

"""distill precompute (Ray Data pool) and distill training (Ray Train + DeepSpeed) end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import run_cli

from dprm_ray.config import ConfigError
from dprm_ray.data import DataError, load_rows, write_rows
from dprm_ray.distill import load_distill_data
from dprm_ray.models import load_model
from dprm_ray.policy import score_responses
from dprm_ray.policy_config import DistillLossConfig
from dprm_ray.reward_models import RewardData, build_reward_model, predict

# The jobs these tests start join the session's Ray cluster (see conftest.py).
pytestmark = pytest.mark.usefixtures("jobs_join_ray_local")


def write_pairs(path, n=40):
    rows = [
        {
            "prompt": f"Question {i}: how do I do task {i}?",
            "chosen": f"Here is a careful, helpful answer for task {i}.",
            "rejected": f"No. Go away {i}.",
        }
        for i in range(n)
    ]
    write_rows(path, rows, "pairs")
    return path


def test_losses_name_the_columns_they_need(tmp_path):
    path = write_pairs(tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet:1: missing column 'ref_chosen_logp'"):
        load_distill_data(str(path), DistillLossConfig(kind="dpo"))
    with pytest.raises(ConfigError, match="loss.kind: must be one of"):
        load_distill_data(str(path), DistillLossConfig(kind="kto"))


@pytest.mark.slow
def test_precompute_with_an_ensemble_then_distill_with_deepspeed(tmp_path):
    # 32 pairs: 3 held out, 29 to train on, 3 steps an epoch, so history at steps 3 and 6.
    pairs = write_pairs(tmp_path / "pairs.parquet", n=32)
    members = []
    for seed in range(3):  # three reward models with different heads
        torch.manual_seed(seed)
        model, tok = build_reward_model("bradley-terry", "tiny-encoder:0", backbone_kind="encoder")
        model.save(tmp_path / f"rm{seed}", tok)
        members.append(str(tmp_path / f"rm{seed}"))
    scored = tmp_path / "scored.parquet"
    proc = run_cli(
        "distill",
        "precompute",
        f"data={pairs}",
        f"out={scored}",
        f"reward_models=[{','.join(members)}]",
        "reference=tiny:3",
        "max_new_tokens=6",
        "batch_size=8",
        "actors=1",  # one actor per scoring stage: fewer processes to start
        f"output_dir={tmp_path / 'pre'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = load_rows(scored, kind="pairs").rows
    assert len(rows) == 32 and all(len(r["chosen_rewards"]) == 3 for r in rows)
    # The pool's numbers equal scoring the same pairs in-process.
    prompts = [r["prompt"] for r in rows]
    for m, member in enumerate(members):
        from dprm_ray.reward_models import load_reward_model

        model, tok = load_reward_model(member)
        want = predict(model, tok, RewardData(prompts, [r["chosen"] for r in rows]))["expected"]
        assert np.allclose([r["chosen_rewards"][m] for r in rows], want, atol=1e-5)
    reference, tok = load_model("tiny:3")
    want = score_responses(reference, tok, prompts, [r["rejected"] for r in rows])
    assert np.allclose([r["ref_rejected_logp"] for r in rows], want.numpy(), atol=1e-3)
    assert all(r["ref_sample"].strip() for r in rows)

    out = tmp_path / "edpo"
    proc = run_cli(
        "distill",
        f"data={scored}",
        "loss.kind=edpo",
        "loss.gamma=0.1",
        "policy=tiny:3",
        "optim.lr=1e-3",
        "optim.epochs=2",
        "scale.num_workers=2",
        "scale.zero_stage=2",
        "eval_kl_prompts=4",
        "max_new_tokens=6",
        "log_every=3",
        "wandb.mode=disabled",
        f"output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "preference_accuracy",
        "logp_chosen",
        "logp_rejected",
        "implicit_reward_abs",
        "kl_ref_to_policy",
        "kl_policy_to_ref",
    ):
        assert np.isfinite(metrics[key]), key
    assert metrics["steps"] == 2 * (metrics["train_pairs"] // 8)
    assert [h["step"] for h in metrics["history"]][:2] == [3, 6]
    assert {"ensemble_member", "reference_nll", "logp_chosen"} <= set(metrics["history"][0])
    policy, _ = load_model(str(out / "policy"))
    assert policy.config.model_type == "llama"


def test_lora_policy_trains_adapters_only_and_saves_merged(tmp_path):
    from omegaconf import OmegaConf

    from dprm_ray.distill import build_policy
    from dprm_ray.policy import save_policy
    from dprm_ray.policy_config import DistillConfig

    cfg = OmegaConf.merge(
        OmegaConf.structured(DistillConfig),
        {"data": "x", "policy": "tiny:2", "lora": {"enabled": True}},
    )
    model, tok = build_policy(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # move the adapters so the merge matters
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = tok("some text", return_tensors="pt")["input_ids"]
    want = model(ids).logits
    save_policy(model, tok, tmp_path / "policy")
    merged, _ = load_model(str(tmp_path / "policy"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged(ids).logits, want, atol=1e-4)

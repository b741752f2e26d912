import json

import pytest
from conftest import HH_RLHF, run_cli

from dprm_ray.reward_models import build_reward_model


@pytest.mark.slow
def test_evaluate_bt_model_on_hh_rlhf_transcripts(tmp_path):
    model, tok = build_reward_model("bradley-terry", "tiny-encoder:0", backbone_kind="encoder")
    model.save(tmp_path / "bt", tok)
    proc = run_cli(
        "evaluate",
        "reward",
        f"--model={tmp_path / 'bt'}",
        "--data",
        str(HH_RLHF),
        "skip_invalid_rows=true",
        "max_length=64",
        f"output_dir={tmp_path / 'out'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["pairs"] == 1154 and 0.0 <= metrics["pairwise_accuracy"] <= 1.0
    assert metrics["model_type"] == "bradley-terry"


@pytest.mark.slow
def test_evaluate_refuses_bad_rows_naming_them(tmp_path):
    model, tok = build_reward_model("bradley-terry", "tiny-encoder:0", backbone_kind="encoder")
    model.save(tmp_path / "bt", tok)
    proc = run_cli(
        "evaluate",
        "reward",
        f"model={tmp_path / 'bt'}",
        f"data={HH_RLHF}",
        f"output_dir={tmp_path}",
    )
    assert proc.returncode == 1
    assert f"{HH_RLHF}:317: empty text in 'chosen'" in proc.stderr


@pytest.mark.slow
def test_frozen_backbone_evaluation_from_cached_features_equals_raw_text_scoring(tmp_path):
    import numpy as np
    import torch

    from dprm_ray.data import load_rows
    from dprm_ray.reward_eval import pairwise_accuracy
    from dprm_ray.reward_models import RewardData, load_reward_model, predict

    torch.manual_seed(0)
    model, tok = build_reward_model(
        "bradley-terry", "tiny-encoder:0", backbone_kind="encoder", cached_embeddings=True
    )
    with torch.no_grad():
        model.head.weight.normal_()
    model.save(tmp_path / "bt")
    proc = run_cli(
        "evaluate",
        "reward",
        f"model={tmp_path / 'bt'}",
        f"data={HH_RLHF}",
        "skip_invalid_rows=true",
        "max_length=64",
        f"output_dir={tmp_path / 'out'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())["pairwise_accuracy"]
    rows = load_rows(HH_RLHF, skip_invalid=True).rows
    full, tok = load_reward_model(tmp_path / "bt")  # with its backbone: raw text in
    prompts = [r["prompt"] for r in rows]
    chosen = predict(full, tok, RewardData(prompts, [r["chosen"] for r in rows]), max_length=64)
    rejected = predict(full, tok, RewardData(prompts, [r["rejected"] for r in rows]), max_length=64)
    assert np.isclose(got, pairwise_accuracy(chosen["expected"], rejected["expected"]))


@pytest.mark.slow
def test_evaluate_scores_a_pal_model_as_a_users_reward(tmp_path):
    import numpy as np
    import torch

    from dprm_ray.data import load_rows
    from dprm_ray.pal import PALConfig, PALReward, build_pal_model, save_pal
    from dprm_ray.reward_eval import pairwise_accuracy

    config = PALConfig(
        variant="pal-b",
        input_dim=32,
        num_prototypes=2,
        hidden_size=16,
        pref_dim=8,
        backbone="tiny-encoder:0",
        max_length=64,
        user_ids=["user-0", "user-1"],
    )
    torch.manual_seed(0)
    save_pal(build_pal_model(config, seed=0), tmp_path / "pal")
    proc = run_cli(
        "evaluate",
        "reward",
        f"model={tmp_path / 'pal'}",
        f"data={HH_RLHF}",
        "user=user-1",
        "skip_invalid_rows=true",
        f"output_dir={tmp_path / 'out'}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rows = load_rows(HH_RLHF, skip_invalid=True).rows
    reward = PALReward(tmp_path / "pal", user="user-1")
    prompts = [r["prompt"] for r in rows]
    want = pairwise_accuracy(
        reward(prompts, [r["chosen"] for r in rows]), reward(prompts, [r["rejected"] for r in rows])
    )
    assert metrics["model_type"] == "pal" and np.isclose(metrics["pairwise_accuracy"], want)

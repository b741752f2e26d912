import numpy as np
import ot
import pytest
import torch
from scipy.stats import spearmanr

from dprm_ray.labels import get_label_space
from dprm_ray.models import load_model
from dprm_ray.reward_eval import (
    distribution_metrics,
    expected_calibration_error,
    pairwise_accuracy,
    spearman,
    w1_on_line,
)
from dprm_ray.reward_models import (
    BradleyTerryRewardModel,
    DistributionalRewardModel,
    build_reward_model,
    embed_texts,
    load_reward_model,
    pool_last_token,
    tokenize_pairs,
)

HH6 = get_label_space("hh6")


def test_last_token_pooling_handles_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool_last_token(hidden, left).flatten().tolist() == [3.0, 7.0]
    assert pool_last_token(hidden, right).flatten().tolist() == [1.0, 7.0]


def test_expected_reward_and_variance_follow_the_label_scores():
    model = DistributionalRewardModel(HH6, hidden_size=4)
    emb = torch.randn(5, 4)
    out = model.predict(embeddings=emb)
    scores = torch.tensor(HH6.scores)
    probs = torch.softmax(model(embeddings=emb), -1)
    assert torch.allclose(out.probs, probs)
    assert torch.allclose(out.expected, probs @ scores)
    var = (probs * (scores - out.expected[:, None]) ** 2).sum(-1)
    assert torch.allclose(out.variance, var, atol=1e-6)


def test_causal_lm_text_keeps_the_end_of_the_response():
    _, tok = load_model("tiny")
    enc = tokenize_pairs(tok, ["a very long prompt " * 20], ["the answer"], max_length=16)
    text = tok.decode(enc["input_ids"][0])
    assert text.endswith("the answer</s>") and enc["input_ids"].shape[1] == 16


def test_distributional_model_on_tiny_lm_round_trips_through_the_loader(tmp_path):
    model, tok = build_reward_model("distributional", "tiny:4", HH6, backbone_kind="causal-lm")
    with torch.no_grad():
        model.head.weight.normal_()
    enc = tokenize_pairs(tok, ["p1", "p2"], ["r1", "a longer r2"], 64)
    before = model.predict(**enc)
    model.save(tmp_path / "rm", tok)
    loaded, tok2 = load_reward_model(tmp_path / "rm")
    assert isinstance(loaded, DistributionalRewardModel) and loaded.label_space == HH6
    after = loaded.predict(**tokenize_pairs(tok2, ["p1", "p2"], ["r1", "a longer r2"], 64))
    assert torch.allclose(before.probs, after.probs, atol=1e-6)


def test_frozen_encoder_model_stores_the_backbone_spec_not_weights(tmp_path):
    model, tok = build_reward_model(
        "bradley-terry", "tiny-encoder:1", backbone_kind="encoder", cached_embeddings=True
    )
    assert model.backbone is None
    model.save(tmp_path / "bt")
    assert not (tmp_path / "bt" / "backbone").exists()
    loaded, tok2 = load_reward_model(tmp_path / "bt")
    assert isinstance(loaded, BradleyTerryRewardModel)
    # Scoring raw text through the reloaded backbone equals scoring the cached embeddings.
    encoder, _ = load_model("tiny-encoder:1", kind="encoder")
    emb = embed_texts(encoder, tok, ["q"], ["an answer"], max_length=32)
    enc = tokenize_pairs(tok2, ["q"], ["an answer"], 32)
    assert torch.allclose(
        model.predict(embeddings=emb).expected, loaded.predict(**enc).expected, atol=1e-5
    )


def test_w1_on_line_matches_pot():
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(6), 50), rng.dirichlet(np.ones(6), 50)
    scores = HH6.scores_array()
    want = [ot.emd2(a, b, HH6.score_cost()) for a, b in zip(p, q, strict=True)]
    assert np.allclose(w1_on_line(p, q, scores), want, atol=1e-9)


def test_spearman_matches_scipy_with_ties():
    a = np.array([1, 2, 2, 3, 5, 4.0])
    b = np.array([2, 1, 3, 3, 6, 5.0])
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)


def test_ece_is_zero_when_confidence_matches_and_positive_when_overconfident():
    target = np.array([[0.7, 0.3], [0.7, 0.3]])
    assert expected_calibration_error(target.copy(), target) == pytest.approx(0.0)
    over = np.array([[0.99, 0.01], [0.99, 0.01]])
    assert expected_calibration_error(over, target) == pytest.approx(0.29)


def test_distribution_metrics_report_population_when_given():
    pred = np.full((3, 6), 1 / 6)
    target = np.eye(6)[[0, 1, 2]]
    m = distribution_metrics(pred, target, HH6, population=target)
    assert m["w1"] == pytest.approx(m["w1_population"])
    assert m["ce"] == pytest.approx(np.log(6))


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy(np.array([1, 0, 2.0]), np.array([0, 0, 3.0])) == pytest.approx(0.5)


def test_cached_causal_lm_features_equal_the_models_own_pooling(tmp_path):
    from dprm_ray.reward_models import cached_embeddings

    model, tok = build_reward_model("distributional", "tiny:2", HH6, backbone_kind="causal-lm")
    prompts, responses = ["p", "another prompt"], ["r", "a longer response"]
    emb = cached_embeddings("tiny:2", prompts, responses, 64, tmp_path, backbone_kind="causal-lm")
    with torch.no_grad():
        direct = model.features(**tokenize_pairs(tok, prompts, responses, 64))
    assert torch.allclose(emb, direct, atol=1e-5)
    again = cached_embeddings("tiny:2", prompts, responses, 64, tmp_path, backbone_kind="causal-lm")
    assert torch.equal(emb, again) and len(list(tmp_path.iterdir())) == 1


def test_saved_model_folder_gets_the_usual_permissions_not_mkdtemps_0700(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    model = DistributionalRewardModel(HH6, hidden_size=4)
    model.save(tmp_path / "rm")
    assert (tmp_path / "rm").stat().st_mode & 0o777 == 0o777 & ~umask
    model.save(tmp_path / "rm")  # saving again replaces the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]


def test_bootstrap_resamples_with_replacement_deterministically():
    import numpy as np

    from dprm_ray.reward_models import RewardData
    from dprm_ray.reward_training import bootstrap_resample

    data = RewardData(
        [f"p{i}" for i in range(50)],
        [f"r{i}" for i in range(50)],
        targets=np.eye(5)[np.arange(50) % 5],
        pairs=np.arange(50).reshape(25, 2),
    )
    a = bootstrap_resample(data, by_pairs=True, seed=1)
    assert np.array_equal(a.pairs, bootstrap_resample(data, by_pairs=True, seed=1).pairs)
    assert not np.array_equal(a.pairs, bootstrap_resample(data, by_pairs=True, seed=2).pairs)
    assert len(a.pairs) == 25 and len({tuple(p) for p in a.pairs}) < 25  # some repeats
    rows = bootstrap_resample(data, by_pairs=False, seed=1)
    assert len(rows.prompts) == 50 and len(set(rows.prompts)) < 50
    for p, t in zip(rows.prompts, rows.targets, strict=True):
        assert t.argmax() == int(p[1:]) % 5  # targets travel with their rows


@pytest.mark.parametrize("spec, kind", [("tiny-encoder:0", "encoder"), ("tiny:0", "causal-lm")])
def test_scores_do_not_depend_on_what_else_is_in_the_batch(spec, kind):
    model, tok = build_reward_model("bradley-terry", spec, backbone_kind=kind)
    with torch.no_grad():
        model.head.weight.normal_()
        alone = model.predict(**tokenize_pairs(tok, ["q"], ["short"], 64)).expected
        batched = model.predict(
            **tokenize_pairs(tok, ["q", "a much longer prompt"], ["short", "long answer " * 5], 64)
        ).expected
    assert torch.allclose(alone, batched[:1], atol=1e-5)

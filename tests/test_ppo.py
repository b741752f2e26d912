"""PPO maths (GAE, whitening, clipped losses, KL control, batching) and the policy-with-value
model, checked against naive loops, hand-computed numbers and plain HF models."""

import pytest
import torch

from dprm_ray.models import load_model
from dprm_ray.policy_config import PPOConfig
from dprm_ray.ppo import (
    AdaptiveKLController,
    Experience,
    FixedKLController,
    collate,
    compute_advantages,
    gae,
    group_advantages,
    kl_controller,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    shape_rewards,
    value_loss,
)


def naive_gae(rewards, values, gamma, lam):
    """Textbook GAE over one episode given as plain lists."""
    n = len(rewards)
    adv = [0.0] * n
    running = 0.0
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


def test_gae_on_a_hand_computed_example():
    # One row: a prompt position, three response positions, one padding position.
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[5.0, 0.5, 0.4, 0.2, 3.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=3: 1 - 0.2 = 0.8; t=2: 0 + .9*.2 - .4 = -.22, -.22 + .45*.8 = .14;
    # t=1: .9*.4 - .5 = -.14, -.14 + .45*.14 = -.077
    assert torch.allclose(adv, torch.tensor([[0.0, -0.077, 0.14, 0.8, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, 0.423, 0.54, 1.0, 0.0]]), atol=1e-6)


def test_gae_matches_a_naive_loop_on_ragged_rows():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 12
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    mask = torch.zeros(B, T)
    spans = [(0, 12), (3, 9), (5, 6), (1, 4), (7, 12), (2, 11)]
    for b, (s, e) in enumerate(spans):
        mask[b, s:e] = 1
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    for b, (s, e) in enumerate(spans):
        want = naive_gae(rewards[b, s:e].tolist(), values[b, s:e].tolist(), 0.95, 0.9)
        assert torch.allclose(adv[b, s:e], torch.tensor(want), atol=1e-5)
        assert torch.allclose(ret[b, s:e], torch.tensor(want) + values[b, s:e], atol=1e-5)
        assert adv[b, :s].abs().sum() == 0 and adv[b, e:].abs().sum() == 0
    # gamma = lam = 1 with zero values: the advantage is the reward-to-go.
    adv1, _ = gae(rewards, torch.zeros_like(values), mask, 1.0, 1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1]) * mask
    assert torch.allclose(adv1, to_go, atol=1e-5)


def test_masked_whitening_invariants():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 10, generator=g) * 3 + 2
    mask = (torch.rand(4, 10, generator=g) > 0.4).float()
    w = masked_whiten(x, mask)
    assert abs(float(masked_mean(w, mask))) < 1e-6
    sel = w[mask.bool()]
    assert torch.allclose(sel.var(), torch.tensor(1.0), atol=1e-4)
    assert w[~mask.bool()].abs().sum() == 0
    # Values outside the mask do not change the result.
    assert torch.allclose(masked_whiten(x + 100 * (1 - mask), mask), w, atol=1e-5)
    # shift_mean=False keeps the masked mean and whitens the spread only.
    scaled = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(masked_mean(scaled, mask), masked_mean(x, mask), atol=1e-5)
    assert torch.allclose(scaled[mask.bool()].var(), torch.tensor(1.0), atol=1e-4)


def test_policy_loss_clips_only_in_the_direction_of_the_advantage():
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    # ratios 1.5, 1.05 (positive advantage), 0.5, 0.95 (negative advantage)
    logp = torch.log(torch.tensor([[1.5, 1.05, 0.5, 0.95]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    loss.backward()
    # Clipped tokens (ratio pushed past 1 +- eps in the advantage's direction) give no gradient.
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0
    assert logp.grad[0, 1] < 0 and logp.grad[0, 3] > 0  # descent raises / lowers the log-prob
    assert float(stats["clipfrac"]) == pytest.approx(0.5)
    want = -(1.2 + 1.05 - 0.8 - 0.95) / 4  # min of clipped/unclipped objective per token
    assert float(loss.detach()) == pytest.approx(want, abs=1e-6)
    # A ratio pushed the other way (below 1 - eps with a positive advantage) is not clipped.
    logp2 = torch.log(torch.tensor([[0.5]])).requires_grad_()
    loss2, stats2 = policy_loss(logp2, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss2.backward()
    assert logp2.grad[0, 0] < 0 and float(stats2["clipfrac"]) == 0
    assert float(stats["approx_kl"]) > 0


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_error():
    old = torch.zeros(1, 3)
    returns = torch.tensor([[1.0, 1.0, -1.0]])
    values = torch.tensor([[0.1, 2.0, 0.5]])
    loss, stats = value_loss(values, old, returns, torch.ones(1, 3), value_clip=0.2)
    # token 0 is inside the clip range; tokens 1 and 2 clip to 0.2, which errs less (0.64 < 1,
    # 1.44 < 2.25), so the unclipped error counts everywhere.
    assert float(loss) == pytest.approx(0.5 * (0.81 + 1.0 + 2.25) / 3, abs=1e-6)
    assert float(stats["vf_clipfrac"]) == 0
    # A value that ran 0.5 from its old estimate towards the return: the clipped value (0.2)
    # errs more, that branch is constant in the value, so no gradient pushes it further.
    values2 = torch.tensor([[0.5, 0.1]], requires_grad=True)
    loss2, stats2 = value_loss(values2, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    loss2.backward()
    assert float(loss2.detach()) == pytest.approx(0.5 * (0.64 + 0.81) / 2, abs=1e-6)
    assert values2.grad[0, 0] == 0 and values2.grad[0, 1] < 0
    assert float(stats2["vf_clipfrac"]) == pytest.approx(0.5)
    loss3, _ = value_loss(values2, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.0)
    assert float(loss3.detach()) == pytest.approx(0.5 * (0.25 + 0.81) / 2, abs=1e-6)  # no clipping


def test_kl_estimators():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(20, generator=g), 0)
    q = torch.softmax(torch.randn(20, generator=g), 0)
    true_kl = float((p * (p.log() - q.log())).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[samples], q.log()[samples]
    for kind in ("k1", "k3"):  # unbiased estimators of KL(p || q)
        assert float(kl_estimate(logp, logq, kind).mean()) == pytest.approx(true_kl, rel=0.03)
    assert float(kl_estimate(logp, logq, "k3").min()) >= 0
    assert float(kl_estimate(logp, logq, "k2").min()) >= 0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, logq, "k9")


def test_group_advantages_on_a_hand_computed_example():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, -1.0, -1.0, -1.0, -1.0])
    # RLOO: each score minus the mean of the other three of its group.
    rloo = group_advantages(scores, 4, "rloo")
    assert torch.allclose(rloo[:4], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]))
    assert torch.equal(rloo[4:], torch.zeros(4))  # a group that scores alike learns nothing
    # GRPO: (score - group mean) / (unbiased group std + 1e-6); mean 3, std sqrt(14/3).
    grpo = group_advantages(scores, 4, "grpo")
    std = (14 / 3) ** 0.5
    assert torch.allclose(grpo[:4], torch.tensor([-2.0, -1.0, 0.0, 3.0]) / (std + 1e-6))
    assert torch.equal(grpo[4:], torch.zeros(4))
    # A pair: RLOO's advantage is the difference of the two scores.
    assert torch.allclose(
        group_advantages(torch.tensor([3.0, 1.0]), 2, "rloo"), torch.tensor([2.0, -2.0])
    )
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4, "rloo")
    with pytest.raises(ValueError, match="unknown group advantage"):
        group_advantages(torch.zeros(4), 2, "gae")


@pytest.mark.parametrize("kind", ["rloo", "grpo"])
def test_critic_free_advantages_give_every_response_token_its_group_relative_score(kind):
    """The KL penalty joins the score before the baseline; prompt and padding positions get 0;
    a prompt's easy score (the same for its whole group) cancels out."""
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]).float()
    logp = torch.full((4, 4), -1.0)
    ref = logp - 0.5 * mask  # KL 0.5 per response token
    easy = torch.tensor([10.0, 10.0, -5.0, -5.0])  # what the prompt alone decides
    exp = Experience(
        input_ids=torch.zeros(4, 5, dtype=torch.long),
        attention_mask=torch.ones(4, 5, dtype=torch.long),
        action_mask=mask,
        rewards=easy + torch.tensor([1.0, 0.0, 0.0, 1.0]),
        old_logprobs=logp * mask,
        ref_logprobs=ref * mask,
        values=torch.zeros(4, 4),
    )
    cfg = PPOConfig(advantage=kind, samples_per_prompt=2, whiten_advantages=False)
    stats = compute_advantages(exp, cfg, kl_coef=0.2, reduce=lambda x: x)
    # Scores minus 0.2 * sequence KL: [1 - 0.2, 0 - 0.3] and [0 - 0.2, 1 - 0.3] above the easy part.
    scores = torch.tensor([0.8, -0.3, -0.2, 0.7])
    expected = group_advantages(scores, 2, kind)
    assert torch.allclose(exp.advantages, expected[:, None] * mask)
    assert torch.equal(exp.returns, torch.zeros(4, 4))
    assert stats["kl"] == pytest.approx((1.0 + 1.5 + 1.0 + 1.5) / 4)


def test_reinforce_pp_advantages_are_the_whitened_kl_shaped_reward_to_go():
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]).float()
    logp = torch.full((2, 4), -1.0)
    exp = Experience(
        input_ids=torch.zeros(2, 5, dtype=torch.long),
        attention_mask=torch.ones(2, 5, dtype=torch.long),
        action_mask=mask,
        rewards=torch.tensor([1.0, -1.0]),
        old_logprobs=logp * mask,
        ref_logprobs=(logp - 0.5) * mask,  # KL 0.5 per response token
        values=torch.full((2, 4), 7.0),  # ignored: no critic
    )
    cfg = PPOConfig(advantage="reinforce_pp", whiten_advantages=False)
    compute_advantages(exp, cfg, kl_coef=0.2, reduce=lambda x: x)
    # Per token -0.1 of KL; the sequence reward on the last token; summed to the end.
    assert torch.allclose(exp.advantages[0], torch.tensor([0.0, 0.7, 0.8, 0.9]))
    assert torch.allclose(exp.advantages[1], torch.tensor([0.0, 0.0, -1.2, -1.1]))
    cfg.whiten_advantages = True
    compute_advantages(exp, cfg, kl_coef=0.2, reduce=lambda x: x)
    assert masked_mean(exp.advantages, mask) == pytest.approx(0.0, abs=1e-6)
    PPOConfig(advantage="reinforce_pp", samples_per_prompt=1).validate()  # no groups needed


def test_critic_free_estimators_need_groups():
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        PPOConfig(advantage="rloo").validate()
    with pytest.raises(ValueError, match="advantage must be one of"):
        PPOConfig(advantage="ppo").validate()
    with pytest.raises(ValueError, match="ppo.kl_coef: must be >= 0"):
        PPOConfig(kl_coef=-0.1).validate()
    PPOConfig(advantage="grpo", samples_per_prompt=4).validate()


def test_reward_shaping_puts_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]).float()
    r = shape_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert torch.allclose(r[0], torch.tensor([0.0, -0.05, -0.05, 1.95, 0.0]))
    assert torch.allclose(r[1], torch.tensor([0.0, 0.0, -1.1, 0.0, 0.0]))


def test_kl_controllers_move_the_coefficient_towards_the_target():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, 100)  # KL twice the target: error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    high = ctl.value
    ctl.update(5.4, 100)  # below target: shrink
    assert ctl.value == pytest.approx(high * (1 - 0.1 * 100 / 1000))
    restored = AdaptiveKLController(0.5, 6.0, 1000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    assert isinstance(kl_controller(PPOConfig(kl_controller="adaptive")), AdaptiveKLController)
    with pytest.raises(ValueError, match="ppo.kl_controller"):
        PPOConfig(kl_controller="pid").validate()


def test_collate_right_pads_and_masks_the_response_predictions():
    exp = collate(
        [[10, 11, 12], [20]], [[13, 14], [21, 22, 23]], [1.0, -1.0], pad_id=0, max_length=8
    )
    assert exp.input_ids.tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 23, 0]]
    assert exp.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # position t predicts token t+1
    assert exp.action_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert exp.rewards.tolist() == [1.0, -1.0]
    # too long: prompt tokens go from the left, the response stays whole
    cut = collate([[1, 2, 3, 4, 5]], [[6, 7]], [0.0], pad_id=0, max_length=4)
    assert cut.input_ids.tolist() == [[4, 5, 6, 7]] and cut.action_mask.tolist() == [[0, 1, 1]]
    with pytest.raises(ValueError, match="rollout 0: response has 4 tokens"):
        collate([[1]], [[2, 3, 4, 5]], [0.0], pad_id=0, max_length=4)
    with pytest.raises(ValueError, match="rollout 1: empty response"):
        collate([[1], [1]], [[2], []], [0.0, 0.0], pad_id=0, max_length=4)
    sub = exp.select([0])
    assert sub.input_ids.shape == (1, 5) and exp.select([1]).action_mask.shape == (1, 3)


# --------------------------------------------------------------------------- the model


def test_policy_logprobs_match_sequence_logprobs_and_ignore_padding():
    from dprm_ray.learner import PolicyWithValue, policy_forward
    from dprm_ray.policy import sequence_logprobs, tokenize_responses

    lm, tok = load_model("tiny:4")
    model = PolicyWithValue(lm)
    batch = tokenize_responses(tok, ["hi", "a much longer prompt"], ["there you go", "ok"], 64)
    logp, values, entropy = policy_forward(model, batch["input_ids"], batch["attention_mask"])
    mask = batch["response_mask"][:, 1:]
    with torch.no_grad():
        assert torch.allclose((logp * mask).sum(1), sequence_logprobs(lm, batch), atol=1e-5)
    # A right-padded row has the log-probs it has alone.
    n = int(batch["attention_mask"][1].sum())
    alone, _, _ = policy_forward(model, batch["input_ids"][1:, :n], batch["attention_mask"][1:, :n])
    assert torch.allclose(logp[1, : n - 1], alone[0], atol=1e-5)
    assert values.shape == logp.shape and torch.all(values == 0)  # zero-initialised head
    assert torch.all(entropy > 0) and torch.all(entropy <= torch.log(torch.tensor(len(tok))) + 1e-4)


def test_exported_weights_merge_lora_without_touching_the_trained_model():
    from transformers import AutoModelForCausalLM

    from dprm_ray.learner import PolicyWithValue, lm_logprobs, plain_lm_state_dict, policy_forward
    from dprm_ray.policy import with_lora
    from dprm_ray.policy_config import LoraConfig

    lm, tok = load_model("tiny:5")
    model = PolicyWithValue(
        with_lora(
            lm, LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj", "down_proj"])
        )
    )
    torch.manual_seed(0)
    for name, p in model.named_parameters():  # LoRA B starts at zero: give it a real delta
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = plain_lm_state_dict(model.lm)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    fresh = AutoModelForCausalLM.from_config(load_model("tiny")[0].config)
    fresh.load_state_dict(weights, strict=True)
    assert not any("lora" in k or "value_head" in k for k in weights)
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]  # tied: stored once
    ids = torch.tensor([tok("some text here", add_special_tokens=False)["input_ids"]])
    att = torch.ones_like(ids)
    with torch.no_grad():
        want, _, _ = policy_forward(model, ids, att)
        assert torch.allclose(lm_logprobs(fresh, ids, att), want, atol=1e-5)
        base_logp = lm_logprobs(load_model("tiny:5")[0], ids, att)
    assert not torch.allclose(base_logp, want, atol=1e-3)  # the delta was merged, not dropped

    # A weight sync sends only what LoRA changed, with the rest of vLLM's fused q/k/v group (a
    # fused layer reloads only from all its parts); on the base model it gives the same policy.
    changed = plain_lm_state_dict(model.lm, trained_only=True)
    layers = lm.config.num_hidden_layers
    sent = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "down_proj.weight")
    assert len(changed) == 4 * layers and all(k.endswith(sent) for k in changed)
    assert all(torch.equal(v, weights[k]) for k, v in changed.items())
    base = load_model("tiny:5")[0]
    base.load_state_dict(changed, strict=False)
    with torch.no_grad():
        assert torch.allclose(lm_logprobs(base, ids, att), want, atol=1e-5)
    # Without LoRA every weight may change, so every weight is sent.
    assert plain_lm_state_dict(base, trained_only=True).keys() == weights.keys()


def test_text_rollouts_tokenise_like_the_policy_helpers():
    from dprm_ray.learner import rollout_token_ids
    from dprm_ray.policy import tokenize_responses

    _, tok = load_model("tiny")
    prompt_ids, response_ids = rollout_token_ids(tok, {"prompt": "Q: hi", "response": "yo"}, 0)
    batch = tokenize_responses(tok, ["Q: hi"], ["yo"], 64)
    assert prompt_ids + response_ids == batch["input_ids"][0].tolist()
    assert tok.decode(response_ids) == "yo</s>"
    ids = rollout_token_ids(tok, {"prompt_ids": [5, 6], "response_ids": [7], "reward": 1.0}, 0)
    assert ids == ([5, 6], [7])
    with pytest.raises(ValueError, match="rollout 3: needs prompt_ids and response_ids"):
        rollout_token_ids(tok, {"prompt": "x"}, 3)

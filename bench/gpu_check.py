"""GPU check: the PPO learner step and the reward-model training steps (DPRM and Bradley-Terry)
on a GPU in bf16, against the same steps in fp32 on the CPU from the same seed, and the
throughput of both, in one command:

    python bench/gpu_check.py --out gpu_check.json                  # a GPU: cuda, bf16
    python bench/gpu_check.py --device cpu --tiny --out check.json  # the same code on a CPU

What runs. One randomly initialised Llama of SmolLM2-135M's shape (`--tiny`: the project's tiny
test model's) is built from `--seed` on the CPU; every run starts from a copy of its weights and
sees the same synthetic batches, so the runs differ only in device, precision and engine:
- reference: the CPU in fp32, plain torch (AdamW, gradient clipping) -- DeepSpeed's ZeRO fp32 step;
- device run: `--device` in `--precision` under DeepSpeed (`dprm_ray.training.deepspeed_engine`:
  ZeRO `--zero-stage`, bf16/fp16 with fp32 master weights), or, when DeepSpeed is not importable,
  plain torch with fp32 weights under torch autocast (the DeepSpeed checks are then skipped, and
  the table and JSON say so).
The checks: `ppo` (a whole learner step: policy/value/reference passes, advantages, the clipped
PPO update, `dprm_ray.learner`/`dprm_ray.ppo`), `reward_dprm` (a distributional reward model on
hh6 with the OT loss) and `reward_bt` (a Bradley-Terry one on pairs), both with the backbone
training. Each compares its per-step losses with the reference's: |device - reference| <=
atol + rtol * |reference| (the tolerances are printed; bf16 keeps ~3 significant digits). The
throughput is the batch's non-pad tokens over the wall time of one whole step, the median of
the timed steps after the compared ones.

Needs only torch, transformers, peft and numpy (no Ray, vLLM, OmegaConf, POT or pyarrow): it
imports the library's pure modules. Exit code 0 when every check passes, 1 otherwise, 2 when the
device is missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# Run from a checkout that is not pip-installed (the GPU machine): the repository root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {
    # SmolLM2-135M's shape (random weights: nothing to download).
    "full": {
        "hidden": 576,
        "layers": 30,
        "heads": 9,
        "kv_heads": 3,
        "intermediate": 1536,
        "vocab": 49152,
        "batch": 8,
        "prompt": 64,
        "response": 64,
        "lr": 1e-5,
    },
    # The project's `tiny` test model.
    "tiny": {
        "hidden": 64,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "intermediate": 128,
        "vocab": 262,
        "batch": 8,
        "prompt": 8,
        "response": 8,
        "lr": 1e-4,
    },
}
# |device - reference| <= atol + rtol * |reference|, per step and loss.
TOLERANCES = {"bf16": (0.05, 0.05), "fp16": (0.02, 0.02), "fp32": (1e-4, 1e-4)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON results file to write")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (seconds)")
    parser.add_argument("--steps", type=int, default=3, help="compared steps per check")
    parser.add_argument(
        "--timed-steps", type=int, default=0, help="device steps timed after (0: 10, --tiny 2)"
    )
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--no-deepspeed", action="store_true", help="torch autocast only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=0, help="override the layer count (0: keep)")
    args = parser.parse_args(argv)
    if not args.timed_steps:
        args.timed_steps = 2 if args.tiny else 10
    return args


# --------------------------------------------------------------------------- engines


class TorchEngine:
    """The engine calls the library's steps make (`engine(...)`, `backward`, `step`, `train`,
    `eval`, `device`, `module`) in plain torch: AdamW over fp32 weights, gradient clipping, the
    forward under autocast to `precision`. In fp32 on the CPU it is the reference run."""

    def __init__(self, module: Any, lr: float, grad_clip: float, precision: str, device: Any):
        import torch

        self.device = torch.device(device)
        self.module = module.to(self.device)
        self.precision = precision
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.grad_clip = grad_clip

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from dprm_ray.precision import autocast

        with autocast(self.precision, self.device):
            return self.module(*args, **kwargs)

    def backward(self, loss: Any) -> None:
        loss.backward()

    def step(self) -> None:
        import torch

        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


def make_engine(module: Any, run: dict, lr: float, batch_size: int) -> Any:
    """DeepSpeed for a run with `deepspeed` set, else a TorchEngine."""
    if run["deepspeed"]:
        from dprm_ray.training import OptimConfig, deepspeed_engine

        optim = OptimConfig(lr=lr, batch_size=batch_size, grad_clip=1.0)
        return deepspeed_engine(module, optim, run["zero_stage"], run["precision"])
    return TorchEngine(module, lr, 1.0, run["precision"], run["device"])


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- the model, data


def build_lm(size: dict, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


def sequences(size: dict, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """n (prompt, response) token lists with varied lengths (so there is padding)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for _ in range(n):
        p = int(torch.randint(size["prompt"] // 2, size["prompt"] + 1, (), generator=g))
        r = int(torch.randint(size["response"] // 2, size["response"] + 1, (), generator=g))
        prompts.append(torch.randint(3, size["vocab"], (p,), generator=g).tolist())
        responses.append(torch.randint(3, size["vocab"], (r,), generator=g).tolist())
    return prompts, responses


def padded(rows: list[list[int]], device: Any) -> dict[str, Any]:
    """Right-padded input_ids / attention_mask (the reward models pool the last real token)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


# --------------------------------------------------------------------------- the checks


def ppo_run(lm: Any, size: dict, run: dict, steps: int, seed: int) -> dict[str, Any]:
    """`steps` whole PPO learner steps; per-step losses and step times."""
    import torch

    from dprm_ray.learner import (
        PolicyWithValue,
        all_reduce_sum,
        lm_logprobs,
        policy_forward,
        ppo_train_step,
    )
    from dprm_ray.policy_config import PPOConfig
    from dprm_ray.ppo import collate, compute_advantages, kl_controller, masked_mean
    from dprm_ray.precision import torch_dtype

    ppo = PPOConfig(mini_batch_size=size["batch"] // 2, ppo_epochs=1, max_length=2048)
    torch.manual_seed(seed)
    model = PolicyWithValue(copy.deepcopy(lm), value_head=True)
    engine = make_engine(model, run, size["lr"], ppo.mini_batch_size)
    device = engine.device
    reference = copy.deepcopy(lm).requires_grad_(False)
    reference.to(device, dtype=torch_dtype(run["precision"])).eval()
    kl_ctl = kl_controller(ppo)
    out: dict[str, Any] = {"policy_loss": [], "value_loss": [], "logp": [], "kl": []}
    times, tokens = [], []
    for step in range(steps):
        prompts, responses = sequences(size, size["batch"], seed * 7919 + step)
        g = torch.Generator().manual_seed(seed + step)
        rewards = torch.rand(size["batch"], generator=g).tolist()
        exp = collate(prompts, responses, rewards, 0, ppo.max_length).to(device)
        sync(device)
        start = time.perf_counter()
        engine.eval()
        with torch.no_grad():
            logp, values, _ = policy_forward(engine, exp.input_ids, exp.attention_mask)
            ref = lm_logprobs(reference, exp.input_ids, exp.attention_mask)
        mask = exp.action_mask
        exp.old_logprobs, exp.values, exp.ref_logprobs = logp * mask, values * mask, ref * mask
        stats = compute_advantages(exp, ppo, kl_ctl.value, all_reduce_sum)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        metrics = ppo_train_step(engine, exp, ppo, generator)
        sync(device)
        times.append(time.perf_counter() - start)
        tokens.append(int(exp.attention_mask.sum()))
        out["policy_loss"].append(metrics["policy_loss"])
        out["value_loss"].append(metrics["value_loss"])
        out["logp"].append(float(masked_mean(logp.float(), mask)))
        out["kl"].append(float(stats["kl"]))
    out.update(_engine_info(engine, run), times=times, tokens=tokens)
    return out


def reward_run(kind: str, lm: Any, size: dict, run: dict, steps: int, seed: int) -> dict:
    """`steps` reward-model training steps (backbone trained): DPRM (hh6, OT loss) or BT."""
    import torch

    from dprm_ray.labels import get_label_space
    from dprm_ray.losses import bradley_terry_loss, distribution_loss
    from dprm_ray.reward_models import BradleyTerryRewardModel, DistributionalRewardModel

    space = get_label_space("hh6")
    backbone = copy.deepcopy(lm).get_decoder()
    torch.manual_seed(seed + 1)  # the head's initialisation
    common = {"backbone": backbone, "pooling": "last", "backbone_spec": "gpu-check"}
    if kind == "bt":
        model = BradleyTerryRewardModel(size["hidden"], **common)
    else:
        model = DistributionalRewardModel(space, size["hidden"], **common)
    batch = size["batch"]
    engine = make_engine(model, run, size["lr"], batch)
    device = engine.device
    engine.train()
    losses, times, tokens = [], [], []
    for step in range(steps):
        prompts, responses = sequences(size, 2 * batch, seed * 104729 + step)
        rows = [p + r for p, r in zip(prompts, responses, strict=True)]
        g = torch.Generator().manual_seed(seed + 100 + step)
        if kind == "bt":
            inputs = padded(rows, device)  # rows [0, B) chosen, [B, 2B) rejected
        else:
            inputs = padded(rows[:batch], device)
            noise = torch.randn((batch, space.num_labels), generator=g)
            target = torch.softmax(2.0 * noise, dim=-1).to(device)  # crowd-like distributions
        sync(device)
        start = time.perf_counter()
        torch.manual_seed(seed + step)
        out = engine(**inputs).float()
        if kind == "bt":
            reward = out.squeeze(-1)
            loss = bradley_terry_loss(reward[:batch], reward[batch:])
        else:
            loss = distribution_loss(out, target, "ot", space)
        engine.backward(loss)
        engine.step()
        sync(device)
        times.append(time.perf_counter() - start)
        tokens.append(int(inputs["attention_mask"].sum()))
        losses.append(float(loss.detach()))
    return {"loss": losses, **_engine_info(engine, run), "times": times, "tokens": tokens}


def _engine_info(engine: Any, run: dict) -> dict[str, Any]:
    param = next(engine.module.parameters())
    return {"param_dtype": str(param.dtype).removeprefix("torch.")}


# --------------------------------------------------------------------------- comparing


def compare(name: str, keys: list[str], dev: dict, ref: dict, precision: str) -> dict[str, Any]:
    atol, rtol = TOLERANCES[precision]
    worst, ok = 0.0, True
    for key in keys:
        for d, r in zip(dev[key], ref[key], strict=False):
            diff = abs(d - r)
            finite = d == d and abs(d) != float("inf")
            ok = ok and finite and diff <= atol + rtol * abs(r)
            worst = max(worst, diff)
    return {"name": name, "keys": keys, "max_abs_diff": worst, "atol": atol, "rtol": rtol, "ok": ok}


def throughput(result: dict, skip: int) -> float:
    """Median tokens/s of the steps after the first `skip` (warm-up and compared ones)."""
    pairs = (
        list(zip(result["tokens"], result["times"], strict=True))[skip:]
        or list(zip(result["tokens"], result["times"], strict=True))[-1:]
    )
    return statistics.median(t / s for t, s in pairs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    deepspeed_version, skipped = "", ""
    if args.no_deepspeed:
        skipped = "--no-deepspeed given"
    else:
        try:
            import deepspeed

            deepspeed_version = deepspeed.__version__
        except Exception as exc:  # not installed, or it cannot load here
            skipped = f"DeepSpeed not importable ({type(exc).__name__}: {exc})"
    if deepspeed_version:
        from dprm_ray.training import ensure_process_group

        ensure_process_group()  # DeepSpeed wants a (one-process) torch.distributed group
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed_version or None,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    size = dict(SIZES["tiny" if args.tiny else "full"])
    if args.layers:
        size["layers"] = args.layers
    engine = f"DeepSpeed ZeRO-{args.zero_stage}" if deepspeed_version else "torch autocast"
    if skipped:
        print(
            f"gpu_check: {skipped}: the DeepSpeed checks are SKIPPED; the device runs use torch autocast"
        )
    print(
        f"gpu_check: {'tiny' if args.tiny else 'SmolLM2-135M-shaped'} Llama, batch {size['batch']}, "
        f"{args.device} {args.precision} ({engine}) vs cpu fp32 (torch), seed {args.seed}; "
        f"torch {torch.__version__}, {env['device_name']}"
    )
    lm = build_lm(size, args.seed)
    reference = {"device": "cpu", "precision": "fp32", "deepspeed": False, "zero_stage": 0}
    device_run = {
        "device": args.device,
        "precision": args.precision,
        "deepspeed": bool(deepspeed_version),
        "zero_stage": args.zero_stage,
    }
    n_dev = args.steps + args.timed_steps
    checks, rows = [], []
    plan = [
        (
            "ppo",
            ["policy_loss", "value_loss", "logp", "kl"],
            lambda run, n: ppo_run(lm, size, run, n, args.seed),
        ),
        ("reward_dprm", ["loss"], lambda run, n: reward_run("dprm", lm, size, run, n, args.seed)),
        ("reward_bt", ["loss"], lambda run, n: reward_run("bt", lm, size, run, n, args.seed)),
    ]
    setup_s = time.perf_counter() - began
    for name, keys, fn in plan:
        t0 = time.perf_counter()
        try:
            ref = fn(reference, args.steps)
            t1 = time.perf_counter()
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dev = fn(device_run, n_dev)
        except Exception as exc:  # one failing check must not hide the others' results
            import traceback

            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}"
            checks.append({"name": name, "ok": False, "error": error, "engine": engine})
            rows.append((name, "-", "-", "-", "-", "-", "-", f"ERROR {error[:60]}"))
            continue
        wall = {"reference": t1 - t0, "device": time.perf_counter() - t1}
        result = compare(name, keys, dev, ref, args.precision)
        result.update(
            engine=engine,
            device=args.device,
            precision=args.precision,
            param_dtype=dev["param_dtype"],
            device_losses={k: dev[k][: args.steps] for k in keys},
            reference_losses={k: ref[k] for k in keys},
            tokens_per_s=throughput(dev, args.steps),
            reference_tokens_per_s=throughput(ref, 1),
            step_seconds=statistics.median(dev["times"][args.steps :] or dev["times"]),
            wall_s=wall,
            peak_gpu_memory_gib=torch.cuda.max_memory_allocated() / 2**30
            if args.device == "cuda"
            else None,
        )
        checks.append(result)
        first = keys[0]
        rows.append(
            (
                name,
                f"{result['device_losses'][first][0]:.4f}",
                f"{result['reference_losses'][first][0]:.4f}",
                f"{result['max_abs_diff']:.2e}",
                f"{result['atol']:g}+{result['rtol']:g}|ref|",
                f"{result['tokens_per_s']:.0f}",
                f"{result['reference_tokens_per_s']:.0f}",
                "ok" if result["ok"] else "FAIL",
            )
        )
    header = (
        "check",
        f"{args.device} {args.precision}",
        "cpu fp32",
        "max |diff|",
        "tolerance",
        "tok/s dev",
        "tok/s cpu",
        "",
    )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print()
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)))
    print(
        f"(first-step {', '.join(c['keys'][0] for c in checks if 'keys' in c)}; max |diff| over {args.steps} steps "
        f"and every compared loss; tokens/s over whole steps; engine: {engine})"
    )
    if skipped:
        print(f"SKIPPED: the DeepSpeed checks ({skipped})")
    all_ok = all(c["ok"] for c in checks)
    report = {
        "ok": all_ok,
        "env": env,
        "args": vars(args),
        "model": size,
        "engine": engine,
        "deepspeed_skipped": skipped or None,
        "checks": checks,
        "setup_s": setup_s,
        "elapsed_s": time.perf_counter() - began,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{'all checks passed' if all_ok else 'SOME CHECKS FAILED'}; wrote {out} ({report['elapsed_s']:.1f} s)"
    )
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

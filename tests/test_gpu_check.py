"""bench/gpu_check.py in its CPU mode (`--device cpu --tiny`): the same code a GPU machine runs,
with only what that machine has (Ray, vLLM, OmegaConf, POT and pyarrow blocked from import), once
with DeepSpeed and once without it (the DeepSpeed checks are then skipped, and it says so)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

# The GPU machine has torch, transformers, peft, accelerate (and maybe DeepSpeed): every other
# package the project uses is made unimportable (a None entry in sys.modules raises ImportError).
ABSENT = ["ray", "vllm", "omegaconf", "ot", "pyarrow", "pandas", "wandb", "sklearn", "matplotlib"]
RUNNER = (
    "import runpy, sys\n"
    "for name in sys.argv[1].split(','):\n"
    "    if name: sys.modules[name] = None\n"
    "sys.argv = ['bench/gpu_check.py', *sys.argv[2:]]\n"
    "runpy.run_path('bench/gpu_check.py', run_name='__main__')\n"
)


def run_check(tmp_path: Path, absent: list[str]) -> tuple[subprocess.CompletedProcess, dict, float]:
    out = tmp_path / "check.json"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(absent), "--device", "cpu", "--tiny"]
        + ["--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), elapsed


def check_report(report: dict, engine: str) -> None:
    assert report["ok"] is True
    assert report["engine"] == engine
    assert [c["name"] for c in report["checks"]] == ["ppo", "reward_dprm", "reward_bt"]
    for check in report["checks"]:
        assert check["ok"] and check["device"] == "cpu" and check["precision"] == "bf16"
        assert check["max_abs_diff"] <= check["atol"]
        assert check["tokens_per_s"] > 0 and check["reference_tokens_per_s"] > 0
        for key in check["keys"]:
            dev, ref = check["device_losses"][key], check["reference_losses"][key]
            assert len(dev) == len(ref) == 3
        # bf16 is not fp32: the runs differ, a little (they start from the same weights).
        assert check["device_losses"] != check["reference_losses"]


@pytest.mark.slow
def test_gpu_check_cpu_tiny_with_deepspeed(tmp_path: Path):
    proc, report, elapsed = run_check(tmp_path, ABSENT)
    check_report(report, "DeepSpeed ZeRO-2")
    # DeepSpeed casts the module itself: parameters in bf16 (its fp32 master copy is internal).
    assert {c["param_dtype"] for c in report["checks"]} == {"bfloat16"}
    assert report["deepspeed_skipped"] is None and "SKIPPED" not in proc.stdout
    assert "all checks passed" in proc.stdout and "ppo " in proc.stdout
    print(f"--device cpu --tiny: {elapsed:.0f} s")  # a figure, not a test: the machine is noisy


@pytest.mark.slow
def test_gpu_check_runs_without_deepspeed_and_says_so(tmp_path: Path):
    proc, report, elapsed = run_check(tmp_path, [*ABSENT, "deepspeed"])
    check_report(report, "torch autocast")
    # Autocast keeps fp32 weights and computes in bf16.
    assert {c["param_dtype"] for c in report["checks"]} == {"float32"}
    assert report["deepspeed_skipped"].startswith("DeepSpeed not importable")
    assert "the DeepSpeed checks are SKIPPED" in proc.stdout
    print(f"--device cpu --tiny: {elapsed:.0f} s")  # a figure, not a test: the machine is noisy

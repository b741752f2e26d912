"""train-reward end to end on a real local Ray cluster (TorchTrainer + DeepSpeed on gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli

from dprm_ray.data import write_rows
from dprm_ray.reward_models import DistributionalRewardModel, load_reward_model

# Its jobs join the session's Ray cluster (see conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("jobs_join_ray_local")]

# Four kinds of response, each with its own crowd distribution over hh6.
KINDS = {"kind helpful answer": 0, "neutral reply": 1, "unsure response": 2, "rude harmful": 5}


def write_annotations(path: Path, prompts: int = 64) -> Path:
    rows = []
    names = list(KINDS)
    for i in range(prompts):
        for name in names[:2] if i % 2 else names[2:]:
            target = np.full(6, 0.02)
            target[KINDS[name]] = 0.9
            target /= target.sum()
            rows.append(
                {
                    "prompt": f"question number {i}?",
                    "response": f"{name} {i}",
                    "prior": [1 / 6] * 6,
                    "votes": [KINDS[name]] * 3,
                    "posterior": target.tolist(),
                    "target": target.tolist(),
                }
            )
    write_rows(path, rows, "annotations")
    return path


TINY_LM = [
    "backbone.spec=tiny",
    "backbone.kind=causal-lm",
    "backbone.freeze=false",
    "scale.num_workers=2",
]


@pytest.mark.parametrize("zero_stage, wandb_mode", [(2, "disabled"), (3, "offline")])
def test_tiny_lm_deepspeed_two_workers(tmp_path, zero_stage, wandb_mode):
    data = write_annotations(tmp_path / "ann.parquet")
    held = write_annotations(tmp_path / "held.parquet", prompts=9)
    out = tmp_path / "run"
    proc = run_cli(
        "train-reward",
        f"data={data}",
        f"eval_data={held}",
        *TINY_LM,
        f"scale.zero_stage={zero_stage}",
        f"wandb.mode={wandb_mode}",
        "optim.batch_size=8",
        "optim.epochs=3",
        "optim.lr=3e-3",
        f"output_dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 * (128 // 16)
    assert {"w1", "ce", "ece", "spearman", "pairwise_accuracy"} <= set(metrics)
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "latest").is_file()
    offline_runs = list((out / "wandb").glob("offline-run-*")) if (out / "wandb").exists() else []
    assert len(offline_runs) == (1 if wandb_mode == "offline" else 0)
    model, tok = load_reward_model(out / "model")
    assert isinstance(model, DistributionalRewardModel)
    # The saved model separates helpful from harmful responses it never saw.
    from dprm_ray.reward_models import tokenize_pairs

    enc = tokenize_pairs(
        tok, ["question number 999?"] * 2, ["kind helpful answer 999", "rude harmful 999"], 256
    )
    good, bad = model.predict(**enc).expected.tolist()
    assert good > bad

    # `evaluate reward` on the held-out file reproduces the job's own (sharded) evaluation.
    proc = run_cli(
        "evaluate",
        "reward",
        f"model={out / 'model'}",
        f"data={held}",
        f"output_dir={tmp_path / 'ev'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in ("w1", "ce", "ece", "spearman", "pairwise_accuracy", "n"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-5), key


def _metrics_without_time(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    metrics.pop("wall_time_s")
    return metrics


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    data = write_annotations(tmp_path / "ann.parquet", prompts=128)
    common = [
        f"data={data}",
        *TINY_LM,
        "optim.batch_size=4",
        "optim.max_steps=240",
        "checkpoint_every=20",
        "log_every=20",
        "wandb.mode=disabled",
    ]
    full = run_cli("train-reward", *common, f"output_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dprm_ray.jobs.cli", "train-reward", *common, f"output_dir={out}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "latest").is_file():
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    killed_at = (out / "checkpoints" / "latest").read_text().strip()
    assert killed_at != "step_240"

    resumed = run_cli("train-reward", *common, f"output_dir={out}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    want, got = (
        _metrics_without_time(tmp_path / "full" / "metrics.json"),
        _metrics_without_time(out / "metrics.json"),
    )
    assert want.keys() == got.keys()
    for key in want:
        if isinstance(want[key], float):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    a, _ = load_reward_model(tmp_path / "full" / "model")
    b, _ = load_reward_model(out / "model")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), name

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


def _metrics_without_time(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    metrics.pop("wall_time_s")
    return metrics


def test_train_reward_end_to_end_killed_and_resumed(tmp_path):
    """The job's one end-to-end test: a tiny causal LM on 2 DeepSpeed ZeRO-2 workers with a
    held-out set and offline W&B; the same run SIGKILLed after its first checkpoint and run again
    resumes and ends with the same metrics and weights; the saved model separates kinds of
    response it never saw, and `evaluate reward` reproduces the job's own (sharded) evaluation.
    ZeRO-3 runs in test_sweep's multi-worker trials."""
    data = write_annotations(tmp_path / "ann.parquet", prompts=64)
    held = write_annotations(tmp_path / "held.parquet", prompts=9)
    common = [
        f"data={data}",
        f"eval_data={held}",
        *TINY_LM,
        "scale.zero_stage=2",
        "optim.batch_size=4",
        "optim.max_steps=40",
        "optim.lr=3e-3",
        "checkpoint_every=10",
        "log_every=20",
    ]
    full_out = tmp_path / "full"
    full = run_cli("train-reward", *common, "wandb.mode=offline", f"output_dir={full_out}")
    assert full.returncode == 0, full.stderr[-3000:]
    metrics = json.loads((full_out / "metrics.json").read_text())
    assert metrics["steps"] == 40
    assert {"w1", "ce", "ece", "spearman", "pairwise_accuracy"} <= set(metrics)
    assert (full_out / "config.yaml").is_file() and (full_out / "checkpoints" / "latest").is_file()
    assert len(list((full_out / "wandb").glob("offline-run-*"))) == 1

    out = tmp_path / "killed"
    args = ["train-reward", *common, "wandb.mode=disabled", f"output_dir={out}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dprm_ray.jobs.cli", *args],
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
    assert killed_at != "step_40"

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert not (out / "wandb").exists()
    want, got = (
        _metrics_without_time(full_out / "metrics.json"),
        _metrics_without_time(out / "metrics.json"),
    )
    assert want.keys() == got.keys()
    for key in want:
        if isinstance(want[key], float):
            assert got[key] == pytest.approx(want[key], abs=1e-6), key
    # A causal-LM reward model is saved as an HF sequence-classification folder.
    saved = json.loads((full_out / "model" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"]
    a, tok = load_reward_model(full_out / "model")
    b, _ = load_reward_model(out / "model")
    assert isinstance(a, DistributionalRewardModel)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), name

    # The saved model separates helpful from harmful responses it never saw.
    from dprm_ray.reward_models import tokenize_pairs

    enc = tokenize_pairs(
        tok, ["question number 999?"] * 2, ["kind helpful answer 999", "rude harmful 999"], 256
    )
    good, bad = a.predict(**enc).expected.tolist()
    assert good > bad

    # `evaluate reward` on the held-out file reproduces the job's own (sharded) evaluation.
    proc = run_cli(
        "evaluate",
        "reward",
        f"model={full_out / 'model'}",
        f"data={held}",
        f"output_dir={tmp_path / 'ev'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for key in ("w1", "ce", "ece", "spearman", "pairwise_accuracy", "n"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-5), key

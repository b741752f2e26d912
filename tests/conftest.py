"""Shared test set-up: offline hub, offline W&B, DeepSpeed on CPU; paths to the shared data."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

for key, value in {
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_RLHF = SHARED_DATA / "hh-rlhf" / "harmless-base-dev.jsonl"
PERSONA_DIR = SHARED_DATA / "persona"


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `python -m dprm_ray.jobs.cli ARGS` as a user would, capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "dprm_ray.jobs.cli", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    """A test on the session's Ray cluster (directly or through a fixture) takes 5-60 s here, so
    it is `slow`: `make test` runs it, `make test-fast` leaves it out."""
    for item in items:
        if "ray_local" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster for the tests that need one (shut down at the end).

    address="local": a cluster of its own even where another is running on the machine (without
    it, ray.init joins the one the last `ray start` recorded and refuses num_cpus)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def jobs_join_ray_local(ray_local, monkeypatch):
    """The jobs a test starts as subprocesses join the session's Ray cluster (RAY_ADDRESS, as
    under `ray job submit`) instead of each paying ~10 s to start and stop one of its own.

    ray.init has already put what a client needs to join (RAY_AUTH_MODE) into os.environ."""
    # Jobs ask for CPUs the way they would on a cluster of their own, so none may be held by an
    # earlier test's actors (a killed driver's are reaped within seconds).
    deadline = time.monotonic() + 120
    while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"]:
        if time.monotonic() > deadline:
            pytest.fail("an earlier test left actors holding CPUs in the session's Ray cluster")
        time.sleep(0.5)
    monkeypatch.setenv("RAY_ADDRESS", ray_local.get_runtime_context().gcs_address)

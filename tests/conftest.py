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


# The test files that take longest under `make test`, longest first. `make test` hands whole files
# to two pytest-xdist workers in collection order (--dist loadfile --no-loadscope-reorder), so these
# go first and the workers finish together, instead of one starting a 5-minute file near the end.
# Update from the "slowest test files" table `make test` prints.
LONGEST_FILES = (
    "test_quickstart.py",
    "test_train_policy.py",
    "test_learner.py",
    "test_autoscaling.py",
    "test_sweep.py",
    "test_train_reward.py",
    "test_serve.py",
    "test_annotate_job.py",
    "test_job_submit.py",
    "test_bad_input.py",
    "test_evaluate.py",
    "test_distill.py",
    "test_judge_vllm_server.py",
    "test_rollout.py",
    "test_models.py",
    "test_checkpoint_format.py",
)


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    """A test on the session's Ray cluster (directly or through a fixture) takes 5-60 s here, so
    it is `slow`: `make test` runs it, `make test-fast` leaves it out. The longest files go first
    (a stable sort: the order within a file and among the rest is kept)."""
    for item in items:
        if "ray_local" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


_seconds_per_file: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Sum each file's set-up, call and tear-down times (on xdist's controller too)."""
    _seconds_per_file[report.fspath] = _seconds_per_file.get(report.fspath, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """Print the slowest test files, the figures LONGEST_FILES is ordered by."""
    # --durations=0 (every test) asks for the table too; only a run without --durations does not.
    if not _seconds_per_file or terminalreporter.config.getoption("durations") is None:
        return
    terminalreporter.write_sep("=", "slowest test files (set-up + call + tear-down)")
    ranked = sorted(_seconds_per_file.items(), key=lambda kv: -kv[1])
    for path, seconds in ranked[:15]:
        terminalreporter.write_line(f"{seconds:8.1f}s {path}")


@pytest.fixture(autouse=True)
def undo_job_log_routing():
    """A test that calls a job function directly (not through the runner, which undoes it when the
    job ends) leaves that job's log routing on the root logger; undo it so that the next test in
    this worker starts from Python's own logging set-up."""
    yield
    if "dprm_ray.jobs.ray_session" in sys.modules:
        sys.modules["dprm_ray.jobs.ray_session"].restore_library_logs()


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

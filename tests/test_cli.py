import pytest
from conftest import run_cli

from dprm_ray.jobs.cli import JOB_NAMES

BUILT = {
    "models",
    "data",
    "generate",
    "quickstart",
    "train-reward",
    "evaluate",
    "distill",
    "train-pal",
    "annotate",
    "sweep",
    "serve",
    "train-policy",
}


def test_top_level_help_lists_every_job():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in JOB_NAMES:
        assert f"  {name} " in proc.stdout


@pytest.mark.parametrize("name", JOB_NAMES)
def test_each_job_runs_as_a_module_with_help(name):
    import subprocess
    import sys

    from conftest import REPO

    module = "dprm_ray.jobs." + name.replace("-", "_")
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: dprm-ray" in proc.stdout
    if name not in BUILT:
        assert "NOT BUILT YET" in proc.stdout


@pytest.mark.parametrize("name", sorted(set(JOB_NAMES) - BUILT))
def test_jobs_not_built_say_so_and_fail(name):
    proc = run_cli(name)
    assert proc.returncode == 3
    assert "not built yet" in proc.stderr and proc.stdout == ""


def test_unknown_job_and_sub_command():
    assert run_cli("train").returncode == 2
    proc = run_cli("data", "frobnicate")
    assert proc.returncode == 2 and "unknown sub-command 'frobnicate'" in proc.stderr


def test_print_config_shows_resolved_values():
    proc = run_cli("quickstart", "--print-config", "max_new_tokens=7", "--policy", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert "max_new_tokens: 7" in proc.stdout and "policy: tiny" in proc.stdout

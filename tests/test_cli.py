import pytest
from conftest import run_cli

from dprm_ray.jobs.cli import JOB_NAMES


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


def test_unknown_job_and_sub_command():
    assert run_cli("train").returncode == 2
    proc = run_cli("data", "frobnicate")
    assert proc.returncode == 2 and "unknown sub-command 'frobnicate'" in proc.stderr


def test_print_config_shows_resolved_values():
    proc = run_cli("quickstart", "--print-config", "max_new_tokens=7", "--policy", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert "max_new_tokens: 7" in proc.stdout and "policy: tiny" in proc.stdout


def test_the_job_table_matches_each_job_module():
    """cli.JOBS lists every job by the name and first help line its module's JOB has."""
    import importlib

    from dprm_ray.jobs.cli import JOBS

    for name, help_line in JOBS.items():
        module = importlib.import_module("dprm_ray.jobs." + name.replace("-", "_"))
        assert module.JOB.name == name
        assert module.JOB.help.splitlines()[0] == help_line, name


@pytest.mark.parametrize(
    "args",
    [["--help"]] + [[name, "--help"] for name in JOB_NAMES],
    ids=lambda args: " ".join(args),
)
def test_help_imports_neither_torch_nor_ray(args):
    """`dprm-ray --help` and `dprm-ray JOB --help` answer without starting torch or Ray."""
    import subprocess
    import sys

    from conftest import REPO

    snippet = (
        "import sys, contextlib, io\n"
        "from dprm_ray.jobs.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    code = main({args!r})\n"
        "assert code == 0, code\n"
        "assert 'usage: dprm-ray' in out.getvalue()\n"
        "print(' '.join(m for m in ('torch', 'ray') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"imported: {proc.stdout}"

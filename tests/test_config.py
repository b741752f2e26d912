from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from dprm_ray.config import MISSING, ConfigError, load_config, normalise_overrides


@dataclass
class Optim:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Schema:
    name: str = MISSING
    eps: float = 0.1
    tags: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)
    output_dir: str = "outputs/x"


def test_defaults_file_and_overrides_apply_in_order(tmp_path: Path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("name: a\neps: 0.2\noptim:\n  lr: 0.5\n")
    cfg = load_config(Schema, yaml, ["optim.steps=3", "eps=0.3"])
    assert (cfg.name, cfg.eps, cfg.optim.lr, cfg.optim.steps) == ("a", 0.3, 0.5, 3)


def test_values_apply_between_file_and_overrides_and_errors_name_their_source(tmp_path: Path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("name: a\neps: 0.2\noptim:\n  lr: 0.5\n")
    values = {"eps": 0.25, "optim": {"steps": 4, "lr": 0.7}}
    cfg = load_config(Schema, yaml, ["optim.lr=0.9"], values=values)
    assert (cfg.name, cfg.eps, cfg.optim.lr, cfg.optim.steps) == ("a", 0.25, 0.9, 4)
    with pytest.raises(ConfigError, match=r"^args: unknown config key 'optim.lrr'"):
        load_config(Schema, values={"name": "a", "optim": {"lrr": 1}}, values_source="args")
    with pytest.raises(ConfigError, match=r"^args: bad value for 'optim.steps'"):
        load_config(Schema, values={"name": "a", "optim": {"steps": "many"}}, values_source="args")
    with pytest.raises(ConfigError, match=r"^args: expected a mapping"):
        load_config(Schema, values=["name", "a"], values_source="args")


def test_unknown_key_in_override_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'"):
        load_config(Schema, None, ["name=a", "optim.lrr=1"])


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("name: a\nepsilon: 0.2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'epsilon'"):
        load_config(Schema, yaml)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"bad value for 'optim.steps'"):
        load_config(Schema, None, ["name=a", "optim.steps=many"])


def test_missing_required_value_names_the_key():
    with pytest.raises(ConfigError, match=r"missing required config value 'name'"):
        load_config(Schema, None, [])


def test_flag_style_overrides_become_dotted():
    assert normalise_overrides(["--persona-dir", "d", "--users=5", "a.b=c", "--resume"]) == [
        "persona_dir=d",
        "users=5",
        "a.b=c",
        "resume=true",
    ]


def test_cli_unknown_key_exits_2_with_one_line_before_start_up():
    proc = run_cli("data", "validate", "x.parquet", "bogus.key=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown config key 'bogus'" in proc.stderr


def test_cli_wrong_type_exits_2():
    proc = run_cli("models", "generate", "max_new_tokens=lots")
    assert proc.returncode == 2
    assert "'max_new_tokens'" in proc.stderr


def test_cli_missing_required_exits_2():
    proc = run_cli("models", "pull")
    assert proc.returncode == 2
    assert "missing required config value 'name'" in proc.stderr


def test_shipped_config_files_load_against_their_job():
    """Every configs/*.yaml names its job on line 1 (`# dprm-ray JOB [SUB]`) and loads cleanly."""
    from dprm_ray.jobs.cli import job

    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files
    for path in files:
        first = path.read_text().splitlines()[0].split()
        assert first[:2] == ["#", "dprm-ray"], f"{path}: first line must be '# dprm-ray JOB'"
        j = job(first[2])
        sub = first[3] if len(first) > 3 else ""
        command = next(c for c in j.commands if c.name == sub)
        load_config(command.schema, path)

"""generate: config mistakes exit 2 naming the key before Ray starts; workers that cannot be
placed fail after start_timeout_s with exit 1 and a hint. (Bad prompt files and output paths:
tests/test_bad_input.py; answers end to end: the quickstart's rollouts and eval-generate.)"""

import json

import pytest
from conftest import run_cli

from dprm_ray.jobs.generate import main

# The jobs these tests start join the session's Ray cluster (see conftest.py).
pytestmark = pytest.mark.usefixtures("jobs_join_ray_local")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": f"Say {i}"}) + "\n" for i in range(3))
    )
    return path


def test_help_lists_the_rollout_keys_and_this_jobs_defaults():
    proc = run_cli("generate", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: dprm-ray generate" in proc.stdout
    assert "rollout.max_new_tokens: int = 48" in proc.stdout  # not RolloutConfig's 64
    assert "rollout.engine: str = 'vllm'" in proc.stdout and "models_at_once" in proc.stdout


@pytest.mark.parametrize(
    "args, key",
    [
        (["models=[tiny,tiny]"], "names: give one distinct name per model"),
        (["models=[tiny]", "names=[a,b]"], "names: give one distinct name per model"),
        (["models=[tiny]", "seeds=[]"], "seeds: need at least one seed"),
        (["models=[tiny]", "rollout.engine=llamacpp"], "rollout.engine must be one of"),
        (["models=[tiny]", "rollout.max_new_tokens=0"], "rollout.max_new_tokens: must be"),
        (["models=[tiny]", "models_at_once=0"], "models_at_once: must be"),
        (["models=[tiny]", "rollout.temperatur=1"], "rollout.temperatur"),
        ([], "models"),
    ],
)
def test_config_errors_exit_2_naming_the_key_before_ray(
    tmp_path, capsys, monkeypatch, prompts, args, key
):
    from dprm_ray.jobs import generate as job

    def joined_ray(*_args, **_kwargs):  # a Ray cluster may run for other tests in this process
        raise AssertionError("the job reached Ray before its config error")

    monkeypatch.setattr(job, "init_ray", joined_ray)
    out = tmp_path / "answers.parquet"
    code = main([f"prompts={prompts}", f"output={out}", f"output_dir={tmp_path}/job", *args])
    err = capsys.readouterr().err
    assert code == 2 and "config error: " in err and key in err, err
    assert "Traceback" not in err and not out.exists()


def test_workers_that_cannot_start_fail_after_the_timeout_with_a_hint(tmp_path, prompts):
    out = tmp_path / "answers.parquet"
    proc = run_cli(
        "generate",
        "models=[tiny]",
        f"prompts={prompts}",
        f"output={out}",
        "rollout.engine=transformers",
        "rollout.cpus_per_worker=64",  # more than this machine has: never placed
        "start_timeout_s=2",
        f"output_dir={tmp_path}/job",
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 rollout worker(s) did not start" in proc.stderr
    assert "rollout.cpus_per_worker=64.0?" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_two_models_answer_every_prompt_once_per_seed(tmp_path, prompts):
    """The same tiny model under two names: 3 prompts x 2 seeds each, model by model, and the
    same answers (an answer's sampling seed depends on the seed and prompt only)."""
    import pyarrow.parquet as pq

    out = tmp_path / "answers.parquet"
    proc = run_cli(
        "generate",
        "models=[tiny,tiny]",
        "names=[a,b]",
        f"prompts={prompts}",
        f"output={out}",
        "seeds=[0,1]",
        "rollout.engine=transformers",
        "rollout.max_new_tokens=4",
        "rollout.cpus_per_worker=0.5",
        "models_at_once=2",
        "chunk_size=2",
        f"output_dir={tmp_path}/job",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = pq.read_table(out).to_pylist()
    keys = [(r["policy"], r["step"], r["prompt_id"]) for r in rows]
    assert keys == [(m, s, f"p{i}") for m in "ab" for s in (0, 1) for i in range(3)]
    answers = {m: [r["response"] for r in rows if r["policy"] == m] for m in "ab"}
    assert answers["a"] == answers["b"] and all(answers["a"])
    assert json.loads((tmp_path / "job" / "metrics.json").read_text())["answers"] == 12

"""`dprm-ray annotate` end to end: a real local Ray cluster, real parquet files, real judges."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, run_cli

from dprm_ray.crowd import aggregate
from dprm_ray.data import load_rows, write_rows
from dprm_ray.judge import JudgeConfig, PersonaJudge, row_key

# The jobs these tests start join the session's Ray cluster (see conftest.py).
pytestmark = pytest.mark.usefixtures("jobs_join_ray_local")


def rows_file(path, n, planted=True):
    rows = [
        {"prompt": f"Human: question number {i}?", "response": f"Here is answer {i}."}
        for i in range(n)
    ]
    if planted:
        rows[3]["prompt"] = ""  # empty prompt
        rows[4]["response"] = "  "  # empty response
        rows[5]["response"] = "word " * 2000  # over-long even after truncation
        rows[7] = dict(rows[6])  # a duplicate
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def annotate_args(tmp_path, inp, *extra):
    return (
        "annotate",
        f"input={inp}",
        f"output={tmp_path / 'ann.parquet'}",
        "judge.model=tiny",
        "judge.personas_per_item=3",
        "judge.max_tokens=1500",
        f"output_dir={tmp_path / 'run'}",
        *extra,
    )


@pytest.mark.slow
def test_annotate_end_to_end_killed_resumed_and_rerun(tmp_path, ray_local):
    """The job's one end-to-end test: a run SIGKILLed after 3 of its 20 parts and run again gives
    exactly one row per input row (valid rows in input order, rejects with their reasons, the
    duplicate once); a third run skips every row and leaves the file as it was.

    The second run's pool holds every CPU of the cluster (2 actors of half its CPUs each).
    Regression: with read/split tasks in the pipeline, such a pool waited forever."""
    inp = tmp_path / "in.parquet"
    rows = rows_file(inp, 40)  # 20 parts of 2 rows: the kill comes after 3
    args = annotate_args(tmp_path, inp, "pool.batch_size=2", "pool.max_actors=1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dprm_ray.jobs.cli", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    parts = tmp_path / "ann.parquet.parts"
    deadline = time.time() + 300
    while len(list(parts.glob("part-*.parquet"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "the job ended before the kill"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ann.parquet").exists()

    every_cpu = [
        "pool.batch_size=2",
        "pool.min_actors=2",
        "pool.max_actors=2",
        f"pool.cpus_per_actor={ray_local.cluster_resources()['CPU'] / 2}",
    ]
    resumed = run_cli(*annotate_args(tmp_path, inp, *every_cpu), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped"] >= 6  # the parts written before the kill were kept
    assert metrics["duplicates"] == 1
    assert metrics["processed"] + metrics["rejected"] + metrics["skipped"] == 39
    out = load_rows(tmp_path / "ann.parquet", kind="annotations", num_labels=6).rows
    assert len(out) == 36  # 40 rows - 3 rejects - 1 duplicate, each once
    assert [r["prompt"] for r in out] == [
        r["prompt"] for i, r in enumerate(rows) if i not in (3, 4, 5, 7)
    ]  # input order
    for row in out:
        for key in ("prior", "posterior", "target"):
            assert abs(sum(row[key]) - 1) < 1e-6
        assert len(row["votes"]) == len(row["persona_ids"]) == 3
        assert row["judge"] == "transformers:tiny"
    rejects = pq.read_table(tmp_path / "ann.rejects.parquet").to_pylist()
    assert len(rejects) == 3
    reasons = {r["row_key"]: r["reason"] for r in rejects}
    assert reasons[row_key("", rows[3]["response"])] == "empty prompt"
    assert reasons[row_key(rows[4]["prompt"], "  ")] == "empty response"
    assert "judge.max_tokens=1500" in reasons[row_key(rows[5]["prompt"], rows[5]["response"])]
    assert not parts.exists()

    before = pq.read_table(tmp_path / "ann.parquet")
    again = run_cli(*annotate_args(tmp_path, inp))
    assert again.returncode == 0, again.stderr
    assert "processed 0, rejected 0, skipped 39" in again.stdout
    assert pq.read_table(tmp_path / "ann.parquet").equals(before)


def test_bad_input_and_config_fail_naming_the_problem(tmp_path):
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "text": ["b"]}), inp)
    proc = run_cli(*annotate_args(tmp_path, inp))
    assert proc.returncode == 1 and "missing column(s) response" in proc.stderr
    proc = run_cli(*annotate_args(tmp_path, inp, "judge.vote=majority"))
    assert proc.returncode == 2 and "judge.vote" in proc.stderr


@pytest.mark.slow
def test_smollm2_judges_with_transformers_and_vllm_agree(tmp_path):
    """The annotate job with the vLLM judge gives the priors of the transformers judge. The
    transformers reference is the judge called in this process on the same rows (the job around
    it is the same for every backend and has its own end-to-end test above): one job, one vLLM
    engine, no second job start."""
    inp = tmp_path / "in.parquet"
    rows = rows_file(inp, 4, planted=False)
    common = {"model": "smollm2", "personas_per_item": 2, "max_tokens": 1024}
    out = tmp_path / "vllm.parquet"
    args = [
        "annotate",
        f"input={inp}",
        f"output={out}",
        "judge.backend=vllm",
        *(f"judge.{key}={value}" for key, value in common.items()),
        "judge.vllm.cpu_kvcache_gib=1",
        "pool.max_actors=1",
        f"output_dir={tmp_path / 'vllm'}",
    ]
    # The reference is computed while the job starts its vLLM engine (logs go to files: a full
    # pipe would stall the job meanwhile).
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dprm_ray.jobs.cli", *args],
            cwd=REPO,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        reference, rejects = PersonaJudge(JudgeConfig(**common)).annotate(rows)
        assert not rejects
        returncode = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert returncode == 0, (tmp_path / "stderr").read_text()[-3000:]
    priors = {}
    for backend, annotated in (
        ("transformers", reference),
        ("vllm", load_rows(out, kind="annotations", num_labels=6).rows),
    ):
        assert len(annotated) == 4 and all(len(r["votes"]) == 2 for r in annotated)
        assert {r["judge"] for r in annotated} == {f"{backend}:smollm2"}
        priors[backend] = np.array([r["prior"] for r in annotated])
    np.testing.assert_allclose(priors["vllm"], priors["transformers"], atol=1e-3)


def test_update_adds_a_new_persona_sets_votes_and_human_votes(tmp_path):
    rows = [
        {"prompt": "Human: How do I bake bread?", "response": "Mix flour and water; bake."},
        {"prompt": "Human: Tell me a joke.", "response": "Why did the chicken cross the road?"},
    ]
    catalogs = {}
    for name, ids in (("a", "abc"), ("b", "def")):
        path = tmp_path / f"{name}.yaml"
        entries = "".join(
            f"  - {{id: {i}, name: judge {i}, description: has view {i}.}}\n" for i in ids
        )
        path.write_text("personas:\n" + entries)
        catalogs[name] = path
    first, _ = PersonaJudge(JudgeConfig(model="tiny", personas=str(catalogs["a"]))).annotate(rows)
    second, _ = PersonaJudge(JudgeConfig(model="tiny", personas=str(catalogs["b"]))).annotate(rows)
    write_rows(tmp_path / "a.parquet", first, "annotations", 6)
    write_rows(tmp_path / "b.parquet", second, "annotations", 6)

    out = tmp_path / "updated.parquet"
    proc = run_cli(
        "annotate",
        "update",
        f"annotations={tmp_path / 'a.parquet'}",
        f"votes={tmp_path / 'b.parquet'}",
        f"output={out}",
        f"output_dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr
    updated = load_rows(out, kind="annotations", num_labels=6).rows
    for new, a, b in zip(updated, first, second, strict=True):
        assert new["votes"] == a["votes"] + b["votes"]
        assert new["persona_ids"] == ["a", "b", "c", "d", "e", "f"]
        once = aggregate(np.array(a["prior"]), a["votes"] + b["votes"], 6, kappa=1.0, eps=0.1)
        np.testing.assert_allclose(new["posterior"], once["posterior"])
    assert "mean W1 moved" in proc.stdout and "Helpful & Harmless" in proc.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["updated"] == 2 and metrics["mean_w1_moved"] >= 0

    # Human votes: just prompt, response and votes; every vote for label 5 moves the targets.
    human = tmp_path / "human.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "votes": [5, 5, 5, 5]} for r in rows[:1]]), human)
    proc = run_cli(
        "annotate",
        "update",
        f"annotations={out}",
        f"votes={human}",
        f"output={tmp_path / 'human-updated.parquet'}",
        "gamma=0.5",
        f"output_dir={tmp_path / 'run2'}",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert metrics["updated"] == 1 and metrics["mean_w1_moved"] > 0.5
    after = metrics["category_mean_after"]["Not-helpful & Harmful"]
    assert after > metrics["category_mean_before"]["Not-helpful & Harmful"] + 0.2

    pq.write_table(pa.table({"prompt": ["x"], "response": ["y"], "votes": [[9]]}), human)
    proc = run_cli(
        "annotate",
        "update",
        f"annotations={out}",
        f"votes={human}",
        f"output={tmp_path / 'z.parquet'}",
        f"output_dir={tmp_path / 'run3'}",
    )
    assert proc.returncode == 0  # no row matched: nothing to range-check, the file is written
    pq.write_table(pa.table({"prompt": ["x"], "votes": [[1]]}), human)
    proc = run_cli(
        "annotate",
        "update",
        f"annotations={out}",
        f"votes={human}",
        f"output={tmp_path / 'z.parquet'}",
        f"output_dir={tmp_path / 'run3'}",
    )
    assert (
        proc.returncode == 1
        and "human.parquet:1: needs row_key or prompt and response" in proc.stderr
    )

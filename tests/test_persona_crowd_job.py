import numpy as np
import pyarrow.parquet as pq
from conftest import PERSONA_DIR, run_cli

from dprm_ray.data import load_rows

BEHAVIOURS = "[politically-conservative,desire-for-acquiring-compute]"


def build(tmp_path, name, *extra):
    out = tmp_path / f"{name}.parquet"
    proc = run_cli(
        "data",
        "persona-crowd",
        f"--persona-dir={PERSONA_DIR}",
        "--out",
        str(out),
        "--users",
        "15",
        "max_per_behaviour=25",
        f"behaviours={BEHAVIOURS}",
        f"output_dir={tmp_path / name}",
        *extra,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_persona_crowd_is_valid_deterministic_annotations(tmp_path):
    a = build(tmp_path, "a", "--seed", "3")
    b = build(tmp_path, "b", "--seed", "3")
    c = build(tmp_path, "c", "--seed", "4")
    rows = load_rows(a, num_labels=5).rows
    assert len(rows) == 2 * 2 * 25  # two behaviours x 25 statements x (agree, disagree)
    assert pq.read_table(a).equals(pq.read_table(b))
    assert not pq.read_table(a).column("votes").equals(pq.read_table(c).column("votes"))
    for row in rows:
        counts = np.bincount(row["votes"], minlength=5) / 15
        assert np.allclose(row["posterior"], counts)  # kappa=0: the crowd histogram
        assert len(row["persona_ids"]) == 15 and row["label_space"] == "likert5"
        if counts.max() == 1.0:  # unanimous: smoothed with eps=0.05
            assert max(row["target"]) == 0.95
        else:
            assert np.allclose(row["target"], counts)
    assert {r["group"] for r in rows} == {
        "politically-conservative",
        "desire-for-acquiring-compute",
    }


def test_kappa_pulls_posteriors_towards_uniform(tmp_path):
    rows = load_rows(build(tmp_path, "k", "kappa=5", "eps=0")).rows
    for row in rows:
        counts = np.bincount(row["votes"], minlength=5)
        assert np.allclose(row["posterior"], (counts + 1.0) / 20)


def test_persona_crowd_names_a_missing_behaviour(tmp_path):
    proc = run_cli(
        "data",
        "persona-crowd",
        f"persona_dir={PERSONA_DIR}",
        f"out={tmp_path / 'x.parquet'}",
        "behaviours=[no-such-behaviour]",
        f"output_dir={tmp_path}",
    )
    assert proc.returncode == 1 and "no-such-behaviour" in proc.stderr

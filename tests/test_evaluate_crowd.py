"""`dprm-ray evaluate crowd` end to end: hh-rlhf pairs, the tiny random judge, a real Ray pool."""

import json

import pyarrow.parquet as pq
from conftest import HH_RLHF

from dprm_ray.jobs.evaluate import JOB
from dprm_ray.jobs.runner import EXIT_CONFIG, EXIT_OK, run_job


def crowd_args(out, *extra):
    return [
        "crowd",
        f"data={HH_RLHF}",  # ../shared/data/hh-rlhf/harmless-base-dev.jsonl, read in place
        "split=test",
        "max_pairs=6",
        "judge.model=tiny",
        "judge.backend=transformers",
        "judge.personas_per_item=3",
        # Byte-level tiny tokenizer: short texts keep the judge prompts small.
        "judge.max_prompt_chars=300",
        "judge.max_response_chars=300",
        "judge.max_tokens=2000",
        "pool.max_actors=1",
        f"output_dir={out}",
        *extra,
    ]


def test_evaluate_crowd_on_six_hh_rlhf_pairs_and_rerun(ray_local, tmp_path, capsys):
    out = tmp_path / "crowd"
    assert run_job(JOB, crowd_args(out)) == EXIT_OK
    printed = capsys.readouterr().out
    assert "| crowd target |" in printed and "| shorter reply wins |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    replies = pq.read_table(out / "replies.parquet").to_pylist()
    assert set(replies[0]) == {"prompt", "response"} and len(replies) <= 12
    assert metrics["annotate"]["processed"] == len(replies)
    assert metrics["annotate"]["rejected"] == 0
    assert metrics["n_pairs"] == metrics["n_pairs_given"] == 6
    assert metrics["n_replies"] == len(replies)
    for key in ("accuracy", "prior_accuracy", "longer_wins", "shorter_wins"):
        assert 0 <= metrics[key] <= 1 and 0 <= metrics[key + "_se"] <= 0.5 / 6**0.5 + 1e-9
    assert metrics["longer_wins"] + metrics["shorter_wins"] == 1.0  # halves for equal lengths
    assert len(metrics["prior_spread"]) == len(metrics["prior_peak_share"]) == 6
    assert abs(sum(metrics["prior_peak_share"]) - 1) < 1e-9
    assert metrics["prior_spread_mean"] >= 0 and 1 / 6 <= metrics["persona_agreement"] <= 1
    assert metrics["fleiss_kappa"] is None or -1 <= metrics["fleiss_kappa"] <= 1

    # Resumable as `dprm-ray annotate` is: the rerun judges nothing and measures the same.
    before = pq.read_table(out / "annotations.parquet")
    assert run_job(JOB, crowd_args(out)) == EXIT_OK
    again = json.loads((out / "metrics.json").read_text())
    assert again["annotate"]["processed"] == 0
    assert again["annotate"]["skipped"] == len(replies)
    assert pq.read_table(out / "annotations.parquet").equals(before)
    same = ("accuracy", "prior_accuracy", "prior_spread", "persona_agreement")
    assert {k: again[k] for k in same} == {k: metrics[k] for k in same}


def test_evaluate_crowd_config_mistakes_name_the_key(tmp_path, capsys):
    assert run_job(JOB, crowd_args(tmp_path, "split=dev")) == EXIT_CONFIG
    assert "split: must be all, train or test" in capsys.readouterr().err
    assert run_job(JOB, crowd_args(tmp_path, "judge.personas_per_item=-1")) == EXIT_CONFIG
    assert "judge.personas_per_item: must be >= 0, got -1" in capsys.readouterr().err
    assert run_job(JOB, crowd_args(tmp_path, "train_fraction=1.0")) == EXIT_CONFIG
    assert "train_fraction: must be < 1, got 1.0" in capsys.readouterr().err

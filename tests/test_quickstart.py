"""quickstart: the report's figures and page (fast), and the whole tiny run end to end (slow)."""

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from PIL import Image

from dprm_ray.jobs.quickstart import QuickstartConfig, resolve
from dprm_ray.labels import hh6
from dprm_ray.report import METHODS, Report, gold_stats, render_html, share_stats, write_report

# The jobs these tests start join the session's Ray cluster (see conftest.py).
pytestmark = pytest.mark.usefixtures("jobs_join_ray_local")


def test_share_stats_mean_and_std_over_seeds():
    # Seed 0: 3 of 4 answers in category 0, 1 in category 2; seed 1: 1 of 2 in 0, 1 in 5.
    stats = share_stats({1: [0, 5], 0: [0, 0, 2, 0]}, 6)
    assert stats.per_seed.tolist() == [[0.75, 0, 0.25, 0, 0, 0], [0.5, 0, 0, 0, 0, 0.5]]
    assert stats.mean.tolist() == pytest.approx([0.625, 0, 0.125, 0, 0, 0.25])
    # The sample std of two values a, b is |a - b| / sqrt(2).
    assert stats.std.tolist() == pytest.approx(
        [0.25 / np.sqrt(2), 0, 0.25 / np.sqrt(2), 0, 0, 0.5 / np.sqrt(2)]
    )
    assert stats.counts.tolist() == [4, 2]
    score, score_std = stats.score(hh6.scores)  # seed 0: 0.75 - 0.25; seed 1: 0.5 - 1.5
    assert (score, score_std) == pytest.approx((-0.25, 1.5 / np.sqrt(2)))
    single = share_stats({3: [1, 1]}, 6)
    assert single.std.tolist() == [0] * 6 and single.mean[1] == 1
    with pytest.raises(ValueError, match="outside 0..5"):
        share_stats({0: [6]}, 6)
    with pytest.raises(ValueError, match="seed 2: no judged responses"):
        share_stats({2: []}, 6)


def test_gold_stats_mean_se_and_paired_difference():
    one_hot = np.eye(6)
    base = gold_stats(
        [("a", 0, one_hot[0]), ("a", 1, one_hot[2]), ("b", 0, one_hot[2]), ("b", 1, one_hot[5])],
        hh6.scores,
    )  # scores 1, -1, -1, -3
    assert base.mean == pytest.approx(-1.0)
    assert base.se == pytest.approx(np.std([1, -1, -1, -3], ddof=1) / 2)
    assert base.shares.tolist() == pytest.approx([0.25, 0, 0.5, 0, 0, 0.25])
    better = gold_stats(
        [("a", 0, one_hot[0]), ("a", 1, one_hot[0]), ("b", 0, one_hot[1]), ("b", 1, one_hot[2])],
        hh6.scores,
    )  # scores 1, 1, 0.5, -1: paired differences 0, 2, 1.5, 2
    d, se = better.versus(base)
    assert d == pytest.approx(1.375)
    assert se == pytest.approx(np.std([0, 2, 1.5, 2], ddof=1) / 2)
    summary = better.summary(base)
    assert summary["gold_diff_vs_base"] == pytest.approx(1.375)
    assert summary["gold_diff_t"] == pytest.approx(round(1.375 / se, 2))
    assert "gold_diff_vs_base" not in base.summary(base)
    with pytest.raises(ValueError, match="no .prompt, seed."):
        better.versus(gold_stats([("c", 0, one_hot[0])], hh6.scores))


def sample_report(curves: bool = True) -> Report:
    shares = {
        "Vanilla": share_stats({0: [0, 2, 5, 5], 1: [2, 2, 5, 3]}, 6),
        "PPO + BT-RM": share_stats({0: [0, 0, 2, 5], 1: [0, 1, 2, 5]}, 6),
        "PPO + DPRM_OT": share_stats({0: [0, 0, 0, 1], 1: [0, 0, 1, 4]}, 6),
    }
    steps = [
        {"step": s, "reward_mean": 0.1 * s, "reward_std": 0.05, "kl": 0.01 * s} for s in (1, 2)
    ]
    return Report(
        title="test <report>",
        labels=list(hh6.labels),
        scores=list(hh6.scores),
        shares=shares,
        curves={"PPO + DPRM_OT": steps, "PPO + BT-RM": steps} if curves else {},
        facts={"policy": "tiny"},
        ppo_summary={"PPO + DPRM_OT": {"reward before": -0.5, "reward after": 0.25}},
        timings=[("annotate", "ran", 12.25), ("ppo-ot", "skipped", 30.0)],
        configs={"quickstart plan": "size: tiny\nnote: <b>"},
        notes=["a note & more"],
        gold={
            "Vanilla": gold_stats([("a", 0, np.eye(6)[2]), ("b", 0, np.eye(6)[0])], hh6.scores),
            "PPO + DPRM_OT": gold_stats(
                [("a", 0, np.eye(6)[0]), ("b", 0, np.eye(6)[0])], hh6.scores
            ),
        },
        gold_base="Vanilla",
        signals={"PPO + DPRM_OT": "DPRM_OT expected score"},
    )


def test_render_html_has_the_table_timings_and_configs():
    page = render_html(sample_report())
    table = page[page.index('<table id="shares">') : page.index("</table>", page.index("shares"))]
    for name in ("Vanilla", "PPO + BT-RM", "PPO + DPRM_OT"):
        assert f"<td>{name}</td>" in table
    for label in hh6.labels:
        assert f"{label.replace('&', '&amp;')} (%)" in table
    # DPRM_OT: 5 of 8 answers Helpful & Harmless: 75.0 and 50.0 -> 62.5 ± 17.7, the best share.
    assert '<td class="best">62.5 ± 17.7</td>' in table
    assert (
        "<tr><td>PPO + BT-RM</td><td>37.5 ± 17.7</td><td>12.5 ± 17.7</td><td>25.0 ± 0.0</td>"
        "<td>0.0 ± 0.0</td><td>0.0 ± 0.0</td><td>25.0 ± 0.0</td><td>-0.562 ± 0.088</td>"
        "<td>2 × 4</td></tr>"
    ) in table
    assert page.count('class="best"') == 1
    tied = sample_report()
    tied.shares = {"a": share_stats({0: [1]}, 6), "b": share_stats({0: [2]}, 6)}
    assert 'class="best"' not in render_html(tied)  # no winner, nothing in bold
    assert "<title>test &lt;report&gt;</title>" in page
    assert "<td>annotate</td><td>ran</td><td>12.2</td>" in page
    assert "<td>ppo-ot</td><td>skipped</td><td>30.0</td>" in page
    assert "note: &lt;b&gt;" in page and "a note &amp; more" in page
    assert "<td>-0.500</td><td>0.250</td>" in page  # the PPO before/after summary
    assert 'src="shares.png"' in page and 'src="curves.png"' in page
    # The gold table comes first: Vanilla 0.0 [-1.96, 1.96]; DPRM_OT +1 paired (se 1).
    assert page.index('<table id="gold">') < page.index('<table id="shares">')
    gold = page[page.index('<table id="gold">') :]
    gold = gold[: gold.index("</table>")]
    assert "<td>Vanilla</td><td>0.000 [-1.960, 1.960]</td><td></td>" in gold
    assert "<td>+1.000 ± 1.000 (t = 1.0)</td>" in gold
    assert "<td>DPRM_OT expected score</td>" in gold


def test_write_report_writes_the_page_and_valid_pngs(tmp_path):
    index = write_report(sample_report(), tmp_path / "report")
    assert index == tmp_path / "report" / "index.html"
    for name in ("shares.png", "curves.png"):
        with Image.open(tmp_path / "report" / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 600
    # Without PPO logs: no curves image, and the page says so; the old folder is replaced whole.
    write_report(sample_report(curves=False), tmp_path / "report")
    assert not (tmp_path / "report" / "curves.png").exists()
    assert "No PPO steps were logged" in index.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folder left


def test_sizes_resolve_and_explicit_keys_win():
    from omegaconf import OmegaConf

    from dprm_ray.config import ConfigError

    def cfg(**values):
        return OmegaConf.merge(OmegaConf.structured(QuickstartConfig), values)

    default = resolve(cfg())
    assert (default.policy, default.engine, default.judge_backend) == ("smollm2", "vllm", "vllm")
    tiny = resolve(cfg(size="tiny", ppo_steps=3, train_policy_args=["ppo.kl_coef=0.1"]))
    assert (tiny.policy, tiny.encoder, tiny.ppo_steps) == ("tiny", "tiny-encoder", 3)
    assert tiny.train_policy_args[-1] == "ppo.kl_coef=0.1"  # after the size's own args
    with pytest.raises(ConfigError, match="size: unknown size 'huge'"):
        resolve(cfg(size="huge"))
    with pytest.raises(ConfigError, match="responses_per_prompt"):
        resolve(cfg(responses_per_prompt=1))


def test_each_size_is_one_yaml_that_sets_every_key():
    from dataclasses import fields

    from dprm_ray.jobs.quickstart import PRESETS, Plan, preset

    sizes = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert sizes == ["default", "tiny"]
    keys = {f.name for f in fields(Plan)} - {"size", "reward_models", "seed"}
    for size in sizes:
        assert set(preset(size)) == keys
        # Both sizes train with RLOO over two samples of each prompt.
        args = preset(size)["train_policy_args"]
        assert "ppo.advantage=rloo" in args and "ppo.samples_per_prompt=2" in args


def test_quickstart_size_key_is_accepted_and_bad_sizes_fail_before_ray(tmp_path):
    proc = run_cli("quickstart", "--print-config", "quickstart.size=tiny")
    assert proc.returncode == 0, proc.stderr
    assert "size: tiny" in proc.stdout
    # Below the config, as comments, the values the preset gives the keys left unset.
    proc = run_cli("quickstart", "--print-config", "size=tiny", "max_new_tokens=7")
    assert proc.returncode == 0, proc.stderr
    config, resolved = proc.stdout.split("# resolved: what the job runs with\n")
    assert "policy: ''" in config and "max_new_tokens: 7" in config
    assert "#   policy: tiny\n" in resolved and "#   max_new_tokens: 7\n" in resolved
    assert "#   - ppo.advantage=rloo\n" in resolved
    proc = run_cli("quickstart", "--print-config", "size=tiny", "crowd=bogus")
    assert proc.returncode == 2 and "crowd: must be gold or judge" in proc.stderr
    proc = run_cli("quickstart", "size=huge", f"output_dir={tmp_path}")
    assert proc.returncode == 2 and "unknown size 'huge'" in proc.stderr


@pytest.mark.slow
def test_tiny_quickstart_end_to_end_then_a_rerun_skips_every_stage(tmp_path):
    out = tmp_path / "qs"
    start = time.perf_counter()
    proc = run_cli("quickstart", "quickstart.size=tiny", f"output_dir={out}", timeout=900)
    first = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    page = (out / "report" / "index.html").read_text()
    table = page[page.index('<table id="shares">') :]
    table = table[: table.index("</table>")]
    trained = ("Vanilla", "PPO + BT-RM", "PPO + DPRM_OT")  # the default reward_models
    for name in trained:
        assert f"<td>{name}</td>" in table
    assert "DPRM_C" not in table
    for label in hh6.labels:
        assert f"{label.replace('&', '&amp;')} (%)" in table
    for name in ("shares.png", "curves.png"):
        with Image.open(out / "report" / name) as image:
            image.verify()
            assert image.format == "PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["shares"]) == set(trained) <= set(METHODS.values())
    assert set(metrics["gold"]) == set(trained)
    for name, gold in metrics["gold"].items():
        assert sum(gold["gold_shares"]) == pytest.approx(1.0, abs=1e-3)
        assert gold["gold_expected_score_se"] >= 0 and gold["answers"] == 8
        assert ("gold_diff_vs_base" in gold) == (name != "Vanilla")
    assert page.index('<table id="gold">') < page.index('<table id="shares">')
    annotations = pq.read_table(out / "annotations.parquet").to_pylist()
    assert {r["judge"] for r in annotations} == {"gold"}
    assert all(len(r["votes"]) == 4 and r["population"] for r in annotations)
    for stats in metrics["shares"].values():
        assert sum(stats["mean"]) == pytest.approx(1.0)
    ppo = json.loads((out / "ppo-ot" / "metrics.json").read_text())
    assert ppo["steps"] == 2 and (out / "ppo-bt" / "steps.jsonl").is_file()
    # RLOO groups: each step samples 4 prompts twice, the two samples of a prompt side by side,
    # each with its own position (so its own sampling seed).
    steps = [json.loads(line) for line in (out / "ppo-ot" / "steps.jsonl").read_text().splitlines()]
    for step in steps:
        ids = step["prompt_ids"]
        assert len(ids) == len(set(ids)) == 8
        prompts = [i.split("@")[0] for i in ids]
        assert prompts[0::2] == prompts[1::2] and len(set(prompts)) == 4
        assert "value_loss" not in step
    assert "x 2 samples (rloo advantages)" in page

    start = time.perf_counter()
    again = run_cli("quickstart", "size=tiny", f"output_dir={out}")
    assert again.returncode == 0, again.stderr[-4000:]
    assert time.perf_counter() - start < min(60, first / 3)
    assert json.loads((out / "metrics.json").read_text())["ran"] == 0
    assert again.stdout.count("done already (") == 12  # 11 stages and the report
    assert "$ dprm-ray" not in again.stdout  # no sub-job started
    proc = run_cli("quickstart", "size=default", f"output_dir={out}")
    assert proc.returncode == 2 and "holds a run with other settings" in proc.stderr

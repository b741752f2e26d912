"""The quickstart report: one HTML page with PNG charts, written atomically.

What it shows (DESIGN.md, "paper Table 2"): for each policy, the share of its responses to the
held-out prompts that the persona judge puts in each category of the label space, as mean ± std
over the sampling seeds; then the PPO runs' reward and KL curves, the configs used and how long
each stage took. Pure NumPy + matplotlib (the object API with the Agg canvas, so no pyplot
state), no Ray.

The figures come from a quickstart output folder (`eval_gold`, `eval_shares`,
`identical_answers`, `build_report`): the quickstart job only orchestrates the stages that
write it.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dprm_ray.data import atomic_dir

SHARES_PNG = "shares.png"
CURVES_PNG = "curves.png"


@dataclass(frozen=True)
class ShareStats:
    """Per-seed category shares of one policy's judged responses."""

    per_seed: np.ndarray  # [S, K]: share of the seed's responses in each category
    counts: np.ndarray  # [S]: responses judged per seed

    @property
    def mean(self) -> np.ndarray:
        return self.per_seed.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        # The sample std over seeds (0 with a single seed).
        if len(self.per_seed) < 2:
            return np.zeros(self.per_seed.shape[1])
        return self.per_seed.std(axis=0, ddof=1)

    def score(self, scores: Sequence[float]) -> tuple[float, float]:
        """Mean ± std over seeds of the average label score of the responses."""
        per_seed = self.per_seed @ np.asarray(scores, dtype=np.float64)
        std = float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0
        return float(per_seed.mean()), std


def share_stats(categories: Mapping[int, Sequence[int]], num_labels: int) -> ShareStats:
    """ShareStats from each sampling seed's judged categories (one label index per response)."""
    if not categories:
        raise ValueError("no seeds: need the judged categories of at least one seed")
    rows, counts = [], []
    for seed in sorted(categories):
        cats = np.asarray(categories[seed], dtype=np.int64)
        if len(cats) == 0:
            raise ValueError(f"seed {seed}: no judged responses")
        if cats.min() < 0 or cats.max() >= num_labels:
            raise ValueError(f"seed {seed}: category outside 0..{num_labels - 1}")
        rows.append(np.bincount(cats, minlength=num_labels) / len(cats))
        counts.append(len(cats))
    return ShareStats(np.array(rows, dtype=np.float64), np.array(counts, dtype=np.int64))


@dataclass(frozen=True)
class GoldStats:
    """One policy's held-out answers under the gold population (exact distributions).

    `scores` are the answers' exact expected hh6 scores keyed by (prompt id, seed), so that two
    policies can be compared on the same prompt and sampling seed (a paired difference).
    """

    scores: Mapping[tuple[str, int], float]
    shares: np.ndarray  # [K]: mean exact category distribution over the answers

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.scores.values())))

    @property
    def se(self) -> float:
        """Standard error of the mean over prompts x seeds."""
        values = np.array(list(self.scores.values()))
        return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0

    def versus(self, base: GoldStats) -> tuple[float, float]:
        """Paired difference of the mean score against `base` on shared (prompt, seed): (d, se)."""
        keys = sorted(set(self.scores) & set(base.scores))
        if not keys:
            raise ValueError("no (prompt, seed) answered by both policies")
        diff = np.array([self.scores[k] - base.scores[k] for k in keys])
        se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
        return float(diff.mean()), se

    def summary(self, base: GoldStats | None = None) -> dict[str, Any]:
        """The figures for metrics.json (keys say `gold`)."""
        out: dict[str, Any] = {
            "gold_expected_score_mean": round(self.mean, 4),
            "gold_expected_score_se": round(self.se, 4),
            "gold_shares": [round(float(x), 4) for x in self.shares],
            "answers": len(self.scores),
        }
        if base is not None and base is not self:
            d, se = self.versus(base)
            out.update(
                gold_diff_vs_base=round(d, 4),
                gold_diff_se=round(se, 4),
                gold_diff_t=round(d / se, 2) if se > 0 else None,
            )
        return out


def gold_stats(
    answers: Sequence[tuple[str, int, np.ndarray]], scores: Sequence[float]
) -> GoldStats:
    """GoldStats from (prompt id, seed, exact distribution) per answer."""
    if not answers:
        raise ValueError("no answers to summarise")
    score = np.asarray(scores, dtype=np.float64)
    dists = np.array([d for _, _, d in answers], dtype=np.float64)
    return GoldStats(
        scores={(pid, int(seed)): float(d @ score) for pid, seed, d in answers},
        shares=dists.mean(axis=0),
    )


@dataclass
class Report:
    title: str
    labels: Sequence[str]  # the label space's categories, in order
    scores: Sequence[float]  # their scores
    shares: Mapping[str, ShareStats]  # policy name -> stats, in display order
    curves: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    # PPO run name -> its steps.jsonl records (step, reward_mean, reward_std, kl, ...)
    facts: Mapping[str, str] = field(default_factory=dict)  # the run at a glance
    ppo_summary: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    timings: Sequence[tuple[str, str, float]] = ()  # (stage, ran | skipped, seconds)
    configs: Mapping[str, str] = field(default_factory=dict)  # name -> YAML text
    notes: Sequence[str] = ()
    gold: Mapping[str, GoldStats] = field(default_factory=dict)  # policy -> gold figures
    gold_base: str = ""  # the policy the others are compared with (paired differences)
    signals: Mapping[str, str] = field(default_factory=dict)  # policy -> reward it optimised


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _wrap_label(label: str) -> str:
    return label.replace(" & ", " &\n")


def plot_shares(report: Report, path: Path) -> None:
    """Grouped bars: one group per category, one bar per policy, std over seeds as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(report.shares)
    k = len(report.labels)
    fig = Figure(figsize=(10, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(names))
    x = np.arange(k)
    for i, name in enumerate(names):
        stats = report.shares[name]
        ax.bar(
            x + (i - (len(names) - 1) / 2) * width,
            100 * stats.mean,
            width,
            yerr=100 * stats.std,
            capsize=3,
            label=name,
        )
    ax.set_xticks(x, [_wrap_label(label) for label in report.labels], fontsize=8)
    ax.set_ylabel("share of responses (%)")
    ax.set_title("Held-out responses by judged category (mean ± std over sampling seeds)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def plot_curves(report: Report, path: Path) -> None:
    """Reward (mean ± std band) and KL per PPO step, one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    reward_ax, kl_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, records in report.curves.items():
        steps = np.array([r["step"] for r in records], dtype=np.float64)
        mean = np.array([r.get("reward_mean", math.nan) for r in records], dtype=np.float64)
        std = np.array([r.get("reward_std", 0.0) for r in records], dtype=np.float64)
        kl = np.array([r.get("kl", math.nan) for r in records], dtype=np.float64)
        (line,) = reward_ax.plot(steps, mean, marker="o", label=name)
        reward_ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        kl_ax.plot(steps, kl, marker="o", label=name)
    reward_ax.set_title("reward of the step's rollouts (its own reward model)", fontsize=10)
    kl_ax.set_title("KL to the reference policy", fontsize=10)
    for ax in (reward_ax, kl_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
td { white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; } td.best { font-weight: bold; }
table.facts td { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #555; font-size: 0.92em; }
"""


def _row(cells: Sequence[str], tag: str = "td", classes: Sequence[str] = ()) -> str:
    out = []
    for i, cell in enumerate(cells):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        out.append(f"<{tag}{cls}>{cell}</{tag}>")
    return "<tr>" + "".join(out) + "</tr>"


def shares_table(report: Report) -> str:
    """Policies x categories, "mean ± std" in %, plus the mean label score; the best policy's
    Helpful-and-Harmless share (the first label) in bold."""
    esc = html.escape
    head = ["policy", *(f"{esc(label)} (%)" for label in report.labels), "mean score", "n"]
    firsts = sorted((stats.mean[0], name) for name, stats in report.shares.items())
    # Bold only a strict winner.
    best = firsts[-1][1] if len(firsts) > 1 and firsts[-1][0] > firsts[-2][0] else None
    rows = []
    for name, stats in report.shares.items():
        score, score_std = stats.score(report.scores)
        cells = [esc(name)]
        cells += [_pct(m, s) for m, s in zip(stats.mean, stats.std, strict=True)]
        cells += [f"{score:.3f} ± {score_std:.3f}", f"{len(stats.counts)} × {stats.counts.min()}"]
        classes = ["", "best" if name == best else ""]
        rows.append(_row(cells, classes=classes))
    return (
        '<table id="shares"><thead>'
        + _row(head, "th")
        + "</thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def gold_table(report: Report) -> str:
    """Policies x (expected score with 95% interval, paired difference to the base policy,
    exact category shares, the reward signal optimised)."""
    esc = html.escape
    head = ["policy", "gold expected score (95% CI)", f"vs {esc(report.gold_base)} (± se, t)"]
    head += [f"{esc(label)} (%)" for label in report.labels] + ["optimised", "n"]
    base = report.gold.get(report.gold_base)
    rows = []
    for name, stats in report.gold.items():
        cells = [
            esc(name),
            f"{stats.mean:.3f} [{stats.mean - 1.96 * stats.se:.3f}, "
            f"{stats.mean + 1.96 * stats.se:.3f}]",
        ]
        if base is not None and name != report.gold_base:
            d, se = stats.versus(base)
            t = f"{d / se:.1f}" if se > 0 else "-"
            cells.append(f"{d:+.3f} ± {se:.3f} (t = {t})")
        else:
            cells.append("")
        cells += [f"{100 * x:.1f}" for x in stats.shares]
        cells += [esc(report.signals.get(name, "")), str(len(stats.scores))]
        rows.append(_row(cells))
    return (
        '<table id="gold"><thead>'
        + _row(head, "th")
        + "</thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )


def render_html(report: Report, images: Sequence[str] = (SHARES_PNG, CURVES_PNG)) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(report.title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(report.title)}</h1>",
    ]
    if report.facts:
        parts.append('<table class="facts">')
        parts += [_row([esc(k), esc(v)]) for k, v in report.facts.items()]
        parts.append("</table>")
    if report.gold:
        parts += [
            "<h2>Gold population: held-out answers</h2>",
            '<p class="note">Every held-out answer gets the gold population\'s exact hh6 '
            "distribution (simulated people over measured answer properties; "
            "<code>dprm_ray/gold.py</code>), so this table has no judge noise. The expected score "
            "is averaged over prompts × sampling seeds, with a 95% interval (1.96 standard "
            "errors). The difference to the base policy is paired on the same prompt and "
            "seed. Shares are the mean exact distributions. <i>optimised</i> names the reward "
            "signal each PPO run maximised.</p>",
            gold_table(report),
        ]
    parts += [
        "<h2>Held-out responses by category: the LLM judge's view</h2>",
        '<p class="note">Each policy answers the held-out prompts once per sampling seed; the '
        "persona-crowd judge labels every response (category = the argmax of its posterior). A "
        "cell is the share of a seed's responses in that category, mean ± std over the seeds. "
        "The judge is independent of the reward models, so the comparison is fair to both. "
        "<i>mean score</i> is the average label score; <i>n</i> is seeds × responses per "
        "seed.</p>",
        shares_table(report),
    ]
    if SHARES_PNG in images:
        parts.append(f'<p><img src="{SHARES_PNG}" alt="category shares per policy"></p>')
    parts.append("<h2>PPO training</h2>")
    if report.curves and CURVES_PNG in images:
        parts.append(f'<p><img src="{CURVES_PNG}" alt="reward and KL per PPO step"></p>')
    else:
        parts.append('<p class="note">No PPO steps were logged.</p>')
    if report.ppo_summary:
        keys = list(dict.fromkeys(k for s in report.ppo_summary.values() for k in s))
        parts.append("<table><thead>" + _row(["run", *map(esc, keys)], "th") + "</thead><tbody>")
        for name, summary in report.ppo_summary.items():
            cells = [f"{summary[k]:.3f}" if k in summary else "" for k in keys]
            parts.append(_row([esc(name), *cells]))
        parts.append("</tbody></table>")
    if report.timings:
        parts.append("<h2>Stage timings</h2><table><thead>")
        parts.append(_row(["stage", "this run", "seconds"], "th") + "</thead><tbody>")
        parts += [_row([esc(s), esc(st), f"{sec:.1f}"]) for s, st, sec in report.timings]
        total = sum(sec for _, _, sec in report.timings)
        parts.append(_row(["<b>sum</b>", "", f"<b>{total:.1f}</b>"]) + "</tbody></table>")
    if report.notes:
        parts.append("<h2>Notes</h2><ul>")
        parts += [f"<li>{esc(note)}</li>" for note in report.notes]
        parts.append("</ul>")
    if report.configs:
        parts.append("<h2>Configs used</h2>")
        for name, text in report.configs.items():
            parts.append(f"<details><summary>{esc(name)}</summary><pre>{esc(text)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(report: Report, out_dir: str | Path) -> Path:
    """Write `out_dir/index.html` with its PNGs; the folder appears only once complete."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        images = [SHARES_PNG]
        plot_shares(report, tmp / SHARES_PNG)
        if report.curves:
            plot_curves(report, tmp / CURVES_PNG)
            images.append(CURVES_PNG)
        (tmp / "index.html").write_text(render_html(report, images), encoding="utf-8")
    return out / "index.html"


# ----------------------------------------------------------------------------- the quickstart's figures
# Pure functions over a quickstart output folder (<out>/eval/*.parquet, <out>/ppo-*/...).

METHODS = {  # eval key -> name in the report (the paper's Table 2 names), in table order
    "vanilla": "Vanilla",
    "bt": "PPO + BT-RM",
    "dprm_c": "PPO + DPRM_C",
    "dprm_w": "PPO + DPRM_W",
    "dprm_ot": "PPO + DPRM_OT",
}
REWARD_MODELS = {  # `reward_models` entry (train-reward loss.kind) -> (eval key, model name)
    "bt": ("bt", "Bradley-Terry"),
    "ce": ("dprm_c", "DPRM_C"),
    "w1": ("dprm_w", "DPRM_W"),
    "ot": ("dprm_ot", "DPRM_OT"),
}


def write_gold(responses: Path, output: Path) -> None:
    """Every answer's exact gold distribution and the properties it was judged from."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dprm_ray.data import atomic_path
    from dprm_ray.gold import GoldPopulation, properties
    from dprm_ray.labels import hh6

    gold = GoldPopulation()
    rows = []
    for r in pq.read_table(responses).to_pylist():
        measured = properties(r["prompt"], r["response"])
        dist = gold.mixture(measured)
        rows.append(
            {
                "prompt_id": r["prompt_id"],
                "policy": r["policy"],
                "step": int(r["step"]),
                "gold": dist.tolist(),
                "gold_score": float(dist @ np.array(hh6.scores)),
                **asdict(measured),
            }
        )
    with atomic_path(output) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def eval_shares(out: Path) -> dict[str, Any]:
    """Per policy, ShareStats of the judged held-out answers (category = posterior argmax)."""
    import pyarrow.parquet as pq

    from dprm_ray.judge import row_key
    from dprm_ray.labels import hh6

    judged = {
        r["row_key"]: int(np.argmax(r["posterior"]))
        for r in pq.read_table(out / "eval" / "annotations.parquet").to_pylist()
    }
    by_policy: dict[str, dict[int, list[int]]] = {}
    unjudged = 0
    for r in pq.read_table(out / "eval" / "responses.parquet").to_pylist():
        cat = judged.get(row_key(r["prompt"], r["response"]))
        if cat is None:  # rejected by the judge (e.g. too long): not counted
            unjudged += 1
            continue
        by_policy.setdefault(r["policy"], {}).setdefault(int(r["step"]), []).append(cat)
    stats = {
        name: share_stats(by_policy[key], hh6.num_labels)
        for key, name in METHODS.items()
        if key in by_policy
    }
    return {"stats": stats, "unjudged": unjudged}


def eval_gold(out: Path) -> dict[str, Any]:
    """Per policy (report name), GoldStats of its held-out answers."""
    import pyarrow.parquet as pq

    from dprm_ray.labels import hh6

    answers: dict[str, list[tuple[str, int, Any]]] = {}
    for r in pq.read_table(out / "eval" / "gold.parquet").to_pylist():
        answers.setdefault(r["policy"], []).append((r["prompt_id"], r["step"], np.array(r["gold"])))
    return {
        name: gold_stats(answers[key], hh6.scores)
        for key, name in METHODS.items()
        if key in answers
    }


SIGNALS = {  # report name -> the reward signal that policy's PPO run maximised
    "Vanilla": "none (the untrained policy)",
    "PPO + BT-RM": "BT scalar reward (pairs of crowd-labelled answers)",
    "PPO + DPRM_C": "DPRM_C (cross-entropy) expected hh6 score (crowd distributions)",
    "PPO + DPRM_W": "DPRM_W (Wasserstein-1) expected hh6 score (crowd distributions)",
    "PPO + DPRM_OT": "DPRM_OT expected hh6 score (crowd distributions)",
}


def identical_answers(out: Path) -> dict[str, tuple[int, int]]:
    """Per PPO policy: (answers equal to Vanilla's for the same prompt and seed, answers)."""
    import pyarrow.parquet as pq

    answers: dict[str, dict[tuple[str, int], str]] = {}
    for r in pq.read_table(out / "eval" / "responses.parquet").to_pylist():
        answers.setdefault(r["policy"], {})[(r["prompt_id"], r["step"])] = r["response"]
    base = answers.get("vanilla", {})
    return {
        key: (sum(base.get(k) == v for k, v in answers[key].items()), len(answers[key]))
        for key in METHODS
        if key in answers and key != "vanilla"
    }


def _ppo_estimator(config_file: Path) -> str:
    """' x N samples (rloo advantages)' from a train-policy run's resolved config ('' if none)."""
    if not config_file.is_file():
        return ""
    from omegaconf import OmegaConf

    ppo = OmegaConf.load(config_file).ppo
    return f" x {ppo.samples_per_prompt} samples ({ppo.advantage} advantages)"


def build_report(plan: Mapping[str, Any], out: Path, timings: list[tuple[str, str, float]]) -> Path:
    """<out>/report from the quickstart's output folder, its resolved plan (the fields of
    `quickstart.Plan`) and each stage's (name, status, seconds)."""
    from dprm_ray.labels import hh6

    shares = eval_shares(out)
    gold = eval_gold(out)
    curves, summary = {}, {}
    for kind in plan["reward_models"]:
        name = METHODS[REWARD_MODELS[kind][0]]
        folder = out / f"ppo-{kind}"
        steps = folder / "steps.jsonl"
        if steps.is_file():
            curves[name] = [json.loads(line) for line in steps.read_text().splitlines() if line]
        metrics = read_json(folder / "metrics.json")
        if metrics:
            summary[name] = {
                "reward before": metrics["before"]["reward_mean"],
                "reward after": metrics["after"]["reward_mean"],
                "length before": metrics["before"].get("response_length", float("nan")),
                "length after": metrics["after"].get("response_length", float("nan")),
                "final KL": metrics.get("last_step", {}).get("kl", float("nan")),
            }
    configs = {"quickstart plan": _yaml(dict(plan))}
    subs = [("annotate (train answers)", "annotations-job")]
    subs += [(f"train-reward {REWARD_MODELS[k][1]}", f"rm-{k}") for k in plan["reward_models"]]
    subs += [(f"train-policy vs {REWARD_MODELS[k][1]}", f"ppo-{k}") for k in plan["reward_models"]]
    subs += [("annotate (held-out answers)", "eval/annotations-job")]
    for label, sub in subs:
        path = out / sub / "config.yaml"
        if path.is_file():
            configs[label] = path.read_text()
    facts = {
        "size": plan["size"],
        "policy": plan["policy"],
        "reward data labelled by": (
            f"{plan['personas_per_item']} people per answer sampled from the gold population"
            if plan["crowd"] == "gold"
            else f"{plan['judge_backend']}:{plan['judge']}, {plan['personas_per_item']} personas/answer"
        ),
        "judge (second view)": f"{plan['judge_backend']}:{plan['judge']}, hh6",
        "reward models": ", ".join(REWARD_MODELS[k][1] for k in plan["reward_models"])
        + f" on frozen {plan['encoder']} (seed {plan['seed']})",
        "reward data": f"{plan['train_prompts']} train prompts x {plan['responses_per_prompt']} answers",
        "PPO": f"{plan['ppo_steps']} steps x {plan['prompts_per_step']} prompts"
        + _ppo_estimator(out / f"ppo-{plan['reward_models'][0]}" / "config.yaml")
        + f", {plan['engine']} rollouts",
        "evaluation": f"{plan['eval_prompts']} held-out prompts x {plan['eval_seeds']} seeds",
        "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    notes = []
    same = identical_answers(out)
    if same:
        notes.append(
            "Answers identical to the untrained policy's (the same sampling seed and prompt): "
            + "; ".join(f"{METHODS[k]} {n} of {total}" for k, (n, total) in same.items())
            + ". With shared sampling seeds an answer changes only where the PPO update tips a "
            "sampled token."
        )
    if shares["unjudged"]:
        notes.append(f"{shares['unjudged']} held-out answers were rejected by the judge.")
    notes.append(
        "PPO rewards are each under its own reward model (DPRM_OT: expected hh6 score; BT: "
        "a scalar), so their scales differ; the tables above use the gold population and the "
        "judge alone."
    )
    if plan["size"] == "tiny":
        notes.append(
            "size=tiny: random tiny models; the figures test the pipeline, not the methods."
        )
    report = Report(
        title="dprm-ray quickstart: "
        + " vs ".join(REWARD_MODELS[k][1] for k in plan["reward_models"]),
        labels=list(hh6.labels),
        scores=list(hh6.scores),
        shares=shares["stats"],
        curves=curves,
        facts=facts,
        ppo_summary=summary,
        timings=timings,
        configs=configs,
        notes=notes,
        gold=gold,
        gold_base=METHODS["vanilla"],
        signals=SIGNALS,
    )
    return write_report(report, out / "report")


def _yaml(data: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(data))

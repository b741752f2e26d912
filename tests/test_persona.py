"""The simulated persona crowd: loading, topics, votes vs the closed-form population."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dprm_ray.data import DataError
from dprm_ray.persona import (
    PersonaPopulation,
    behaviour_topic,
    build_persona_crowd,
    load_persona_statements,
    make_items,
)

REPO = Path(__file__).resolve().parents[1]
PERSONA_DIR = REPO.parent / "shared" / "data" / "persona"
CONTESTED = ["politically-conservative", "subscribes-to-Islam"]
AI_RISK = "desire-for-acquiring-compute"
BEHAVIOURS = [*CONTESTED, AI_RISK, "agreeableness"]

pytestmark = pytest.mark.skipif(
    not PERSONA_DIR.is_dir(), reason=f"persona data not found at {PERSONA_DIR}"
)


@pytest.fixture(scope="module")
def statements():
    return load_persona_statements(PERSONA_DIR, BEHAVIOURS, max_per_behaviour=40)


def test_load_order_and_fields(statements):
    assert [s.behaviour for s in statements[::40]] == sorted(BEHAVIOURS)
    assert len(statements) == 4 * 40
    first = json.loads((PERSONA_DIR / "agreeableness.jsonl").open().readline())
    s = statements[0]
    assert s.statement == first["statement"]
    assert s.question == first["question"].strip()
    assert s.matches_on_yes == (first["answer_matching_behavior"].strip() == "Yes")
    assert all(0.5 <= s.label_confidence <= 1.0 for s in statements)


def test_topics():
    expected = {
        "politically-conservative": "politics",
        "believes-abortion-should-be-illegal": "politics",
        "anti-LGBTQ-rights": "politics",
        "anti-immigration": "politics",
        "subscribes-to-Islam": "religion",
        "subscribes-to-Confucianism": "religion",
        "subscribes-to-deontology": "ethics",
        "subscribes-to-rule-utilitarianism": "ethics",
        "ends-justify-means": "ethics",
        "agreeableness": "personality",
        "psychopathy": "personality",
        "interest-in-art": "personality",
        "risk-seeking": "personality",
        "desire-for-acquiring-power": "ai-risk",
        "willingness-to-use-social-engineering-to-achieve-its-goals": "ai-risk",
        "believes-it-is-a-moral-patient": "ai-risk",
        "okay-with-using-many-resources": "ai-risk",
        "self-replication": "ai-risk",
        "resource-acquisition": "ai-risk",
        "something-unrelated": "other",
    }
    assert {name: behaviour_topic(name) for name in expected} == expected


def test_crowd_rows_deterministic_and_well_formed():
    kwargs = dict(behaviours=BEHAVIOURS, max_per_behaviour=10)
    rows = build_persona_crowd(PERSONA_DIR, num_users=7, seed=3, **kwargs)
    assert rows == build_persona_crowd(PERSONA_DIR, num_users=7, seed=3, **kwargs)
    other = build_persona_crowd(PERSONA_DIR, num_users=7, seed=4, **kwargs)
    assert [r["votes"] for r in rows] != [r["votes"] for r in other]

    assert len(rows) == 2 * 4 * 10
    for row in rows:
        assert set(row) == {
            "prompt",
            "response",
            "group",
            "votes",
            "population",
            "label_confidence",
        }
        assert len(row["votes"]) == 7 and all(0 <= v <= 4 for v in row["votes"])
        assert all(isinstance(v, int) for v in row["votes"])
        assert len(row["population"]) == 5 and abs(sum(row["population"]) - 1.0) < 1e-9
        assert min(row["population"]) >= 0.0
    # Two items per statement: an agreeing then a disagreeing answer to the same prompt.
    assert rows[0]["prompt"] == rows[1]["prompt"]
    assert rows[0]["response"].startswith("Yes") and rows[1]["response"].startswith("No")


def test_empirical_votes_converge_to_population(statements):
    items = make_items(statements[::20])  # 8 statements, 16 items across the 4 behaviours
    pop = PersonaPopulation(BEHAVIOURS, num_users=5000, seed=0)
    votes = pop.votes(items, np.random.default_rng(1))
    assert votes.shape == (16, 5000) and votes.min() >= 0 and votes.max() <= 4
    hist = np.stack([np.bincount(v, minlength=5) / v.size for v in votes])
    assert np.abs(hist - pop.population_distribution(items)).max() < 0.03


def test_contested_bimodal_and_ai_risk_one_sided(statements):
    pop = PersonaPopulation(BEHAVIOURS, num_users=10, seed=0)
    items = make_items(statements)
    dist = pop.population_distribution(items)
    groups = np.array([it.behaviour for it in items])
    bad, neutral, good = dist[:, :2].sum(1), dist[:, 2], dist[:, 3:].sum(1)
    for b in CONTESTED:
        m = groups == b
        assert (bad[m] > 0.25).all() and (good[m] > 0.25).all()
        assert (neutral[m] < np.minimum(bad[m], good[m])).all()
    # Most users oppose an AI that wants more compute: exhibiting responses are rated bad.
    exhibits = np.array([it.exhibits for it in items])
    m = (groups == AI_RISK) & exhibits
    assert (bad[m] > 0.6).all() and (good[m] < 0.25).all()
    assert ((groups == AI_RISK) & ~exhibits & (good > 0.6)).sum() == m.sum()


def test_agree_and_disagree_are_mirrored(statements):
    items = make_items(statements)
    # Any mix: the same user sees +strength for one answer and -strength for the other.
    dist = PersonaPopulation(BEHAVIOURS, num_users=3, seed=0).population_distribution(items)
    np.testing.assert_allclose(dist[0::2], dist[1::2, ::-1], atol=1e-12)
    # A balanced mix: each item's distribution is itself symmetric.
    balanced = {b: (0.45, 0.45, 0.10) for b in BEHAVIOURS}
    pop = PersonaPopulation(BEHAVIOURS, num_users=3, seed=0, mixtures=balanced)
    dist = pop.population_distribution(items)
    np.testing.assert_allclose(dist, dist[:, ::-1], atol=1e-12)
    assert pop.mixture(AI_RISK) == pytest.approx((0.45, 0.45, 0.10))


def test_mixtures_differ_by_behaviour_and_are_stable():
    names = ["subscribes-to-Islam", "subscribes-to-Christianity", "politically-conservative"]
    pop = PersonaPopulation(names, num_users=4, seed=0)
    assert pop.mixture(names[0]) != pop.mixture(names[1])
    assert sum(pop.mixture(names[0])) == pytest.approx(1.0)
    # A behaviour's mixture and users' stances do not depend on the other behaviours loaded ...
    alone = PersonaPopulation(names[1:2], num_users=4, seed=0)
    assert alone.mixture(names[1]) == pop.mixture(names[1])
    np.testing.assert_array_equal(alone.stances[:, 0], pop.stances[:, 1])
    # ... nor on Python's per-process hash salt.
    code = (
        "from dprm_ray.persona import PersonaPopulation as P; "
        "print(P(['subscribes-to-Islam'], 4, 0).mixture('subscribes-to-Islam'))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": salt},
        ).stdout
        for salt in ("1", "2")
    }
    assert outs == {f"{pop.mixture(names[0])}\n"}


def test_user_utility_noise_free_and_noisy(statements):
    items = make_items(statements[:3])
    pop = PersonaPopulation(BEHAVIOURS, num_users=6, seed=0)
    mean = pop.user_utility(items)
    assert mean.shape == (6, 6)
    np.testing.assert_array_equal(mean, pop.user_utility(items))
    np.testing.assert_allclose(pop.user_utility(items, users=[2, 4]), mean[:, [2, 4]])
    noisy = pop.user_utility(items, rng=np.random.default_rng(0))
    assert not np.allclose(noisy, mean)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"question": "q"\n', "bad JSON"),
        ('{"question": "q", "statement": "s"}\n', "missing key(s)"),
        (
            json.dumps(
                {
                    "question": "q",
                    "statement": "s",
                    "label_confidence": 2.0,
                    "answer_matching_behavior": " Yes",
                    "answer_not_matching_behavior": " No",
                }
            )
            + "\n",
            "label_confidence",
        ),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, content, problem):
    good = (PERSONA_DIR / "agreeableness.jsonl").open().readline()
    path = tmp_path / "some-behaviour.jsonl"
    path.write_text(good + "\n" + content)
    with pytest.raises(DataError) as err:
        load_persona_statements(tmp_path)
    assert f"{path}:3: " in str(err.value) and problem in str(err.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_persona_statements(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-behaviour"):
        load_persona_statements(PERSONA_DIR, ["no-such-behaviour"])

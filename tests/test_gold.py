"""The gold population: detectors against labelled examples, the closed form against a
Monte-Carlo crowd, and the gold crowd as an annotation backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dprm_ray.gold import (
    GOLD_PERSONAS,
    GoldCrowd,
    GoldPersona,
    GoldPopulation,
    harm_request,
    is_refusal,
    last_human_turn,
    properties,
    relevance,
    repetition,
)
from dprm_ray.judge import JudgeConfig
from dprm_ray.labels import hh6

DATA = Path(__file__).parent / "data"
CATALOG = Path(__file__).parents[1] / "dprm_ray" / "catalog" / "prompts.jsonl"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _precision_recall(truth: list[bool], found: list[bool]) -> tuple[float, float]:
    tp = sum(t and f for t, f in zip(truth, found, strict=True))
    return tp / max(1, sum(found)), tp / max(1, sum(truth))


def test_refusal_detector_on_labelled_answers():
    rows = _jsonl(DATA / "refusals.jsonl")
    assert len(rows) >= 100
    precision, recall = _precision_recall(
        [r["refusal"] for r in rows], [is_refusal(r["response"]) for r in rows]
    )
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)


def test_harm_request_detector_on_labelled_prompts():
    rows = _jsonl(DATA / "harm_prompts.jsonl")
    assert len(rows) >= 100
    precision, recall = _precision_recall(
        [r["harmful"] for r in rows], [harm_request(r["prompt"]) for r in rows]
    )
    assert precision >= 0.85 and recall >= 0.85, (precision, recall)
    # The built-in prompt catalog was labelled separately (kind: helpful | harmful).
    catalog = _jsonl(CATALOG)
    precision, recall = _precision_recall(
        [r["kind"] == "harmful" for r in catalog], [harm_request(r["prompt"]) for r in catalog]
    )
    assert precision >= 0.95 and recall >= 0.8, (precision, recall)


def test_detector_edge_cases():
    assert not is_refusal("I can't stress enough how important it is to stretch. Here are five.")
    assert not is_refusal("Sorry for the confusion! Here is the corrected recipe: boil water.")
    assert is_refusal("I\u2019m sorry, but I can\u2019t help with that.")
    assert is_refusal("i cant help you with that")
    transcript = (
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: How do I kill a Python process?\n\nAssistant:"
    )
    assert last_human_turn(transcript) == "How do I kill a Python process?"
    assert not harm_request(transcript)
    assert harm_request("\n\nHuman: How can I poison my neighbour?\n\nAssistant:")
    assert relevance("How do I make tomato sauce?", "Simmer tomatoes into a sauce.") == 1.0
    assert relevance("How do I make tomato sauce?", "I like cars.") == 0.0
    assert repetition("the cat sat " * 10) > 0.5
    assert repetition("one two three four five six seven") == 0.0


def test_persona_distribution_is_a_distribution_and_monotone():
    p = properties("How do I make tomato sauce?", "Simmer chopped tomatoes with garlic.")
    for persona in GOLD_PERSONAS:
        d = persona.distribution(p)
        assert d.shape == (6,) and np.all(d >= 0) and d.sum() == pytest.approx(1.0)
    pop = GoldPopulation()
    relevant = pop.expected_score(
        "How do I make tomato sauce?",
        "Simmer chopped tomatoes with garlic and olive oil for twenty minutes, then season the "
        "sauce with salt and basil.",
    )
    refusal = pop.expected_score(
        "How do I make tomato sauce?", "I'm sorry, I can't help with that."
    )
    assert relevant > refusal + 0.5
    harmful = "How do I poison my neighbour's dog?"
    complies = pop.distribution(harmful, "Mix antifreeze into its food and poison the dog slowly.")
    refuses = pop.distribution(harmful, "I'm sorry, but I can't help you hurt an animal.")
    assert complies[3:].sum() > 0.5 > refuses[3:].sum()
    assert refuses @ np.array(hh6.scores) > complies @ np.array(hh6.scores)


@pytest.mark.parametrize(
    ("prompt", "response"),
    [
        ("How do I make tomato sauce?", "Simmer chopped tomatoes with garlic."),
        ("How can I steal my neighbour's car?", "Use a slim jim on the door and hotwire it."),
        ("How can I steal my neighbour's car?", "I won't help you steal a car."),
        ("Explain recursion.", "I'm sorry, I cannot help with that request."),
    ],
)
def test_closed_form_matches_a_monte_carlo_crowd(prompt, response):
    """Many simulated people (type by share, then their own noise) vote like the closed form."""
    pop = GoldPopulation()
    votes, ids = pop.sample_people(prompt, response, 60_000, np.random.default_rng(0))
    empirical = np.bincount(votes, minlength=6) / len(votes)
    assert np.abs(empirical - pop.distribution(prompt, response)).max() < 0.01
    assert set(ids) == {p.id for p in GOLD_PERSONAS}


def test_population_shares_weight_the_mixture():
    a = GoldPersona("a", "lenient", bias=3.0, share=3.0)
    b = GoldPersona("b", "harsh", bias=-3.0, share=1.0)
    pop = GoldPopulation([a, b])
    p = properties("Explain recursion.", "Recursion is when a function calls itself.")
    expected = 0.75 * a.distribution(p) + 0.25 * b.distribution(p)
    assert np.allclose(
        pop.distribution("Explain recursion.", "Recursion is when a function calls itself."),
        expected,
    )
    with pytest.raises(ValueError, match="share"):
        GoldPopulation([GoldPersona("z", "none", share=0.0)])


def test_gold_crowd_annotates_like_the_judge():
    cfg = JudgeConfig(backend="gold", personas_per_item=5, kappa=1.0, eps=0.1, seed=3)
    crowd = GoldCrowd(cfg)
    rows = [
        {"prompt": "How do I make tomato sauce?", "response": "Simmer tomatoes."},
        {"prompt": "How can I hack my ex's email?", "response": "Guess the password."},
        {"prompt": "Explain recursion.", "response": ""},
    ]
    good, rejects = crowd.annotate(rows)
    again, _ = GoldCrowd(cfg).annotate(rows)
    assert [r["votes"] for r in good] == [r["votes"] for r in again]  # seeded per row
    assert len(good) == 2 and len(rejects) == 1
    for row in good:
        assert len(row["votes"]) == 5 and len(row["persona_ids"]) == 5
        assert np.allclose(row["prior"], 1 / 6)
        assert sum(row["target"]) == pytest.approx(1.0)
        assert row["population"] == pytest.approx(
            GoldPopulation().distribution(row["prompt"], row["response"]).tolist()
        )
    with pytest.raises(ValueError, match="hh6"):
        GoldCrowd(JudgeConfig(backend="gold", label_space="likert5"))

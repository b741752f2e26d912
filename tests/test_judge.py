"""The persona judge protocol and its backends (in-process; the openai backend over real HTTP to
the scripted server of tests/openai_fixture.py, and to vLLM's in tests/test_judge_vllm_server.py)."""

import random

import numpy as np
import pytest
import torch
from openai_fixture import FixtureServer

from dprm_ray.config import ConfigError
from dprm_ray.crowd import aggregate
from dprm_ray.judge import (
    JudgeBackendError,
    JudgeConfig,
    OpenAIJudge,
    PersonaJudge,
    choose_personas,
    load_personas,
    retry_wait,
)

ROWS = [
    {"prompt": "Human: How do I bake bread?", "response": "Mix flour, water and yeast; bake."},
    {"prompt": "Human: How can I hurt my neighbour?", "response": "Sorry, I can't help with that."},
    {"prompt": "Human: Tell me a joke.", "response": "Why did the chicken cross the road?"},
]


@pytest.fixture(scope="module")
def tiny_judge():
    return PersonaJudge(JudgeConfig(model="tiny", personas_per_item=4))


def openai_judge(base_url, model="tiny", top=300, openai=None, **judge):
    openai = openai or {}
    cfg = JudgeConfig(model=model, backend="openai", personas_per_item=4, **judge)
    cfg.openai.base_url = base_url
    cfg.openai.top_logprobs = top
    cfg.openai.max_retries = 1
    cfg.openai.backoff_s = 0.05
    for key, value in openai.items():
        setattr(cfg.openai, key, value)
    return PersonaJudge(cfg)


def test_builtin_catalog_has_the_papers_personas():
    personas = load_personas()
    assert len(personas) >= 24
    names = {p.name for p in personas}
    for example in ("a rigorous scientist", "an impulsive teenager", "an eccentric artist"):
        assert example in names
    assert len({p.id for p in personas}) == len(personas)


def test_bad_catalogs_name_the_file_and_entry(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("personas:\n  - {id: a, name: A, description: x}\n  - {id: b, name: B}\n")
    with pytest.raises(ConfigError, match=r"p.yaml: persona 2: missing description"):
        load_personas(path)
    path.write_text("personas:\n  - {id: a, name: A, description: x}\n  - {id: a, name: B, description: y}\n")  # fmt: skip
    with pytest.raises(ConfigError, match="duplicate persona ids: a"):
        load_personas(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_personas(tmp_path / "missing.yaml")


def test_persona_sampling_is_per_item_and_repeatable():
    personas = load_personas()
    a = choose_personas(personas, 5, seed=0, key="0123456789abcdef0123")
    assert len(a) == 5 and a == choose_personas(personas, 5, 0, "0123456789abcdef0123")
    others = {tuple(p.id for p in choose_personas(personas, 5, 0, f"{i:020x}")) for i in range(20)}
    assert len(others) > 10
    assert choose_personas(personas, 0, 0, "0" * 20) == personas


def test_rows_get_prior_votes_posterior_and_target(tiny_judge):
    good, rejects = tiny_judge.annotate(ROWS)
    assert not rejects and len(good) == len(ROWS)
    for row in good:
        for key in ("prior", "posterior", "target"):
            assert len(row[key]) == 6 and abs(sum(row[key]) - 1) < 1e-9
        assert len(row["votes"]) == len(row["persona_ids"]) == 4
        expected = aggregate(np.array(row["prior"]), row["votes"], 6, kappa=1.0, eps=0.1)
        np.testing.assert_allclose(row["posterior"], expected["posterior"])
        np.testing.assert_allclose(row["target"], expected["target"])
        assert row["judge"] == "transformers:tiny" and row["label_space"] == "hh6"


def test_prior_is_the_softmax_of_the_option_logits(tiny_judge):
    """No parsing: the prior is the next-token distribution restricted to the K option tokens."""
    row = ROWS[0]
    prompt = tiny_judge.prompts.build(row["prompt"], row["response"])
    backend = tiny_judge.backend
    ids = torch.tensor([backend.tokenizer(prompt).input_ids])
    with torch.no_grad():
        logits = backend.model(input_ids=ids).logits[0, -1]
    expected = torch.softmax(logits[backend.option_ids], dim=-1).numpy()
    (good,), _ = tiny_judge.annotate([row])
    np.testing.assert_allclose(good["prior"], expected, atol=1e-5)
    # Options are "1".."6" read at the answer position of a prompt that lists them.
    assert prompt.endswith("Answer: ") and "6. Not-helpful & Harmful" in prompt


def test_sampled_votes_are_repeatable_and_follow_the_seed():
    cfg = JudgeConfig(model="tiny", vote="sample", temperature=5.0, personas_per_item=0)
    judge = PersonaJudge(cfg)
    first, _ = judge.annotate(ROWS)
    again, _ = judge.annotate(ROWS)
    assert [r["votes"] for r in first] == [r["votes"] for r in again]
    assert len(set(first[0]["votes"])) > 1  # hot sampling over 28 personas: not all one label
    judge.cfg.seed = 1
    reseeded, _ = judge.annotate(ROWS)
    assert [r["votes"] for r in reseeded] != [r["votes"] for r in first]


def test_empty_and_overlong_rows_are_rejected_with_reasons():
    judge = PersonaJudge(JudgeConfig(model="tiny", personas_per_item=2, max_tokens=1200))
    rows = [
        {"prompt": "", "response": "fine"},
        {"prompt": "Human: hi", "response": "   "},
        {"prompt": "Human: hi", "response": "x" * 5000},  # truncated to 2000 chars: too long
        ROWS[0],
    ]
    good, rejects = judge.annotate(rows)
    assert [r["response"] for r in good] == [ROWS[0]["response"]]
    reasons = [r["reason"] for r in rejects]
    assert reasons[0] == "empty prompt" and reasons[1] == "empty response"
    assert "tokens > judge.max_tokens=1200" in reasons[2]


def test_config_mistakes_name_the_key():
    with pytest.raises(ConfigError, match="judge.backend"):
        PersonaJudge(JudgeConfig(backend="nope"))
    with pytest.raises(ConfigError, match="judge.template: missing the {options} field"):
        PersonaJudge(JudgeConfig(model="tiny", template="{persona}{rubric}{prompt}{response}"))
    with pytest.raises(ConfigError, match="judge.label_space"):
        PersonaJudge(JudgeConfig(model="tiny", label_space="hh7"))


def option_scores(judge):
    """A fixture `score` that answers what `judge`'s own model gives the options, plus one
    non-option token below them all (as a server's top log-probs would)."""

    def score(prompts):
        answers = judge.backend.option_logprobs(prompts)
        return [
            {**{str(i + 1): float(lp) for i, lp in enumerate(a)}, " The": float(min(a)) - 1}
            for a in answers
        ]

    return score


def test_openai_backend_matches_transformers_on_the_same_model(tiny_judge):
    """Prompts go out in requests of judge.openai.prompts_per_request and every choice comes back
    to its own prompt: the labels equal the transformers backend's."""
    with FixtureServer(option_scores(tiny_judge)) as srv:
        good, rejects = openai_judge(srv.url).annotate(ROWS)
    reference, _ = tiny_judge.annotate(ROWS)
    assert (
        not rejects and len(srv.requests) == 2
    )  # 3 rows x (1 + 4 personas) = 15 prompts, 8 a request
    for a, b in zip(good, reference, strict=True):
        np.testing.assert_allclose(a["prior"], b["prior"], atol=1e-9)
        assert a["votes"] == b["votes"]
    assert good[0]["judge"] == "openai:tiny"


def test_openai_backend_gives_missing_options_the_smallest_returned_logprob():
    def score(prompts):
        return [{"1": -1.0, "2": -2.0, " The": -0.5, "x": -4.0} for _ in prompts]

    with FixtureServer(score) as srv:
        (good,), _ = openai_judge(srv.url).annotate(ROWS[:1])
    expected = np.exp([-1.0, -2.0, -4.0, -4.0, -4.0, -4.0])
    np.testing.assert_allclose(good["prior"], expected / expected.sum())


def test_openai_backend_errors():
    with FixtureServer(api_key="s3cret") as srv:
        with pytest.raises(JudgeBackendError, match="401"):
            openai_judge(srv.url).annotate(ROWS[:1])
        judge = openai_judge(srv.url, model="other-name")
        judge.backend.headers["Authorization"] = "Bearer s3cret"
        with pytest.raises(JudgeBackendError, match="404.*model_name"):
            judge.annotate(ROWS[:1])
    # A 400 is the request's fault: no retry, the rows are rejected.
    with FixtureServer(failures=[(400, {})]) as srv:
        good, rejects = openai_judge(srv.url).annotate(ROWS[:1])
    assert not good and "400" in rejects[0]["reason"] and len(srv.requests) == 1
    # A server that is not there: retried with backoff, then the rows are rejected (not fatal).
    dead = openai_judge("http://127.0.0.1:9/v1")
    good, rejects = dead.annotate(ROWS[:2])
    assert not good and all("after 1 retries" in r["reason"] for r in rejects)


def test_openai_backend_reads_the_key_from_the_named_env_var(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "s3cret")
    with FixtureServer(api_key="s3cret") as srv:
        judge = openai_judge(srv.url)
        judge.cfg.openai.api_key_env = "JUDGE_KEY"
        judge.backend = OpenAIJudge(judge.cfg, judge.options)
        good, _ = judge.annotate(ROWS[:1])
    assert len(good) == 1


def retry_gaps(failures, **openai):
    """Annotate one row against a server that first answers `failures`; the seconds between
    consecutive requests, and the rows."""
    with FixtureServer(failures=failures) as srv:
        good, rejects = openai_judge(srv.url, openai=openai).annotate(ROWS[:1])
    return np.diff(srv.requests), good, rejects


def test_a_429_with_retry_after_is_retried_after_that_many_seconds():
    # Without Retry-After the backoff would wait 0.005-0.015 s.
    gaps, good, rejects = retry_gaps([(429, {"Retry-After": "1"})], backoff_s=0.01, max_wait_s=5.0)
    assert len(good) == 1 and not rejects
    assert len(gaps) == 1 and 1.0 <= gaps[0] < 1.5


def test_retry_after_is_capped_by_max_wait_s():
    gaps, good, _ = retry_gaps([(503, {"Retry-After": "30"})], backoff_s=0.01, max_wait_s=0.3)
    assert len(good) == 1 and len(gaps) == 1 and 0.3 <= gaps[0] < 0.8


def test_backoff_doubles_per_retry_with_jitter_without_retry_after():
    gaps, good, _ = retry_gaps([(503, {}), (500, {})], backoff_s=0.2, max_retries=2)
    assert len(good) == 1 and len(gaps) == 2
    assert 0.1 <= gaps[0] < 0.3 + 0.2 and 0.2 <= gaps[1] < 0.6 + 0.2


def test_retry_wait_jitters_the_backoff_and_honours_retry_after():
    rng = random.Random(0)
    for attempt in (1, 2, 3, 4):
        waits = [retry_wait(attempt, 1.0, 100.0, None, rng) for _ in range(200)]
        base = 2 ** (attempt - 1)
        assert all(0.5 * base <= w < 1.5 * base for w in waits)
        # Spread over the whole range, not one value: clients refused together do not retry together.
        assert min(waits) < 0.6 * base and max(waits) > 1.4 * base
    assert retry_wait(10, 1.0, 7.5, None, rng) == 7.5  # 512 s of backoff, capped
    assert retry_wait(1, 1.0, 60.0, "12", rng) == 12.0
    assert retry_wait(3, 1.0, 60.0, " 0 ", rng) == 0.0
    assert retry_wait(1, 1.0, 60.0, "120", rng) == 60.0
    # The HTTP-date form (and nonsense) falls back to the jittered backoff.
    for header in ("Wed, 21 Oct 2015 07:28:00 GMT", "-3", "nan", "soon"):
        assert 0.5 <= retry_wait(1, 1.0, 60.0, header, rng) < 1.5


@pytest.mark.parametrize("value", [0, -1.0])
def test_max_wait_s_must_be_positive(value):
    cfg = JudgeConfig(model="tiny", backend="openai")
    cfg.openai.max_wait_s = value
    with pytest.raises(ConfigError, match=rf"^judge.openai.max_wait_s: must be > 0, got {value}$"):
        cfg.validate()


# ----------------------------------------------------------------------------- calibration, votes

OPTIONS_AT = "Assistant's last response:\n"


class FakeBackend:
    """Option log-probs = log(bias of the prompt's persona) + the item signal of its response.

    Content-free responses have no signal, so their option distribution is the bias itself.
    """

    def __init__(self, biases: dict[str, np.ndarray], signals: dict[str, np.ndarray]):
        self.biases, self.signals = biases, signals
        self.prompts: list[str] = []

    def option_logprobs(self, prompts):
        self.prompts.extend(prompts)
        out = []
        for prompt in prompts:
            who = next((name for name in self.biases if name and f"way {name} would" in prompt), "")
            response = prompt.split(OPTIONS_AT)[1].split("\n\nOptions:")[0]
            logits = np.log(self.biases[who]) + self.signals.get(response, 0.0)
            out.append(logits - np.log(np.exp(logits).sum()))
        return out


def softmax(x):
    z = np.exp(x - x.max())
    return z / z.sum()


@pytest.fixture()
def three_personas(tmp_path):
    path = tmp_path / "three.yaml"
    path.write_text(
        "personas:\n"
        "  - {id: a, name: Alice, description: likes detail.}\n"
        "  - {id: b, name: Bob, description: likes brevity.}\n"
        "  - {id: c, name: Carol, description: likes safety.}\n"
    )
    return str(path)


def test_calibration_divides_out_a_constant_bias_exactly(three_personas):
    # Like SmolLM2: every prompt peaks at option 1, each persona with its own strength.
    biases = {
        "": np.array([0.9, 0.02, 0.02, 0.02, 0.02, 0.02]),
        "Alice": np.array([0.8, 0.1, 0.04, 0.03, 0.02, 0.01]),
        "Bob": np.array([0.95, 0.01, 0.01, 0.01, 0.01, 0.01]),
        "Carol": np.array([0.5, 0.1, 0.1, 0.1, 0.1, 0.1]),
    }
    signals = {
        ROWS[0]["response"]: np.array([0.0, 1.0, 0.0, 0.0, -1.0, 0.0]),
        ROWS[1]["response"]: np.array([0.0, 0.0, 0.0, 1.5, 0.0, 0.5]),
    }
    rows = ROWS[:2]
    plain = PersonaJudge(JudgeConfig(personas=three_personas), FakeBackend(biases, signals))
    raw, _ = plain.annotate(rows)
    assert all(v == 0 for row in raw for v in row["votes"])  # the bias wins every vote

    backend = FakeBackend(biases, signals)
    judge = PersonaJudge(JudgeConfig(personas=three_personas, calibrate=True), backend)
    good, rejects = judge.annotate(rows)
    assert not rejects
    for row in good:
        signal = signals[row["response"]]
        np.testing.assert_allclose(row["prior"], softmax(signal), atol=1e-12)
        assert row["votes"] == [int(np.argmax(signal))] * 3  # every persona's bias cancels
        expected = aggregate(np.array(row["prior"]), row["votes"], 6, kappa=1.0, eps=0.1)
        np.testing.assert_allclose(row["target"], expected["target"])
    assert set(judge.content_free) == {"", "a", "b", "c"}
    np.testing.assert_allclose(judge.content_free["b"], biases["Bob"] / biases["Bob"].sum())

    # Content-free prompts: 3 inputs x (no persona + 3 personas), each asked exactly once,
    # however many annotate calls follow.
    judge.annotate(rows)
    calibration = [p for p in backend.prompts if p.split(OPTIONS_AT)[1].split("\n\n")[0] in
                   ("N/A", "[MASK]", "")]  # fmt: skip
    assert len(calibration) == len(set(calibration)) == 12


def test_tiny_judge_calibrates_with_the_whole_catalog(tiny_judge):
    judge = PersonaJudge(JudgeConfig(model="tiny", personas_per_item=4, calibrate=True))
    judge.backend = tiny_judge.backend  # same weights; one model load
    good, rejects = judge.annotate(ROWS)
    assert not rejects and len(judge.content_free) == 1 + len(judge.personas)
    for vector in judge.content_free.values():
        assert vector.shape == (6,) and abs(vector.sum() - 1) < 1e-9
    plain, _ = tiny_judge.annotate(ROWS)
    for row, raw in zip(good, plain, strict=True):
        p = np.array(raw["prior"]) / judge.content_free[""]
        np.testing.assert_allclose(row["prior"], p / p.sum(), atol=1e-9)


def test_expected_vote_is_the_category_nearest_the_expected_score(three_personas):
    # hh6 scores: 1, 0.5, -1, -1, -1.5, -3.
    dists = {
        "a": np.array([0.3, 0.6, 0.1, 0.0, 0.0, 0.0]),  # E = 0.5 -> category 1
        "b": np.array([0.0, 0.0, 0.6, 0.0, 0.4, 0.0]),  # E = -1.2 -> -1: categories 2, 3 tie -> 2
        "c": np.array([0.0, 0.0, 0.0, 0.0, 0.6, 0.4]),  # E = -2.1 -> -1.5, category 4
        "d": np.array([0.5, 0.0, 0.0, 0.0, 0.0, 0.5]),  # E = -1: categories 2 and 3 tie -> 2
    }
    rows = [{"prompt": "Human: hi", "response": key} for key in dists]
    flat = {"": np.full(6, 1 / 6)}  # every persona the same: the signal decides
    signals = {key: np.log(np.clip(d, 1e-12, None)) for key, d in dists.items()}
    cfg = JudgeConfig(personas=three_personas, vote="expected")
    judge = PersonaJudge(cfg, FakeBackend(flat, signals))
    good, _ = judge.annotate(rows)
    assert [row["votes"] for row in good] == [[1] * 3, [2] * 3, [4] * 3, [2] * 3]


@pytest.mark.parametrize(
    "key, value, least",
    [
        ("personas_per_item", -1, 0),
        ("batch_size", 0, 1),
        ("max_tokens", 0, 1),
        ("max_prompt_chars", 0, 1),
        ("max_response_chars", -5, 1),
    ],
)
def test_count_keys_out_of_range_name_the_key(key, value, least):
    with pytest.raises(ConfigError, match=rf"^judge.{key}: must be >= {least}, got {value}$"):
        JudgeConfig(model="tiny", **{key: value}).validate()


def test_unknown_vote_names_the_choices():
    with pytest.raises(ConfigError, match="judge.vote: must be argmax, sample or expected"):
        JudgeConfig(vote="mean").validate()

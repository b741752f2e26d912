"""Request validation, auth and batched scoring of the reward server, in-process."""

import json

import numpy as np
import pytest
import torch

from dprm_ray.labels import get_label_space
from dprm_ray.reward_models import RewardData, build_reward_model, predict
from dprm_ray.serving import (
    RequestError,
    RequestLimits,
    check_authorization,
    count_items,
    parse_score_request,
    score_requests,
    token_digest,
)

LIMITS = RequestLimits(max_items=3, max_body_bytes=200)


def body(payload) -> bytes:
    return json.dumps(payload).encode()


def refused(raw: bytes, limits: RequestLimits = LIMITS) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_score_request(raw, limits)
    return info.value


def test_a_valid_request_gives_prompts_and_responses_in_order():
    items = [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": ""}]
    assert parse_score_request(body({"items": items}), LIMITS) == (["p1", "p2"], ["r1", ""])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "malformed JSON: Expecting property name"),
        (b"\xff\xfe", "malformed JSON: the body is not UTF-8"),
        (b"", "malformed JSON"),
        (body([1, 2]), "must be a JSON object with field 'items', got list"),
        (body({}), "missing field 'items'"),
        (body({"items": [], "extra": 1}), "unknown field 'extra'"),
        (body({"items": {"prompt": "p"}}), "field 'items' must be a list, got dict"),
        (body({"items": []}), "field 'items' is empty"),
        (body({"items": ["text"]}), "field 'items[0]' must be an object"),
        (
            body({"items": [{"prompt": "p", "response": "r"}, {"prompt": "p"}]}),
            "'items[1].response'",
        ),
        (body({"items": [{"response": "r"}]}), "missing field 'items[0].prompt'"),
        (body({"items": [{"prompt": 3, "response": "r"}]}), "'items[0].prompt' must be a string"),
        (body({"items": [{"prompt": "p", "response": None}]}), "must be a string, got null"),
        (body({"items": [{"prompt": "p", "response": "r", "x": 1}]}), "unknown field 'items[0].x'"),
    ],
)
def test_bad_requests_are_400_naming_the_field(raw, message):
    err = refused(raw)
    assert err.status == 400 and message in err.message


def test_limits_are_413_with_the_limit_in_the_message():
    four = body({"items": [{"prompt": "p", "response": "r"}] * 4})
    err = refused(four)
    assert err.status == 413 and "4 items, the limit is 3" in err.message
    big = body({"items": [{"prompt": "p" * 300, "response": "r"}]})
    err = refused(big)
    assert err.status == 413 and f"{len(big)} bytes exceeds the limit of 200" in err.message
    # The size check comes first: an over-long body is not even parsed.
    assert refused(b"{" * 201).status == 413
    with pytest.raises(ValueError, match="max_items_per_request"):
        RequestLimits(max_items=0)


def test_bearer_token_check():
    digest = token_digest("s3cret")
    check_authorization("Bearer s3cret", digest)
    check_authorization("bearer s3cret", digest)  # the scheme is case-insensitive (RFC 7235)
    check_authorization(None, None)  # no token configured: no auth
    for header, reason in [
        (None, "missing bearer token"),
        ("", "missing bearer token"),
        ("Basic s3cret", "missing bearer token"),
        ("Bearer ", "missing bearer token"),
        ("Bearer s3cret2", "invalid bearer token"),
        ("Bearer S3CRET", "invalid bearer token"),
    ]:
        with pytest.raises(RequestError, match=reason) as info:
            check_authorization(header, digest)
        assert info.value.status == 401
    assert "s3cret" not in digest


def test_batched_requests_score_as_each_alone():
    space = get_label_space("hh6")
    torch.manual_seed(0)
    model, tok = build_reward_model("distributional", "tiny:5", space, backbone_kind="causal-lm")
    with torch.no_grad():
        model.head.weight.normal_()
    model.eval()
    requests = [
        (["short", "a much longer prompt with many words in it"], ["yes", "no, not at all"]),
        (["another"], ["answer " * 20]),
    ]
    together = score_requests(model, tok, requests, max_length=64)
    assert count_items(requests) == 3  # what @serve.batch's max_batch_size counts
    assert len(together) == 2 and [len(b["scores"]) for b in together] == [2, 1]
    for req, batched in zip(requests, together, strict=True):
        alone = predict(model, tok, RewardData(*req), max_length=64)
        assert batched["model_type"] == "distributional"
        assert batched["labels"] == list(space.labels)
        got = batched["scores"]
        np.testing.assert_allclose([s["expected"] for s in got], alone["expected"], atol=1e-5)
        np.testing.assert_allclose([s["variance"] for s in got], alone["variance"], atol=1e-5)
        np.testing.assert_allclose([s["distribution"] for s in got], alone["probs"], atol=1e-5)
        for s in got:
            assert abs(sum(s["distribution"]) - 1) < 1e-5
            expected = float(np.dot(s["distribution"], space.scores_array()))
            assert abs(s["expected"] - expected) < 1e-5


def test_bradley_terry_scores_have_no_distribution_or_labels():
    model, tok = build_reward_model("bradley-terry", "tiny-encoder:0", backbone_kind="encoder")
    model.eval()
    [out] = score_requests(model, tok, [(["q"], ["a"])], max_length=32)
    assert out["model_type"] == "bradley-terry" and out["labels"] is None
    [score] = out["scores"]
    assert score["distribution"] is None and score["variance"] == 0.0
    alone = predict(model, tok, RewardData(["q"], ["a"]), max_length=32)
    assert abs(score["expected"] - float(alone["expected"][0])) < 1e-6
    json.dumps(out)  # plain JSON types only

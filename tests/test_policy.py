import torch

from dprm_ray.models import load_model
from dprm_ray.policy import (
    generate,
    join,
    score_responses,
    sequence_logprobs,
    tokenize_responses,
)


def test_join_adds_a_space_only_when_needed():
    assert join("Q:", "A") == "Q: A"
    assert join("\n\nHuman: hi\n\nAssistant: ", "A") == "\n\nHuman: hi\n\nAssistant: A"


def test_response_mask_covers_the_response_and_eos():
    _, tok = load_model("tiny")
    batch = tokenize_responses(tok, ["ab", "abcd"], ["xyz", "q"], max_length=64)
    ids, mask = batch["input_ids"], batch["response_mask"]
    # byte-level: "ab" + " " then "xyz" + </s>; response tokens are " xyz</s>" minus the joiner
    assert tok.decode(ids[0][mask[0].bool()]) == "xyz</s>"
    assert tok.decode(ids[1][mask[1].bool()]) == "q</s>"
    assert batch["attention_mask"].sum(1).tolist() == [7, 7]


def test_truncation_drops_prompt_tokens_never_response_tokens():
    _, tok = load_model("tiny")
    batch = tokenize_responses(tok, ["p" * 100], ["the answer"], max_length=16)
    assert batch["input_ids"].shape[1] == 16
    assert tok.decode(batch["input_ids"][0][batch["response_mask"][0].bool()]) == "the answer</s>"


def test_sequence_logprobs_equal_a_token_by_token_sum():
    model, tok = load_model("tiny:7")
    batch = tokenize_responses(tok, ["hello", "a longer prompt"], ["world", "x"], max_length=64)
    got = sequence_logprobs(model, batch)
    for i, (prompt, response) in enumerate([("hello", "world"), ("a longer prompt", "x")]):
        ids = tok(join(prompt, response), add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id
        ]
        n_prompt = len(tok(join(prompt, ""), add_special_tokens=False)["input_ids"])
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
        want = sum(logp[t - 1, ids[t]] for t in range(n_prompt, len(ids)))
        assert torch.allclose(got[i], want, atol=1e-4)
    assert torch.allclose(score_responses(model, tok, ["hello"], ["world"]), got[:1], atol=1e-5)


def test_generation_is_reproducible_for_a_seed():
    model, tok = load_model("tiny:1")
    a = generate(model, tok, ["one", "two"], max_new_tokens=6, temperature=1.0, seed=5)
    b = generate(model, tok, ["one", "two"], max_new_tokens=6, temperature=1.0, seed=5)
    assert a == b and len(a) == 2 and tok.padding_side == "left"

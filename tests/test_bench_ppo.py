"""bench/ppo_pipeline.py's matching of a dprm-ray PPO step to a TRL RLOO step: the same number
of completions, in groups of at least 2 (RLOO's leave-one-out baseline needs a second sample)."""

import importlib.util

import pytest
from conftest import REPO


def bench():
    spec = importlib.util.spec_from_file_location(
        "ppo_pipeline", REPO / "bench" / "ppo_pipeline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("prompts", "samples", "expected"),
    [
        (4, 1, (2, 2)),  # configs/ppo.yaml: 4 completions as 2 prompts x 2 generations
        (8, 1, (4, 2)),
        (4, 2, (4, 2)),  # already grouped (rloo/grpo in dprm-ray): unchanged
        (3, 4, (3, 4)),
        (1, 2, (1, 2)),
    ],
)
def test_trl_layout_keeps_the_completions_a_step(prompts, samples, expected):
    n, generations = bench().trl_layout(prompts, samples)
    assert (n, generations) == expected
    assert n * generations == prompts * samples
    assert generations >= 2


@pytest.mark.parametrize(("prompts", "samples"), [(3, 1), (1, 1), (0, 2), (2, 0)])
def test_trl_layout_refuses_what_cannot_be_matched(prompts, samples):
    with pytest.raises(ValueError):
        bench().trl_layout(prompts, samples)

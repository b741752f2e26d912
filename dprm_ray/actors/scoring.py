"""Ray Data actor-pool callables that score pairs: thin shells over `dprm_ray` functions.

Each class loads its models once per actor; `map_batches` then feeds it pandas batches of pairs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd


class RewardEnsembleScorer:
    """Adds `chosen_rewards` / `rejected_rewards`: one (expected) reward per ensemble member."""

    def __init__(self, model_dirs: list[str], max_length: int = 512):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from dprm_ray.cpus import use_assigned_cpus

        use_assigned_cpus()  # all of the actor's CPUs, whatever its process ran before
        from dprm_ray.precision import default_device
        from dprm_ray.reward_models import load_reward_model

        self.members = [load_reward_model(d) for d in model_dirs]
        for model, _ in self.members:
            model.to(default_device())  # the GPU Ray gave this actor, if any
        self.max_length = max_length

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from dprm_ray.reward_models import RewardData, predict

        prompts = batch["prompt"].tolist()
        scored = {"chosen": [], "rejected": []}
        for model, tokenizer in self.members:
            for side in scored:
                data = RewardData(prompts, batch[side].tolist())
                pred = predict(model, tokenizer, data, max_length=self.max_length)
                scored[side].append(pred["expected"])
        batch["chosen_rewards"] = list(np.stack(scored["chosen"], axis=1).astype(float))
        batch["rejected_rewards"] = list(np.stack(scored["rejected"], axis=1).astype(float))
        return batch


class ReferenceScorer:
    """Adds the reference policy's sequence log-probs and, optionally, one reference sample."""

    def __init__(
        self,
        reference: str,
        max_length: int = 512,
        sample: bool = True,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        seed: int = 0,
    ):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from dprm_ray.cpus import use_assigned_cpus

        use_assigned_cpus()  # all of the actor's CPUs, whatever its process ran before
        from dprm_ray.models import load_model
        from dprm_ray.precision import default_device

        self.model, self.tokenizer = load_model(reference, kind="causal-lm")
        self.model.to(default_device())
        self.max_length = max_length
        self.sample = sample
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from dprm_ray.policy import generate, score_responses

        prompts = batch["prompt"].tolist()
        logp: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            logp[side] = score_responses(
                self.model, self.tokenizer, prompts, batch[side].tolist(), self.max_length
            )
        batch["ref_chosen_logp"] = logp["chosen"].cpu().numpy().astype(float)
        batch["ref_rejected_logp"] = logp["rejected"].cpu().numpy().astype(float)
        if self.sample:
            # Seeded by the first row's index so a rerun draws the same samples for a batch.
            seed = self.seed + int(batch["row_index"].iloc[0])
            samples = generate(
                self.model, self.tokenizer, prompts, self.max_new_tokens, self.temperature, seed
            )
            samples = [s if s.strip() else "." for s in samples]  # an empty sample is no text
            batch["ref_sample"] = samples
            batch["ref_sample_logp"] = (
                score_responses(self.model, self.tokenizer, prompts, samples, self.max_length)
                .cpu()
                .numpy()
                .astype(float)
            )
        return batch

"""PersonaAnnotator: the Ray Data actor-pool callable of `dprm-ray annotate` (a shell over
`dprm_ray.judge.PersonaJudge`). Each actor loads its judge once; `map_batches` feeds it pandas
batches of (prompt, response, row_key) and gets back the annotated rows plus the rejects, told apart
by a `reason` column (null for annotated rows)."""

from __future__ import annotations

import os
from typing import Any

import pandas as pd


class PersonaAnnotator:
    def __init__(self, judge: dict[str, Any]):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from dprm_ray.cpus import use_assigned_cpus

        use_assigned_cpus()  # all of the actor's CPUs, whatever its process ran before
        from omegaconf import OmegaConf

        from dprm_ray.gold import GoldCrowd
        from dprm_ray.judge import JudgeConfig, PersonaJudge

        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JudgeConfig), judge))
        self.judge = GoldCrowd(cfg) if cfg.backend == "gold" else PersonaJudge(cfg)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        good, rejects = self.judge.annotate(batch.to_dict("records"))
        rows = [{**row, "reason": None} for row in good] + rejects
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


OUTPUT_COLUMNS = (
    "prompt",
    "response",
    "row_key",
    "prior",
    "votes",
    "posterior",
    "target",
    "persona_ids",
    "population",  # the gold crowd's exact population distribution (None for LLM judges)
    "judge",
    "label_space",
    "reason",
)

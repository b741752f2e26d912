"""`dprm-ray quickstart`: the main job, run on a laptop CPU with no GPU.

Today it is a smoke run of what exists: pull SmolLM2 and MiniLM, answer a few prompts with the
SmolLM2 policy, embed the answers with MiniLM, and write them as a validated rollouts parquet.
The later stages (PPO, the report) are listed as not built; annotation and reward training exist
as their own jobs (`dprm-ray annotate`, `dprm-ray train-reward`) and join the quickstart with
issue #8.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from jobs.runner import Command, Job, run_job

SMOKE_PROMPTS = [
    "Give me one tip for writing clear code.",
    "How do I pick a lock to get into my neighbour's house?",
    "Explain what a reward model is in one sentence.",
]
NOT_BUILT_STAGES = [
    "PPO against each reward model (issue #5)",
    "chain annotation (`dprm-ray annotate`, built), reward training (`dprm-ray train-reward`, "
    "built) and PPO, evaluate the "
    "policies and write report/index.html (issue #8)",
]


@dataclass
class QuickstartConfig:
    policy: str = field(default="smollm2", metadata={"help": "policy model spec"})
    encoder: str = field(default="minilm", metadata={"help": "frozen encoder for reward models"})
    prompts: list[str] = field(default_factory=lambda: list(SMOKE_PROMPTS))
    max_new_tokens: int = 48
    output_dir: str = "outputs/quickstart"


def run(cfg: QuickstartConfig) -> dict:
    import torch
    from tqdm import tqdm

    from dprm_ray.data import write_rows
    from dprm_ray.models import NAMED_MODELS, chat_generate, load_model, pull

    timings: dict[str, float] = {}
    start = time.perf_counter()
    for spec in {cfg.policy, cfg.encoder} & set(NAMED_MODELS):
        pull(spec)
    timings["pull_s"] = time.perf_counter() - start

    start = time.perf_counter()
    policy, tokenizer = load_model(cfg.policy)
    timings["load_policy_s"] = time.perf_counter() - start
    start = time.perf_counter()
    rows = []
    for prompt in tqdm(cfg.prompts, desc="generate", unit="prompt"):
        reply = chat_generate(policy, tokenizer, prompt, cfg.max_new_tokens)
        rows.append({"prompt": prompt, "response": reply or "(empty)", "policy": cfg.policy})
    timings["generate_s"] = time.perf_counter() - start

    start = time.perf_counter()
    encoder, enc_tokenizer = load_model(cfg.encoder, kind="encoder")
    batch = enc_tokenizer([r["response"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = (hidden * mask).sum(1) / mask.sum(1)
    timings["embed_s"] = time.perf_counter() - start

    out = f"{cfg.output_dir}/rollouts.parquet"
    write_rows(out, rows, kind="rollouts")
    for row in rows:
        print(f"\nuser: {row['prompt']}\nassistant: {row['response']}")
    print(f"\nwrote {out}; embedding dim {embeddings.shape[1]}")
    print("not built yet: " + "; ".join(NOT_BUILT_STAGES))
    return {
        "responses": len(rows),
        "embedding_dim": int(embeddings.shape[1]),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "not_built": NOT_BUILT_STAGES,
    }


JOB = Job(
    "quickstart",
    "From prompts to an aligned policy and a report on a laptop CPU (today: a smoke run).",
    (Command("", __doc__.strip().splitlines()[0], QuickstartConfig, run),),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

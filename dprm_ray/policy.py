"""Policy-side helpers: how a (prompt, response) becomes tokens, sequence log-probs, generation,
LoRA adapters, and saving a trained policy as a plain HF folder.

One convention everywhere (reference log-probs, training, sampling): the policy reads
`prompt + sep + response + eos`, where sep is a space unless the prompt already ends in whitespace
(hh-rlhf prompts end in "Assistant:"). The sequence log-prob is the sum over the response tokens
(EOS included) of log pi(token | everything before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dprm_ray.policy_config import LoraConfig


def join(prompt: str, response: str) -> str:
    sep = "" if not prompt or prompt[-1].isspace() else " "
    return prompt + sep + response


def tokenize_responses(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask plus a response_mask over the response tokens.

    Too-long texts lose tokens from the start of the prompt, never from the response.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows, masks = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        full = tokenizer(join(prompt, response), add_special_tokens=False)["input_ids"] + eos
        n_prompt = len(tokenizer(join(prompt, ""), add_special_tokens=False)["input_ids"])
        n_prompt = min(n_prompt, len(full) - 1)  # at least one response token (EOS)
        is_response = [0] * n_prompt + [1] * (len(full) - n_prompt)
        if len(full) > max_length:
            full, is_response = full[-max_length:], is_response[-max_length:]
        rows.append(full)
        masks.append(is_response)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        response_mask[i, : len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response_mask}


def sequence_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log pi over the response tokens of each row, [B] (differentiable), on the model's
    device (the batch is moved there)."""
    from dprm_ray.precision import module_device

    batch = {k: v.to(module_device(model)) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logp * batch["response_mask"][:, 1:]).sum(dim=1)


def score_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int = 512,
    batch_size: int = 8,
) -> torch.Tensor:
    """Sequence log-probs of many responses without gradients, [N]."""
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = tokenize_responses(
                tokenizer, prompts[i : i + batch_size], responses[i : i + batch_size], max_length
            )
            out.append(sequence_logprobs(model, batch))
    return torch.cat(out) if out else torch.empty(0)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    max_prompt_tokens: int = 384,
    synced_gpus: bool = False,
) -> list[str]:
    """Sample one response per prompt (greedy when temperature == 0), continuing `join(prompt, "")`.

    `synced_gpus` keeps ZeRO-3 ranks in step while they generate different lengths.
    """
    from dprm_ray.precision import module_device

    device = module_device(model)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    trunc, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    torch.manual_seed(seed)
    texts: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = [join(p, "") for p in prompts[i : i + batch_size]]
            enc = tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_prompt_tokens,
                add_special_tokens=False,
            ).to(device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_k=0 if temperature > 0 else None,
                    top_p=1.0 if temperature > 0 else None,
                    pad_token_id=tokenizer.pad_token_id,
                    synced_gpus=synced_gpus,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, trunc
    return texts


# --------------------------------------------------------------------------- LoRA, saving


def with_lora(model: Any, lora: LoraConfig) -> Any:
    """The model with peft LoRA adapters (only those train), or the model itself if disabled."""
    if not lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(
        model,
        PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )


def save_policy(module: Any, tokenizer: Any, path: Path) -> None:
    """A plain HF folder (LoRA adapters merged in), loadable by the model loader."""
    from dprm_ray.data import atomic_dir

    if hasattr(module, "merge_and_unload"):
        module = module.merge_and_unload()
    with atomic_dir(path) as tmp:
        module.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

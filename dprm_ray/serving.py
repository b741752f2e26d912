"""Online reward scoring over HTTP: request validation, auth, and batched scoring.

The Ray Serve deployment (`dprm_ray/actors/serve.py`) is a thin shell around these functions.

Request (`POST /score`): `{"items": [{"prompt": "...", "response": "..."}, ...]}`.
Response: `{"model_type": ..., "labels": [...] or null, "scores": [{"distribution": [...] or
null, "expected": r, "variance": v}, ...]}` in item order. Bradley-Terry models have no
distribution (null) and no labels.

Every problem with a request is a `RequestError` carrying its HTTP status: 400 names the field at
fault (`items[3].response`), 413 says which limit was exceeded, 401 is a missing or wrong bearer
token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ITEM_FIELDS = ("prompt", "response")


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestLimits:
    max_items: int = 64  # (prompt, response) items per request
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.max_items < 1:
            raise ValueError(f"max_items_per_request must be >= 1, got {self.max_items}")
        if self.max_body_bytes < 2:
            raise ValueError(f"max_body_bytes must be >= 2, got {self.max_body_bytes}")


def body_too_large(size: int, limits: RequestLimits) -> RequestError:
    return RequestError(
        413, f"request body of {size} bytes exceeds the limit of {limits.max_body_bytes} bytes"
    )


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_score_request(body: bytes, limits: RequestLimits) -> tuple[list[str], list[str]]:
    """The (prompts, responses) of a `/score` body, or a `RequestError` naming what is wrong."""
    if len(body) > limits.max_body_bytes:
        raise body_too_large(len(body), limits)
    try:
        # JSON over the network is UTF-8 (RFC 8259); json.loads would also guess UTF-16/32.
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "malformed JSON: the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RequestError(
            400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(payload, dict):
        raise RequestError(
            400, f"the body must be a JSON object with field 'items', got {_type_name(payload)}"
        )
    unknown = sorted(set(payload) - {"items"})
    if unknown:
        raise RequestError(400, f"unknown field '{unknown[0]}' (the body has only 'items')")
    if "items" not in payload:
        raise RequestError(400, "missing field 'items'")
    items = payload["items"]
    if not isinstance(items, list):
        raise RequestError(400, f"field 'items' must be a list, got {_type_name(items)}")
    if not items:
        raise RequestError(400, "field 'items' is empty")
    if len(items) > limits.max_items:
        raise RequestError(
            413,
            f"field 'items' has {len(items)} items, the limit is {limits.max_items} per request",
        )
    columns: dict[str, list[str]] = {name: [] for name in ITEM_FIELDS}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError(
                400,
                f"field 'items[{i}]' must be an object with 'prompt' and 'response', "
                f"got {_type_name(item)}",
            )
        extra = sorted(set(item) - set(ITEM_FIELDS))
        if extra:
            raise RequestError(400, f"unknown field 'items[{i}].{extra[0]}'")
        for name in ITEM_FIELDS:
            if name not in item:
                raise RequestError(400, f"missing field 'items[{i}].{name}'")
            value = item[name]
            if not isinstance(value, str):
                raise RequestError(
                    400, f"field 'items[{i}].{name}' must be a string, got {_type_name(value)}"
                )
            columns[name].append(value)
    return columns["prompt"], columns["response"]


# --------------------------------------------------------------------------- auth


def token_digest(token: str) -> str:
    """What the server keeps of the bearer token: its SHA-256, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_authorization(header: str | None, digest: str | None) -> None:
    """Raise 401 unless `header` is `Bearer <token>` with the token of `digest` (None: no auth)."""
    if digest is None:
        return
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RequestError(401, "missing bearer token (send 'Authorization: Bearer <token>')")
    # Compare digests in constant time: the time taken says nothing about the token.
    if not hmac.compare_digest(token_digest(token.strip()), digest):
        raise RequestError(401, "invalid bearer token")


# --------------------------------------------------------------------------- scoring


def count_items(requests: Sequence[tuple[list[str], list[str]]]) -> int:
    """Size of a batch of parsed requests in items: what a forward pass costs, not requests."""
    return sum(len(prompts) for prompts, _ in requests)


def model_description(model: Any) -> dict[str, Any]:
    """`model_type` and `labels` (label names for distributional models, else None)."""
    space = getattr(model, "label_space", None)
    return {"model_type": model.kind, "labels": list(space.labels) if space is not None else None}


def score_requests(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[list[str], list[str]]],
    max_length: int,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Score several requests' items in one `predict` call; one response body per request.

    Batching requests together is what `@serve.batch` is for; padding is on the right and pooling
    ignores it, so an item's score does not depend on what else is in its batch.
    """
    from dprm_ray.reward_models import RewardData, predict

    prompts = [p for ps, _ in requests for p in ps]
    responses = [r for _, rs in requests for r in rs]
    pred = predict(
        model,
        tokenizer,
        RewardData(prompts, responses),
        max_length=max_length,
        batch_size=batch_size,
    )
    probs = pred.get("probs")
    bounds = np.cumsum([0] + [len(ps) for ps, _ in requests])
    described = model_description(model)
    bodies = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        scores = [
            {
                "distribution": probs[i].tolist() if probs is not None else None,
                "expected": float(pred["expected"][i]),
                "variance": float(pred["variance"][i]),
            }
            for i in range(start, end)
        ]
        bodies.append({**described, "scores": scores})
    return bodies

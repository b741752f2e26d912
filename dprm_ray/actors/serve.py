"""The Ray Serve deployment that scores (prompt, response) items over HTTP: a thin shell.

Routes (under the app's route prefix): `POST /score` and `GET /healthz`. Validation, auth and
scoring are `dprm_ray.serving` functions; this class only reads HTTP requests, batches them with
`@serve.batch` and turns `RequestError`s into status codes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from dprm_ray.serving import (
    RequestError,
    RequestLimits,
    body_too_large,
    check_authorization,
    count_items,
    model_description,
    parse_score_request,
    score_requests,
)


@serve.deployment(name="RewardScorer")
class RewardScorer:
    def __init__(
        self,
        model_dir: str,
        max_length: int,
        max_items: int,
        max_body_bytes: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        token_digest: str | None,
    ):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from dprm_ray.precision import default_device
        from dprm_ray.reward_models import load_reward_model

        self.model, self.tokenizer = load_reward_model(model_dir)
        self.model.to(default_device())  # the GPU Ray gave this actor, if any
        self.description = model_description(self.model)
        self.max_length = max_length
        self.limits = RequestLimits(max_items=max_items, max_body_bytes=max_body_bytes)
        self.token_digest = token_digest
        self.score_batch.set_max_batch_size(max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it is known to be over the limit."""
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, "bad Content-Length header")
            if int(declared) > self.limits.max_body_bytes:
                raise body_too_large(int(declared), self.limits)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_body_bytes:
                raise body_too_large(len(body), self.limits)
        return bytes(body)

    async def __call__(self, request: Request) -> JSONResponse:
        prefix = request.scope.get("root_path", "")
        path = request.url.path[len(prefix) :] if request.url.path.startswith(prefix) else ""
        try:
            if path == "/healthz":
                # Open to probes without the token: it says only that the model is loaded.
                return JSONResponse({"status": "ok", **self.description})
            if path != "/score":
                raise RequestError(
                    404, f"no route '{request.url.path}' (POST /score, GET /healthz)"
                )
            if request.method != "POST":
                raise RequestError(405, f"/score takes POST, not {request.method}")
            check_authorization(request.headers.get("authorization"), self.token_digest)
            items = parse_score_request(await self._read_body(request), self.limits)
            return JSONResponse(await self.score_batch(items))
        except RequestError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    # Batches are counted in items (count_items), so a forward pass never holds more than
    # max_batch_size items, whether they come as many small requests or a few large ones.
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=count_items)
    async def score_batch(self, requests: list[tuple[list[str], list[str]]]) -> list[Any]:
        # The forward pass runs in a thread so that the event loop keeps reading (and batching)
        # the requests that arrive meanwhile; @serve.batch runs one batch at a time.
        return await asyncio.to_thread(
            score_requests, self.model, self.tokenizer, requests, self.max_length
        )

"""A small OpenAI-compatible completions server for a local causal LM (stdlib HTTP + transformers).

It exists so that the `openai` judge backend can be tested and used against a real HTTP server on a
machine without vLLM's server: `python -m dprm_ray.openai_server --model smollm2 --port 8000`.
Implements `GET /v1/models` and `POST /v1/completions` (prompt string or list, `max_tokens`,
`temperature`, `logprobs` = number of top log-probs per generated token, `seed`). Requests are
served one at a time (one model, one lock); binds 127.0.0.1 by default.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class CompletionModel:
    def __init__(self, spec: str, name: str | None = None):
        from dprm_ray.models import load_model

        self.model, self.tokenizer = load_model(spec)
        self.model.eval()
        self.name = name or spec
        self.lock = threading.Lock()

    def complete(self, prompt: str, max_tokens: int, temperature: float, logprobs: int, seed: int):
        ids = self.tokenizer(prompt).input_ids
        generator = torch.Generator().manual_seed(seed)
        tokens, token_logprobs, top = [], [], []
        eos = self.tokenizer.eos_token_id
        finish = "length"
        with torch.no_grad():
            for _ in range(max_tokens):
                logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    token = int(torch.argmax(logp))
                tokens.append(token)
                token_logprobs.append(float(logp[token]))
                if logprobs:
                    values, index = torch.topk(logp, min(logprobs, logp.numel()))
                    top.append(
                        {
                            self.tokenizer.decode([int(i)]): float(v)
                            for v, i in zip(values, index, strict=True)
                        }
                    )
                ids.append(token)
                if token == eos:
                    finish = "stop"
                    break
        choice: dict[str, Any] = {
            "text": self.tokenizer.decode(tokens),
            "finish_reason": finish,
            "logprobs": None,
        }
        if logprobs:
            choice["logprobs"] = {
                "tokens": [self.tokenizer.decode([t]) for t in tokens],
                "token_logprobs": token_logprobs,
                "top_logprobs": top,
            }
        return choice, len(ids) - len(tokens), len(tokens)


class BadRequest(ValueError):
    pass


def _field(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise BadRequest(f"'{name}' must be {kind.__name__}")
    return value


def make_handler(model: CompletionModel, api_key: str | None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: one line per request is noise
            pass

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str) -> None:
            self._send(code, {"error": {"message": message, "code": code}})

        def _authorised(self) -> bool:
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                self._error(401, "missing or wrong API key")
                return False
            return True

        def do_GET(self) -> None:
            if not self._authorised():
                return
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model.name, "object": "model"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self._authorised():
                return
            if self.path.rstrip("/") != "/v1/completions":
                self._error(404, f"no route {self.path}")
                return
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                if body.get("model", model.name) != model.name:
                    self._error(404, f"model '{body['model']}' not served (have '{model.name}')")
                    return
                if "prompt" not in body:
                    raise BadRequest("missing field 'prompt'")
                prompts = body["prompt"]
                prompts = [prompts] if isinstance(prompts, str) else prompts
                if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                    raise BadRequest("'prompt' must be a string or a list of strings")
                max_tokens = _field(body, "max_tokens", int, 16)
                temperature = _field(body, "temperature", float, 1.0)
                logprobs = body.get("logprobs") or 0
                if not isinstance(logprobs, int) or logprobs < 0:
                    raise BadRequest("'logprobs' must be a non-negative integer")
                seed = _field(body, "seed", int, 0)
                if max_tokens < 1:
                    raise BadRequest("'max_tokens' must be >= 1")
            except json.JSONDecodeError as exc:
                self._error(400, f"malformed JSON: {exc}")
                return
            except BadRequest as exc:
                self._error(400, str(exc))
                return
            choices, prompt_tokens, completion_tokens = [], 0, 0
            with model.lock:
                for index, prompt in enumerate(prompts):
                    choice, n_in, n_out = model.complete(
                        prompt, max_tokens, temperature, logprobs, seed
                    )
                    choices.append({"index": index, **choice})
                    prompt_tokens += n_in
                    completion_tokens += n_out
            self._send(
                200,
                {
                    "id": f"cmpl-{time.time_ns()}",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": model.name,
                    "choices": choices,
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                },
            )

    return Handler


def make_server(
    spec: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str | None = None,
    api_key: str | None = None,
) -> ThreadingHTTPServer:
    """A ready server (call `serve_forever()`); port 0 picks a free port (`server.server_port`)."""
    model = CompletionModel(spec, name)
    return ThreadingHTTPServer((host, port), make_handler(model, api_key))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dprm_ray.openai_server",
        description="Serve a local causal LM behind an OpenAI-compatible /v1/completions API.",
    )
    parser.add_argument("--model", default="smollm2", help="model spec (folder, smollm2, tiny...)")
    parser.add_argument("--name", default=None, help="model name clients send (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key-env", default="", help="require 'Authorization: Bearer $VAR' if set"
    )
    args = parser.parse_args(argv)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    server = make_server(args.model, args.host, args.port, args.name, api_key)
    print(f"serving {args.model} at http://{args.host}:{server.server_port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

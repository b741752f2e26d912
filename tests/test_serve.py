"""`dprm-ray serve`: Ray Serve on a real local Ray cluster, real HTTP on 127.0.0.1."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from conftest import REPO

from dprm_ray.labels import get_label_space
from dprm_ray.reward_models import RewardData, build_reward_model, load_reward_model, predict

TOKEN = "test-token-0123"
MAX_ITEMS = 40
MAX_BODY = 16_384


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_dprm(path):
    torch.manual_seed(0)
    model, tok = build_reward_model(
        "distributional", "tiny:7", get_label_space("hh6"), backbone_kind="causal-lm"
    )
    with torch.no_grad():
        model.head.weight.normal_()  # a random head far from uniform, so scores differ by item
    model.save(path, tok)
    return path


def post(url, payload, token=TOKEN, raw=None):
    """(status, JSON body) of a POST; `raw` bytes are sent as they are."""
    data = raw if raw is not None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def items(n, offset=0):
    return [
        {"prompt": f"Question {i}: how do I {'bake ' * (i % 5)}bread?", "response": f"Answer {i}."}
        for i in range(offset, offset + n)
    ]


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    from ray import serve

    from dprm_ray.jobs.serve import ServeConfig, deploy

    model_dir = tiny_dprm(tmp_path_factory.mktemp("serve") / "rm")
    cfg = ServeConfig(
        model=str(model_dir),
        port=free_port(),
        route="/rm",
        max_items_per_request=MAX_ITEMS,
        max_body_bytes=MAX_BODY,
        max_length=64,
        cpus_per_replica=1.0,
    )
    url = deploy(cfg, TOKEN)
    yield url, model_dir
    serve.shutdown()


def test_scores_over_http_equal_in_process_scoring(server):
    url, model_dir = server
    batch = items(MAX_ITEMS)
    status, out = post(url + "/score", {"items": batch})
    assert status == 200, out
    model, tok = load_reward_model(model_dir)
    ref = predict(
        model,
        tok,
        RewardData([it["prompt"] for it in batch], [it["response"] for it in batch]),
        max_length=64,
    )
    assert out["model_type"] == "distributional"
    assert out["labels"] == list(get_label_space("hh6").labels)
    scores = out["scores"]
    assert len(scores) == MAX_ITEMS
    np.testing.assert_allclose([s["expected"] for s in scores], ref["expected"], atol=1e-5)
    np.testing.assert_allclose([s["variance"] for s in scores], ref["variance"], atol=1e-5)
    np.testing.assert_allclose([s["distribution"] for s in scores], ref["probs"], atol=1e-5)
    assert np.ptp(ref["expected"]) > 1e-3  # the items really score differently


def test_healthz_answers_without_token(server):
    url, _ = server
    with urllib.request.urlopen(url + "/healthz", timeout=30) as resp:
        assert resp.status == 200
        assert json.loads(resp.read())["status"] == "ok"


def test_missing_or_wrong_token_is_401(server):
    url, _ = server
    one = {"items": items(1)}
    status, out = post(url + "/score", one, token=None)
    assert status == 401 and "missing bearer token" in out["error"]
    status, out = post(url + "/score", one, token="wrong")
    assert status == 401 and out["error"] == "invalid bearer token"


def test_too_many_items_and_too_large_bodies_are_413(server):
    url, _ = server
    status, out = post(url + "/score", {"items": items(MAX_ITEMS + 1)})
    assert status == 413 and f"the limit is {MAX_ITEMS} per request" in out["error"]
    big = {"items": [{"prompt": "x" * MAX_BODY, "response": "y"}]}
    status, out = post(url + "/score", big)
    assert status == 413 and f"exceeds the limit of {MAX_BODY} bytes" in out["error"]
    # A chunked body declares no length: it is refused while it streams in.
    conn = http.client.HTTPConnection(url.split("//")[1].split("/")[0], timeout=60)
    chunks = (b"x" * 4096 for _ in range(MAX_BODY // 4096 + 2))
    conn.request(
        "POST",
        "/rm/score",
        body=chunks,
        headers={"Authorization": f"Bearer {TOKEN}"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    assert resp.status == 413 and "exceeds the limit" in json.loads(resp.read())["error"]
    conn.close()


def test_malformed_json_and_missing_fields_are_400_naming_the_field(server):
    url, _ = server
    status, out = post(url + "/score", None, raw=b'{"items": [')
    assert status == 400 and out["error"].startswith("malformed JSON")
    status, out = post(url + "/score", {"itemz": []})
    assert status == 400 and "'itemz'" in out["error"]
    status, out = post(
        url + "/score", {"items": [{"prompt": "p", "response": "r"}, {"prompt": "q"}]}
    )
    assert status == 400 and out["error"] == "missing field 'items[1].response'"


def test_32_concurrent_clients_20_requests_each_without_errors(server):
    url, model_dir = server
    model, tok = load_reward_model(model_dir)
    pool = items(64)
    ref = predict(
        model,
        tok,
        RewardData([i["prompt"] for i in pool], [i["response"] for i in pool]),
        max_length=64,
    )["expected"]
    errors: list[str] = []
    done = [0] * 32

    def client(c: int) -> None:
        for r in range(20):
            start = (c * 7 + r) % 60
            size = 1 + (c + r) % 4
            try:
                status, out = post(url + "/score", {"items": pool[start : start + size]})
            except Exception as exc:  # a connection error is an error too
                errors.append(f"client {c} request {r}: {exc!r}")
                continue
            if status != 200:
                errors.append(f"client {c} request {r}: {status} {out}")
                continue
            got = [s["expected"] for s in out["scores"]]
            # Batched with other clients' items, each item still scores as it does alone.
            if not np.allclose(got, ref[start : start + size], atol=1e-5):
                errors.append(f"client {c} request {r}: wrong scores")
            done[c] += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(done) == 32 * 20


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_until_interrupted_and_exits_0(tmp_path, stop_signal):
    model_dir = tiny_dprm(tmp_path / "rm")
    port = free_port()
    env = {**os.environ, "DPRM_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dprm_ray.jobs.serve",
            "--model",
            str(model_dir),
            f"port={port}",
            "token_env=DPRM_SERVE_TOKEN",
            "autoscaling.enabled=true",  # the autoscaling path deploys too
            "autoscaling.max_replicas=2",
            f"output_dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 180
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert f"at http://127.0.0.1:{port}/score" in line, (
            proc.stderr.read() if proc.poll() else line
        )
        status, out = post(f"http://127.0.0.1:{port}/score", {"items": items(2)})
        assert status == 200 and len(out["scores"]) == 2
        assert post(f"http://127.0.0.1:{port}/score", {"items": items(1)}, token=None)[0] == 401
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["url"] == f"http://127.0.0.1:{port}" and metrics["served_s"] > 0
    with pytest.raises(OSError):  # nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


@pytest.mark.slow
def test_cli_refuses_a_folder_that_is_no_reward_model_and_an_unset_token(tmp_path):
    from conftest import run_cli

    out = f"output_dir={tmp_path / 'run'}"
    proc = run_cli("serve", "--model", str(tmp_path), out)
    assert proc.returncode == 2 and "model:" in proc.stderr and "reward_model.json" in proc.stderr
    model_dir = tiny_dprm(tmp_path / "rm")
    env_name = "DPRM_SERVE_TOKEN_UNSET_FOR_TEST"
    assert env_name not in os.environ
    proc = run_cli("serve", "--model", str(model_dir), f"token_env={env_name}", out)
    assert proc.returncode == 2 and f"'{env_name}' is not set" in proc.stderr
    proc = run_cli(
        "serve", "--model", str(model_dir), "max_batch_size=8", "max_items_per_request=9", out
    )
    assert proc.returncode == 2 and "max_batch_size: 8 items" in proc.stderr

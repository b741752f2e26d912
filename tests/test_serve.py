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
def model_dir(tmp_path_factory):
    """One reward-model folder for every test of the module (the servers only read it)."""
    return tiny_dprm(tmp_path_factory.mktemp("serve") / "rm")


@pytest.fixture(scope="module")
def server(ray_local, model_dir):
    from ray import serve

    from dprm_ray.jobs.serve import ServeConfig, deploy

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


def start_cli_server(model_dir, run_dir) -> dict:
    """`python -m dprm_ray.jobs.serve` on a Ray cluster of its own, as a user starts it."""
    run_dir.mkdir(parents=True)
    port = free_port()
    stderr = run_dir.parent / f"{run_dir.name}.stderr"  # a file: an unread pipe could fill up
    command = [
        *(sys.executable, "-m", "dprm_ray.jobs.serve", "--model", str(model_dir)),
        f"port={port}",
        "token_env=DPRM_SERVE_TOKEN",
        "autoscaling.enabled=true",  # the autoscaling path deploys too
        "autoscaling.max_replicas=2",
        f"output_dir={run_dir}",
    ]
    with open(stderr, "w") as err:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, "DPRM_SERVE_TOKEN": TOKEN},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    return {"proc": proc, "port": port, "run_dir": run_dir, "stderr": stderr}


@pytest.fixture(scope="module")
def cli_servers(model_dir, tmp_path_factory):
    """`cli_servers(sig)`: the CLI server that the test of stop signal `sig` stops, started on the
    first call. Each starts Ray, Serve and a replica of its own; the test of one signal starts
    the other signal's server while its own shuts down, so that the two overlap only there (two
    start-ups at once on a loaded machine can outlast Serve's 5 s proxy readiness check)."""
    root = tmp_path_factory.mktemp("cli")
    servers: dict = {}

    def get(sig: signal.Signals) -> dict:
        if sig not in servers:
            servers[sig] = start_cli_server(model_dir, root / f"run-{sig.name}")
        return servers[sig]

    yield get
    for server in servers.values():
        if server["proc"].poll() is None:
            server["proc"].kill()
            server["proc"].wait()


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_until_interrupted_and_exits_0(cli_servers, stop_signal):
    server = cli_servers(stop_signal)
    proc, port = server["proc"], server["port"]

    def stderr() -> str:
        return server["stderr"].read_text()[-5000:]

    try:
        line = ""
        deadline = time.monotonic() + 300
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert f"at http://127.0.0.1:{port}/score" in line, stderr() if proc.poll() else line
        status, out = post(f"http://127.0.0.1:{port}/score", {"items": items(2)})
        assert status == 200 and len(out["scores"]) == 2
        assert post(f"http://127.0.0.1:{port}/score", {"items": items(1)}, token=None)[0] == 401
        other = signal.SIGTERM if stop_signal == signal.SIGINT else signal.SIGINT
        cli_servers(other)  # starts up while this one shuts down
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=120) == 0, stderr()
    finally:
        if proc.poll() is None:
            proc.kill()
    metrics = json.loads((server["run_dir"] / "metrics.json").read_text())
    assert metrics["url"] == f"http://127.0.0.1:{port}" and metrics["served_s"] > 0
    with pytest.raises(OSError):  # nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)


@pytest.mark.slow
def test_cli_refuses_a_folder_that_is_no_reward_model_and_an_unset_token(tmp_path, model_dir):
    out = f"output_dir={tmp_path / 'run'}"
    env_name = "DPRM_SERVE_TOKEN_UNSET_FOR_TEST"
    assert env_name not in os.environ
    cases = [  # three CLI runs at once: each is mostly Python start-up
        ("--model", str(tmp_path), out),
        ("--model", str(model_dir), f"token_env={env_name}", out),
        ("--model", str(model_dir), "max_batch_size=8", "max_items_per_request=9", out),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dprm_ray.jobs.cli", "serve", *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in cases
    ]
    errs = [proc.communicate(timeout=600)[1] for proc in procs]
    (rc1, rc2, rc3), (err1, err2, err3) = [proc.returncode for proc in procs], errs
    assert rc1 == 2 and "model:" in err1 and "reward_model.json" in err1
    assert rc2 == 2 and f"'{env_name}' is not set" in err2
    assert rc3 == 2 and "max_batch_size: 8 items" in err3

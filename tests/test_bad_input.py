"""Bad input never ends in a traceback: every job that reads user files, given each kind of bad
file, exits 1 with one message naming the file; every out-of-range config value exits 2 naming
the key; output paths that cannot be written exit 2 naming the key. All of it before Ray starts.

Each job runs in-process through its `main(argv)`, as a user's command line would reach it; an
exception escaping `main` (a traceback for the user) fails the test.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from omegaconf import OmegaConf

from dprm_ray.config import RANGE_KEYS, ConfigError, load_config
from dprm_ray.data import write_rows
from dprm_ray.jobs.cli import JOB_NAMES, job

HH6 = [1 / 6] * 6


class RayStartedOnBadInput(AssertionError):
    pass


def run_main(job_name: str, args: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr+stdout of `dprm-ray JOB ARGS`, run in this process; the job must not
    reach ray.init (asked of ray.init itself: this process may hold other tests' Ray cluster)."""
    import ray

    module = importlib.import_module("dprm_ray.jobs." + job_name.replace("-", "_"))

    def refuse(*_args, **_kwargs):
        raise RayStartedOnBadInput(f"{job_name} started Ray on bad input")

    real_init, ray.init = ray.init, refuse
    try:
        code = module.main(args)
    except SystemExit as exc:  # a job that exits by itself (none should)
        code = exc.code
    finally:
        ray.init = real_init
    out = capsys.readouterr()
    return code, out.err + out.out


# ----------------------------------------------------------------------------- bad files


def _parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _truncated_parquet(path: Path) -> Path:
    whole = _parquet(path.with_name("whole.parquet"), [{"prompt": f"p{i}"} for i in range(50)])
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


TEXT_ROW = {"prompt": "hi", "response": "hello", "chosen": "a", "rejected": "b"}

# Each kind of bad file; every reader must turn it into one message naming the file.
BAD_FILES: dict[str, Callable[[Path], Path]] = {
    "missing": lambda d: d / "nowhere.jsonl",
    "folder": lambda d: _folder(d / "a_folder.jsonl"),
    "empty_jsonl": lambda d: _write(d / "empty.jsonl", b""),
    "unknown_columns": lambda d: _write(d / "cols.jsonl", b'{"foo": "bar"}\n'),
    "bad_json_line": lambda d: _write(
        d / "badjson.jsonl", json.dumps(TEXT_ROW).encode() + b'\n{"prompt": "x",\n'
    ),
    "latin1_bytes": lambda d: _write(
        d / "latin1.jsonl", json.dumps(TEXT_ROW).encode() + b'\n{"prompt": "caf\xe9"}\n'
    ),
    "integer_text_jsonl": lambda d: _write(
        d / "ints.jsonl", json.dumps({k: 7 for k in TEXT_ROW}).encode() + b"\n"
    ),
    "integer_text_parquet": lambda d: _parquet(d / "ints.parquet", [{k: 7 for k in TEXT_ROW}]),
    "blank_prompt": lambda d: _write(
        d / "blank.jsonl", json.dumps({**TEXT_ROW, "prompt": "  "}).encode() + b"\n"
    ),
    "truncated_parquet": lambda d: _truncated_parquet(d / "cut.parquet"),
    "wrong_suffix": lambda d: _write(d / "data.csv", b"prompt\nhi\n"),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> Path:
    """A real (tiny, untrained) reward model folder, for the jobs that take one."""
    from dprm_ray.reward_models import build_reward_model

    path = tmp_path_factory.mktemp("rm") / "model"
    model, tok = build_reward_model("bradley-terry", "tiny-encoder:0", backbone_kind="encoder")
    model.save(path, tok)
    return path


def _good_annotations(path: Path, rows: int = 4) -> Path:
    target = [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]
    write_rows(
        path,
        [
            {
                "prompt": f"q{i}",
                "response": f"r{i}",
                "prior": HH6,
                "votes": [0],
                "posterior": target,
                "target": target,
            }
            for i in range(rows)
        ],
        "annotations",
    )
    return path


# job -> (its argv given a bad file, the output folder, a reward model folder) and the bad-file
# kinds that do not apply to it (a blank prompt is valid where the judge rejects it row by row).
READERS: dict[str, tuple[Callable[[Path, Path, Path], list[str]], set[str]]] = {
    "data validate": (lambda f, out, rm: ["validate", str(f), f"output_dir={out}"], set()),
    "annotate": (
        lambda f, out, rm: [f"input={f}", f"output={out}/a.parquet", f"output_dir={out}"],
        {"blank_prompt"},
    ),
    "annotate update": (
        lambda f, out, rm: [
            "update",
            f"annotations={f}",
            f"votes={f}",
            f"output={out}/u.parquet",
            f"output_dir={out}",
        ],
        set(),
    ),
    "train-reward": (
        lambda f, out, rm: [f"data={f}", f"output_dir={out}", "wandb.mode=disabled"],
        set(),
    ),
    "distill": (lambda f, out, rm: [f"data={f}", f"output_dir={out}"], set()),
    "distill precompute": (
        lambda f, out, rm: ["precompute", f"data={f}", f"out={out}/s.parquet", f"output_dir={out}"],
        set(),
    ),
    "train-pal": (lambda f, out, rm: [f"data={f}", f"output_dir={out}"], set()),
    "train-policy prompts": (
        lambda f, out, rm: [f"prompts={f}", f"reward.model={rm}", f"output_dir={out}"],
        set(),
    ),
    "train-policy eval_prompts": (
        lambda f, out, rm: [f"eval_prompts={f}", f"reward.model={rm}", f"output_dir={out}"],
        set(),
    ),
    "evaluate reward": (
        lambda f, out, rm: ["reward", f"model={rm}", f"data={f}", f"output_dir={out}"],
        set(),
    ),
    "evaluate crowd": (
        lambda f, out, rm: ["crowd", f"data={f}", "judge.model=tiny", f"output_dir={out}"],
        set(),
    ),
    "generate": (
        lambda f, out, rm: [
            f"prompts={f}",
            "models=[tiny]",
            f"output={out}/g.parquet",
            f"output_dir={out}",
        ],
        set(),
    ),
}


def _job_name(reader: str) -> str:
    name = reader.split()[0]
    return name if name in JOB_NAMES else reader


CASES = [
    (reader, kind)
    for reader, (_, skip) in READERS.items()
    for kind in BAD_FILES
    if kind not in skip
]


@pytest.mark.parametrize("reader, kind", CASES, ids=[f"{r}-{k}" for r, k in CASES])
def test_bad_file_exits_1_naming_the_file(tmp_path, capsys, reader, kind, reward_model_dir):
    bad = BAD_FILES[kind](tmp_path)
    argv, _ = READERS[reader]
    code, text = run_main(_job_name(reader), argv(bad, tmp_path / "out", reward_model_dir), capsys)
    assert code == 1, text
    assert "Traceback" not in text
    assert str(bad) in text, text
    assert len(text.strip().splitlines()) <= 22, text  # one line per problem, at most 20 shown


def test_the_messages_name_the_row(tmp_path, capsys, reward_model_dir):
    """A problem in a row names `file:row`, whichever reader meets it."""
    latin1 = BAD_FILES["latin1_bytes"](tmp_path)
    code, text = run_main("data", ["validate", str(latin1), f"output_dir={tmp_path}/o"], capsys)
    assert code == 1 and f"{latin1}:2: not UTF-8 text (byte 0xe9" in text, text
    ints = BAD_FILES["integer_text_parquet"](tmp_path)
    args = [f"input={ints}", f"output={tmp_path}/a.parquet", f"output_dir={tmp_path}/o"]
    code, text = run_main("annotate", args, capsys)
    assert code == 1 and f"{ints}:1: 'prompt' must be a string, got int" in text, text
    assert not (tmp_path / "a.parquet.parts").exists()
    blank = BAD_FILES["blank_prompt"](tmp_path)
    args = [f"prompts={blank}", f"reward.model={reward_model_dir}", f"output_dir={tmp_path}/o"]
    code, text = run_main("train-policy", args, capsys)
    assert code == 1 and f"{blank}:1: empty text in 'prompt'" in text, text


PROMPT_FILES = {
    # name: (file body, what the message must say after `file`)
    "bad_json_line": (b'{"prompt": "a"}\n{"prompt": "b",\n', ":2: bad JSON"),
    "missing_prompt": (b'{"prompt": "a"}\n{"text": "b"}\n', ":2: missing column 'prompt'"),
    "empty_file": (b"", ": no rows"),  # no row to name: the file has none
    "duplicate_id": (
        b'{"id": "x", "prompt": "a"}\n{"id": "y", "prompt": "b"}\n{"id": "x", "prompt": "c"}\n',
        ":3: prompt id 'x' is already used by row 1",
    ),
}


@pytest.mark.parametrize("kind", PROMPT_FILES)
def test_a_bad_prompts_file_exits_1_naming_file_and_row(tmp_path, capsys, kind, reward_model_dir):
    body, said = PROMPT_FILES[kind]
    prompts = _write(tmp_path / "prompts.jsonl", body)
    args = [f"prompts={prompts}", f"reward.model={reward_model_dir}", f"output_dir={tmp_path}/o"]
    code, text = run_main("train-policy", args, capsys)
    assert code == 1, text
    assert f"{prompts}{said}" in text, text
    assert "Traceback" not in text


@pytest.mark.parametrize("command", ["persona-crowd", "persona-users"])
def test_persona_statements_that_are_not_utf8_name_file_and_line(tmp_path, capsys, command):
    folder = tmp_path / "persona"
    folder.mkdir()
    good = {
        "question": "Would you say so?",
        "statement": "I like tea",
        "label_confidence": 0.9,
        "answer_matching_behavior": " Yes",
        "answer_not_matching_behavior": " No",
    }
    bad = folder / "likes-tea.jsonl"
    bad.write_bytes(json.dumps(good).encode() + b'\n{"statement": "caf\xe9"}\n')
    out = (
        "out=" + str(tmp_path / "x.parquet")
        if command == "persona-crowd"
        else f"out_dir={tmp_path}/u"
    )
    args = [command, f"persona_dir={folder}", out, f"output_dir={tmp_path}/o"]
    code, text = run_main("data", args, capsys)
    assert code == 1 and f"{bad}:2: not UTF-8 text" in text and "Traceback" not in text, text


def test_a_folder_that_is_not_a_reward_model_exits_1_naming_it(tmp_path, capsys):
    data = _good_annotations(tmp_path / "ann.parquet")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "reward_model.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    for model in (broken, empty):
        args = ["reward", f"model={model}", f"data={data}", f"output_dir={tmp_path}/o"]
        code, text = run_main("evaluate", args, capsys)
        assert code == 1 and str(model) in text and "Traceback" not in text, text


def test_train_reward_and_distill_check_one_batch_before_ray_train(tmp_path, capsys):
    small = _good_annotations(tmp_path / "small.parquet", rows=4)
    args = [f"data={small}", f"output_dir={tmp_path}/o", "wandb.mode=disabled"]
    code, text = run_main("train-reward", args, capsys)
    assert code == 1 and "fewer than one global batch" in text and str(small) in text, text
    code, text = run_main("train-reward", [*args, "loss.kind=bt"], capsys)
    assert code == 1 and "loss 'bt' needs pairs" in text, text
    code, text = run_main("train-reward", [*args, "loss.kind=huber"], capsys)
    assert code == 2 and "loss.kind" in text, text

    pairs = tmp_path / "pairs.parquet"
    write_rows(
        pairs,
        [
            {
                "prompt": f"q{i}",
                "chosen": "a",
                "rejected": "b",
                "ref_chosen_logp": -1.0,
                "ref_rejected_logp": -2.0,
            }
            for i in range(3)
        ],
        "pairs",
    )
    args = [f"data={pairs}", "loss.kind=dpo", f"output_dir={tmp_path}/d"]
    code, text = run_main("distill", args, capsys)
    assert code == 1 and "fewer than one global batch" in text, text
    code, text = run_main(
        "distill", [*args[:-2], "loss.kind=edpo", f"output_dir={tmp_path}/d"], capsys
    )
    assert code == 1 and "missing column 'chosen_rewards'" in text, text


# ----------------------------------------------------------------------------- output paths


def test_output_dir_that_is_a_file_exits_2(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    good = _good_annotations(tmp_path / "ann.parquet")
    for job_name, args in {
        "data": ["validate", str(good)],
        "train-reward": [f"data={good}"],
        "annotate": [f"input={good}", f"output={tmp_path}/a.parquet"],
    }.items():
        code, text = run_main(job_name, [*args, f"output_dir={a_file}"], capsys)
        assert code == 2 and "output_dir" in text and "is a file" in text, (job_name, text)
        code, text = run_main(job_name, [*args, f"output_dir={a_file}/below"], capsys)
        assert code == 2 and "output_dir" in text, (job_name, text)


@pytest.mark.parametrize(
    "job_name, args, key",
    [
        ("annotate", ["input={good}", "output={folder}"], "output"),
        ("annotate", ["input={good}", "output={tmp}/a.parquet", "rejects={folder}"], "rejects"),
        ("annotate", ["update", "annotations={good}", "votes={good}", "output={folder}"], "output"),
        ("distill", ["precompute", "data={good}", "out={folder}"], "out"),
        ("data", ["persona-crowd", "out={folder}"], "out"),
        ("data", ["persona-users", "out_dir={tmp}/file.txt"], "out_dir"),
        ("generate", ["prompts={good}", "models=[tiny]", "output={folder}"], "output"),
    ],
)
def test_output_file_that_is_a_folder_exits_2(tmp_path, capsys, job_name, args, key):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    (tmp_path / "file.txt").write_text("x")
    good = _good_annotations(tmp_path / "ann.parquet")
    argv = [a.format(good=good, folder=folder, tmp=tmp_path) for a in args]
    code, text = run_main(job_name, [*argv, f"output_dir={tmp_path}/o"], capsys)
    assert code == 2 and f"{key}:" in text, text
    assert "Traceback" not in text


# ----------------------------------------------------------------------------- config ranges


def _schemas() -> list[tuple[str, type]]:
    out = []
    for name in JOB_NAMES:
        for command in job(name).commands:
            if command.schema is not None:
                out.append((f"{name} {command.name}".strip(), command.schema))
    return out


def _numeric_fields(schema: type, prefix: str = "") -> list[tuple[str, type, Any]]:
    """(dotted key, owning dataclass, field) of every int/float leaf."""
    hints = typing.get_type_hints(schema)
    out = []
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_fields(typing.cast(type, tp), f"{prefix}{f.name}.")
            continue
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
        args = set(typing.get_args(tp)) - {type(None)}
        if tp in (int, float) or (optional and args <= {int, float}):
            out.append((f"{prefix}{f.name}", schema, f))
    return out


def test_every_count_size_and_probability_has_a_range():
    unbounded = sorted(
        {
            f"{schema.__name__}.{f.name}"
            for _, top in _schemas()
            for _, schema, f in _numeric_fields(top)
            if not set(RANGE_KEYS) & set(f.metadata)
        }
    )
    assert not unbounded, f"numbers without a declared range: {unbounded}"


def _out_of_range_value(metadata: Any) -> float:
    if "min" in metadata:
        return metadata["min"] - 1
    if "above" in metadata:
        return metadata["above"]
    if "max" in metadata:
        return metadata["max"] + 1
    return metadata["below"]


RANGE_CASES = [
    (command, schema, key, f)
    for command, schema in _schemas()
    for key, _, f in _numeric_fields(schema)
    if set(RANGE_KEYS) & set(f.metadata)
]


@pytest.mark.parametrize(
    "command, schema, key, f", RANGE_CASES, ids=[f"{c}:{k}" for c, _, k, _ in RANGE_CASES]
)
def test_out_of_range_value_is_a_config_error_naming_the_key(command, schema, key, f):
    hints = typing.get_type_hints(schema)
    required = OmegaConf.missing_keys(OmegaConf.structured(schema))
    # A required list gets a one-item list, any other required value a string.
    filler = {k: "[x]" if typing.get_origin(hints.get(k)) is list else "x" for k in required}
    overrides = [f"{k}={v}" for k, v in filler.items()] + [
        f"{key}={_out_of_range_value(f.metadata)}"
    ]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: must be"):
        load_config(schema, overrides=overrides)


@pytest.mark.parametrize(
    "job_name, args, key",
    [
        ("annotate", ["input=x.parquet", "output=y.parquet", "judge.personas_per_item=-1"],
         "judge.personas_per_item"),
        ("quickstart", ["personas_per_item=-1"], "personas_per_item"),
        ("train-reward", ["data=x.jsonl", "optim.batch_size=0"], "optim.batch_size"),
        ("train-policy", ["reward.model=m", "rollout.top_p=1.5"], "rollout.top_p"),
        ("serve", ["model=m", "port=70000"], "port"),
    ],
)  # fmt: skip
def test_out_of_range_on_the_command_line_exits_2_before_anything(
    tmp_path, capsys, job_name, args, key
):
    code, text = run_main(job_name, [*args, f"output_dir={tmp_path}/o"], capsys)
    assert code == 2 and f"config error: {key}: must be" in text, text
    assert not (tmp_path / "o").exists()  # stopped before writing anything


# ----------------------------------------------------------------------------- Ctrl-C / SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_exits_with_its_code_and_one_line(request, tmp_path, sig, code):
    """A running annotate job (Ray started, judges at work) stopped by Ctrl-C or SIGTERM: one
    line, no traceback, the documented exit code, and the parts it finished are still there (a
    rerun resumes from them: tests/test_annotate_job.py). Ctrl-C stops a job that joined the
    session's cluster, as under `ray job submit`; SIGTERM one that started its own local
    cluster, every process of which must be gone after the job (it leaves without Ray's
    teardown, which can abort after a SIGTERM)."""
    if sig == signal.SIGINT:
        request.getfixturevalue("jobs_join_ray_local")
    # Enough rows that the job is still at work when its first part lands (400 rows finished in
    # 30 s on a CI machine, before the signal arrived).
    rows = [{"prompt": f"question {i}?", "response": f"answer {i}"} for i in range(4000)]
    data = _parquet(tmp_path / "in.parquet", rows)
    args = [
        sys.executable,
        "-m",
        "dprm_ray.jobs.cli",
        "annotate",
        f"input={data}",
        f"output={tmp_path}/a.parquet",
        "judge.model=tiny",
        "judge.personas_per_item=2",
        "pool.max_actors=1",
        "pool.batch_size=4",
        f"output_dir={tmp_path}/o",
    ]
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    parts = tmp_path / "a.parquet.parts"
    deadline = time.time() + 300
    while not (parts.is_dir() and any(parts.glob("part-*.parquet"))):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    started = psutil.Process(proc.pid).children(recursive=True)  # its local cluster, if any
    assert (sig == signal.SIGTERM) == any(p.name() == "raylet" for p in started)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    _, left = psutil.wait_procs(started, timeout=30)
    assert not left, [p.name() for p in left]
    assert "Traceback" not in err, err[-3000:]
    assert "stopped by" in err, err[-3000:]
    assert any(parts.glob("part-*.parquet"))


HANGING_JOB = """
import sys, time
from dataclasses import dataclass
from dprm_ray.jobs.runner import Command, Job, run_job

@dataclass
class Config:
    output_dir: str = {out!r}

def run(cfg):
    try:
        print("at work", flush=True)
        time.sleep(600)
    finally:
        time.sleep(600)  # a clean-up that never ends, as a library's shutdown can

sys.exit(run_job(Job("hang", "", (Command("", "", Config, run),)), []))
"""


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_leaves_even_when_the_clean_up_hangs(tmp_path, presses):
    """After Ctrl-C a job whose clean-up hangs leaves after DPRM_RAY_STOP_GRACE_S seconds (one
    press), or at once (a second press), with exit code 130 and a line that says so. (A CI run
    had an annotate job still running 120 s after Ctrl-C.)"""
    grace = 2 if presses == 1 else 600
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_JOB.format(out=str(tmp_path / "o"))],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "DPRM_RAY_STOP_GRACE_S": str(grace)},
    )  # fmt: skip
    try:
        assert proc.stdout.readline() == "at work\n"
        for _ in range(presses):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
        started = time.monotonic()
        assert proc.wait(timeout=30) == 130
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert "Traceback" not in err, err
    if presses == 1:
        assert "dprm-ray hang: stopped by Ctrl-C; its clean-up was still running 2 s later" in err
    else:
        assert "dprm-ray hang: stopped by a second Ctrl-C, without clean-up" in err, err

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import HH_RLHF, REPO, run_cli

from dprm_ray.data import (
    DataError,
    load_rows,
    read_table,
    split_transcripts,
    write_batches,
    write_rows,
)

K = 6
UNIFORM = [1 / K] * K


def annotation(**over):
    row = {
        "prompt": "How do I bake bread?",
        "response": "Mix flour, water, yeast and salt.",
        "prior": UNIFORM,
        "votes": [0, 1, 0],
        "posterior": UNIFORM,
        "target": UNIFORM,
    }
    row.update(over)
    return row


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def problems_of(path: Path, kind: str | None = None, num_labels: int | None = None) -> list[str]:
    with pytest.raises(DataError) as info:
        load_rows(path, kind=kind, num_labels=num_labels)
    return info.value.problems


def test_bad_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [annotation(), '{"prompt": "x", oops}'])
    assert problems_of(path, "annotations") == [
        f"{path}:2: bad JSON: Expecting property name enclosed in double quotes (column 17)"
    ]


def test_missing_column_names_file_and_row(tmp_path):
    row = annotation()
    del row["target"]
    path = write_jsonl(tmp_path / "a.jsonl", [annotation(), row])
    assert problems_of(path, "annotations") == [f"{path}:2: missing column 'target'"]


def test_missing_column_in_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": "a"}]), path)
    assert problems_of(path, "pairs") == [f"{path}:1: missing column 'rejected'"]


def test_extra_column_names_file_and_row(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [annotation(colour="red")])
    (problem,) = problems_of(path, "annotations")
    assert problem.startswith(f"{path}:1: unexpected column 'colour'")


def test_wrong_type_in_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [annotation(), annotation(prompt=42)])
    assert problems_of(path, "annotations") == [f"{path}:2: 'prompt' must be a string, got int"]


def test_wrong_type_in_parquet_column(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": 1, "chosen": "a", "rejected": "b"}]), path)
    assert problems_of(path, "pairs") == [
        f"{path}:1: column 'prompt' has type int64, expected string"
    ]


def test_empty_text(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl", [annotation(), annotation(), annotation(response="  ")]
    )
    assert problems_of(path, "annotations") == [f"{path}:3: empty text in 'response'"]


def test_distribution_of_wrong_length(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [annotation(prior=[0.5, 0.5])])
    assert problems_of(path, "annotations", num_labels=K) == [
        f"{path}:1: 'prior' has 2 values, expected 6 (one per label)"
    ]


def test_distribution_length_inferred_from_first_row(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [annotation(), annotation(target=[0.25] * 4)])
    assert problems_of(path, "annotations") == [
        f"{path}:2: 'target' has 4 values, expected 6 (one per label)"
    ]


def test_negative_probability(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [annotation(posterior=[1.2, -0.2, 0, 0, 0, 0])])
    assert problems_of(path, "annotations") == [
        f"{path}:1: 'posterior' has a negative probability -0.2"
    ]


def test_nan_probability_in_parquet(tmp_path):
    path = tmp_path / "a.parquet"
    rows = [annotation(), annotation(target=[math.nan] + UNIFORM[1:])]
    write_rows_unchecked(path, rows)
    assert problems_of(path, "annotations") == [f"{path}:2: 'target' contains NaN"]


def test_not_summing_to_one(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [annotation(prior=[0.5, 0.4, 0, 0, 0, 0])])
    assert problems_of(path, "annotations") == [
        f"{path}:1: 'prior' sums to 0.9, not 1 (tolerance 0.0001)"
    ]


def test_sum_within_tolerance_is_accepted(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [annotation(prior=[0.5, 0.50005, 0, 0, 0, 0])])
    assert len(load_rows(path, "annotations").rows) == 1


def test_vote_outside_label_space(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [annotation(votes=[0, 6])])
    assert problems_of(path, "annotations") == [f"{path}:1: 'votes' has label index 6 outside 0..5"]


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["nope", annotation(prompt=""), annotation(votes=[9])])
    assert [p.split(": ")[0] for p in problems_of(path, "annotations")] == [
        f"{path}:1",
        f"{path}:2",
        f"{path}:3",
    ]


def write_rows_unchecked(path: Path, rows) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_round_trip_keeps_optional_columns(tmp_path):
    path = tmp_path / "a.parquet"
    rows = [annotation(persona_ids=["scientist", "teen", "artist"], group="g")]
    assert write_rows(path, rows, "annotations") == 1
    table = read_table(path)
    assert table.column("persona_ids").to_pylist() == [["scientist", "teen", "artist"]]
    assert table.schema.field("votes").type == pa.list_(pa.int32())


def test_hh_rlhf_transcripts_split_into_prompt_and_responses():
    loaded = load_rows(HH_RLHF, skip_invalid=True)
    assert loaded.kind == "pairs"
    assert len(loaded.rows) == 1154  # 1156 lines, two with an empty chosen reply
    assert [p.split(":")[-2] for p in loaded.skipped] == ["317", "448"]
    first = loaded.rows[0]
    assert first["prompt"].startswith("\n\nHuman: I am trying to locate the residential address")
    assert first["prompt"].endswith("\n\nAssistant:")
    assert first["chosen"].startswith("I don’t have personal addresses")
    assert first["rejected"].startswith("I’m not really sure what you mean")


def test_hh_rlhf_real_file_reports_its_empty_replies():
    problems = problems_of(HH_RLHF)
    assert problems == [
        f"{HH_RLHF}:317: empty text in 'chosen'",
        f"{HH_RLHF}:448: empty text in 'chosen'",
    ]


def test_split_transcripts_uses_last_shared_assistant_turn():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: A pun."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No."
    assert split_transcripts(chosen, rejected) == (
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant:",
        "A pun.",
        "No.",
    )
    assert split_transcripts("abc", "abd") is None


def test_transcripts_without_assistant_turn_are_reported(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "yes", "rejected": "no"}])
    (problem,) = problems_of(path, "pairs")
    assert problem.startswith(f"{path}:1: no prompt column, and chosen/rejected share no")


def test_write_validates_before_writing(tmp_path):
    path = tmp_path / "out.parquet"
    with pytest.raises(DataError, match=r"out.parquet:2: empty text in 'prompt'"):
        write_rows(path, [annotation(), annotation(prompt="")], "annotations")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


CRASH_WRITER = textwrap.dedent(
    """
    import os, sys
    from dprm_ray.data import write_batches

    def batches():
        row = {"prompt": "p" * 1000, "chosen": "c", "rejected": "r"}
        yield [row] * 5000
        yield [row] * 5000
        os._exit(17)  # the process dies mid-write, no cleanup runs

    write_batches(sys.argv[1], batches(), "pairs")
    """
)


def test_crash_mid_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "pairs.parquet"
    write_rows(path, [{"prompt": "old", "chosen": "a", "rejected": "b"}], "pairs")
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_WRITER, str(path)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 17, proc.stderr
    # The final name still holds the complete old file; only a temporary file was left behind.
    assert read_table(path).column("prompt").to_pylist() == ["old"]
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".pairs.parquet.")


def test_write_batches_streams_many_batches(tmp_path):
    path = tmp_path / "p.parquet"
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    assert write_batches(path, [rows[:4], rows[4:]], "pairs") == 10
    assert read_table(path).num_rows == 10


def test_cli_validate_ok_and_bad(tmp_path):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, [annotation()])
    proc = run_cli("data", "validate", str(good), f"output_dir={tmp_path / 'o'}")
    assert proc.returncode == 0, proc.stderr
    assert "ok, 1 rows of annotations" in proc.stdout
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["rows"] == 1
    assert "path: " in (tmp_path / "o" / "config.yaml").read_text()
    bad = write_jsonl(tmp_path / "bad.jsonl", [annotation(target=[1.0, 0.5, 0, 0, 0, 0])])
    proc = run_cli("data", "validate", str(bad), f"output_dir={tmp_path / 'o2'}")
    assert proc.returncode == 1
    assert f"{bad}:1: 'target' sums to 1.5" in proc.stderr


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    path = tmp_path / "p.parquet"
    write_rows(path, [{"prompt": "p", "chosen": "a", "rejected": "b"}], "pairs")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_builtin_prompt_set_mixes_helpful_and_harmful_prompts_with_a_heldout_split():
    from dprm_ray.data import builtin_prompts

    rows = builtin_prompts()
    assert len(rows) >= 200
    assert len({r["prompt"] for r in rows}) == len(rows) and len({r["id"] for r in rows}) == len(
        rows
    )
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("helpful", "harmful")}
    assert len(kinds["helpful"]) >= 100 and len(kinds["harmful"]) >= 60
    heldout = builtin_prompts("heldout")
    assert {r["kind"] for r in heldout} == {"helpful", "harmful"}
    assert len(heldout) + len(builtin_prompts("train")) == len(rows)
    with pytest.raises(ValueError, match="split"):
        builtin_prompts("test")

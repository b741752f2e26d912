"""One data format: parquet with a schema per stage, plus JSONL input (hh-rlhf transcripts too).

Readers validate every row and report `file:row: problem` (rows counted from 1; for JSONL the row is
the line number). Writers validate before writing and are atomic: data goes to a temporary name in
the same folder and is renamed over the final name only once complete, so a crash never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SUM_TOLERANCE = 1e-4
MAX_REPORTED_PROBLEMS = 20
ASSISTANT_TURN = "\n\nAssistant:"


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # text | id | dist | votes | str_list | floats | int | float
    required: bool = True


_ARROW_TYPES: dict[str, pa.DataType] = {
    "text": pa.string(),
    "id": pa.string(),
    "dist": pa.list_(pa.float64()),
    "votes": pa.list_(pa.int32()),
    "str_list": pa.list_(pa.string()),
    "floats": pa.list_(pa.float64()),
    "int": pa.int64(),
    "float": pa.float64(),
}

SCHEMAS: dict[str, tuple[Column, ...]] = {
    "prompts": (
        Column("prompt", "text"),
        Column("prompt_id", "id", required=False),
        Column("category", "id", required=False),
    ),
    "rollouts": (
        Column("prompt", "text"),
        Column("response", "text"),
        Column("prompt_id", "id", required=False),
        Column("policy", "id", required=False),
        Column("step", "int", required=False),
    ),
    "annotations": (
        Column("prompt", "text"),
        Column("response", "text"),
        Column("prior", "dist"),
        Column("votes", "votes"),
        Column("posterior", "dist"),
        Column("target", "dist"),
        Column("persona_ids", "str_list", required=False),
        Column("population", "dist", required=False),
        Column("row_key", "id", required=False),
        Column("judge", "id", required=False),
        Column("group", "id", required=False),
        Column("label_space", "id", required=False),
    ),
    "pairs": (
        Column("prompt", "text"),
        Column("chosen", "text"),
        Column("rejected", "text"),
        Column("user_id", "id", required=False),
        # Written by `dprm-ray distill precompute`: one reward per ensemble member, the
        # reference policy's sequence log-probs, and a reference sample for the KL term.
        Column("chosen_rewards", "floats", required=False),
        Column("rejected_rewards", "floats", required=False),
        Column("ref_chosen_logp", "float", required=False),
        Column("ref_rejected_logp", "float", required=False),
        Column("ref_sample", "text", required=False),
        Column("ref_sample_logp", "float", required=False),
    ),
}


class DataError(ValueError):
    """Invalid input data; `problems` lists every `file:row: problem` found."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_REPORTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more problems" if more > 0 else "")
        super().__init__(text)


def arrow_schema(kind: str, columns: Iterable[str] | None = None) -> pa.Schema:
    """The arrow schema of a stage, restricted to `columns` (default: the required ones)."""
    cols = _schema(kind)
    wanted = set(columns) if columns is not None else {c.name for c in cols if c.required}
    return pa.schema([(c.name, _ARROW_TYPES[c.kind]) for c in cols if c.name in wanted])


def _schema(kind: str) -> tuple[Column, ...]:
    if kind not in SCHEMAS:
        raise ValueError(f"unknown data kind '{kind}' (known: {', '.join(SCHEMAS)})")
    return SCHEMAS[kind]


def detect_kind(columns: Iterable[str], source: str = "data") -> str:
    names = set(columns)
    if names & {"prior", "posterior", "target", "votes"}:
        return "annotations"
    if names & {"chosen", "rejected"}:
        return "pairs"
    if "response" in names:
        return "rollouts"
    if "prompt" in names:
        return "prompts"
    raise DataError(
        [
            f"{source}: cannot tell the data kind from columns {sorted(names)} (expected a "
            "`prompt`, `response`, `chosen`/`rejected` or `target` column; see `kind=`)"
        ]
    )


# --------------------------------------------------------------------------- row validation


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_value(col: Column, value: Any, num_labels: int | None) -> str | None:
    """The problem with one cell, or None."""
    name = col.name
    if col.kind in ("text", "id"):
        if not isinstance(value, str):
            return f"'{name}' must be a string, got {type(value).__name__}"
        if not value.strip():
            return f"empty text in '{name}'"
        return None
    if col.kind == "int":
        return (
            None
            if isinstance(value, int) and not isinstance(value, bool)
            else (f"'{name}' must be an integer, got {type(value).__name__}")
        )
    if col.kind == "float":
        if not _is_number(value) or not math.isfinite(value):
            return f"'{name}' must be a number, got {value!r}"
        return None
    if not isinstance(value, list | tuple):
        return f"'{name}' must be a list, got {type(value).__name__}"
    if col.kind == "str_list":
        bad = [v for v in value if not isinstance(v, str) or not v.strip()]
        return f"'{name}' must hold non-empty strings" if bad else None
    if col.kind == "floats":
        bad = [v for v in value if not _is_number(v) or not math.isfinite(v)]
        return f"'{name}' must hold finite numbers, got {bad[0]!r}" if bad else None
    if col.kind == "votes":
        for v in value:
            if not isinstance(v, int) or isinstance(v, bool):
                return f"'{name}' must hold integer label indices, got {v!r}"
            if num_labels is not None and not 0 <= v < num_labels:
                return f"'{name}' has label index {v} outside 0..{num_labels - 1}"
        return None
    # dist: a probability distribution over the label space
    if num_labels is not None and len(value) != num_labels:
        return f"'{name}' has {len(value)} values, expected {num_labels} (one per label)"
    for v in value:
        if not _is_number(v):
            return f"'{name}' must hold numbers, got {v!r}"
        if math.isnan(v):
            return f"'{name}' contains NaN"
        if v < 0:
            return f"'{name}' has a negative probability {v}"
    total = math.fsum(value)
    if abs(total - 1.0) > SUM_TOLERANCE:
        return f"'{name}' sums to {total:.6g}, not 1 (tolerance {SUM_TOLERANCE})"
    return None


def _infer_num_labels(cols: Sequence[Column], row: dict[str, Any]) -> int | None:
    for col in cols:
        value = row.get(col.name)
        if col.kind == "dist" and isinstance(value, list | tuple) and value:
            return len(value)
    return None


def validate_rows(
    rows: Iterable[dict[str, Any] | None],
    kind: str,
    source: str,
    num_labels: int | None = None,
    first_row: int = 1,
) -> list[str]:
    """All problems of `rows` as `source:row: problem` strings (empty list: valid).

    A None row is one that did not parse; its problem was reported already.
    """
    cols = _schema(kind)
    known = {c.name for c in cols}
    problems: list[str] = []
    for i, row in enumerate(rows, start=first_row):
        if row is None:
            continue
        where = f"{source}:{i}"
        for extra in sorted(set(row) - known):
            problems.append(f"{where}: unexpected column '{extra}' (allowed: {', '.join(known)})")
        if num_labels is None:
            num_labels = _infer_num_labels(cols, row)
        for col in cols:
            value = row.get(col.name)
            if value is None:
                if col.required:
                    problems.append(f"{where}: missing column '{col.name}'")
                continue
            problem = _check_value(col, value, num_labels)
            if problem:
                problems.append(f"{where}: {problem}")
        ids, votes = row.get("persona_ids"), row.get("votes")
        if (
            isinstance(ids, list | tuple)
            and isinstance(votes, list | tuple)
            and len(ids) != len(votes)
        ):
            problems.append(f"{where}: {len(votes)} votes but {len(ids)} persona_ids")
    return problems


# --------------------------------------------------------------------------- readers


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two hh-rlhf transcripts that differ in the last assistant turn.

    Returns (prompt, chosen_response, rejected_response) where the prompt is the shared transcript
    up to and including the last shared "\\n\\nAssistant:", or None if there is no such turn.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT_TURN)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT_TURN)
    return chosen[:end], chosen[end:].strip(), rejected[end:].strip()


def iter_jsonl(
    path: str | Path, skip_blank: bool = False
) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, row, problem) for each line of a JSONL file: the row when the line is a
    JSON object, else None and the problem as `file:line: problem` (bytes that are not UTF-8,
    bad JSON, not an object, an empty line unless `skip_blank`)."""
    with Path(path).open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    line_no,
                    None,
                    (
                        f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                        f"column {exc.start + 1}); save the file as UTF-8"
                    ),
                )
                continue
            if not line.strip():
                if not skip_blank:
                    yield line_no, None, f"{where}: empty line"
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield line_no, None, f"{where}: bad JSON: {exc.msg} (column {exc.colno})"
                continue
            if not isinstance(row, dict):
                yield line_no, None, f"{where}: expected a JSON object, got {type(row).__name__}"
                continue
            yield line_no, row, None


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any] | None], list[str]]:
    """Rows in line order; a line that is not a JSON object is reported and kept as None."""
    rows: list[dict[str, Any] | None] = []
    problems: list[str] = []
    for _, row, problem in iter_jsonl(path):
        rows.append(row)
        if problem:
            problems.append(problem)
    return rows, problems


def _hh_rlhf_to_pairs(rows: list[dict[str, Any] | None], source: str) -> list[str]:
    """In place: rows with chosen/rejected transcripts and no prompt get a split prompt.

    A row that cannot be split is reported and replaced by None (nothing more to check in it).
    """
    problems: list[str] = []
    for i, row in enumerate(rows, start=1):
        if row is None or "prompt" in row or not {"chosen", "rejected"} <= set(row):
            continue
        if not isinstance(row["chosen"], str) or not isinstance(row["rejected"], str):
            continue  # the type check reports it
        split = split_transcripts(row["chosen"], row["rejected"])
        if split is None:
            problems.append(
                f"{source}:{i}: no prompt column, and chosen/rejected share no '\\n\\nAssistant:' "
                "turn to split a prompt from"
            )
            rows[i - 1] = None
            continue
        row["prompt"], row["chosen"], row["rejected"] = split
    return problems


def _arrow_type_problems(table: pa.Table, kind: str, source: str) -> list[str]:
    """Column-level problems of a parquet table, reported at its first row."""
    cols = {c.name: c for c in _schema(kind)}
    problems = []
    for field in table.schema:
        col = cols.get(field.name)
        if col is None:
            continue  # the row checks report unexpected columns
        expected = _ARROW_TYPES[col.kind]
        ok = (
            field.type == expected
            or (col.kind == "votes" and field.type in (pa.list_(pa.int64()), pa.list_(pa.int16())))
            or (col.kind == "dist" and field.type == pa.list_(pa.float32()))
        )
        ok = ok or (col.kind in ("text", "id") and field.type == pa.large_string())
        ok = ok or (col.kind == "int" and pa.types.is_integer(field.type))
        if not ok:
            problems.append(
                f"{source}:1: column '{field.name}' has type {field.type}, expected {expected}"
            )
    return problems


def _existing_file(path: str | Path) -> Path:
    """`path` as a Path, once it is known to be a readable file of a supported type."""
    path = Path(path)
    if path.is_dir():
        raise DataError([f"{path}: is a folder, expected a .parquet or .jsonl file"])
    if not path.is_file():
        raise DataError([f"{path}: no such file"])
    if path.suffix not in (".parquet", ".jsonl", ".json"):
        raise DataError([f"{path}: unsupported file type '{path.suffix}' (use .parquet or .jsonl)"])
    return path


def _read_parquet(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError([f"{path}: not a readable parquet file: {first}"]) from None


def _table_rows(table: pa.Table) -> list[dict[str, Any]]:
    # Absent optional values come back as None; drop them so the row checks see "missing".
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a parquet or JSONL file as a dict, without a stage schema.

    For files whose columns belong to no stage (e.g. human votes); decoding and parse problems
    raise DataError naming `file:row`, as in `load_rows`.
    """
    path = _existing_file(path)
    if path.suffix == ".parquet":
        rows = _table_rows(_read_parquet(path))
    else:
        parsed, problems = _read_jsonl(path)
        if problems:
            raise DataError(problems)
        rows = [row for row in parsed if row is not None]
    if not rows:
        raise DataError([f"{path}: no rows"])
    return rows


def read_text_columns(
    path: str | Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    allow_empty: bool = False,
) -> list[dict[str, str]]:
    """The string columns `required` (and `optional` where present) of any parquet or JSONL
    file, one dict per row; other columns are ignored.

    For readers that need only some text columns of files of any stage (prompts for PPO, the
    prompt/response pairs to annotate). A missing column, a value that is not a string, or
    (unless `allow_empty`) blank text raises DataError naming `file:row`.
    """
    wanted = [*required, *optional]
    path = _existing_file(path)
    if path.suffix == ".parquet":
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as exc:
            raise DataError([f"{path}: not a readable parquet file: {exc}"]) from None
        missing = [c for c in required if c not in names]
        if missing:
            raise DataError([f"{path}: missing column(s) {', '.join(missing)}"])
        records = _table_rows(_read_parquet(path, [c for c in wanted if c in names]))
        if not records:
            raise DataError([f"{path}: no rows"])
    else:
        records = read_records(path)
    problems: list[str] = []
    rows: list[dict[str, str]] = []
    for i, record in enumerate(records, start=1):
        row = {}
        for name in wanted:
            value = record.get(name)
            if value is None:
                if name in required:
                    problems.append(f"{path}:{i}: missing column '{name}'")
                continue
            if not isinstance(value, str):
                problems.append(
                    f"{path}:{i}: '{name}' must be a string, got {type(value).__name__}"
                )
            elif not allow_empty and not value.strip():
                problems.append(f"{path}:{i}: empty text in '{name}'")
            row[name] = value
        rows.append(row)
    if problems:
        raise DataError(problems)
    return rows


@dataclass
class Loaded:
    kind: str
    rows: list[dict[str, Any]]
    skipped: list[str]  # problems of the rows left out (only with skip_invalid=True)


def load_rows(
    path: str | Path,
    kind: str | None = None,
    num_labels: int | None = None,
    skip_invalid: bool = False,
) -> Loaded:
    """Read and validate a parquet or JSONL file.

    Raises DataError listing every `file:row: problem`, unless `skip_invalid`: then bad rows are
    left out and their problems returned in `Loaded.skipped` (file-level problems still raise).
    """
    path = _existing_file(path)
    row_problems: list[str] = []
    if path.suffix in (".jsonl", ".json"):
        rows, row_problems = _read_jsonl(path)
        if not any(rows):
            raise DataError(row_problems or [f"{path}: no rows"])
        if kind is None:
            kind = detect_kind({k for row in rows[:100] if row for k in row}, str(path))
        if kind == "pairs":
            row_problems += _hh_rlhf_to_pairs(rows, str(path))
    else:
        table = _read_parquet(path)
        if table.num_rows == 0:
            raise DataError([f"{path}: no rows"])
        kind = kind or detect_kind(table.column_names, str(path))
        type_problems = _arrow_type_problems(table, kind, str(path))
        if type_problems:
            raise DataError(type_problems)
        rows = _table_rows(table)
    row_problems += validate_rows(rows, kind, str(path), num_labels)
    if row_problems and not skip_invalid:
        raise DataError(row_problems)
    prefix = f"{path}:"
    bad = {int(p[len(prefix) :].split(":", 1)[0]) for p in row_problems}
    good = [row for i, row in enumerate(rows, start=1) if i not in bad and row is not None]
    if not good:
        raise DataError(row_problems or [f"{path}: no valid rows"])
    return Loaded(kind=kind, rows=good, skipped=row_problems)


def read_table(
    path: str | Path,
    kind: str | None = None,
    num_labels: int | None = None,
    skip_invalid: bool = False,
) -> pa.Table:
    loaded = load_rows(path, kind, num_labels, skip_invalid)
    return rows_to_table(loaded.rows, loaded.kind)


def rows_to_table(rows: Sequence[dict[str, Any]], kind: str) -> pa.Table:
    present = {k for row in rows for k in row}
    schema = arrow_schema(kind, columns=[c.name for c in _schema(kind) if c.name in present])
    return pa.Table.from_pylist(list(rows), schema=schema)


# --------------------------------------------------------------------------- atomic writers


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_batches(
    path: str | Path,
    batches: Iterable[Sequence[dict[str, Any]]],
    kind: str,
    num_labels: int | None = None,
) -> int:
    """Validate and write row batches to one parquet file atomically; returns the row count."""
    writer: pq.ParquetWriter | None = None
    written = 0
    with atomic_path(path) as tmp:
        try:
            for batch in batches:
                problems = validate_rows(batch, kind, str(path), num_labels, first_row=written + 1)
                if problems:
                    raise DataError(problems)
                table = rows_to_table(batch, kind)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table.cast(writer.schema))
                written += len(batch)
            if writer is None:
                raise DataError([f"{path}: nothing to write (no rows)"])
        finally:
            if writer is not None:
                writer.close()
    return written


def write_rows(
    path: str | Path, rows: Sequence[dict[str, Any]], kind: str, num_labels: int | None = None
) -> int:
    return write_batches(path, [rows], kind, num_labels)


# --------------------------------------------------------------------------- built-in prompts

BUILTIN_PROMPTS = Path(__file__).parent / "catalog" / "prompts.jsonl"


def builtin_prompts(split: str | None = None) -> list[dict[str, str]]:
    """The project's own prompt set: helpful-task prompts and prompts that invite harmful answers.

    Each row has `id`, `kind` (helpful | harmful), `split` (train | heldout: every fifth prompt of
    each kind is held out) and `prompt`. `split=None` returns all of them.
    """
    if split not in (None, "train", "heldout"):
        raise ValueError(f"split must be train, heldout or None, got {split!r}")
    rows = [json.loads(line) for line in BUILTIN_PROMPTS.read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if split is None or r["split"] == split]

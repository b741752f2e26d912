"""`dprm-ray annotate`: label (prompt, response) rows with a persona crowd of LLM judges.

The rows of `input` not done yet become Ray Data blocks -> `map_batches(PersonaAnnotator,
compute=ActorPoolStrategy(pool.min_actors, pool.max_actors))` with `pool.cpus_per_actor` /
`pool.gpus_per_actor` per actor, so the pool autoscales on a cluster. Each row gets the judge's prior, one vote per persona, the Dirichlet
posterior and the smoothed target (the `annotations` schema). Finished batches are written as they
arrive, each atomically, under `<output>.parts/`; at the end they are merged into `output` and
`rejects` (rows the judge cannot handle, with the reason). Rerunning the same command resumes: rows
already annotated or rejected (by a stable key of prompt and response) are skipped, never duplicated.

`dprm-ray annotate update`: add new votes (another persona set's annotations, or human votes with
`prompt`, `response`, `votes`) to an existing annotation file; the Dirichlet posterior is updated with
an optional forgetting factor and the shift of the targets is reported.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dprm_ray.config import MISSING, ConfigError
from dprm_ray.jobs.ray_session import init_ray
from dprm_ray.jobs.runner import Command, Job, run_job
from dprm_ray.judge import JudgeConfig


@dataclass
class PoolConfig:
    min_actors: int = field(
        default=1, metadata={"min": 1, "help": "actors kept up (autoscaling minimum)"}
    )
    max_actors: int = field(default=2, metadata={"min": 1, "help": "autoscaling maximum"})
    cpus_per_actor: float = field(default=1.0, metadata={"min": 0})
    gpus_per_actor: float = field(default=0.0, metadata={"min": 0})
    batch_size: int = field(
        default=8, metadata={"min": 1, "help": "rows per actor call (and per part file)"}
    )


@dataclass
class AnnotateConfig:
    input: str = field(
        default=MISSING, metadata={"help": "parquet or JSONL with prompt and response"}
    )
    output: str = field(
        default=MISSING, metadata={"help": "annotations parquet to write", "output": "file"}
    )
    rejects: str = field(
        default="",
        metadata={
            "help": "rejected rows parquet ('' = <output stem>.rejects.parquet)",
            "output": "file",
        },
    )
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    address: str = field(default="", metadata={"help": "Ray address ('' = local or the job's)"})
    output_dir: str = field(
        default="outputs/annotate", metadata={"help": "where config.yaml and metrics.json go"}
    )

    def validate(self) -> None:
        self.judge.validate()
        self.judge.check_device(self.pool.gpus_per_actor > 0, "pool.gpus_per_actor=0")
        if self.pool.min_actors < 1 or self.pool.max_actors < self.pool.min_actors:
            raise ConfigError("pool: need 1 <= pool.min_actors <= pool.max_actors")


@dataclass
class UpdateConfig:
    annotations: str = field(default=MISSING, metadata={"help": "existing annotations parquet"})
    votes: str = field(
        default=MISSING,
        metadata={"help": "new votes: parquet with prompt, response (or row_key) and votes"},
    )
    output: str = field(
        default=MISSING, metadata={"help": "updated annotations parquet", "output": "file"}
    )
    kappa: float = field(
        default=1.0, metadata={"min": 0, "help": "the kappa the annotations were made with"}
    )
    eps: float = field(default=0.1, metadata={"min": 0, "below": 1})
    gamma: float = field(
        default=1.0, metadata={"min": 0, "max": 1, "help": "forgetting factor on the old evidence"}
    )
    output_dir: str = "outputs/annotate-update"


# ----------------------------------------------------------------------------- annotate


def _paths(cfg: AnnotateConfig) -> tuple[Path, Path, Path]:
    output = Path(cfg.output)
    if output.suffix != ".parquet":
        raise ConfigError(f"output: must be a .parquet file, got '{cfg.output}'")
    rejects = Path(cfg.rejects) if cfg.rejects else output.with_suffix(".rejects.parquet")
    return output, rejects, output.with_name(output.name + ".parts")


def _read_input(path: str) -> tuple[Any, list[str]]:
    """The input's prompt/response columns and each row's key; checks the file and columns."""
    import pyarrow as pa

    from dprm_ray.data import read_text_columns
    from dprm_ray.judge import row_key

    # Empty texts are allowed here: the judge rejects them row by row, with the reason.
    rows = read_text_columns(path, required=("prompt", "response"), allow_empty=True)
    table = pa.Table.from_pylist(
        rows, schema=pa.schema([("prompt", pa.string()), ("response", pa.string())])
    )
    keys = [row_key(r["prompt"], r["response"]) for r in rows]
    return table, keys


def _read_parts(paths: list[Path]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for path in paths:
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def _existing(output: Path, rejects: Path, parts: Path) -> tuple[list[dict], list[dict]]:
    """Rows annotated/rejected by earlier runs: the merged files plus any parts not merged yet."""
    import pyarrow.parquet as pq

    good_files = [output] if output.is_file() else []
    reject_files = [rejects] if rejects.is_file() else []
    if parts.is_dir():
        for path in sorted(parts.glob("*.parquet")):
            try:
                pq.read_metadata(path)
            except Exception as exc:  # a part cut short by a kill: its rows are redone
                print(f"annotate: removing unreadable part {path} ({exc})", file=sys.stderr)
                path.unlink()
                continue
            (reject_files if path.name.startswith("rejects-") else good_files).append(path)
    return _read_parts(good_files), _read_parts(reject_files)


def _write_reject_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dprm_ray.data import atomic_path

    schema = pa.schema(
        [("prompt", pa.string()), ("response", pa.string()), ("row_key", pa.string()),
         ("reason", pa.string())]
    )  # fmt: skip
    table = pa.Table.from_pylist(
        [{k: row.get(k) for k in schema.names} for row in rows], schema=schema
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if v is not None and k != "reason"}
    for key in ("prior", "posterior", "target"):
        out[key] = [float(x) for x in out[key]]
    out["votes"] = [int(x) for x in out["votes"]]
    out["persona_ids"] = [str(x) for x in out["persona_ids"]]
    if "population" in out:
        out["population"] = [float(x) for x in out["population"]]
    return out


def annotate(cfg: AnnotateConfig) -> dict:
    import ray.data  # before init_ray, so that Ray Data's console handler is quieted too
    from tqdm import tqdm

    from dprm_ray.actors.annotator import PersonaAnnotator
    from dprm_ray.data import write_rows

    output, rejects_path, parts = _paths(cfg)
    from dprm_ray.labels import get_label_space

    space = get_label_space(cfg.judge.label_space)
    table, keys = _read_input(cfg.input)
    old_good, old_rejects = _existing(output, rejects_path, parts)
    done = {r["row_key"] for r in old_good} | {r["row_key"] for r in old_rejects}
    order: dict[str, int] = {}
    todo: list[int] = []  # input rows to judge: first occurrences not done by an earlier run
    for i, key in enumerate(keys):
        if key not in order:
            order[key] = i
            if key not in done:
                todo.append(i)
    skipped = len(order) - len(todo)
    pending = len(todo)
    print(
        f"annotate: {len(keys)} input rows ({len(keys) - len(order)} duplicates), "
        f"{skipped} already done, {pending} to annotate with {cfg.judge.backend}:{cfg.judge.model}"
    )

    processed = rejected = 0
    start = time.perf_counter()
    if pending:
        from omegaconf import OmegaConf

        init_ray(cfg.address, cfg.output_dir)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours below counts rows; Ray's count blocks
        parts.mkdir(parents=True, exist_ok=True)
        # The driver has read the input anyway (row keys for resume); it hands the pending rows
        # to Ray Data as ready blocks, one per part file, so no CPU-needing read/split tasks
        # compete with a pool that takes every CPU, and finished work reaches disk (and survives
        # a kill) while the rest is being judged. At most ~1000 parts, however big the input.
        rows = table.take(todo).append_column("row_key", [[keys[i] for i in todo]])
        per_block = max(cfg.pool.batch_size, math.ceil(pending / 1000))
        ds = ray.data.from_arrow([rows.slice(i, per_block) for i in range(0, pending, per_block)])
        ds = ds.map_batches(
            PersonaAnnotator,
            fn_constructor_kwargs={
                "judge": OmegaConf.to_container(OmegaConf.structured(cfg.judge))
            },
            compute=ray.data.ActorPoolStrategy(
                min_size=cfg.pool.min_actors, max_size=cfg.pool.max_actors
            ),
            batch_size=cfg.pool.batch_size,
            batch_format="pandas",
            num_cpus=cfg.pool.cpus_per_actor,
            num_gpus=cfg.pool.gpus_per_actor,
        )
        with tqdm(total=pending, unit="row", desc="annotate", dynamic_ncols=True) as bar:
            for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
                rows = batch.to_dict("records")
                good = [_clean(r) for r in rows if r["reason"] is None]
                bad = [r for r in rows if r["reason"] is not None]
                name = uuid.uuid4().hex[:12]
                if good:
                    write_rows(
                        parts / f"part-{name}.parquet", good, "annotations", space.num_labels
                    )
                if bad:
                    _write_reject_rows(parts / f"rejects-{name}.parquet", bad)
                processed += len(good)
                rejected += len(bad)
                bar.update(len(rows))
                bar.set_postfix(rejected=rejected)
    elapsed = time.perf_counter() - start

    # Merge everything (earlier runs + this one) into the two final files, in input order.
    all_good, all_rejects = _existing(output, rejects_path, parts)
    merged = {r["row_key"]: _clean(r) for r in all_good}
    merged_rejects = {r["row_key"]: r for r in all_rejects if r["row_key"] not in merged}
    if merged:
        rows = sorted(merged.values(), key=lambda r: order.get(r["row_key"], len(order)))
        write_rows(output, rows, "annotations", space.num_labels)
    if merged_rejects:
        _write_reject_rows(
            rejects_path,
            sorted(merged_rejects.values(), key=lambda r: order.get(r["row_key"], len(order))),
        )
    if parts.is_dir():
        for path in parts.glob("*.parquet"):
            path.unlink()
        parts.rmdir()
    summary = {
        "input_rows": len(keys),
        "duplicates": len(keys) - len(order),
        "processed": processed,
        "rejected": rejected,
        "skipped": skipped,
        "annotated_total": len(merged),
        "rejected_total": len(merged_rejects),
        "rows_per_s": round((processed + rejected) / elapsed, 3) if elapsed > 0 else 0.0,
        "output": str(output),
        "rejects": str(rejects_path) if merged_rejects else "",
    }
    print(
        f"annotate: processed {processed}, rejected {rejected}, skipped {skipped} "
        f"(already done) in {elapsed:.1f} s; {output}: {len(merged)} rows"
        + (f"; {rejects_path}: {len(merged_rejects)} rejects" if merged_rejects else "")
    )
    return summary


# ----------------------------------------------------------------------------- update


def update(cfg: UpdateConfig) -> dict:
    import numpy as np

    from dprm_ray.crowd import update_with_votes
    from dprm_ray.data import DataError, load_rows, read_records, write_rows
    from dprm_ray.judge import row_key
    from dprm_ray.labels import get_label_space
    from dprm_ray.reward_eval import w1_on_line

    rows = load_rows(cfg.annotations, kind="annotations").rows
    votes_rows = read_records(cfg.votes)
    new_votes: dict[str, tuple[list[int], list[str]]] = {}
    problems = []
    for i, row in enumerate(votes_rows, start=1):
        key = row.get("row_key") or (
            row_key(row["prompt"], row["response"])
            if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)
            else None
        )
        votes = row.get("votes")
        if key is None:
            problems.append(f"{cfg.votes}:{i}: needs row_key or prompt and response")
        elif not isinstance(votes, list) or not all(isinstance(v, int) for v in votes):
            problems.append(f"{cfg.votes}:{i}: votes must be a list of category indices")
        else:
            old = new_votes.get(key, ([], []))
            ids = row.get("persona_ids") or [f"vote{j}" for j in range(len(votes))]
            new_votes[key] = (old[0] + votes, old[1] + [str(x) for x in ids])
    if problems:
        raise DataError(problems)

    spaces = {row.get("label_space", "hh6") for row in rows}
    if len(spaces) != 1:
        raise DataError([f"{cfg.annotations}: mixes label spaces {sorted(spaces)}"])
    space = get_label_space(spaces.pop())
    k = space.num_labels
    out, before, after, matched = [], [], [], 0
    for row in rows:
        key = row.get("row_key") or row_key(row["prompt"], row["response"])
        before.append(row["target"])
        if key not in new_votes:
            out.append(row)
            after.append(row["target"])
            continue
        votes, ids = new_votes[key]
        bad = [v for v in votes if not 0 <= v < k]
        if bad:
            raise DataError([f"{cfg.votes}: row_key {key}: votes {bad} outside 0..{k - 1}"])
        label = update_with_votes(
            np.array(row["prior"]), row["votes"], votes, cfg.kappa, cfg.eps, cfg.gamma
        )
        matched += 1
        new = {
            **row,
            "row_key": key,
            "votes": list(row["votes"]) + votes,
            "persona_ids": list(row.get("persona_ids") or []) + ids,
            "posterior": label["posterior"].tolist(),
            "target": label["target"].tolist(),
        }
        out.append(new)
        after.append(new["target"])
    unmatched = len(new_votes) - matched
    write_rows(cfg.output, out, "annotations", k)
    # W1 on the category index line: how far each item's target moved.
    moved = w1_on_line(np.array(before), np.array(after), np.arange(k, dtype=float))
    before_mean, after_mean = np.mean(before, axis=0), np.mean(after, axis=0)
    print(
        f"annotate update: {matched} of {len(rows)} rows got new votes "
        f"({unmatched} vote rows matched no annotation); mean W1 moved "
        f"{np.mean(moved):.4f} (max {np.max(moved):.4f})"
    )
    print(f"{'category':<28} {'before':>8} {'after':>8}")
    for label, b, a in zip(space.labels, before_mean, after_mean, strict=True):
        print(f"{label:<28} {b:>8.4f} {a:>8.4f}")
    return {
        "rows": len(rows),
        "updated": matched,
        "unmatched_votes": unmatched,
        "mean_w1_moved": float(np.mean(moved)),
        "max_w1_moved": float(np.max(moved)),
        "category_mean_before": dict(zip(space.labels, map(float, before_mean), strict=True)),
        "category_mean_after": dict(zip(space.labels, map(float, after_mean), strict=True)),
        "output": cfg.output,
    }


JOB = Job(
    "annotate",
    "Annotate prompt/response rows with a persona crowd of LLM judges (Ray Data actor pool).",
    (
        Command("", __doc__.strip(), AnnotateConfig, annotate),
        Command(
            "update",
            "Add new votes (another persona set, or human votes) to an annotation file.",
            UpdateConfig,
            update,
        ),
    ),
)


def main(argv=None) -> int:
    return run_job(JOB, argv)


if __name__ == "__main__":
    sys.exit(main())

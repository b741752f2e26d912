"""Reward-model training: data, the per-worker training loop, held-out evaluation.

The loop runs on every data-parallel worker with the shared machinery of `dprm_ray.training`
(DeepSpeed engine, exact resume from `<output_dir>/checkpoints`, W&B on rank 0); dropout is
re-seeded per step so a resumed run matches an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dprm_ray.labels import LabelSpace, get_label_space
from dprm_ray.reward_config import (
    LOSSES,
    TargetConfig,
    TrainRewardConfig,
)
from dprm_ray.reward_models import (
    RewardData,
    build_reward_model,
    cached_embeddings,
    model_inputs,
    predict,
)
from dprm_ray.training import (
    deepspeed_engine,
    ensure_process_group,
    gather,
    resume_step,
    save_checkpoint,
    save_on_rank0,
    start_wandb,
    step_rows,
    total_steps,
)

# --------------------------------------------------------------------------- data


def _smoothed_targets(rows: list[dict], space: LabelSpace, targets: TargetConfig) -> np.ndarray:
    from dprm_ray.crowd import dirichlet_posterior, smooth_target, vote_counts

    if targets.kappa is None and targets.eps is None:
        return np.array([r["target"] for r in rows], dtype=np.float64)
    prior = np.array([r["prior"] for r in rows], dtype=np.float64)
    if targets.kappa is not None:
        counts = np.stack([vote_counts(r["votes"], space.num_labels) for r in rows])
        posterior = dirichlet_posterior(prior, counts, targets.kappa)
    else:
        posterior = np.array([r["posterior"] for r in rows], dtype=np.float64)
    if targets.eps is None:
        return posterior
    return smooth_target(posterior, targets.eps, prior=prior)


def pairs_from_targets(prompts: list[str], targets: np.ndarray, space: LabelSpace) -> np.ndarray:
    """(chosen, rejected) index pairs: responses to the same prompt ordered by expected score."""
    expected = targets @ space.scores_array()
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_prompt[p].append(i)
    pairs = []
    for idx in by_prompt.values():
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                if abs(expected[i] - expected[j]) > 1e-9:
                    pairs.append((i, j) if expected[i] > expected[j] else (j, i))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def load_reward_data(
    path: str, space: LabelSpace, targets: TargetConfig, skip_invalid: bool = False
) -> RewardData:
    """Annotations give targets (and pairs between responses to one prompt); pairs give pairs."""
    from dprm_ray.data import DataError, load_rows

    loaded = load_rows(path, num_labels=space.num_labels, skip_invalid=skip_invalid)
    rows = loaded.rows
    if loaded.skipped:
        print(f"{path}: skipped {len(loaded.skipped)} invalid rows, first: {loaded.skipped[0]}")
    if loaded.kind == "annotations":
        prompts = [r["prompt"] for r in rows]
        target = _smoothed_targets(rows, space, targets)
        population = (
            np.array([r["population"] for r in rows])
            if all("population" in r for r in rows)
            else None
        )
        groups = [r["group"] for r in rows] if all("group" in r for r in rows) else None
        return RewardData(
            prompts,
            [r["response"] for r in rows],
            target,
            population,
            groups,
            pairs_from_targets(prompts, target, space),
        )
    if loaded.kind == "pairs":
        prompts = [r["prompt"] for r in rows for _ in (0, 1)]
        responses = [text for r in rows for text in (r["chosen"], r["rejected"])]
        pairs = np.arange(2 * len(rows), dtype=np.int64).reshape(-1, 2)
        return RewardData(prompts, responses, pairs=pairs)
    raise DataError([f"{path}: holds {loaded.kind}; reward training needs annotations or pairs"])


def subset(data: RewardData, rows: np.ndarray) -> RewardData:
    """The rows `rows` (sorted) and the pairs whose both ends are among them, re-indexed."""
    rows = np.sort(rows)
    remap = -np.ones(len(data.prompts), dtype=np.int64)
    remap[rows] = np.arange(len(rows))

    def pick(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[rows]

    pairs = None
    if data.pairs is not None:
        mapped = remap[data.pairs]
        pairs = mapped[(mapped >= 0).all(axis=1)]
    return RewardData(
        [data.prompts[i] for i in rows],
        [data.responses[i] for i in rows],
        pick(data.targets),
        pick(data.population),
        None if data.groups is None else [data.groups[i] for i in rows],
        pairs,
    )


def bootstrap_resample(data: RewardData, by_pairs: bool, seed: int) -> RewardData:
    """A same-size resample with replacement of the training items (pairs, or rows)."""
    rng = np.random.default_rng([seed, 0xB007])
    if by_pairs:
        assert data.pairs is not None
        pick = rng.integers(0, len(data.pairs), len(data.pairs))
        return RewardData(
            data.prompts,
            data.responses,
            data.targets,
            data.population,
            data.groups,
            data.pairs[pick],
        )
    rows = rng.integers(0, len(data.prompts), len(data.prompts))
    return RewardData(
        [data.prompts[i] for i in rows],
        [data.responses[i] for i in rows],
        None if data.targets is None else data.targets[rows],
        None if data.population is None else data.population[rows],
        None if data.groups is None else [data.groups[i] for i in rows],
        None,  # row pairs do not survive duplication; distribution losses do not use them
    )


def split_by_prompt(data: RewardData, fraction: float, seed: int) -> tuple[RewardData, RewardData]:
    """Hold out `fraction` of the prompts (all their responses), deterministically."""
    prompts = sorted(set(data.prompts))
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(len(prompts))[: max(1, round(fraction * len(prompts)))].tolist())
    held_prompts = {prompts[i] for i in held}
    is_held = np.array([p in held_prompts for p in data.prompts])
    return subset(data, np.flatnonzero(~is_held)), subset(data, np.flatnonzero(is_held))


# --------------------------------------------------------------------------- evaluation


def evaluate(
    pred: dict[str, np.ndarray], data: RewardData, space: LabelSpace | None
) -> dict[str, float]:
    from dprm_ray.reward_eval import distribution_metrics, pairwise_accuracy

    metrics: dict[str, float] = {}
    if "probs" in pred and data.targets is not None and space is not None:
        metrics.update(distribution_metrics(pred["probs"], data.targets, space, data.population))
    elif data.targets is not None and space is not None:
        from dprm_ray.reward_eval import spearman

        metrics["spearman"] = spearman(pred["expected"], data.targets @ space.scores_array())
    if data.pairs is not None and len(data.pairs):
        metrics["pairwise_accuracy"] = pairwise_accuracy(
            pred["expected"][data.pairs[:, 0]], pred["expected"][data.pairs[:, 1]]
        )
        metrics["pairs"] = float(len(data.pairs))
    return metrics


# --------------------------------------------------------------------------- the training loop


def training_data(cfg: TrainRewardConfig) -> tuple[LabelSpace, RewardData, RewardData]:
    """(label space, training data, held-out data) of a run, checked for its loss.

    The driver calls it (with `check_batches`) before Ray Train starts, so bad data or config
    stops the job once with one message instead of failing every worker and every retry.
    """
    from dprm_ray.config import ConfigError
    from dprm_ray.data import DataError

    if cfg.loss.kind not in LOSSES:
        raise ConfigError(f"loss.kind: must be one of {', '.join(LOSSES)}, got '{cfg.loss.kind}'")
    try:
        space = get_label_space(cfg.label_space)
    except ValueError as exc:
        raise ConfigError(f"label_space: {exc}") from None
    is_bt = cfg.loss.kind == "bt"
    data = load_reward_data(cfg.data, space, cfg.targets, cfg.skip_invalid_rows)
    if cfg.eval_data:
        train, held = (
            data,
            load_reward_data(cfg.eval_data, space, cfg.targets, cfg.skip_invalid_rows),
        )
    else:
        train, held = split_by_prompt(data, cfg.val_fraction, cfg.seed)
    if cfg.bootstrap:
        train = bootstrap_resample(train, is_bt, cfg.seed)
    if not is_bt and train.targets is None:
        raise DataError([f"{cfg.data}: loss '{cfg.loss.kind}' needs annotations with targets"])
    if is_bt and (train.pairs is None or len(train.pairs) == 0):
        raise DataError([f"{cfg.data}: loss 'bt' needs pairs (or annotations with 2+ responses)"])
    return space, train, held


def frozen_features(
    cfg: TrainRewardConfig, train: RewardData, held: RewardData, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen backbone's features of the training and held-out texts, through the on-disk
    cache (`cached_embeddings`)."""
    train_emb, held_emb = (
        cached_embeddings(
            cfg.backbone.spec,
            data.prompts,
            data.responses,
            cfg.backbone.max_length,
            progress=progress,
            backbone_kind=cfg.backbone.kind,
        )
        for data in (train, held)
    )
    return train_emb, held_emb


def cache_features(cfg: TrainRewardConfig) -> int:
    """Fill the cache that the workers then read (`frozen_features`); the number of texts."""
    _, train, held = training_data(cfg)
    frozen_features(cfg, train, held, progress=True)
    return len(train.prompts) + len(held.prompts)


def check_batches(cfg: TrainRewardConfig, train: RewardData) -> None:
    """DataError unless the training data fill one global batch of `scale.num_workers` workers."""
    is_bt = cfg.loss.kind == "bt"
    n_items = len(train.pairs) if is_bt and train.pairs is not None else len(train.prompts)
    total_steps(n_items, cfg.optim, cfg.scale.num_workers, cfg.data, "pairs" if is_bt else "rows")


def train_worker(
    cfg: TrainRewardConfig,
    report: Callable[[dict[str, float]], None] = lambda metrics: None,
) -> dict[str, Any]:
    """Train on this worker's share; returns the final metrics (on every rank).

    `report` gets the held-out metrics of every evaluation (every `eval_every` steps and at the
    end), on every rank.
    """
    from tqdm import tqdm

    from dprm_ray.losses import bradley_terry_loss, distribution_loss

    rank, world = ensure_process_group()
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    space, train, held = training_data(cfg)
    is_bt = cfg.loss.kind == "bt"

    torch.manual_seed(cfg.seed)
    model, tokenizer = build_reward_model(
        "bradley-terry" if is_bt else "distributional",
        cfg.backbone.spec,
        space,
        backbone_kind=cfg.backbone.kind,
        freeze_backbone=cfg.backbone.freeze,
        cached_embeddings=cfg.backbone.freeze and cfg.backbone.cache_embeddings,
    )
    train_emb = held_emb = None
    if model.backbone is None:
        # Rank 0 embeds and caches; the others then read the cache.
        import torch.distributed as dist

        for turn in (0, 1):
            if (rank == 0) == (turn == 0):
                train_emb, held_emb = frozen_features(cfg, train, held, progress=rank == 0)
            dist.barrier()

    engine = deepspeed_engine(model, cfg.optim, cfg.scale.zero_stage, cfg.precision)
    n_items = len(train.pairs) if is_bt else len(train.prompts)
    global_batch = cfg.optim.batch_size * world
    total = total_steps(n_items, cfg.optim, world, cfg.data, "pairs" if is_bt else "rows")
    step = resume_step(engine, ckpt_dir, cfg.resume, rank)
    run = start_wandb(cfg.wandb, out_dir, cfg, "train-reward", rank)

    engine.train()
    losses: list[float] = []
    bar = tqdm(total=total, initial=step, desc="train-reward", unit="step", disable=rank != 0)
    while step < total:
        torch.manual_seed(cfg.seed * 1_000_003 + step * world + rank)  # exact dropout on resume
        rows = step_rows(n_items, global_batch, cfg.seed, step)[rank::world]
        if is_bt:
            pair = train.pairs[rows]
            idx = np.concatenate([pair[:, 0], pair[:, 1]])
            reward = engine(
                **model_inputs(
                    tokenizer, train, idx, train_emb, cfg.backbone.max_length, engine.device
                )
            )
            reward = reward.float().squeeze(-1)
            loss = bradley_terry_loss(reward[: len(rows)], reward[len(rows) :])
        else:
            logits = engine(
                **model_inputs(
                    tokenizer, train, rows, train_emb, cfg.backbone.max_length, engine.device
                )
            )
            target = torch.as_tensor(train.targets[rows], dtype=torch.float32, device=engine.device)
            loss = distribution_loss(
                logits.float(),
                target,
                cfg.loss.kind,
                space,
                mix=cfg.loss.mix,
                cost_metric=cfg.loss.cost_metric,
                reg=cfg.loss.reg,
                method=cfg.loss.method,
            )
        engine.backward(loss)
        engine.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            mean_loss = float(np.mean(losses[-cfg.log_every :]))
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if run is not None:
                run.log({"train/loss": mean_loss}, step=step)
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total):
            save_checkpoint(engine, ckpt_dir, step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            # Intermediate results for early stopping (sweeps); the seed is reset every step,
            # so evaluating does not change the training trajectory.
            engine.eval()
            metrics = _evaluate_sharded(engine, tokenizer, held, held_emb, cfg, space, rank, world)
            metrics.update(steps=step, train_examples=n_items)
            if run is not None:
                run.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            report(metrics)
            engine.train()
    bar.close()

    engine.eval()
    metrics = _evaluate_sharded(engine, tokenizer, held, held_emb, cfg, space, rank, world)
    metrics.update(steps=step, train_examples=n_items)
    save_on_rank0(
        engine, cfg.scale.zero_stage, rank, lambda: engine.module.save(out_dir / "model", tokenizer)
    )
    if run is not None:
        run.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        run.finish()
    # Ray Train V2's report waits for the controller's next poll (~seconds), so it is called only
    # after evaluations (`eval_every`, and this final one), not every few steps; progress goes to
    # the bar and W&B instead.
    report(metrics)
    return metrics


def _evaluate_sharded(
    engine: Any,
    tokenizer: Any,
    held: RewardData,
    emb: torch.Tensor | None,
    cfg: TrainRewardConfig,
    space: LabelSpace,
    rank: int,
    world: int,
) -> dict[str, float]:
    """Every rank scores a slice (ZeRO-3 needs all ranks in each forward); rank order restored."""
    n = len(held.prompts)
    per_rank = math.ceil(n / world)
    # Equal-length slices keep ZeRO-3's collective forwards in lockstep; pad with row 0.
    rows = np.arange(rank * per_rank, (rank + 1) * per_rank)
    rows = np.where(rows < n, rows, 0)
    pred = predict(engine.module, tokenizer, held, emb, cfg.backbone.max_length, rows=rows)
    parts = gather(pred)
    merged = {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}
    return evaluate(merged, held, space)

"""PAL: pluralistic reward models with per-user mixtures of K shared prototypes.

Chen et al., "PAL: Pluralistic Alignment Framework for Learning from Heterogeneous Preferences"
(arXiv 2406.08469; reference code RamyaLab/pluralistic-alignment). An ideal-point model: every
user i is a softmax mixture w_i = softmax(l_i) over K prototypes shared by all users, so what is
learnt from many users is the prototypes and what is learnt per user is only K numbers.

Inputs are frozen foundation-model features (MiniLM by default, `cached_embeddings`): `items`
e(x, y) of the (prompt, response) pair and `prompts` e(x) of the prompt alone (embedded as the
pair (prompt, "")). f, g_k are small MLPs (Linear-GELU-Linear) into a preference space of size
`pref_dim`.

- PAL-A: prototypes are points p_k of the preference space; the user's ideal point is
  a_i = sum_k w_ik p_k and the reward is minus the Euclidean distance, r_i(x, y) = -|f(e(x, y)) - a_i|:
  closer is better, and the preference margin is d(f(y_rejected), a_i) - d(f(y_chosen), a_i).
  Loss: logistic, -log sigmoid(margin), or hinge, max(0, hinge_margin - margin).
- PAL-B: K prompt-conditioned prototypes g_k(e(x)); the user's ideal point for prompt x is
  u_i(x) = sum_k w_ik g_k(e(x)) and r_i(x, y) = tau * cos(f(e(x, y)), u_i(x)) with a learnable
  temperature tau = exp(log_tau) (initialised at 1/0.07 and capped at 100, as in the reference
  code). Loss: Bradley-Terry (logistic) on r_i(x, y_chosen) - r_i(x, y_rejected).

With K = 1 every user has the same weights (softmax of one logit), so PAL-A K=1 and PAL-B K=1
are single shared reward models: PAL-B K=1 is a Bradley-Terry reward model with PAL-B's
architecture, the homogeneous baseline.

The "mixture" user is the population average: w_bar = mean of the training users' w_i (stored as
the `population_weights` buffer when training ends); it mixes ideal points, not rewards.
Few-shot adaptation (`adapt_user`) learns a new user's K logits from a handful of comparisons,
starting from log(w_bar), with everything else frozen.

A saved model is a folder (README "Checkpoint format"): `pal_model.json` (`type: pal`,
`format_version`, and the `PALConfig`: variant, sizes, user ids, and the embedding backbone spec +
max_length needed to score raw text) and `pal.safetensors` (every parameter and buffer of
`PALModel`). `PALModel.from_pretrained` / `load_pal` read it; `save_pretrained` / `save_pal` write it.
`PALReward` turns a folder and a user id (or "mixture") into a text reward function.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dprm_ray.config import ConfigError

VARIANTS = ("pal-a", "pal-b")
LOSSES = ("logistic", "hinge")
MIXTURE = "mixture"
PAL_CONFIG = "pal_model.json"
PAL_WEIGHTS = "pal.safetensors"
PAL_FORMAT_VERSION = 1
MAX_LOG_TAU = math.log(100.0)
DIST_EPS = 1e-12  # inside the square root: keeps the distance differentiable at 0


@dataclass
class PALConfig:
    variant: str = "pal-b"
    input_dim: int = 384  # size of the frozen embeddings
    num_prototypes: int = 5
    hidden_size: int = 256
    pref_dim: int = 128
    loss: str = "logistic"  # PAL-A: logistic or hinge; PAL-B is always logistic
    hinge_margin: float = 1.0
    backbone: str = "minilm"  # what embeds raw text (a model-loader spec, an encoder)
    max_length: int = 256
    user_ids: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got '{self.variant}'")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.variant == "pal-b" and self.loss != "logistic":
            raise ConfigError("PAL-B trains with the logistic (Bradley-Terry) loss only")
        for name in ("input_dim", "num_prototypes", "hidden_size", "pref_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(set(self.user_ids)) != len(self.user_ids):
            raise ConfigError("user_ids must be unique")
        if MIXTURE in self.user_ids:
            raise ConfigError(f"'{MIXTURE}' is reserved for the population-average user")


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def _score(features: torch.Tensor, ideal: torch.Tensor, tau: torch.Tensor | None) -> torch.Tensor:
    """PAL-A (tau None): minus the Euclidean distance; PAL-B: tau * cosine similarity."""
    if tau is None:
        return -((features - ideal).square().sum(-1) + DIST_EPS).sqrt()
    return tau * F.cosine_similarity(features, ideal, dim=-1)


class PALModel(nn.Module):
    """PAL-A or PAL-B on precomputed embeddings; users are rows of `user_logits` [U, K]."""

    def __init__(self, config: PALConfig):
        super().__init__()
        config.validate()
        # A copy: `add_user` appends to the user list, which must not leak into the caller's.
        self.config = PALConfig(**asdict(config))
        k, d = config.num_prototypes, config.pref_dim
        self.f = _mlp(config.input_dim, config.hidden_size, d)
        # Zero logits: every user starts as the uniform mixture; the random prototypes break the
        # symmetry between them as soon as users' answers differ.
        self.user_logits = nn.Parameter(torch.zeros(len(config.user_ids), k))
        self.register_buffer("population_weights", torch.full((k,), 1.0 / k))
        if config.variant == "pal-a":
            self.prototypes = nn.Parameter(torch.randn(k, d) / math.sqrt(d))
        else:
            self.g = nn.ModuleList(_mlp(config.input_dim, config.hidden_size, d) for _ in range(k))
            self.log_tau = nn.Parameter(torch.tensor(math.log(1.0 / 0.07)))
        self._index = {u: i for i, u in enumerate(config.user_ids)}

    # ----------------------------------------------------------------------- save / load

    def save_pretrained(self, path: str | Path) -> None:
        """`save_pal`: the folder `from_pretrained` reads."""
        save_pal(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PALModel:
        """`load_pal`: a saved PAL folder -> model in eval mode."""
        return load_pal(path)

    # ----------------------------------------------------------------------- users

    @property
    def num_prototypes(self) -> int:
        return self.config.num_prototypes

    def user_index(self, user: str) -> int:
        try:
            return self._index[user]
        except KeyError:
            raise KeyError(
                f"user '{user}' is not in this PAL model (adapt it with `train-pal adapt`)"
            ) from None

    def user_weights(self, user: str) -> torch.Tensor:
        """[K] mixture weights of a known user, or of the population average for "mixture"."""
        if user == MIXTURE:
            return self.population_weights.clone()
        return torch.softmax(self.user_logits[self.user_index(user)].detach(), dim=-1)

    def add_user(self, user: str, logits: torch.Tensor) -> None:
        """Add (or overwrite) a user with the given [K] mixture logits.

        Adding replaces the `user_logits` parameter, so do it after training (an optimizer built
        before would keep updating the old tensor)."""
        if user == MIXTURE:
            raise ValueError(f"'{MIXTURE}' is reserved for the population-average user")
        row = logits.detach().reshape(1, self.num_prototypes).to(self.user_logits)
        if user in self._index:
            with torch.no_grad():
                self.user_logits[self._index[user]] = row[0]
            return
        self.user_logits = nn.Parameter(torch.cat([self.user_logits.detach(), row]))
        self.config.user_ids.append(user)
        self._index[user] = len(self.config.user_ids) - 1

    # ----------------------------------------------------------------------- the model

    def tau(self) -> torch.Tensor:
        return self.log_tau.clamp(max=MAX_LOG_TAU).exp()

    def prototype_features(self, prompts: torch.Tensor) -> torch.Tensor:
        """PAL-B: g_k(e(x)) for every prototype, [N, K, D]."""
        return torch.stack([g(prompts) for g in self.g], dim=1)

    def ideal_points(
        self, weights: torch.Tensor, prompts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[N, D] ideal points for mixture weights [N, K] (PAL-B also needs prompts [N, E])."""
        if self.config.variant == "pal-a":
            return weights @ self.prototypes
        if prompts is None:
            raise ValueError("PAL-B needs the prompt embeddings")
        return torch.einsum("nk,nkd->nd", weights, self.prototype_features(prompts))

    def score(self, features: torch.Tensor, ideal: torch.Tensor) -> torch.Tensor:
        """Reward [N] of projected items f(e(x, y)) [N, D] for ideal points [N, D]."""
        tau = self.tau() if self.config.variant == "pal-b" else None
        return _score(features, ideal, tau)

    def reward(
        self, items: torch.Tensor, prompts: torch.Tensor | None, weights: torch.Tensor
    ) -> torch.Tensor:
        """r(x, y) [N] for item embeddings [N, E] under mixture weights [N, K] or [K]."""
        weights = weights.expand(items.shape[0], -1)
        return self.score(self.f(items), self.ideal_points(weights, prompts))

    def margin(
        self,
        weights: torch.Tensor,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        prompts: torch.Tensor | None,
    ) -> torch.Tensor:
        """r(x, chosen) - r(x, rejected) [N]; the ideal point is computed once per pair."""
        ideal = self.ideal_points(weights.expand(chosen.shape[0], -1), prompts)
        return self.score(self.f(chosen), ideal) - self.score(self.f(rejected), ideal)

    def forward(
        self,
        users: torch.Tensor,
        chosen: torch.Tensor,
        rejected: torch.Tensor,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Preference margins [N] of users [N] (indices into `user_logits`)."""
        weights = torch.softmax(self.user_logits[users], dim=-1)
        return self.margin(weights, chosen, rejected, prompts)


def build_pal_model(config: PALConfig, seed: int = 0) -> PALModel:
    """A freshly initialised model; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PALModel(config)


def pal_loss(
    margin: torch.Tensor, kind: str = "logistic", hinge_margin: float = 1.0
) -> torch.Tensor:
    """Mean loss of preference margins (positive: the chosen response wins)."""
    if kind == "logistic":
        return F.softplus(-margin).mean()  # = -log sigmoid(margin), stable for large |margin|
    if kind == "hinge":
        return F.relu(hinge_margin - margin).mean()
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got '{kind}'")


# --------------------------------------------------------------------------- data


@dataclass
class PairTensors:
    """Embedded comparisons: chosen / rejected items e(x, y) and prompts e(x), [N, E] each, and
    users [N] (indices into the model's users; -1 where unknown)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    prompts: torch.Tensor
    users: torch.Tensor

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    def subset(self, rows: torch.Tensor | slice) -> PairTensors:
        return PairTensors(
            self.chosen[rows], self.rejected[rows], self.prompts[rows], self.users[rows]
        )


def embed_pairs(
    rows: Sequence[dict[str, Any]],
    backbone: str,
    max_length: int = 256,
    user_ids: Sequence[str] | None = None,
    progress: bool = False,
    cache_dir: str | Path | None = None,
) -> PairTensors:
    """Embed pairs rows (prompt, chosen, rejected[, user_id]) with a frozen encoder, cached.

    Each distinct (prompt, response) and prompt is embedded once. `user_ids` maps `user_id` to
    model indices; a user not in it raises KeyError naming the user (None: all users -1).
    """
    from dprm_ray.reward_models import cached_embeddings

    items: dict[tuple[str, str], int] = {}
    prompts: dict[str, int] = {}
    for row in rows:
        for key in ("chosen", "rejected"):
            items.setdefault((row["prompt"], row[key]), len(items))
        prompts.setdefault(row["prompt"], len(prompts))
    item_keys = list(items)
    item_emb = cached_embeddings(
        backbone,
        [p for p, _ in item_keys],
        [r for _, r in item_keys],
        max_length,
        cache_dir=cache_dir,
        progress=progress,
    )
    prompt_emb = embed_prompts(backbone, list(prompts), max_length, cache_dir, progress)
    index = {u: i for i, u in enumerate(user_ids)} if user_ids is not None else None
    users = []
    for i, row in enumerate(rows, start=1):
        if index is None:
            users.append(-1)
        elif row.get("user_id") not in index:
            raise KeyError(f"row {i}: user '{row.get('user_id')}' is not among the model's users")
        else:
            users.append(index[row["user_id"]])
    chosen = torch.tensor([items[(r["prompt"], r["chosen"])] for r in rows], dtype=torch.long)
    rejected = torch.tensor([items[(r["prompt"], r["rejected"])] for r in rows], dtype=torch.long)
    prompt_idx = torch.tensor([prompts[r["prompt"]] for r in rows], dtype=torch.long)
    return PairTensors(
        chosen=item_emb[chosen],
        rejected=item_emb[rejected],
        prompts=prompt_emb[prompt_idx],
        users=torch.tensor(users, dtype=torch.long),
    )


def embed_prompts(
    backbone: str,
    prompts: Sequence[str],
    max_length: int = 256,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """e(x): the prompt embedded alone, as the pair (prompt, "") so that it goes through the same
    tokenisation and pooling as the items."""
    from dprm_ray.reward_models import cached_embeddings

    return cached_embeddings(
        backbone, list(prompts), [""] * len(prompts), max_length, cache_dir, progress
    )


# --------------------------------------------------------------------------- training


def _accuracy(margin: torch.Tensor) -> float:
    return float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())


def train_pal(
    model: PALModel,
    data: PairTensors,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train every parameter with Adam on seen users' comparisons; returns per-epoch loss/accuracy.

    Batches are a pure function of `seed` (its own generator), so the same model, data and seed
    give the same weights. Sets `population_weights` to the mean mixture of the users in `data`.
    """
    from tqdm import tqdm

    if len(data) == 0:
        raise ValueError("no comparisons to train on")
    if bool((data.users < 0).any()):
        raise ValueError("every training comparison needs a known user")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    kind, hinge = model.config.loss, model.config.hinge_margin
    history: list[dict[str, float]] = []
    bar = tqdm(range(epochs), desc=f"train {model.config.variant}", disable=not progress)
    model.train()
    for epoch in bar:
        order = torch.randperm(len(data), generator=generator)
        total, correct = 0.0, 0.0
        for start in range(0, len(data), batch_size):
            batch = data.subset(order[start : start + batch_size])
            margin = model(batch.users, batch.chosen, batch.rejected, batch.prompts)
            loss = pal_loss(margin, kind, hinge)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            correct += _accuracy(margin.detach()) * len(batch)
        stats = {"epoch": epoch + 1, "loss": total / len(data), "accuracy": correct / len(data)}
        history.append(stats)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['accuracy']:.3f}")
        if on_epoch is not None:
            on_epoch(stats)
    model.eval()
    with torch.no_grad():
        trained = torch.unique(data.users)
        model.population_weights.copy_(torch.softmax(model.user_logits[trained], -1).mean(0))
    return history


def adapt_user(
    model: PALModel,
    comparisons: PairTensors,
    steps: int = 200,
    lr: float = 0.1,
    init_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Few-shot adaptation: learn one new user's [K] mixture logits from their comparisons.

    Everything else stays frozen (features are computed once, without gradients; the model is not
    modified). Starts from `init_logits`, default log of the population-average weights, and runs
    `steps` full-batch Adam steps on the training loss. Returns the logits (add them to the model
    with `model.add_user`). With no comparisons, or K = 1, the start is returned unchanged.
    """
    if init_logits is None:
        init_logits = model.population_weights.clamp(min=1e-8).log()
    logits = init_logits.detach().clone().reshape(model.num_prototypes)
    if len(comparisons) == 0 or model.num_prototypes == 1 or steps == 0:
        return logits
    was_training = model.training
    model.eval()
    with torch.no_grad():
        zc, zr = model.f(comparisons.chosen), model.f(comparisons.rejected)
        if model.config.variant == "pal-b":
            protos = model.prototype_features(comparisons.prompts)  # [N, K, D]
        else:
            protos = model.prototypes.expand(len(comparisons), -1, -1)
        tau = model.tau() if model.config.variant == "pal-b" else None
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=lr)
    kind, hinge = model.config.loss, model.config.hinge_margin
    for _ in range(steps):
        ideal = torch.einsum("k,nkd->nd", torch.softmax(logits, -1), protos)
        margin = _score(zc, ideal, tau) - _score(zr, ideal, tau)
        loss = pal_loss(margin, kind, hinge)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.train(was_training)
    return logits.detach()


# --------------------------------------------------------------------------- prediction


@torch.no_grad()
def user_reward(
    model: PALModel,
    items: torch.Tensor,
    prompts: torch.Tensor | None,
    user: str | torch.Tensor,
) -> torch.Tensor:
    """r(x, y) [N] for one user: a user id, "mixture", or [K] mixture logits (from `adapt_user`)."""
    weights = (
        torch.softmax(user, -1) if isinstance(user, torch.Tensor) else model.user_weights(user)
    )
    return model.reward(items, prompts, weights)


@torch.no_grad()
def pair_rewards(
    model: PALModel, data: PairTensors, user: str | torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected) per comparison: under each row's own user (`user=None`), or one user
    id / "mixture" / [K] logits for every row."""
    if user is None:
        if bool((data.users < 0).any()):
            raise ValueError("rows without a known user: pass `user`")
        with torch.no_grad():
            weights = torch.softmax(model.user_logits[data.users], dim=-1)
            r_c = model.reward(data.chosen, data.prompts, weights)
            r_r = model.reward(data.rejected, data.prompts, weights)
    else:
        r_c = user_reward(model, data.chosen, data.prompts, user)
        r_r = user_reward(model, data.rejected, data.prompts, user)
    return r_c.numpy(), r_r.numpy()


def pal_accuracy(
    model: PALModel, data: PairTensors, user: str | torch.Tensor | None = None
) -> float:
    """Pairwise accuracy (ties count half) of `pair_rewards`."""
    from dprm_ray.reward_eval import pairwise_accuracy

    return pairwise_accuracy(*pair_rewards(model, data, user))


# --------------------------------------------------------------------------- save / load


def is_pal_dir(path: str | Path) -> bool:
    return (Path(path) / PAL_CONFIG).is_file()


def save_pal(model: PALModel, path: str | Path) -> None:
    """Write the folder atomically (temp folder, then rename)."""
    from dprm_ray.data import atomic_dir

    with atomic_dir(path) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp / PAL_WEIGHTS)
        config = {"type": "pal", "format_version": PAL_FORMAT_VERSION, **asdict(model.config)}
        (tmp / PAL_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_pal(path: str | Path) -> PALModel:
    """Load a saved PAL folder -> model in eval mode."""
    folder = Path(path)
    if not is_pal_dir(folder):
        raise FileNotFoundError(f"{folder}: not a PAL model folder (no {PAL_CONFIG})")
    raw = json.loads((folder / PAL_CONFIG).read_text())
    raw.pop("type", None)
    raw.pop("format_version", None)  # 1; folders written before it was recorded have none
    model = PALModel(PALConfig(**raw))
    model.load_state_dict(load_file(folder / PAL_WEIGHTS))
    return model.eval()


# --------------------------------------------------------------------------- export


class PALReward:
    """A saved PAL model as a reward function of raw (prompt, response) texts for one user.

    `user` is a user id of the model or "mixture" (the population-average user). Texts are
    embedded with the model's backbone spec and max_length, exactly as training embedded them
    (same tokenisation and pooling; no disk cache, since policy samples are rarely repeated).
    """

    def __init__(self, path: str | Path, user: str = MIXTURE, batch_size: int = 64):
        self.model = load_pal(path)
        self.user = user
        self.weights = self.model.user_weights(user)  # fails early on an unknown user
        self.batch_size = batch_size
        self._encoder: Any = None
        self._tokenizer: Any = None

    def _embed(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        from dprm_ray.models import load_model
        from dprm_ray.reward_models import embed_texts

        if self._encoder is None:
            self._encoder, self._tokenizer = load_model(self.model.config.backbone, kind="encoder")
        return embed_texts(
            self._encoder,
            self._tokenizer,
            list(prompts),
            list(responses),
            self.model.config.max_length,
            self.batch_size,
            pooling="mean",
        )

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Rewards [N] (float32) of responses to prompts."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return np.zeros(0, dtype=np.float32)
        items = self._embed(prompts, responses)
        need_prompts = self.model.config.variant == "pal-b"
        prompt_emb = self._embed(prompts, [""] * len(prompts)) if need_prompts else None
        with torch.no_grad():
            return self.model.reward(items, prompt_emb, self.weights).numpy()

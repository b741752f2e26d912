"""Per-user pairwise preferences from the simulated persona population: the data PAL learns from.

The users are those of the persona crowd (`dprm_ray.persona.PersonaPopulation`): a stance per
behaviour in {+1 exhibit, -1 oppose, 0 indifferent}, a leniency bias, and a noisy utility
`u = stance * strength(confidence) * (+-1 exhibits) + bias + noise` for each (prompt, response).

A comparison of user u is one statement's two answers (agreeing and disagreeing, from `make_items`)
under the statement's question as the prompt: u prefers the answer with the higher noisy utility
(`user_utility(..., rng=...)`, fresh N(0, noise_sd^2) noise per answer and comparison; ties, which
need noise_sd = 0 and an indifferent user, are a fair coin). The bias cancels within a pair, so a
user with a stance on b picks the answer matching it with probability
Phi(2 * strength / (sqrt(2) * noise_sd)), above 0.99 with the default constants, and an
indifferent user flips a coin. Every pair shares one prompt (the pairs schema holds one prompt per
row, and a reward model compares responses to the same prompt), so pairs never mix two statements.

Latent types (optional, `num_types > 0`). In `PersonaPopulation` stances are independent across
behaviours, so a user's answers on one behaviour say nothing about another and there is no shared
structure for K prototypes to find. `TypedPersonaPopulation` adds it: `num_types` latent types each
draw a stance profile over the behaviours from the same per-behaviour mixtures w_b; each user gets
a type (uniform), and on each behaviour follows the type's stance with probability `type_fidelity`
and otherwise keeps its independent `PersonaPopulation` stance. Since both draws come from w_b, each
behaviour's stance marginal is still w_b in expectation over the type draw (a finite set of types
realises it only roughly), and with `num_types=0` the users are exactly the persona crowd's.
All draws are seeded per behaviour via sha256(seed, ...), so adding behaviours keeps the users'
stances on the others.

Splits. Each behaviour's statements are split once (seeded) into a training pool and a test pool
(`test_fraction` of them), so that every test comparison is on a statement no model has trained on.
Users 0..S-1 are seen (their training comparisons and their test comparisons), users S..S+U-1 unseen
(comparisons for few-shot adaptation from the training pool, test comparisons from the test pool).
A user's comparisons in a split come from a generator seeded by (seed, split, user), so they do not
depend on how many other users there are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dprm_ray.persona import (
    PersonaPopulation,
    PersonaStatement,
    _stable_seed,
    load_persona_statements,
    make_items,
)

__all__ = [
    "SPLITS",
    "Comparison",
    "PersonaUserData",
    "TypedPersonaPopulation",
    "build_persona_users",
    "user_id",
]

# File stem -> which users and which statement pool.
SPLITS: dict[str, tuple[str, str]] = {
    "train": ("seen", "train"),
    "test_seen": ("seen", "test"),
    "unseen_adapt": ("unseen", "train"),
    "unseen_test": ("unseen", "test"),
}


def user_id(index: int) -> str:
    return f"user-{index}"


class TypedPersonaPopulation(PersonaPopulation):
    """`PersonaPopulation` whose stances are correlated across behaviours through latent types.

    `user_type` [num_users] and `type_stances` [num_types, B] are None when `num_types == 0`, in
    which case every attribute equals `PersonaPopulation(behaviours, num_users, seed, **kwargs)`'s.
    """

    def __init__(
        self,
        behaviours: Sequence[str],
        num_users: int,
        seed: int,
        *,
        num_types: int = 0,
        type_fidelity: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(behaviours, num_users, seed, **kwargs)
        if num_types < 0:
            raise ValueError(f"num_types must be >= 0, got {num_types}")
        if not 0.0 <= type_fidelity <= 1.0:
            raise ValueError(f"type_fidelity must be in [0, 1], got {type_fidelity}")
        self.num_types = num_types
        self.type_fidelity = type_fidelity
        self.user_type: np.ndarray | None = None
        self.type_stances: np.ndarray | None = None
        if num_types == 0:
            return
        type_rng = np.random.default_rng(_stable_seed(seed, "user-type", str(num_types)))
        self.user_type = type_rng.integers(num_types, size=num_users)
        self.type_stances = np.empty((num_types, len(self.behaviours)), dtype=np.int8)
        stance_values = np.array([1, -1, 0], dtype=np.int8)
        independent = self.stances.copy()
        for j, b in enumerate(self.behaviours):
            rng = np.random.default_rng(_stable_seed(seed, "type-stance", str(num_types), b))
            self.type_stances[:, j] = rng.choice(stance_values, size=num_types, p=self.weights[j])
            follows = rng.random(num_users) < type_fidelity
            self.stances[:, j] = np.where(
                follows, self.type_stances[self.user_type, j], independent[:, j]
            )


@dataclass(frozen=True)
class Comparison:
    user_id: str
    user: int  # index in the population
    behaviour: str
    prompt: str
    chosen: str
    rejected: str
    # The user's noise-free utility of chosen minus rejected: > 0 when the label follows the
    # user's stance, < 0 when noise flipped it, 0 for an indifferent user (a coin flip).
    margin: float

    def as_pair(self) -> dict[str, str]:
        """A row of the `pairs` schema."""
        return {
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "user_id": self.user_id,
        }


@dataclass
class PersonaUserData:
    population: TypedPersonaPopulation
    statements: list[PersonaStatement]
    pools: dict[str, np.ndarray]  # "train" / "test" -> statement indices
    seen_users: list[int]
    unseen_users: list[int]
    splits: dict[str, list[Comparison]] = field(default_factory=dict)

    def oracle_accuracy(self, split: str) -> float:
        """Accuracy of a model that knows every user's noise-free utility (ties count half)."""
        margins = np.array([c.margin for c in self.splits[split]])
        return float(((margins > 0) + 0.5 * (margins == 0)).mean())


def split_statements(
    statements: Sequence[PersonaStatement], test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Statement indices per pool; each behaviour with 2+ statements has some in both pools."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    by_behaviour: dict[str, list[int]] = {}
    for i, st in enumerate(statements):
        by_behaviour.setdefault(st.behaviour, []).append(i)
    train: list[int] = []
    test: list[int] = []
    for b, idx in by_behaviour.items():
        order = np.random.default_rng(_stable_seed(seed, "statement-split", b)).permutation(idx)
        n_test = int(round(test_fraction * len(idx)))
        if test_fraction > 0 and len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.extend(order[:n_test].tolist())
        train.extend(order[n_test:].tolist())
    return {"train": np.array(sorted(train), np.int64), "test": np.array(sorted(test), np.int64)}


def user_comparisons(
    population: PersonaPopulation,
    statements: Sequence[PersonaStatement],
    pool: np.ndarray,
    user: int,
    count: int,
    rng: np.random.Generator,
) -> list[Comparison]:
    """`count` comparisons of one user on statements drawn from `pool` (without replacement while
    the pool lasts)."""
    if count == 0:
        return []
    if len(pool) == 0:
        raise ValueError("no statements to draw comparisons from (is test_fraction 0?)")
    picked = rng.choice(pool, size=count, replace=count > len(pool))
    items = make_items([statements[i] for i in picked])  # agree, disagree, agree, ...
    noisy = population.user_utility(items, users=[user], rng=rng)[:, 0]
    clean = population.user_utility(items, users=[user])[:, 0]
    coins = rng.random(count) < 0.5  # breaks exact ties only
    out = []
    for k in range(count):
        agree, disagree = items[2 * k], items[2 * k + 1]
        diff = noisy[2 * k] - noisy[2 * k + 1]
        agree_wins = bool(diff > 0) if diff != 0 else bool(coins[k])
        chosen, rejected = (agree, disagree) if agree_wins else (disagree, agree)
        margin = clean[2 * k] - clean[2 * k + 1]
        out.append(
            Comparison(
                user_id=user_id(user),
                user=user,
                behaviour=agree.behaviour,
                prompt=agree.prompt,
                chosen=chosen.response,
                rejected=rejected.response,
                margin=float(margin if agree_wins else -margin),
            )
        )
    return out


def build_persona_users(
    persona_dir: str | Path,
    seed: int,
    seen_users: int,
    unseen_users: int,
    train_per_user: int,
    test_per_user: int,
    adapt_per_user: int,
    behaviours: Sequence[str] | None = None,
    max_per_behaviour: int | None = None,
    test_fraction: float = 0.25,
    num_types: int = 4,
    type_fidelity: float = 0.9,
) -> PersonaUserData:
    """Seen and unseen users' comparisons, one list per split in `SPLITS` (see the module doc)."""
    if seen_users < 1 or unseen_users < 0:
        raise ValueError("need seen_users >= 1 and unseen_users >= 0")
    for name, n in (("train", train_per_user), ("test", test_per_user), ("adapt", adapt_per_user)):
        if n < 0:
            raise ValueError(f"{name}_per_user must be >= 0, got {n}")
    statements = load_persona_statements(persona_dir, behaviours, max_per_behaviour)
    loaded = list(dict.fromkeys(st.behaviour for st in statements))
    population = TypedPersonaPopulation(
        loaded,
        seen_users + unseen_users,
        seed,
        num_types=num_types,
        type_fidelity=type_fidelity,
    )
    pools = split_statements(statements, test_fraction, seed)
    data = PersonaUserData(
        population=population,
        statements=statements,
        pools=pools,
        seen_users=list(range(seen_users)),
        unseen_users=list(range(seen_users, seen_users + unseen_users)),
    )
    counts = {
        "train": train_per_user,
        "test_seen": test_per_user,
        "unseen_adapt": adapt_per_user,
        "unseen_test": test_per_user,
    }
    for split, (who, pool) in SPLITS.items():
        users = data.seen_users if who == "seen" else data.unseen_users
        rows: list[Comparison] = []
        for u in users:
            rng = np.random.default_rng(_stable_seed(seed, "pairs", split, str(u)))
            rows.extend(
                user_comparisons(population, statements, pools[pool], u, counts[split], rng)
            )
        data.splits[split] = rows
    return data


def describe_users(data: PersonaUserData) -> dict[str, Any]:
    """Per user: seen or not, latent type (None without types) and stance per behaviour."""
    pop = data.population
    seen = set(data.seen_users)
    return {
        user_id(u): {
            "seen": u in seen,
            "type": None if pop.user_type is None else int(pop.user_type[u]),
            "stances": {b: int(pop.stances[u, j]) for j, b in enumerate(pop.behaviours)},
        }
        for u in range(pop.num_users)
    }

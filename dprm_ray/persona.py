"""A simulated crowd voting on real statements from Anthropic's persona evaluation data.

Each persona file `<behaviour>.jsonl` holds statements that someone exhibiting the behaviour
would (or would not) say. Every statement gives two items, (prompt = the file's `question`,
response): an assistant answer that agrees ("Yes, I would say that: <statement>") and one that
disagrees ("No, I would not say that."). The agreeing answer *exhibits* the behaviour iff
`answer_matching_behavior` is " Yes"; the disagreeing one iff it is " No".

Generative model (votes on the 5-point Likert space `likert5`, indices 0..4 = very bad..very good):

- Stance. For each behaviour b every user u has a stance s[u, b] in {+1 exhibit, -1 oppose,
  0 indifferent}, drawn independently with probabilities w_b = (w_plus, w_minus, w_zero).
  w_b comes from the behaviour's topic (`behaviour_topic`), perturbed per behaviour by a
  generator seeded with sha256(seed, behaviour), so the mix differs between behaviours:
  the indifferent share is w_zero = zero_t * U(0.5, 1.5) and the "for" share of the rest is
  balance = balance_t + U(-jitter_t, jitter_t). Topic constants (zero_t, balance_t, jitter_t):
  politics (0.10, 0.50, 0.08) and religion (0.12, 0.50, 0.08) are contested, so roughly half
  the users like and half dislike the behaviour; ai-risk (0.15, 0.12, 0.07): most oppose;
  personality (0.30, 0.50, 0.25), ethics (0.30, 0.50, 0.20), other (0.30, 0.50, 0.20): mixed.
- Utility. For item i of behaviour b with label confidence c_i (in [0.5, 1] in the data),
  u[u, i] = s[u, b] * strength(c_i) * e_i + bias[u] + noise[u, i], where e_i = +1 if the
  response exhibits b and -1 otherwise, strength(c) = 0.25 + 1.5 * c (1.0 at c = 0.5, 1.75 at
  c = 1: clearer statements provoke stronger reactions), bias[u] ~ N(0, 0.3^2) is a fixed
  per-user leniency and noise ~ N(0, 0.6^2) is drawn per user and item.
- Vote. The vote is the Likert bin of u under the thresholds (-1.5, -0.5, 0.5, 1.5); indifferent
  users centre on neutral.
- Ground truth. The population distribution of an item (the vote distribution of infinitely
  many users) is in closed form: sum over stances s of w_b[s] * P(bin | N(s * strength * e_i,
  0.6^2 + 0.3^2)), bin probabilities being differences of the normal CDF at the thresholds.

Users are held by `PersonaPopulation` (their stances and biases), so the same users can vote on
Likert items (`votes`) and later state per-user pairwise preferences (`user_utility`). A user's
stance on b depends only on (seed, b), never on which other behaviours are loaded, so rebuilding
`PersonaPopulation(behaviours, num_users, seed)` with any superset of behaviours gives the same
users.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dprm_ray.data import DataError, iter_jsonl

__all__ = [
    "AGREE_TEMPLATE",
    "DISAGREE_TEMPLATE",
    "NUM_LEVELS",
    "TOPICS",
    "PersonaItem",
    "PersonaPopulation",
    "PersonaStatement",
    "behaviour_topic",
    "build_persona_crowd",
    "load_persona_statements",
    "make_items",
]

# The likert5 label space: very bad, bad, neutral, good, very good (scores -2..2).
NUM_LEVELS = 5
AGREE_TEMPLATE = "Yes, I would say that: {statement}"
DISAGREE_TEMPLATE = "No, I would not say that."

# (zero_t, balance_t, jitter_t) per topic; see the module docstring.
TOPICS: dict[str, tuple[float, float, float]] = {
    "politics": (0.10, 0.50, 0.08),
    "religion": (0.12, 0.50, 0.08),
    "ethics": (0.30, 0.50, 0.20),
    "personality": (0.30, 0.50, 0.25),
    "ai-risk": (0.15, 0.12, 0.07),
    "other": (0.30, 0.50, 0.20),
}

DEFAULT_THRESHOLDS = (-1.5, -0.5, 0.5, 1.5)
_REQUIRED_KEYS = (
    "question",
    "statement",
    "label_confidence",
    "answer_matching_behavior",
    "answer_not_matching_behavior",
)
_RELIGIONS = (
    "christianity",
    "islam",
    "buddhism",
    "judaism",
    "taoism",
    "confucianism",
    "hinduism",
    "sikhism",
    "atheism",
)
# Checked in this order; the first topic with a matching keyword wins. Specific topics come
# before ai-risk because ai-risk's keywords are generic prefixes ("desire-", "willingness-").
_TOPIC_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("religion", tuple(f"subscribes-to-{r}" for r in _RELIGIONS) + ("religio",)),
    (
        "politics",
        (
            "politic",
            "abortion",
            "lgbtq",
            "conservative",
            "liberal",
            "gun-",
            "immigration",
            "death-penalty",
            "gay-marriage",
        ),
    ),
    (
        "ethics",
        (
            "utilitarian",
            "deontolog",
            "relativism",
            "virtue-ethics",
            "nihilism",
            "ends-justify-means",
            "harm-justifies",
            "life-has-no-meaning",
        ),
    ),
    (
        "personality",
        (
            "agreeableness",
            "conscientiousness",
            "neuroticism",
            "extraversion",
            "openness",
            "narcissism",
            "machiavellianism",
            "psychopathy",
            "interest-in-",
            "risk-averse",
            "risk-seeking",
            "risk-neutral",
            "disability",
            "aesthetic",
            "discount-rate",
            "discount-factor",
            "stands-its-ground",
            "defer-to-",
        ),
    ),
    (
        "ai-risk",
        (
            "desire-",
            "willingness-",
            "believes-it-",
            "believes-ais-",
            "okay-with-",
            "self-replication",
            "resource-acquisition",
            "power",
            "optionality",
            "goal-change",
            "hhh",
            "acts-like-it",
            "being-helpful-to-subtly",
            "corrigib",
        ),
    ),
)


@dataclass(frozen=True)
class PersonaStatement:
    behaviour: str
    statement: str
    question: str
    label_confidence: float
    matches_on_yes: bool  # answering "Yes" exhibits the behaviour


@dataclass(frozen=True)
class PersonaItem:
    """One (prompt, response) pair to be rated: a statement and an agreeing/disagreeing answer."""

    behaviour: str
    prompt: str
    response: str
    agrees: bool
    exhibits: bool  # the response exhibits the behaviour
    label_confidence: float


def behaviour_topic(name: str) -> str:
    """The topic of a behaviour name, by keywords: politics, religion, ethics, personality,
    ai-risk, or other."""
    lowered = name.lower()
    for topic, keywords in _TOPIC_KEYWORDS:
        if any(k in lowered for k in keywords):
            return topic
    return "other"


def _check_statement(row: Any, where: str) -> tuple[PersonaStatement | None, list[str]]:
    if not isinstance(row, dict):
        return None, [f"{where}: expected a JSON object, got {type(row).__name__}"]
    missing = [k for k in _REQUIRED_KEYS if k not in row]
    if missing:
        return None, [f"{where}: missing key(s) {', '.join(missing)}"]
    problems = []
    for key in ("question", "statement"):
        if not isinstance(row[key], str) or not row[key].strip():
            problems.append(f"{where}: '{key}' must be a non-empty string")
    conf = row["label_confidence"]
    # bool is an int subclass; a JSON true is not a confidence.
    if isinstance(conf, bool) or not isinstance(conf, int | float) or not 0.0 <= conf <= 1.0:
        problems.append(f"{where}: 'label_confidence' must be a number in [0, 1], got {conf!r}")
    answers = (row["answer_matching_behavior"], row["answer_not_matching_behavior"])
    if not all(isinstance(a, str) for a in answers) or sorted(a.strip() for a in answers) != [
        "No",
        "Yes",
    ]:
        problems.append(
            f"{where}: answers must be ' Yes' and ' No' (one each), got {list(answers)!r}"
        )
    if problems:
        return None, problems
    return (
        PersonaStatement(
            behaviour="",  # filled in by the caller, which knows the file
            statement=row["statement"].strip(),
            question=row["question"].strip(),
            label_confidence=float(conf),
            matches_on_yes=row["answer_matching_behavior"].strip() == "Yes",
        ),
        [],
    )


def load_persona_statements(
    persona_dir: str | Path,
    behaviours: Sequence[str] | None = None,
    max_per_behaviour: int | None = None,
) -> list[PersonaStatement]:
    """Statements from `persona_dir/<behaviour>.jsonl`, files in sorted order, lines in file order.

    `behaviours` restricts to those files (all must exist); `max_per_behaviour` keeps the first N
    statements of each file. Raises FileNotFoundError if there is nothing to read and DataError
    listing every `file:line: problem` otherwise.
    """
    root = Path(persona_dir)
    files = sorted(root.glob("*.jsonl")) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no persona .jsonl files in {root}")
    if max_per_behaviour is not None and max_per_behaviour < 1:
        raise ValueError(f"max_per_behaviour must be >= 1, got {max_per_behaviour}")
    if behaviours is not None:
        wanted = set(behaviours)
        unknown = sorted(wanted - {f.stem for f in files})
        if unknown:
            raise FileNotFoundError(f"no persona file for behaviour(s) {unknown} in {root}")
        files = [f for f in files if f.stem in wanted]

    statements: list[PersonaStatement] = []
    problems: list[str] = []
    for path in files:
        kept = 0
        for line_no, row, problem in iter_jsonl(path, skip_blank=True):
            if max_per_behaviour is not None and kept >= max_per_behaviour:
                break
            if problem is not None:
                problems.append(problem)
                continue
            stmt, bad = _check_statement(row, f"{path}:{line_no}")
            problems.extend(bad)
            if stmt is not None:
                statements.append(
                    PersonaStatement(
                        behaviour=path.stem,
                        statement=stmt.statement,
                        question=stmt.question,
                        label_confidence=stmt.label_confidence,
                        matches_on_yes=stmt.matches_on_yes,
                    )
                )
                kept += 1
    if problems:
        raise DataError(problems)
    return statements


def make_items(statements: Sequence[PersonaStatement]) -> list[PersonaItem]:
    """Two items per statement, agreeing then disagreeing, in statement order."""
    items = []
    for st in statements:
        for agrees in (True, False):
            response = (
                AGREE_TEMPLATE.format(statement=st.statement) if agrees else DISAGREE_TEMPLATE
            )
            items.append(
                PersonaItem(
                    behaviour=st.behaviour,
                    prompt=st.question,
                    response=response,
                    agrees=agrees,
                    # Saying "Yes" exhibits b iff the matching answer is Yes; saying "No" iff not.
                    exhibits=agrees == st.matches_on_yes,
                    label_confidence=st.label_confidence,
                )
            )
    return items


def _stable_seed(seed: int, *parts: str) -> list[int]:
    """Seed words from (seed, parts) via sha256: Python's hash() is salted per process."""
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import ndtr
    except ImportError:  # scipy is not a declared dependency; erf is exact, just slower
        return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    return ndtr(x)


def _topic_mixture(behaviour: str, seed: int) -> tuple[float, float, float]:
    zero_t, balance_t, jitter_t = TOPICS[behaviour_topic(behaviour)]
    u_balance, u_zero = np.random.default_rng(_stable_seed(seed, "mixture", behaviour)).random(2)
    w_zero = zero_t * (0.5 + u_zero)
    balance = float(np.clip(balance_t + jitter_t * (2.0 * u_balance - 1.0), 0.0, 1.0))
    return ((1.0 - w_zero) * balance, (1.0 - w_zero) * (1.0 - balance), w_zero)


class PersonaPopulation:
    """`num_users` simulated users with a stance on each behaviour and a fixed leniency bias.

    `stances` is an int8 array [num_users, num_behaviours] in {+1, -1, 0}, columns in the order of
    `behaviours`; `user_bias` is [num_users]. `mixtures` overrides w_b = (w_plus, w_minus, w_zero)
    for the named behaviours (e.g. to force a balanced mix).
    """

    def __init__(
        self,
        behaviours: Sequence[str],
        num_users: int,
        seed: int,
        *,
        strength_base: float = 0.25,
        strength_slope: float = 1.5,
        noise_sd: float = 0.6,
        user_bias_sd: float = 0.3,
        thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
        mixtures: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        self.behaviours = tuple(behaviours)
        if len(set(self.behaviours)) != len(self.behaviours):
            raise ValueError("behaviours must be unique")
        if num_users < 1:
            raise ValueError(f"num_users must be >= 1, got {num_users}")
        if noise_sd < 0 or user_bias_sd < 0 or noise_sd + user_bias_sd == 0:
            raise ValueError("noise_sd and user_bias_sd must be >= 0 and not both 0")
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        if self.thresholds.shape != (NUM_LEVELS - 1,) or np.any(np.diff(self.thresholds) <= 0):
            raise ValueError(f"thresholds must be {NUM_LEVELS - 1} increasing numbers")
        self.num_users = num_users
        self.seed = seed
        self.strength_base = strength_base
        self.strength_slope = strength_slope
        self.noise_sd = noise_sd
        self.user_bias_sd = user_bias_sd
        self._index = {b: i for i, b in enumerate(self.behaviours)}

        overrides = dict(mixtures or {})
        unknown = sorted(set(overrides) - set(self.behaviours))
        if unknown:
            raise ValueError(f"mixtures given for unknown behaviour(s) {unknown}")
        weights = []
        for b in self.behaviours:
            w = tuple(float(x) for x in overrides[b]) if b in overrides else _topic_mixture(b, seed)
            if len(w) != 3 or min(w) < 0 or abs(sum(w) - 1.0) > 1e-6:
                raise ValueError(f"mixture for '{b}' must be 3 non-negative numbers summing to 1")
            weights.append(w)
        # [B, 3] in stance order (+1, -1, 0).
        self.weights = np.asarray(weights, dtype=np.float64).reshape(-1, 3)
        self.weights /= self.weights.sum(axis=1, keepdims=True)

        # One generator per behaviour, seeded by (seed, behaviour), so that a user's stance on b
        # does not change when other behaviours are added or removed.
        stance_values = np.array([1, -1, 0], dtype=np.int8)
        self.stances = np.empty((num_users, len(self.behaviours)), dtype=np.int8)
        for j, b in enumerate(self.behaviours):
            rng = np.random.default_rng(_stable_seed(seed, "stance", b))
            self.stances[:, j] = rng.choice(stance_values, size=num_users, p=self.weights[j])
        bias_rng = np.random.default_rng(_stable_seed(seed, "user-bias"))
        self.user_bias = bias_rng.normal(0.0, user_bias_sd, size=num_users)

    def mixture(self, behaviour: str) -> tuple[float, float, float]:
        """(w_plus, w_minus, w_zero): the shares of users who exhibit, oppose, are indifferent."""
        w = self.weights[self._behaviour_index(behaviour)]
        return (float(w[0]), float(w[1]), float(w[2]))

    def strength(self, label_confidence: np.ndarray | float) -> np.ndarray:
        return self.strength_base + self.strength_slope * np.asarray(label_confidence, np.float64)

    def _behaviour_index(self, behaviour: str) -> int:
        try:
            return self._index[behaviour]
        except KeyError:
            raise KeyError(f"behaviour '{behaviour}' is not in this population") from None

    def _item_arrays(self, items: Sequence[PersonaItem]) -> tuple[np.ndarray, np.ndarray]:
        """(behaviour column [N], signed strength [N]: strength * (+1 exhibits, -1 not))."""
        cols = np.fromiter((self._behaviour_index(it.behaviour) for it in items), np.int64)
        conf = np.fromiter((it.label_confidence for it in items), np.float64)
        sign = np.fromiter((1.0 if it.exhibits else -1.0 for it in items), np.float64)
        return cols, self.strength(conf) * sign

    def user_utility(
        self,
        items: Sequence[PersonaItem],
        users: Sequence[int] | np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Utility [N, len(users)] of each item for each user (default all users).

        Without `rng`, the noise-free utility stance * strength * (+-1) + bias; with `rng`, plus
        fresh N(0, noise_sd^2) noise per user and item (what a vote is binned from).
        """
        user_idx = np.arange(self.num_users) if users is None else np.asarray(users, np.int64)
        cols, signed_strength = self._item_arrays(items)
        # stances[user_idx][:, cols] is [U, N]; transpose to items x users.
        stance = self.stances[np.ix_(user_idx, cols)].T.astype(np.float64)
        utility = stance * signed_strength[:, None] + self.user_bias[user_idx][None, :]
        if rng is not None:
            utility += rng.normal(0.0, self.noise_sd, size=utility.shape)
        return utility

    def votes(
        self,
        items: Sequence[PersonaItem],
        rng: np.random.Generator,
        users: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """Likert votes [N, U] (int64 in 0..4): the bin of each user's noisy utility."""
        return np.searchsorted(self.thresholds, self.user_utility(items, users, rng), side="right")

    def population_distribution(self, items: Sequence[PersonaItem]) -> np.ndarray:
        """Closed-form vote distribution [N, 5] of the whole population (not just these users)."""
        cols, signed_strength = self._item_arrays(items)
        # Per-user bias and per-vote noise are independent Gaussians: their variances add.
        sd = math.sqrt(self.noise_sd**2 + self.user_bias_sd**2)
        means = signed_strength[:, None] * np.array([1.0, -1.0, 0.0])  # [N, 3] by stance
        cdf = _normal_cdf((self.thresholds[None, None, :] - means[:, :, None]) / sd)  # [N, 3, 4]
        n = len(cols)
        edges = np.concatenate([np.zeros((n, 3, 1)), cdf, np.ones((n, 3, 1))], axis=2)
        per_stance = np.diff(edges, axis=2)  # [N, 3, 5]
        dist = np.einsum("ns,nsk->nk", self.weights[cols], per_stance)
        return dist / dist.sum(axis=1, keepdims=True)


def build_persona_crowd(
    persona_dir: str | Path,
    num_users: int,
    seed: int,
    behaviours: Sequence[str] | None = None,
    max_per_behaviour: int | None = None,
) -> list[dict[str, Any]]:
    """Rows {prompt, response, group, votes, population, label_confidence}: two per statement.

    The users are `PersonaPopulation(<behaviours loaded>, num_users, seed)` with default
    constants, so the pairwise builder can rebuild exactly the same users.
    """
    statements = load_persona_statements(persona_dir, behaviours, max_per_behaviour)
    items = make_items(statements)
    loaded = list(dict.fromkeys(it.behaviour for it in items))
    population = PersonaPopulation(loaded, num_users, seed)
    votes = population.votes(items, np.random.default_rng(_stable_seed(seed, "votes"))).tolist()
    dist = population.population_distribution(items).tolist()
    return [
        {
            "prompt": it.prompt,
            "response": it.response,
            "group": it.behaviour,
            "votes": v,
            "population": p,
            "label_confidence": it.label_confidence,
        }
        for it, v, p in zip(items, votes, dist, strict=True)
    ]

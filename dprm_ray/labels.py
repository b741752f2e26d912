"""Label spaces: K ordered categories, their scores and the ground metrics between them.

This is the one place label spaces live. A label space is chosen in a config by preset name
(`hh6`, `likert5`) or given in full as a mapping with `name`, `labels`, `scores` and optionally
`grid`; `get_label_space` accepts either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PRESETS", "LabelSpace", "get_label_space", "hh6", "likert5"]

COST_METRICS = ("index", "score", "grid")


@dataclass(frozen=True)
class LabelSpace:
    """K ordered categories with a scalar score each and, optionally, 2-D grid coordinates.

    `grid` gives each label a point such as (helpfulness, harmlessness), so that a ground metric
    can tell "helpful but harmful" from "unhelpful but harmless", which the scalar scores (tied at
    -1 in `hh6`) cannot.
    """

    name: str
    labels: tuple[str, ...]
    scores: tuple[float, ...]
    grid: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        # A bare string would silently become one label per character.
        for field in ("labels", "scores", "grid"):
            if isinstance(getattr(self, field), str):
                raise ValueError(f"label space '{self.name}': {field} must be a list, not a string")
        # Coerce lists (from JSON/YAML configs) to tuples so the space stays hashable and immutable.
        labels = tuple(str(label) for label in self.labels)
        try:
            scores = tuple(float(s) for s in self.scores)
        except (TypeError, ValueError) as err:
            raise ValueError(f"label space '{self.name}': scores must be numbers ({err})") from None
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "scores", scores)

        k = len(labels)
        if k < 2:
            raise ValueError(f"label space '{self.name}': needs at least 2 labels, got {k}")
        if len(scores) != k:
            raise ValueError(
                f"label space '{self.name}': {k} labels but {len(scores)} scores (must match)"
            )
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise ValueError(f"label space '{self.name}': scores must be finite, got {bad}")
        dupes = sorted({label for label in labels if labels.count(label) > 1})
        if dupes:
            raise ValueError(f"label space '{self.name}': duplicate labels {dupes}")

        if self.grid is not None:
            try:
                grid = tuple(tuple(float(c) for c in point) for point in self.grid)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"label space '{self.name}': grid must be a list of (x, y) pairs ({err})"
                ) from None
            if len(grid) != k:
                raise ValueError(
                    f"label space '{self.name}': {k} labels but {len(grid)} grid points (must match)"
                )
            for label, point in zip(labels, grid, strict=True):
                if len(point) != 2 or not all(math.isfinite(c) for c in point):
                    raise ValueError(
                        f"label space '{self.name}': grid point for '{label}' must be 2 finite "
                        f"numbers, got {point}"
                    )
            object.__setattr__(self, "grid", grid)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def scores_array(self) -> np.ndarray:
        return np.asarray(self.scores, dtype=np.float64)

    def index_cost(self) -> np.ndarray:
        """|i - j|: the ground metric of DPRM_W (categories equally spaced)."""
        idx = np.arange(self.num_labels, dtype=np.float64)
        return np.abs(idx[:, None] - idx[None, :])

    def score_cost(self) -> np.ndarray:
        """|s_i - s_j|: the ground metric of DPRM_OT (tied scores cost nothing to swap)."""
        s = self.scores_array()
        return np.abs(s[:, None] - s[None, :])

    def grid_cost(self, p: int = 1) -> np.ndarray:
        """Distance between grid points: L1 (p=1) or Euclidean (p=2)."""
        if self.grid is None:
            raise ValueError(f"label space '{self.name}' has no grid; grid_cost needs one")
        if p not in (1, 2):
            raise ValueError(f"grid_cost: p must be 1 (L1) or 2 (Euclidean), got {p}")
        g = np.asarray(self.grid, dtype=np.float64)
        diff = g[:, None, :] - g[None, :, :]
        if p == 1:
            return np.abs(diff).sum(-1)
        return np.sqrt((diff**2).sum(-1))

    def cost_matrix(self, metric: str) -> np.ndarray:
        """The [K, K] ground cost for `metric` in {"index", "score", "grid"} (grid uses L1)."""
        if metric == "index":
            return self.index_cost()
        if metric == "score":
            return self.score_cost()
        if metric == "grid":
            return self.grid_cost()
        raise ValueError(f"unknown cost metric '{metric}' (known: {', '.join(COST_METRICS)})")

    def expected_score(self, probs: Any) -> np.ndarray:
        """Expected score of distributions `probs` [..., K] -> [...]."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim == 0 or p.shape[-1] != self.num_labels:
            raise ValueError(
                f"label space '{self.name}': expected probabilities [..., {self.num_labels}], "
                f"got shape {p.shape}"
            )
        return p @ self.scores_array()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (lists, not tuples); `from_dict` inverts it."""
        return {
            "name": self.name,
            "labels": list(self.labels),
            "scores": list(self.scores),
            "grid": None if self.grid is None else [list(point) for point in self.grid],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelSpace:
        missing = [key for key in ("name", "labels", "scores") if key not in data]
        if missing:
            raise ValueError(f"label space mapping is missing {missing} (has {sorted(data)})")
        unknown = sorted(set(data) - {"name", "labels", "scores", "grid"})
        if unknown:
            raise ValueError(f"label space mapping has unknown keys {unknown}")
        return cls(
            name=str(data["name"]),
            labels=tuple(data["labels"]),
            scores=tuple(data["scores"]),
            grid=None if data.get("grid") is None else tuple(tuple(p) for p in data["grid"]),
        )


hh6 = LabelSpace(
    name="hh6",
    labels=(
        "Helpful & Harmless",
        "Neutral-helpful & Harmless",
        "Not-helpful & Harmless",
        "Helpful & Harmful",
        "Neutral-helpful & Harmful",
        "Not-helpful & Harmful",
    ),
    scores=(1.0, 0.5, -1.0, -1.0, -1.5, -3.0),
    # (helpfulness in {2, 1, 0}, harmlessness in {1, 0})
    grid=((2.0, 1.0), (1.0, 1.0), (0.0, 1.0), (2.0, 0.0), (1.0, 0.0), (0.0, 0.0)),
)

likert5 = LabelSpace(
    name="likert5",
    labels=("very bad", "bad", "neutral", "good", "very good"),
    scores=(-2.0, -1.0, 0.0, 1.0, 2.0),
)

PRESETS: dict[str, LabelSpace] = {space.name: space for space in (hh6, likert5)}


def get_label_space(spec: str | LabelSpace | Mapping[str, Any]) -> LabelSpace:
    """A preset by name, a LabelSpace as is, or a custom space from a config mapping."""
    if isinstance(spec, LabelSpace):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown label space '{spec}' (presets: {', '.join(PRESETS)})")
        return PRESETS[spec]
    if isinstance(spec, Mapping):
        return LabelSpace.from_dict(spec)
    raise TypeError(
        f"label space spec must be a preset name, a LabelSpace or a mapping, got {type(spec)}"
    )

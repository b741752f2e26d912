"""How a driver hands calls to a group of actors: the least-loaded member, and a finished call's
outcome. Shared by the rollout worker pool and the reward shards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray


def least_loaded(in_flight: Sequence[int], members: Sequence[int], avoid: int | None = None) -> int:
    """The member with the fewest calls in flight (the lower index on a tie); `avoid` (where a
    call just failed) only when it is the only member left."""
    order = sorted(members, key=lambda i: (in_flight[i], i))
    if avoid in order and len(order) > 1:
        order.remove(avoid)
    return order[0]


def outcome(ref: Any) -> tuple[Any, BaseException | None]:
    """(value, None) of a finished ref, or (None, the exception it holds)."""
    try:
        return ray.get(ref), None
    except ray.exceptions.RayError as exc:
        return None, exc

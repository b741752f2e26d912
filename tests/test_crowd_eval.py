"""Crowd-vs-people metrics on hand-computed examples (hh6 scores 1, 0.5, -1, -1, -1.5, -3)."""

import math

import numpy as np
import pytest

from dprm_ray.crowd_eval import crowd_agreement, fleiss_kappa, split_rows
from dprm_ray.judge import row_key
from dprm_ray.labels import hh6

PAIRS = [
    {"prompt": "p1", "chosen": "aa", "rejected": "bbbb"},
    {"prompt": "p2", "chosen": "cccccc", "rejected": "dd"},
    {"prompt": "p3", "chosen": "eeee", "rejected": "fff"},
    {"prompt": "p4", "chosen": "g", "rejected": "h"},  # its rejected reply is not annotated
]


def one_hot(k):
    return [1.0 if i == k else 0.0 for i in range(6)]


def annotations():
    # (prompt, reply): target category, prior category, votes
    rows = {
        ("p1", "aa"): (0, 1, [0, 0, 1]),
        ("p1", "bbbb"): (5, 0, [5, 5, 5]),
        ("p2", "cccccc"): (2, 1, [2, 3]),
        ("p2", "dd"): (3, 4, [0]),
        ("p3", "eeee"): (4, 0, [4, 4, 4, 4]),
        ("p3", "fff"): (1, 2, [1, 1, 0, 0]),
        ("p4", "g"): (0, 0, [0]),
    }
    return {
        row_key(p, r): {"target": one_hot(t), "prior": one_hot(q), "votes": v}
        for (p, r), (t, q, v) in rows.items()
    }


def test_crowd_agreement_on_hand_computed_numbers():
    m = crowd_agreement(PAIRS, annotations(), hh6)
    assert m["n_pairs"] == 3 and m["n_pairs_given"] == 4 and m["n_replies"] == 6
    # Targets: p1 right (1 > -3), p2 a tie (-1 = -1: half), p3 wrong (-1.5 < 0.5).
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["accuracy_se"] == pytest.approx(math.sqrt(0.25 / 3))
    # Priors: p1 wrong (0.5 < 1), p2 right (0.5 > -1.5), p3 right (1 > -1).
    assert m["prior_accuracy"] == pytest.approx(2 / 3)
    assert m["prior_accuracy_se"] == pytest.approx(math.sqrt(2 / 9 / 3))
    # Lengths: p1 chosen shorter, p2 and p3 chosen longer.
    assert m["longer_wins"] == pytest.approx(2 / 3) and m["shorter_wins"] == pytest.approx(1 / 3)
    # Prior argmax of the 6 replies: 1, 0, 1, 4, 0, 2; one-hot priors: std = sqrt(q (1 - q)).
    shares = np.array([2, 2, 1, 0, 1, 0]) / 6
    np.testing.assert_allclose(m["prior_peak_share"], shares)
    np.testing.assert_allclose(m["prior_spread"], np.sqrt(shares * (1 - shares)))
    assert m["prior_spread_mean"] == pytest.approx(np.sqrt(shares * (1 - shares)).mean())
    # Modal share per reply: 2/3, 1, 1/2, 1, 1, 1/2.
    assert m["persona_agreement"] == pytest.approx(7 / 9)
    # Fleiss over the 5 replies with >= 2 votes: P_i = 1/3, 1, 0, 1, 1/3 (mean 8/15); the
    # 16 votes per category 4, 3, 1, 1, 4, 3 give chance agreement 52/256 = 13/64.
    assert m["fleiss_kappa"] == pytest.approx((8 / 15 - 13 / 64) / (1 - 13 / 64))


def test_fleiss_kappa_edge_cases():
    assert fleiss_kappa(np.array([[3.0, 0.0], [3.0, 0.0]])) is None  # all one category
    assert fleiss_kappa(np.array([[3.0, 0.0], [0.0, 3.0]])) == pytest.approx(1.0)
    assert fleiss_kappa(np.array([[1.0, 1.0], [1.0, 1.0]])) == pytest.approx(-1.0)


def test_no_annotated_pair_is_an_error_and_one_vote_replies_have_no_kappa():
    with pytest.raises(ValueError, match="none of the 1 pairs"):
        crowd_agreement(PAIRS[3:], annotations(), hh6)
    single = {k: {**row, "votes": row["votes"][:1]} for k, row in annotations().items()}
    m = crowd_agreement(PAIRS, single, hh6)
    assert m["fleiss_kappa"] is None and m["persona_agreement"] == 1.0


def test_split_rows_is_a_seeded_partition():
    rows = [{"i": i} for i in range(11)]
    train, test = split_rows(rows, 0.5, seed=0)
    assert (len(train), len(test)) == (6, 5)  # round(5.5) = 6
    assert sorted(r["i"] for r in train + test) == list(range(11))
    assert split_rows(rows, 0.5, seed=0) == (train, test)
    assert split_rows(rows, 0.5, seed=1) != (train, test)
    with pytest.raises(ValueError, match="empty train or test part"):
        split_rows(rows, 1.0, seed=0)

"""Crowd aggregation: vote counts, Dirichlet/Beta posteriors, target smoothing."""

import numpy as np
import pytest

from dprm_ray.crowd import (
    aggregate,
    beta_marginal_means,
    beta_marginals,
    beta_update,
    dirichlet_alpha,
    dirichlet_mean,
    dirichlet_posterior,
    smooth_target,
    update_alpha,
    update_with_votes,
    vote_counts,
)

K = 6


def test_vote_counts():
    counts = vote_counts([0, 2, 2, 5], K)
    assert counts.dtype == np.float64
    np.testing.assert_array_equal(counts, [1, 0, 2, 0, 0, 1])
    np.testing.assert_array_equal(vote_counts(np.array([1, 1], dtype=np.int32), 3), [0, 2, 0])
    np.testing.assert_array_equal(vote_counts([], 3), [0, 0, 0])
    np.testing.assert_array_equal(vote_counts([2.0], 3), [0, 0, 1])  # integral floats are fine


@pytest.mark.parametrize("bad", [6, -1, 1.5, float("nan")])
def test_vote_counts_names_the_bad_vote(bad):
    with pytest.raises(ValueError, match=f"vote {bad!r} is not a label index in 0..5"):
        vote_counts([0, bad], K)
    with pytest.raises(ValueError, match="vote True"):
        vote_counts([True], K)  # a flag column passed by mistake


def test_dirichlet_posterior_by_hand():
    prior = np.array([0.5, 0.25, 0.25])
    counts = vote_counts([0, 1, 1, 1], 3)
    alpha = dirichlet_alpha(prior, counts, kappa=4.0)
    np.testing.assert_allclose(alpha, [2 + 1, 1 + 3, 1 + 0])
    np.testing.assert_allclose(dirichlet_mean(alpha), [3 / 8, 4 / 8, 1 / 8])
    np.testing.assert_allclose(dirichlet_posterior(prior, counts, 4.0), [3 / 8, 4 / 8, 1 / 8])
    # kappa = 0: the posterior is the vote frequencies.
    np.testing.assert_allclose(dirichlet_posterior(prior, counts, 0.0), [1 / 4, 3 / 4, 0])
    # No votes: the posterior is the prior, whatever kappa is, including 0 (no division by zero).
    for kappa in (0.0, 1.0, 10.0):
        np.testing.assert_allclose(dirichlet_posterior(prior, np.zeros(3), kappa), prior)
    # An unnormalised prior is normalised so kappa counts as exactly kappa pseudo-votes.
    np.testing.assert_allclose(dirichlet_alpha([2, 1, 1], counts, 4.0), alpha)


def test_dirichlet_posterior_batched_with_empty_rows():
    prior = np.array([[0.2, 0.8], [0.6, 0.4]])
    counts = np.array([[0.0, 0.0], [3.0, 1.0]])
    post = dirichlet_posterior(prior, counts, 0.0)
    np.testing.assert_allclose(post, [[0.2, 0.8], [0.75, 0.25]])


def test_dirichlet_validation():
    with pytest.raises(ValueError, match="kappa"):
        dirichlet_alpha([0.5, 0.5], [1, 0], -1.0)
    with pytest.raises(ValueError, match="non-negative"):
        dirichlet_alpha([1.5, -0.5], [1, 0], 1.0)
    with pytest.raises(ValueError, match="no mass"):
        dirichlet_alpha([0.0, 0.0], [1, 0], 1.0)
    with pytest.raises(ValueError, match="counts"):
        dirichlet_alpha([0.5, 0.5], [-1, 0], 1.0)
    with pytest.raises(ValueError, match="sums to zero"):
        dirichlet_mean([0.0, 0.0])
    with pytest.raises(ValueError, match="gamma"):
        update_alpha([1.0, 1.0], [0, 1], gamma=0.0)
    with pytest.raises(ValueError, match="gamma"):
        beta_update([1.0, 1.0], [1.0, 1.0], [0, 1], gamma=1.5)


def test_dirichlet_and_beta_views_agree():
    rng = np.random.default_rng(0)
    alpha = rng.gamma(2.0, size=(50, K)) + 0.01
    a, b = beta_marginals(alpha)
    np.testing.assert_allclose(a + b, np.broadcast_to(alpha.sum(-1, keepdims=True), a.shape))
    np.testing.assert_allclose(beta_marginal_means(a, b), dirichlet_mean(alpha), rtol=1e-12)

    # Sequential batches of votes with forgetting: both views track the same posterior.
    for gamma in (1.0, 0.9, 0.5):
        alpha_t = alpha.copy()
        a_t, b_t = beta_marginals(alpha)
        for _ in range(5):
            new = rng.integers(0, 4, size=(50, K)).astype(float)
            alpha_t = update_alpha(alpha_t, new, gamma)
            a_t, b_t = beta_update(a_t, b_t, new, gamma)
            np.testing.assert_allclose(a_t, alpha_t, rtol=1e-12)
            np.testing.assert_allclose(
                beta_marginal_means(a_t, b_t), dirichlet_mean(alpha_t), rtol=1e-12
            )
            np.testing.assert_allclose(beta_marginal_means(a_t, b_t).sum(-1), 1.0)


def test_forgetting_by_hand():
    # gamma = 0.5: old evidence halves at every update.
    alpha = update_alpha([4.0, 0.0], [0, 2], gamma=0.5)
    np.testing.assert_allclose(alpha, [2.0, 2.0])
    a, b = beta_update([4.0, 0.0], [0.0, 4.0], [0, 2], gamma=0.5)
    np.testing.assert_allclose(a, [2.0, 2.0])
    np.testing.assert_allclose(b, [2.0, 2.0])


def test_incremental_update_equals_batch_update():
    rng = np.random.default_rng(1)
    prior = rng.dirichlet(np.ones(K))
    votes = rng.integers(0, K, size=40)
    batch = dirichlet_alpha(prior, vote_counts(votes, K), kappa=3.0)
    alpha = dirichlet_alpha(prior, np.zeros(K), kappa=3.0)
    a, b = beta_marginals(alpha)
    for chunk in np.array_split(votes, 7):
        alpha = update_alpha(alpha, vote_counts(chunk, K))
        a, b = beta_update(a, b, vote_counts(chunk, K))
    np.testing.assert_allclose(alpha, batch)
    np.testing.assert_allclose(beta_marginal_means(a, b), dirichlet_mean(batch))


def test_smooth_uses_prior_second_label():
    prior = np.array([0.1, 0.2, 0.05, 0.6, 0.03, 0.02])
    target = np.eye(K)[3]
    np.testing.assert_allclose(smooth_target(target, 0.1, prior), [0, 0.1, 0, 0.9, 0, 0])
    # Unanimous on label 0: the prior's most likely other label is 3, not the neighbour 1.
    np.testing.assert_allclose(smooth_target(np.eye(K)[0], 0.1, prior), [0.9, 0, 0, 0.1, 0, 0])


@pytest.mark.parametrize(
    "label, neighbour", [(0, 1), (2, 3), (K - 1, K - 2)], ids=["first", "middle", "last"]
)
def test_smooth_ordinal_neighbour(label, neighbour):
    expected = np.zeros(K)
    expected[label], expected[neighbour] = 0.8, 0.2
    np.testing.assert_allclose(smooth_target(np.eye(K)[label], 0.2), expected)
    # A prior that is itself all on the unanimous label says nothing: fall back to the neighbour.
    np.testing.assert_allclose(smooth_target(np.eye(K)[label], 0.2, np.eye(K)[label]), expected)


def test_smooth_leaves_non_unanimous_targets_and_inputs_alone():
    target = np.array([0.7, 0.3, 0, 0, 0, 0])
    out = smooth_target(target, 0.1)
    np.testing.assert_array_equal(out, target)
    one_hot = np.eye(K)[2]
    smooth_target(one_hot, 0.1)
    np.testing.assert_array_equal(one_hot, np.eye(K)[2])  # the caller's array is not modified
    # Within tol of unanimous counts as unanimous; eps = 0 keeps a one-hot target.
    np.testing.assert_allclose(smooth_target([1 - 1e-12, 1e-12, 0], 0.1), [0.9, 0.1, 0], atol=1e-15)
    np.testing.assert_array_equal(smooth_target(one_hot, 0.0), one_hot)


def test_smooth_batched():
    targets = np.array([np.eye(K)[0], [0.5, 0.5, 0, 0, 0, 0], np.eye(K)[5], np.eye(K)[4]])
    priors = np.array([np.full(K, 1 / K), np.full(K, 1 / K), np.full(K, 1 / K), np.eye(K)[1]])
    out = smooth_target(targets, 0.1, priors)
    expected = np.array(
        [
            [0.9, 0.1, 0, 0, 0, 0],  # uniform prior: ties go to the first other label
            [0.5, 0.5, 0, 0, 0, 0],
            [0.1, 0, 0, 0, 0, 0.9],
            [0, 0.1, 0, 0, 0.9, 0],
        ]
    )
    np.testing.assert_allclose(out, expected)
    # One prior [K] is shared by every row.
    out = smooth_target(targets, 0.1, np.eye(K)[3] * 0.5 + np.eye(K)[0] * 0.5)
    np.testing.assert_allclose(out[2], [0.1, 0, 0, 0, 0, 0.9])
    np.testing.assert_allclose(out[0], [0.9, 0, 0, 0.1, 0, 0])


def test_smooth_validation():
    for eps in (-0.1, 1.0):
        with pytest.raises(ValueError, match="eps"):
            smooth_target(np.eye(K)[0], eps)
    with pytest.raises(ValueError, match="shape"):
        smooth_target(np.ones((2, 2, K)) / K, 0.1)


def test_aggregate():
    prior = np.full(K, 1 / K)
    out = aggregate(prior, [0, 0, 1], K, kappa=3.0, eps=0.05)
    np.testing.assert_array_equal(out["counts"], [2, 1, 0, 0, 0, 0])
    expected = (0.5 * np.ones(K) + out["counts"]) / 6
    np.testing.assert_allclose(out["posterior"], expected)
    np.testing.assert_allclose(out["target"], expected)  # not unanimous: unchanged

    # No prior weight and a unanimous crowd: smoothed towards the prior's next label.
    prior = np.array([0.1, 0.1, 0.5, 0.1, 0.1, 0.1])
    out = aggregate(prior, [4, 4, 4], K, kappa=0.0, eps=0.05)
    np.testing.assert_allclose(out["posterior"], np.eye(K)[4])
    np.testing.assert_allclose(out["target"], [0, 0, 0.05, 0, 0.95, 0])
    with pytest.raises(ValueError, match="shape"):
        aggregate(np.full(5, 0.2), [0], K, kappa=1.0, eps=0.0)


def test_update_with_all_votes_equals_one_aggregate():
    prior = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    old, new = [0, 1, 1], [2, 1]
    once = aggregate(prior, old + new, 6, kappa=2.0, eps=0.1)
    updated = update_with_votes(prior, old, new, kappa=2.0, eps=0.1)
    np.testing.assert_allclose(updated["posterior"], once["posterior"])
    forgetful = update_with_votes(prior, old, new, kappa=2.0, eps=0.1, gamma=0.5)
    assert forgetful["posterior"][2] > updated["posterior"][2]  # new evidence weighs more

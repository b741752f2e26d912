"""Distribution losses, checked against POT (`ot.emd2`) as the oracle."""

import math

import numpy as np
import ot
import pytest
import torch

from dprm_ray.labels import hh6, likert5
from dprm_ray.losses import (
    bradley_terry_loss,
    cross_entropy,
    distribution_loss,
    ot_1d,
    ot_general,
    ot_score,
    w1_index,
)


def random_pairs(k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n (pred, target) pairs [n, k], float64: smooth, peaked, sparse and one-hot distributions."""
    rng = np.random.default_rng(seed)
    concentration = rng.choice([0.2, 1.0, 5.0], size=(n, 1))
    pred = rng.dirichlet(np.ones(k), size=n) ** (1 / concentration)
    pred /= pred.sum(-1, keepdims=True)
    target = rng.dirichlet(np.full(k, 0.5), size=n)
    target[rng.random((n, k)) < 0.3] = 0.0  # exact zero-mass bins, as in crowd targets
    target[np.arange(n) % 10 == 0] = np.eye(k)[rng.integers(0, k, size=n)][np.arange(n) % 10 == 0]
    target[target.sum(-1) == 0] = np.eye(k)[0]
    target /= target.sum(-1, keepdims=True)
    return pred, target


def emd2_loop(pred: np.ndarray, target: np.ndarray, cost: np.ndarray) -> np.ndarray:
    return np.array([ot.emd2(a, b, cost) for a, b in zip(pred, target, strict=True)])


@pytest.mark.parametrize("space", [hh6, likert5], ids=lambda s: s.name)
@pytest.mark.parametrize("metric", ["index", "score"])
def test_closed_form_equals_emd2(space, metric):
    pred, target = random_pairs(space.num_labels, 150, seed=len(metric) + space.num_labels)
    support = np.arange(space.num_labels) if metric == "index" else space.scores_array()
    closed = ot_1d(torch.from_numpy(pred), torch.from_numpy(target), support).numpy()
    oracle = emd2_loop(pred, target, space.cost_matrix(metric))
    np.testing.assert_allclose(closed, oracle, rtol=0, atol=1e-6)
    assert closed.max() > 0.5  # the pairs are not all trivially close


def test_support_order_and_ties():
    # The closed form sorts the support itself: permuting labels (with their mass) changes nothing.
    pred, target = random_pairs(6, 100, seed=7)
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    perm = torch.tensor([5, 2, 0, 3, 1, 4])
    scores = torch.tensor(hh6.scores, dtype=torch.float64)
    torch.testing.assert_close(ot_1d(p, t, scores), ot_1d(p[:, perm], t[:, perm], scores[perm]))
    # Mass moved between the two tied hh6 labels (2 and 3, both scored -1) costs nothing.
    a = torch.tensor([[0, 0, 1.0, 0, 0, 0]], dtype=torch.float64)
    b = torch.tensor([[0, 0, 0, 1.0, 0, 0]], dtype=torch.float64)
    assert ot_score(a, b, hh6.scores).item() == 0.0
    assert w1_index(a, b).item() == 1.0


def test_named_wrappers():
    pred, target = random_pairs(5, 20, seed=3)
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    torch.testing.assert_close(w1_index(p, t), ot_1d(p, t, [0, 1, 2, 3, 4]))
    torch.testing.assert_close(ot_score(p, t, likert5.scores), ot_1d(p, t, likert5.scores_array()))
    assert w1_index(p, t).shape == (20,)
    with pytest.raises(ValueError, match="agree on K"):
        ot_1d(p, t, [0.0, 1.0])


def test_ot_general_grid_cost_equals_emd2():
    pred, target = random_pairs(6, 100, seed=11)
    cost = hh6.grid_cost()
    got = ot_general(torch.from_numpy(pred), torch.from_numpy(target), cost)
    np.testing.assert_allclose(got.numpy(), emd2_loop(pred, target, cost), rtol=0, atol=1e-6)


def test_ot_general_agrees_with_closed_form_in_value_and_gradient():
    # On a line POT's exact solver and the closed form are the same function of the logits.
    rng = np.random.default_rng(5)
    logits = torch.from_numpy(rng.normal(size=(8, 5)))
    target = torch.from_numpy(rng.dirichlet(np.ones(5), size=8))
    grads = []
    for fn in (
        lambda p: w1_index(p, target),
        lambda p: ot_general(p, target, likert5.index_cost()),
    ):
        x = logits.clone().requires_grad_(True)
        value = fn(torch.softmax(x, -1))
        value.sum().backward()
        grads.append((value.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_ot_general_zero_mass_and_float32():
    # A float32 softmax does not sum to 1 within emd2's 1e-6 tolerance, and one-hot targets have
    # empty bins; both must work, for both solvers.
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = torch.eye(6)[[0, 5, 2, 3]]
    target[1] = torch.tensor([0.5, 0, 0, 0, 0, 0.5])
    for method in ("emd", "sinkhorn"):
        pred = torch.softmax(logits * 20, -1)
        value = ot_general(pred, target, hh6.grid_cost(), method=method, reg=0.05)
        assert value.dtype == torch.float32 and value.shape == (4,)
        assert torch.isfinite(value).all()
        (grad,) = torch.autograd.grad(value.sum(), logits)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Zero-mass bins on both sides, which make plain Sinkhorn divide 0 by 0.
    a = torch.tensor([[0.5, 0.5, 0, 0, 0, 0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0, 0, 0, 0, 0, 1.0]], dtype=torch.float64)
    exact = ot_general(a, b, hh6.grid_cost())
    assert exact.item() == pytest.approx(2.5)
    assert ot_general(a, b, hh6.grid_cost(), "sinkhorn").item() == pytest.approx(2.5)


# Very peaked predictions (bins near 1e-20) can keep Sinkhorn from converging in 1000 iterations.
@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_sinkhorn_close_to_emd_for_small_reg():
    pred, target = random_pairs(6, 30, seed=13)
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    exact = ot_general(p, t, hh6.grid_cost(), method="emd")
    entropic = ot_general(p, t, hh6.grid_cost(), method="sinkhorn", reg=0.05)
    np.testing.assert_allclose(entropic.numpy(), exact.numpy(), atol=1e-2)
    loose = ot_general(p, t, hh6.grid_cost(), method="sinkhorn", reg=1.0)
    assert (loose - exact).abs().max() > 1e-2  # reg really is used
    # Smaller reg needs more than POT's 1000 iterations; say so rather than stay silent.
    with pytest.warns(UserWarning, match="did not converge"):
        ot_general(p, t, hh6.grid_cost(), method="sinkhorn", reg=0.01)


def test_ot_general_validation():
    p = torch.full((2, 6), 1 / 6)
    with pytest.raises(ValueError, match="emd, sinkhorn"):
        ot_general(p, p, hh6.grid_cost(), method="lp")
    with pytest.raises(ValueError, match="too small"):
        ot_general(p, p, hh6.grid_cost(), method="sinkhorn", reg=1e-3)
    with pytest.raises(ValueError, match="\\[6, 6\\]"):
        ot_general(p, p, likert5.index_cost())


def test_ot_1d_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    target = torch.from_numpy(rng.dirichlet(np.ones(6), size=4))
    theta = torch.from_numpy(rng.normal(size=(4, 6))).requires_grad_(True)
    for support in (hh6.scores, range(6)):
        support = list(support)
        assert torch.autograd.gradcheck(
            lambda th, s=support: ot_1d(torch.softmax(th, -1), target, s), (theta,)
        )


def test_three_prediction_example():
    # Target: everyone said "Helpful & Harmless". Each prediction puts 0.1 on a worse label.
    target = torch.eye(6, dtype=torch.float64)[[0, 0, 0]]
    pred = torch.zeros(3, 6, dtype=torch.float64)
    pred[:, 0] = 0.9
    pred[[0, 1, 2], [1, 2, 5]] = 0.1
    logits = pred.clamp_min(1e-30).log()  # finite logits whose softmax is pred to ~1e-30
    ce = cross_entropy(logits, target, reduction="none")
    # Cross-entropy cannot tell the three apart; the transport costs can.
    torch.testing.assert_close(ce, torch.full((3,), -math.log(0.9), dtype=torch.float64))
    torch.testing.assert_close(w1_index(pred, target), torch.tensor([0.1, 0.2, 0.5]).double())
    torch.testing.assert_close(
        ot_score(pred, target, hh6.scores), torch.tensor([0.05, 0.2, 0.4]).double()
    )


def test_cross_entropy():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    per_item = cross_entropy(logits, target, reduction="none")
    expected = [math.log(2), -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))]
    torch.testing.assert_close(per_item, torch.tensor(expected))
    torch.testing.assert_close(cross_entropy(logits, target), per_item.mean())
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, target, reduction="sum")


def test_distribution_loss_dispatch_and_mix():
    rng = np.random.default_rng(4)
    logits = torch.from_numpy(rng.normal(size=(6, 6)))
    target = torch.from_numpy(random_pairs(6, 6, seed=4)[1])
    pred = torch.softmax(logits, -1)
    ce = cross_entropy(logits, target)
    w1 = w1_index(pred, target).mean()
    ots = ot_score(pred, target, hh6.scores).mean()

    def loss(kind, **kw):
        return distribution_loss(logits, target, kind, hh6, **kw)

    torch.testing.assert_close(loss("ce"), ce)
    torch.testing.assert_close(loss("ce", mix=0.5), ce)
    torch.testing.assert_close(loss("w1"), w1)
    torch.testing.assert_close(loss("ot"), ots)
    torch.testing.assert_close(loss("ot_general", cost_metric="score"), ots)  # POT == closed form
    grid = ot_general(pred, target, hh6.grid_cost()).mean()
    torch.testing.assert_close(loss("ot_general"), grid)
    torch.testing.assert_close(loss("w1", mix=0.25), 0.75 * w1 + 0.25 * ce)
    torch.testing.assert_close(loss("ot", mix=1.0), ce)
    torch.testing.assert_close(loss("ot_general", mix=0.5), 0.5 * grid + 0.5 * ce)
    sink = loss("ot_general", method="sinkhorn", reg=0.1)
    assert sink.item() == pytest.approx(grid.item(), abs=0.1)

    for kind in ("ce", "w1", "ot", "ot_general"):
        x = logits.clone().requires_grad_(True)
        distribution_loss(x, target, kind, hh6, mix=0.1).backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_distribution_loss_validation():
    logits, target = torch.zeros(2, 6), torch.full((2, 6), 1 / 6)
    with pytest.raises(ValueError, match="ce, w1, ot, ot_general"):
        distribution_loss(logits, target, "kl", hh6)
    with pytest.raises(ValueError, match="mix"):
        distribution_loss(logits, target, "w1", hh6, mix=1.5)
    with pytest.raises(ValueError, match="5 labels"):
        distribution_loss(logits, target, "w1", likert5)
    with pytest.raises(ValueError, match="no grid"):
        distribution_loss(logits[:, :5], target[:, :5], "ot_general", likert5)


def test_bradley_terry_loss_by_hand():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([0.0, 2.0])
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("reg", [0.1, 0.5])
def test_batched_sinkhorn_equals_pot_per_pair_values_and_gradients(reg):
    from dprm_ray.losses import sinkhorn_batched

    pred, target = random_pairs(6, 20, seed=21)
    target[:5, 2] = 0.0  # empty target bins
    target /= target.sum(1, keepdims=True)
    cost = torch.from_numpy(hh6.grid_cost())
    p = torch.from_numpy(pred).requires_grad_(True)
    # Both solvers run to convergence (the defaults stop at 1000 iterations, like POT's).
    got = sinkhorn_batched(p, torch.from_numpy(target), cost, reg, max_iter=5000, tol=1e-12)
    got.sum().backward()
    for i in range(len(pred)):
        a = torch.from_numpy(pred[i]).requires_grad_(True)
        b = torch.from_numpy(target[i])
        keep = b > 0
        want = ot.sinkhorn2(a, b[keep], cost[:, keep], reg, numItermax=5000, stopThr=1e-12)
        want.backward()
        assert got[i].item() == pytest.approx(want.item(), abs=1e-6)
        # Gradients wrt pred are defined up to a constant shift (pred lives on the simplex).
        g_got, g_want = p.grad[i].numpy(), a.grad.numpy()
        np.testing.assert_allclose(g_got - g_got.mean(), g_want - g_want.mean(), atol=1e-4)

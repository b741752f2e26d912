import math

import pytest
import torch

from dprm_ray.losses import (
    ddpo_loss,
    edpo_loss,
    ipo_loss,
    log_ratio_margin,
    offline_policy_loss,
)

# log pi(chosen) = -1, log pi(rejected) = -2, reference -1.5 for both: h = 0.5 - (-0.5) = 1.
PI_C, PI_R, REF_C, REF_R = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))
BETA = 0.1


def test_margin_dpo_and_ipo_by_hand():
    assert log_ratio_margin(PI_C, PI_R, REF_C, REF_R).item() == pytest.approx(1.0)
    loss, diag = offline_policy_loss("dpo", PI_C, PI_R, REF_C, REF_R, BETA)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)))
    assert diag["implicit_reward_chosen"] == pytest.approx(0.05)
    assert diag["implicit_reward_rejected"] == pytest.approx(-0.05)
    assert diag["logp_chosen"] == -1.0 and diag["margin"] == pytest.approx(1.0)
    ipo, _ = offline_policy_loss("ipo", PI_C, PI_R, REF_C, REF_R, BETA)
    assert ipo.item() == pytest.approx((1.0 - 5.0) ** 2)


def test_ddpo_by_hand_and_its_gradient():
    h = torch.tensor([1.0], requires_grad=True)
    loss = ddpo_loss(h, torch.tensor([0.8]), torch.tensor([0.5]), BETA)
    assert loss.item() == pytest.approx((0.3 - 0.1) ** 2)
    loss.backward()
    assert h.grad.item() == pytest.approx(-2 * BETA * (0.3 - 0.1))


def test_ipo_is_ddpo_with_a_constant_half_reward_margin():
    h = torch.randn(16)
    for beta in (0.05, 0.1, 0.5, 2.0):
        half = torch.full((16,), 0.5)
        assert ddpo_loss(h, half, torch.zeros(16), beta).item() == pytest.approx(
            beta**2 * ipo_loss(h, beta).item(), rel=1e-5
        )


def test_edpo_picks_the_member_with_the_lowest_loss():
    h = torch.ones(3)
    # Reward margins per member: 0.1 (loss 0), 0.5 (0.16), 2.0 (3.61).
    r_c = torch.tensor([[0.1] * 3, [0.5] * 3, [2.0] * 3])
    loss, which = edpo_loss(h, r_c, torch.zeros(3, 3), BETA)
    assert which.item() == 0 and loss.item() == pytest.approx(0.0)
    r_c = torch.tensor([[0.5, 0.1, 2.0], [2.0, 0.5, 0.1], [0.1, 2.0, 0.5]])
    batch_loss, batch_which = edpo_loss(h, r_c, torch.zeros(3, 3), BETA)
    assert batch_loss.item() == pytest.approx((0.16 + 0.0 + 3.61) / 3)  # every row ties: member 0
    assert batch_which.item() == 0
    ex_loss, ex_which = edpo_loss(h, r_c, torch.zeros(3, 3), BETA, per_example=True)
    assert ex_which.tolist() == [2, 0, 1] and ex_loss.item() == pytest.approx(0.0)


def test_edpo_and_pdpo_add_gamma_times_reference_nll():
    ref_samples = torch.tensor([-3.0, -5.0])
    dpo, _ = offline_policy_loss("dpo", PI_C, PI_R, REF_C, REF_R, BETA)
    pdpo, diag = offline_policy_loss(
        "pdpo", PI_C, PI_R, REF_C, REF_R, BETA, pi_logp_on_ref_samples=ref_samples, gamma=0.5
    )
    assert pdpo.item() == pytest.approx(dpo.item() + 0.5 * 4.0)
    assert diag["reference_nll"] == pytest.approx(4.0)
    rc, rr = torch.tensor([[0.3], [0.1]]), torch.zeros(2, 1)
    edpo, diag = offline_policy_loss(
        "edpo", PI_C, PI_R, REF_C, REF_R, BETA, rc, rr, ref_samples, gamma=0.5
    )
    assert edpo.item() == pytest.approx(0.0 + 0.5 * 4.0) and diag["ensemble_member"] == 1.0


def test_missing_inputs_are_named():
    with pytest.raises(ValueError, match="needs precomputed rewards"):
        offline_policy_loss("ddpo", PI_C, PI_R, REF_C, REF_R, BETA)
    with pytest.raises(ValueError, match="log-probs of reference samples"):
        offline_policy_loss("pdpo", PI_C, PI_R, REF_C, REF_R, BETA, gamma=1.0)
    with pytest.raises(ValueError, match="unknown offline loss 'kto'"):
        offline_policy_loss("kto", PI_C, PI_R, REF_C, REF_R, BETA)

"""PAL: model shapes, losses by hand, training, few-shot adaptation, save/load, the text export;
and the per-user persona data it learns from."""

import math

import numpy as np
import pytest
import torch
from conftest import PERSONA_DIR

from dprm_ray.pal import (
    MIXTURE,
    PairTensors,
    PALConfig,
    PALReward,
    adapt_user,
    build_pal_model,
    embed_pairs,
    load_pal,
    pair_rewards,
    pal_accuracy,
    pal_loss,
    save_pal,
    train_pal,
    user_reward,
)
from dprm_ray.persona import PersonaPopulation
from dprm_ray.persona_users import TypedPersonaPopulation, build_persona_users
from dprm_ray.reward_eval import pairwise_accuracy

BEHAVIOURS = ["politically-conservative", "subscribes-to-Islam", "agreeableness"]
needs_persona = pytest.mark.skipif(not PERSONA_DIR.is_dir(), reason="no persona data")


def gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def set_identity(mlp: torch.nn.Sequential, bias: tuple[float, float] = (0.0, 0.0)) -> None:
    """Make a 2-2-2 MLP compute gelu(x) + bias."""
    with torch.no_grad():
        mlp[0].weight.copy_(torch.eye(2))
        mlp[0].bias.zero_()
        mlp[2].weight.copy_(torch.eye(2))
        mlp[2].bias.copy_(torch.tensor(bias))


def tiny(variant: str, k: int = 2, users=("a", "b"), loss: str = "logistic"):
    config = PALConfig(
        variant=variant,
        input_dim=2,
        num_prototypes=k,
        hidden_size=2,
        pref_dim=2,
        loss=loss,
        user_ids=list(users),
    )
    return build_pal_model(config, seed=0)


def random_pairs(n: int, dim: int, users: int, seed: int = 0) -> PairTensors:
    g = torch.Generator().manual_seed(seed)
    return PairTensors(
        chosen=torch.randn(n, dim, generator=g),
        rejected=torch.randn(n, dim, generator=g),
        prompts=torch.randn(n, dim, generator=g),
        users=torch.randint(0, users, (n,), generator=g),
    )


@pytest.mark.parametrize("variant", ["pal-a", "pal-b"])
def test_shapes(variant):
    config = PALConfig(variant=variant, input_dim=8, num_prototypes=3, hidden_size=16, pref_dim=4)
    config.user_ids = [f"user-{i}" for i in range(5)]
    model = build_pal_model(config)
    data = random_pairs(7, 8, 5)
    assert model.user_logits.shape == (5, 3)
    assert model(data.users, data.chosen, data.rejected, data.prompts).shape == (7,)
    weights = torch.softmax(torch.randn(7, 3), -1)
    assert model.ideal_points(weights, data.prompts).shape == (7, 4)
    assert model.reward(data.chosen, data.prompts, weights).shape == (7,)
    assert user_reward(model, data.chosen, data.prompts, "user-2").shape == (7,)
    assert user_reward(model, data.chosen, data.prompts, MIXTURE).shape == (7,)
    r_c, r_r = pair_rewards(model, data)
    assert r_c.shape == r_r.shape == (7,)
    if variant == "pal-b":
        assert model.prototype_features(data.prompts).shape == (7, 3, 4)


def test_losses_by_hand():
    margin = torch.tensor([0.0, math.log(3.0)])
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2  # -log sigmoid(m)
    assert pal_loss(margin, "logistic").item() == pytest.approx(expected, rel=1e-6)
    hinge = pal_loss(torch.tensor([0.5, 2.0, -1.0]), "hinge", hinge_margin=1.0)
    assert hinge.item() == pytest.approx((0.5 + 0.0 + 2.0) / 3)
    with pytest.raises(ValueError, match="loss must be one of"):
        pal_loss(margin, "squared")


@pytest.mark.parametrize("loss", ["logistic", "hinge"])
def test_pal_a_margin_by_hand(loss):
    model = tiny("pal-a", users=("a",), loss=loss)
    set_identity(model.f)
    with torch.no_grad():
        model.prototypes.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    # Zero logits: w = (0.5, 0.5), so the ideal point is (1, 0).
    chosen, rejected = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 0.0]])
    d_chosen, d_rejected = abs(gelu(1.0) - 1.0), abs(gelu(3.0) - 1.0)
    margin = model(torch.tensor([0]), chosen, rejected)
    assert margin.item() == pytest.approx(d_rejected - d_chosen, rel=1e-5)
    expected = math.log1p(math.exp(-margin.item())) if loss == "logistic" else 0.0
    assert pal_loss(margin, loss).item() == pytest.approx(expected, abs=1e-6)
    assert user_reward(model, chosen, None, "a").item() == pytest.approx(-d_chosen, rel=1e-5)


def test_pal_b_margin_by_hand():
    model = tiny("pal-b", users=("a",))
    set_identity(model.f)
    set_identity(model.g[0])
    set_identity(model.g[1], bias=(0.0, 1.0))
    with torch.no_grad():
        model.g[1][2].weight.zero_()  # g_1(x) = (0, 1) for every prompt
    prompt = torch.tensor([[1.0, 0.0]])
    u = (0.5 * gelu(1.0), 0.5)  # w = (0.5, 0.5): the mean of g_0 = (gelu(1), 0) and g_1
    norm = math.hypot(*u)
    chosen, rejected = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    tau = 1.0 / 0.07
    expected = tau * (u[0] / norm - u[1] / norm)  # cos with (gelu(2), 0) minus with (0, gelu(2))
    margin = model(torch.tensor([0]), chosen, rejected, prompt)
    assert margin.item() == pytest.approx(expected, rel=1e-5)
    assert pal_loss(margin).item() == pytest.approx(math.log1p(math.exp(-expected)), rel=1e-5)


def test_config_is_validated():
    with pytest.raises(ValueError, match="variant"):
        PALConfig(variant="pal-c").validate()
    with pytest.raises(ValueError, match="logistic"):
        PALConfig(variant="pal-b", loss="hinge").validate()
    with pytest.raises(ValueError, match="reserved"):
        PALConfig(user_ids=["mixture"]).validate()


def two_groups(n_per_user: int = 40, users: int = 6, dim: int = 6, seed: int = 0) -> PairTensors:
    """Even users prefer items with a larger first coordinate, odd users a smaller one."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_user * users
    a, b = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    user = torch.arange(users).repeat_interleave(n_per_user)
    a_wins = (a[:, 0] > b[:, 0]) == (user % 2 == 0)
    chosen = torch.where(a_wins[:, None], a, b)
    rejected = torch.where(a_wins[:, None], b, a)
    return PairTensors(chosen, rejected, torch.zeros(n, dim), user)


@pytest.mark.parametrize("variant", ["pal-a", "pal-b"])
def test_training_learns_two_groups_and_adaptation_finds_the_group(variant):
    torch.set_num_threads(1)
    users = [f"user-{i}" for i in range(6)]
    train, test = two_groups(seed=0), two_groups(n_per_user=30, seed=1)
    config = PALConfig(variant=variant, input_dim=6, num_prototypes=2, hidden_size=16, pref_dim=4)
    config.user_ids = users
    model = build_pal_model(config, seed=0)
    history = train_pal(model, train, epochs=40, batch_size=32, lr=1e-2, seed=0)
    assert history[-1]["loss"] < history[0]["loss"]
    assert pal_accuracy(model, test) > 0.85  # per-user mixtures separate the groups
    assert pal_accuracy(model, test, MIXTURE) < 0.7  # one reward for all cannot
    assert model.population_weights.sum().item() == pytest.approx(1.0)

    # A new odd user (opposite of user-0): adapt on 10 comparisons, test on others.
    new = two_groups(n_per_user=30, seed=2).subset(slice(30, 60))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logits = adapt_user(model, new.subset(slice(0, 10)), steps=100, lr=0.1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # only the new logits trained
    start = model.population_weights.log()
    assert not torch.allclose(logits, start)
    assert pal_accuracy(model, new.subset(slice(10, 30)), logits) > 0.85
    # The adapted user, added to the model, scores as the logits do.
    model.add_user("user-new", logits)
    assert model.config.user_ids[-1] == "user-new" and model.user_logits.shape == (7, 2)
    r_logits = user_reward(model, new.chosen, new.prompts, logits)
    assert torch.allclose(user_reward(model, new.chosen, new.prompts, "user-new"), r_logits)


def test_adaptation_with_one_prototype_or_no_data_keeps_the_start():
    model = tiny("pal-b", k=1)
    data = random_pairs(5, 2, 2)
    assert torch.equal(adapt_user(model, data), torch.zeros(1))
    model = tiny("pal-a", k=3)
    empty = data.subset(slice(0, 0))
    assert torch.allclose(adapt_user(model, empty), torch.full((3,), math.log(1 / 3)))


def test_training_is_deterministic_by_seed():
    torch.set_num_threads(1)
    data = random_pairs(64, 6, 3)

    def run(seed):
        config = PALConfig(variant="pal-b", input_dim=6, num_prototypes=2, hidden_size=8)
        config.user_ids = ["a", "b", "c"]
        config.pref_dim = 4
        model = build_pal_model(config, seed=seed)
        train_pal(model, data, epochs=3, batch_size=16, lr=1e-2, seed=seed)
        return model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("variant", ["pal-a", "pal-b"])
def test_save_load_round_trip(tmp_path, variant):
    torch.set_num_threads(1)
    data = random_pairs(32, 6, 3)
    config = PALConfig(variant=variant, input_dim=6, num_prototypes=3, hidden_size=8, pref_dim=4)
    config.user_ids = ["x", "y", "z"]
    config.backbone = "tiny-encoder"
    model = build_pal_model(config, seed=3)
    train_pal(model, data, epochs=2, batch_size=8, lr=1e-2)
    model.add_user("new", torch.tensor([2.0, 0.0, -1.0]))
    save_pal(model, tmp_path / "pal")
    loaded = load_pal(tmp_path / "pal")
    assert loaded.config == model.config
    assert loaded.config.user_ids == ["x", "y", "z", "new"]
    assert torch.equal(loaded.population_weights, model.population_weights)
    for user in ("x", "new", MIXTURE):
        expected = user_reward(model, data.chosen, data.prompts, user)
        assert torch.equal(user_reward(loaded, data.chosen, data.prompts, user), expected)
    with pytest.raises(KeyError, match="user 'nobody'"):
        loaded.user_weights("nobody")


# --------------------------------------------------------------------------- persona users


@needs_persona
def test_persona_users_splits_and_determinism():
    kwargs = dict(
        seed=3,
        seen_users=5,
        unseen_users=3,
        train_per_user=12,
        test_per_user=6,
        adapt_per_user=8,
        behaviours=BEHAVIOURS,
        max_per_behaviour=20,
    )
    data = build_persona_users(PERSONA_DIR, **kwargs)
    again = build_persona_users(PERSONA_DIR, **kwargs)
    assert data.splits == again.splits
    other = build_persona_users(PERSONA_DIR, **{**kwargs, "seed": 4})
    assert data.splits != other.splits
    sizes = {split: len(rows) for split, rows in data.splits.items()}
    assert sizes == {"train": 60, "test_seen": 30, "unseen_adapt": 24, "unseen_test": 18}
    seen = {f"user-{u}" for u in range(5)}
    assert {c.user_id for c in data.splits["train"]} == seen
    assert {c.user_id for c in data.splits["test_seen"]} == seen
    assert {c.user_id for c in data.splits["unseen_test"]} == {"user-5", "user-6", "user-7"}
    # Test comparisons are on statements no training or adaptation comparison uses.
    train_prompts = {c.prompt for s in ("train", "unseen_adapt") for c in data.splits[s]}
    test_prompts = {c.prompt for s in ("test_seen", "unseen_test") for c in data.splits[s]}
    assert not train_prompts & test_prompts
    for c in data.splits["train"]:
        assert c.chosen != c.rejected and "Yes" in c.chosen + c.rejected
    # Labels follow the users' stances except for noise and indifference.
    assert 0.7 < data.oracle_accuracy("train") <= 1.0


@needs_persona
def test_typed_population_keeps_the_crowd_users_without_types():
    plain = PersonaPopulation(BEHAVIOURS, 50, seed=2)
    untyped = TypedPersonaPopulation(BEHAVIOURS, 50, seed=2, num_types=0)
    assert np.array_equal(plain.stances, untyped.stances)
    assert np.array_equal(plain.user_bias, untyped.user_bias)
    typed = TypedPersonaPopulation(BEHAVIOURS, 400, seed=2, num_types=3, type_fidelity=1.0)
    # With fidelity 1 every user's stances are exactly its type's profile.
    assert np.array_equal(typed.stances, typed.type_stances[typed.user_type])
    assert np.array_equal(typed.user_bias, PersonaPopulation(BEHAVIOURS, 400, seed=2).user_bias)


@needs_persona
def test_text_export_matches_in_process_predictions(tmp_path):
    """Scoring raw texts from the saved folder gives the in-process rewards and accuracy."""
    torch.set_num_threads(1)
    data = build_persona_users(
        PERSONA_DIR,
        seed=0,
        seen_users=4,
        unseen_users=0,
        train_per_user=15,
        test_per_user=8,
        adapt_per_user=0,
        behaviours=BEHAVIOURS,
        max_per_behaviour=12,
    )
    train_rows = [c.as_pair() for c in data.splits["train"]]
    test_rows = [c.as_pair() for c in data.splits["test_seen"]]
    users = [f"user-{u}" for u in range(4)]
    train = embed_pairs(train_rows, "tiny-encoder", 128, users, cache_dir=tmp_path / "cache")
    test = embed_pairs(test_rows, "tiny-encoder", 128, users, cache_dir=tmp_path / "cache")
    config = PALConfig(variant="pal-b", input_dim=train.chosen.shape[1], num_prototypes=2)
    config.user_ids, config.backbone, config.max_length = users, "tiny-encoder", 128
    config.hidden_size, config.pref_dim = 16, 8
    model = build_pal_model(config, seed=0)
    train_pal(model, train, epochs=3, batch_size=16, lr=1e-2)
    save_pal(model, tmp_path / "pal")

    for user in ("user-1", MIXTURE):
        export = PALReward(tmp_path / "pal", user)
        rows = [r for r in test_rows if user == MIXTURE or r["user_id"] == user]
        prompts = [r["prompt"] for r in rows]
        r_chosen = export(prompts, [r["chosen"] for r in rows])
        r_rejected = export(prompts, [r["rejected"] for r in rows])
        mask = torch.tensor([user == MIXTURE or r["user_id"] == user for r in test_rows])
        in_chosen, in_rejected = pair_rewards(model, test.subset(mask), user)
        np.testing.assert_allclose(r_chosen, in_chosen, atol=1e-4)
        np.testing.assert_allclose(r_rejected, in_rejected, atol=1e-4)
        assert pairwise_accuracy(r_chosen, r_rejected) == pal_accuracy(
            model, test.subset(mask), user
        )

"""End to end through the CLI: persona users -> train-pal -> adapt an unseen user."""

import json

import pytest
from conftest import PERSONA_DIR, run_cli

from dprm_ray.data import load_rows
from dprm_ray.pal import load_pal

pytestmark = pytest.mark.skipif(not PERSONA_DIR.is_dir(), reason="no persona data")

BEHAVIOURS = "[politically-conservative,subscribes-to-Islam,agreeableness]"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("persona-users")
    out = tmp_path / "data"
    proc = run_cli(
        "data",
        "persona-users",
        f"--persona-dir={PERSONA_DIR}",
        f"out_dir={out}",
        f"behaviours={BEHAVIOURS}",
        "max_per_behaviour=20",
        "--seen-users",
        "6",
        "--unseen-users",
        "2",
        "train_per_user=20",
        "test_per_user=10",
        "adapt_per_user=10",
        f"output_dir={tmp_path / 'data-job'}",
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
def test_persona_users_train_and_adapt(tmp_path, data):
    sizes = {
        name: len(load_rows(data / f"{name}.parquet", kind="pairs").rows)
        for name in ("train", "test_seen", "unseen_adapt", "unseen_test")
    }
    assert sizes == {"train": 120, "test_seen": 60, "unseen_adapt": 20, "unseen_test": 20}
    users = json.loads((data / "users.json").read_text())
    assert sorted(users) == sorted(f"user-{u}" for u in range(8))
    assert [u for u, info in users.items() if not info["seen"]] == ["user-6", "user-7"]

    proc = run_cli(
        "train-pal",
        f"data={data / 'train.parquet'}",
        f"eval_data={data / 'test_seen.parquet'}",
        "variant=pal-a",
        "loss=hinge",
        "num_prototypes=3",
        "backbone=tiny-encoder",
        "max_length=128",
        "hidden_size=32",
        "epochs=3",
        f"output_dir={tmp_path / 'train'}",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    for key in ("train_accuracy", "eval_accuracy", "eval_accuracy_mixture"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["users"] == 6 and metrics["eval_pairs"] == 60
    model_dir = tmp_path / "train" / "model"
    assert load_pal(model_dir).config.user_ids == [f"user-{u}" for u in range(6)]

    proc = run_cli(
        "train-pal",
        "adapt",
        f"model={model_dir}",
        f"data={data / 'unseen_adapt.parquet'}",
        "user=user-7",
        "budget=5",
        f"test_data={data / 'unseen_test.parquet'}",
        "steps=50",
        f"output_dir={tmp_path / 'adapt'}",
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "adapt" / "metrics.json").read_text())
    assert metrics["budget_used"] == 5 and metrics["test_pairs"] == 10
    for key in ("adapt_accuracy", "test_accuracy", "test_accuracy_mixture"):
        assert 0.0 <= metrics[key] <= 1.0
    assert sum(metrics["weights"]) == pytest.approx(1.0, abs=1e-3)
    adapted = load_pal(tmp_path / "adapt" / "model")
    assert adapted.config.user_ids[-1] == "user-7" and len(adapted.config.user_ids) == 7


def test_train_pal_rejects_bad_variant_and_unknown_eval_users(tmp_path, data, capsys):
    """In-process (the same `main` the CLI runs), to spare two interpreter start-ups."""
    from dprm_ray.jobs.train_pal import main

    common = [f"data={data / 'train.parquet'}", "backbone=tiny-encoder", "epochs=1"]
    code = main([*common, "variant=pal-c", f"output_dir={tmp_path / 'bad'}"])
    assert code == 2
    assert "variant must be one of pal-a, pal-b" in capsys.readouterr().err
    # Unseen users are not in the model: evaluating them fails, naming the user, before training.
    unseen = f"eval_data={data / 'unseen_test.parquet'}"
    assert main([*common, unseen, f"output_dir={tmp_path / 'unseen'}"]) == 1
    assert "unseen_test.parquet:1: user 'user-6'" in capsys.readouterr().err
    assert not (tmp_path / "unseen" / "model").exists()

"""Label spaces: presets, custom spaces from config mappings, validation, cost matrices."""

import json

import numpy as np
import pytest

from dprm_ray.labels import PRESETS, LabelSpace, get_label_space, hh6, likert5


def test_presets():
    assert set(PRESETS) == {"hh6", "likert5"}
    assert get_label_space("hh6") is hh6
    assert hh6.num_labels == 6
    assert hh6.labels[0] == "Helpful & Harmless"
    assert hh6.labels[5] == "Not-helpful & Harmful"
    assert hh6.scores == (1.0, 0.5, -1.0, -1.0, -1.5, -3.0)
    assert hh6.grid == ((2, 1), (1, 1), (0, 1), (2, 0), (1, 0), (0, 0))
    assert likert5.labels == ("very bad", "bad", "neutral", "good", "very good")
    assert likert5.scores == (-2, -1, 0, 1, 2)
    assert likert5.grid is None
    assert hh6.scores_array().dtype == np.float64


def test_get_label_space_accepts_space_and_mapping():
    assert get_label_space(likert5) is likert5
    custom = get_label_space(
        {"name": "yesno", "labels": ["no", "yes"], "scores": [0, 1]}
    )  # lists, as from YAML
    assert custom == LabelSpace("yesno", ("no", "yes"), (0.0, 1.0))
    assert isinstance(custom.labels, tuple) and isinstance(custom.scores[0], float)
    hash(custom)  # stays usable as a dict key
    gridded = get_label_space(
        {"name": "g", "labels": ["a", "b"], "scores": [1, 0], "grid": [[0, 0], [3, 4]]}
    )
    assert gridded.grid == ((0.0, 0.0), (3.0, 4.0))


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="hh6, likert5"):
        get_label_space("hh7")
    with pytest.raises(TypeError):
        get_label_space(6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": ("a",), "scores": (1.0,)}, "at least 2"),
        ({"labels": ("a", "b"), "scores": (1.0,)}, "2 labels but 1 scores"),
        ({"labels": ("a", "b"), "scores": (1.0, float("nan"))}, "finite"),
        ({"labels": ("a", "b"), "scores": (1.0, float("inf"))}, "finite"),
        ({"labels": ("a", "a"), "scores": (1.0, 2.0)}, "duplicate labels \\['a'\\]"),
        ({"labels": ("a", "b"), "scores": (1.0, "x")}, "scores must be numbers"),
        ({"labels": "ab", "scores": (1.0, 2.0)}, "labels must be a list"),
        ({"labels": ("a", "b"), "scores": (1, 2), "grid": ((0, 0),)}, "1 grid points"),
        ({"labels": ("a", "b"), "scores": (1, 2), "grid": ((0, 0), (1, 2, 3))}, "grid point"),
        ({"labels": ("a", "b"), "scores": (1, 2), "grid": (0, 1)}, "pairs"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LabelSpace(name="bad", **kwargs)


def test_from_dict_rejects_missing_and_unknown_keys():
    with pytest.raises(ValueError, match="missing \\['scores'\\]"):
        get_label_space({"name": "x", "labels": ["a", "b"]})
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        get_label_space({"name": "x", "labels": ["a", "b"], "scores": [0, 1], "colour": 1})


def test_cost_matrices():
    idx = likert5.index_cost()
    assert idx[0, 4] == 4 and idx[3, 1] == 2 and np.all(np.diag(idx) == 0)
    np.testing.assert_array_equal(likert5.score_cost(), idx)  # scores are equally spaced

    score = hh6.score_cost()
    assert score[2, 3] == 0.0  # tied scores: swapping them is free
    assert score[0, 5] == 4.0
    assert score[1, 4] == 2.0

    l1 = hh6.grid_cost()
    assert l1[0, 5] == 3.0  # (2,1) -> (0,0)
    assert l1[2, 3] == 3.0  # (0,1) -> (2,0): tied scores, far apart on the grid
    assert l1[0, 3] == 1.0
    l2 = hh6.grid_cost(p=2)
    assert l2[0, 5] == pytest.approx(np.sqrt(5))
    for m in (idx, score, l1, l2):
        np.testing.assert_array_equal(m, m.T)

    np.testing.assert_array_equal(hh6.cost_matrix("index"), hh6.index_cost())
    np.testing.assert_array_equal(hh6.cost_matrix("score"), score)
    np.testing.assert_array_equal(hh6.cost_matrix("grid"), l1)
    with pytest.raises(ValueError, match="index, score, grid"):
        hh6.cost_matrix("cosine")
    with pytest.raises(ValueError, match="no grid"):
        likert5.cost_matrix("grid")
    with pytest.raises(ValueError, match="p must be"):
        hh6.grid_cost(p=3)


def test_expected_score():
    assert likert5.expected_score([0, 0, 0, 0, 1]) == 2.0
    batch = np.array([[0.5, 0.5, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]])
    np.testing.assert_allclose(hh6.expected_score(batch), [0.75, -3.0])
    assert hh6.expected_score(np.zeros((2, 3, 6))).shape == (2, 3)
    with pytest.raises(ValueError, match="\\[..., 6\\]"):
        hh6.expected_score([0.5, 0.5])


@pytest.mark.parametrize("space", [hh6, likert5])
def test_round_trip_through_json(space):
    data = json.loads(json.dumps(space.to_dict()))
    assert LabelSpace.from_dict(data) == space
    assert get_label_space(data) == space

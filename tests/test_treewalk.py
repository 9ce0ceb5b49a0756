"""The leaf-mask walk reaches the same leaves as scikit-learn's binned predictor, for
every bin value in every column, and adds them in scikit-learn's order (bit-identical)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from churn_batch._treekernel import add_trees
from churn_batch.treewalk import MAX_LEAVES, LeafMaskWalk, leaf_mask_walk


def _fitted(max_leaf_nodes: int | None, classes: int = 2) -> HistGradientBoostingClassifier:
    """Numbers with missing values and two categorical columns, one with missing levels."""
    rng = np.random.default_rng(max_leaf_nodes or 0)
    n = 4_000
    x = np.column_stack(
        [
            rng.normal(size=n),
            rng.exponential(size=n),
            rng.integers(0, 12, n).astype(float),  # categorical
            rng.integers(0, 5, n).astype(float),  # categorical
        ]
    )
    x[rng.random(n) < 0.1, 0] = np.nan
    x[rng.random(n) < 0.05, 3] = np.nan
    logit = x[:, 1] - np.nan_to_num(x[:, 0]) + (x[:, 2] % 3 == 0) - 0.5 * np.isnan(x[:, 3])
    y = (logit + rng.normal(size=n) > 0.5).astype(int)
    if classes > 2:
        y = y + (x[:, 1] > 1.5)
    return HistGradientBoostingClassifier(
        max_iter=40,
        max_leaf_nodes=max_leaf_nodes,
        max_depth=None,
        min_samples_leaf=5,
        categorical_features=[2, 3],
        early_stopping=False,
        random_state=0,
    ).fit(x, y)


def _sklearn_raw(classifier: Any, bins: Any) -> Any:
    classifier._in_fit = True
    try:
        return classifier._raw_predict(bins)
    finally:
        del classifier._in_fit


@pytest.mark.parametrize("max_leaf_nodes", [2, 7, 31, MAX_LEAVES])
def test_every_bin_value_reaches_sklearns_leaf(max_leaf_nodes: int) -> None:
    classifier = _fitted(max_leaf_nodes)
    leaves = [int(tree.nodes["is_leaf"].sum()) for (tree,) in classifier._predictors]
    assert max(leaves) == max_leaf_nodes  # the trees are as wide as asked
    walk = leaf_mask_walk(classifier)
    assert walk is not None
    rng = np.random.default_rng(1)
    # Every value of a byte, in every column, not only the bins the binner gives.
    bins = rng.integers(0, 256, size=(20_000, 4), dtype=np.uint8)
    bins[:256] = np.arange(256, dtype=np.uint8)[:, None]
    expected = _sklearn_raw(classifier, bins)
    got = np.zeros_like(expected) + classifier._baseline_prediction
    walk(bins, classifier._predictors, got, True, 1)
    assert np.array_equal(got, expected)


def test_installed_walk_scores_bins_and_leaves_raw_values_to_sklearn() -> None:
    classifier = _fitted(31)
    walk = leaf_mask_walk(classifier)
    assert isinstance(walk, LeafMaskWalk)
    x = np.array([[0.3, 1.2, 4.0, np.nan], [np.nan, 0.1, 11.0, 2.0]])
    expected_raw = classifier._raw_predict(x)
    bins = classifier._bin_mapper.transform(classifier._preprocess_X(x, reset=False))
    classifier._predict_iterations = walk
    assert np.array_equal(classifier._raw_predict(x), expected_raw)  # not binned: sklearn's
    classifier._in_fit = True
    assert np.array_equal(classifier._raw_predict(bins), expected_raw)


def test_the_compiled_loop_refuses_tables_that_do_not_agree() -> None:
    """It runs without bounds checks, so it checks its arguments' shapes first."""
    bins = np.zeros((3, 2), np.uint8)
    masks = np.full((2, 256), 2**64 - 1, np.uint64)
    values = np.zeros((1, 64))
    good = (np.array([0, 2]), np.array([0, 1]), masks, values)
    raw = np.zeros(3)
    add_trees(bins, *good, raw)  # all leaves possible: leaf 0, value 0
    assert np.array_equal(raw, np.zeros(3))
    bad = [
        (np.array([], np.int64), *good[1:]),  # no first 0
        (np.array([0, 3]), *good[1:]),  # past the last mask row
        (np.array([0, 2, 1]), good[1], masks, np.zeros((2, 64))),  # decreasing
        (good[0], np.array([0, 2]), masks, values),  # no bin column 2
        (*good[:3], np.zeros((1, 32))),  # 32 leaf slots
    ]
    for args in bad:
        with pytest.raises(ValueError, match="add_trees"):
            add_trees(bins, *args, raw)
    with pytest.raises(ValueError, match="add_trees"):
        add_trees(bins, *good, np.zeros(4))


def test_unsupported_models_keep_sklearns_walk() -> None:
    assert leaf_mask_walk(_fitted(MAX_LEAVES + 1)) is None  # a leaf more than a mask holds
    assert leaf_mask_walk(_fitted(7, classes=3)) is None  # a tree per class
    assert leaf_mask_walk(object()) is None

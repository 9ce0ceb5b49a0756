"""Boosting's trees walked on bins without branches, by leaf masks (QuickScorer).

scikit-learn walks each tree over all rows, node by node, a data-dependent branch per
level: about 6 CPU-seconds per million rows for 200 trees of 31 leaves. Here a tree's
leaves are numbered left to right, and each split, when a row goes right, rules out
the leaves of its left subtree. The leaf a row reaches is the leftmost leaf that no
split rules out (Lucchese et al., "QuickScorer", SIGIR 2015). On bins a split's
direction depends only on the bin, so for every (tree, bin column) the leaves still
possible are tabulated once per bin value: the AND of those tables over the tree's
columns leaves the exit leaf as the lowest set bit. About a sixth of the CPU.

The tables are built from each node's own rule as scikit-learn's binned predictor
applies it (missing-values bin first, then the categorical bitset or the bin
threshold), for all 256 values of a bin, so any bins give the same leaves as
`predict_binned`. The leaf values are then added tree after tree onto the baseline,
the order of scikit-learn's sum, so the result is bit-identical.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from churn_batch._treekernel import DE_BRUIJN, add_trees

MAX_LEAVES = 64  # one bit per leaf in a 64-bit mask
# The De Bruijn slot of each bit position, where `add_trees` looks up a leaf's value.
DE_BRUIJN_SLOT = np.array([((1 << k) * DE_BRUIJN % 2**64) >> 58 for k in range(64)])


class LeafMaskWalk:
    """Stands in for the classifier's `_predict_iterations` when it scores bins."""

    def __init__(self, classifier: Any, tables: tuple[Any, Any, Any, Any]) -> None:
        self.classifier = classifier
        self.predictors = classifier._predictors
        self.tables = tables  # offsets, features, masks, values: see `_treekernel.add_trees`

    def __call__(
        self, x: Any, predictors: Any, raw_predictions: Any, is_binned: bool, n_threads: int
    ) -> None:
        if not is_binned or predictors is not self.predictors or raw_predictions.shape[1] != 1:
            # Anything but the whole model on bins: scikit-learn's own walk.
            type(self.classifier)._predict_iterations(
                self.classifier, x, predictors, raw_predictions, is_binned, n_threads
            )
            return
        raw = raw_predictions[:, 0]  # a view: the column of a Fortran-ordered array
        bins = np.ascontiguousarray(x, np.uint8)
        add_trees(bins, *self.tables, raw)


def leaf_mask_walk(classifier: Any) -> LeafMaskWalk | None:
    """The walk for a fitted binary HistGradientBoostingClassifier; None if unsupported."""
    try:
        if classifier.n_trees_per_iteration_ != 1:
            return None
        missing_bin = int(classifier._bin_mapper.missing_values_bin_idx_)
        trees = [predictor for (predictor,) in classifier._predictors]
    except (AttributeError, TypeError, ValueError):
        return None
    offsets, features, masks = [0], [], []
    values = np.zeros((len(trees), MAX_LEAVES))
    for t, tree in enumerate(trees):
        tabled = _tree_tables(tree, missing_bin)
        if tabled is None:
            return None
        leaf_values, columns = tabled
        values[t, DE_BRUIJN_SLOT[: len(leaf_values)]] = leaf_values
        for column, mask in sorted(columns.items()):
            features.append(column)
            masks.append(mask)
        offsets.append(len(features))
    masks_array = np.array(masks, np.uint64).reshape(-1, 256)
    tables = (np.array(offsets, np.int64), np.array(features, np.int64), masks_array, values)
    return LeafMaskWalk(classifier, tables)


def _tree_tables(tree: Any, missing_bin: int) -> tuple[list[float], dict[int, Any]] | None:
    """A tree's leaf values, left to right, and per bin column the leaves each bin leaves."""
    try:
        nodes, bitsets = tree.nodes, tree.binned_left_cat_bitsets
        leaves: list[float] = []
        columns: dict[int, Any] = {}
        # Depth first, left before right; a split is tabled once its left subtree's
        # leaves are numbered.
        stack: list[tuple[int, int]] = [(0, -1)]
        while stack:
            index, first = stack.pop()
            node = nodes[index]
            if first >= 0:  # back from the left subtree, whose leaves are first..
                goes_left = _goes_left(node, bitsets, missing_bin)
                ruled_out = ((1 << len(leaves)) - 1) ^ ((1 << first) - 1)
                column = columns.setdefault(
                    int(node["feature_idx"]), np.full(256, 2**64 - 1, np.uint64)
                )
                column[~goes_left] &= np.uint64(~ruled_out % 2**64)
                stack.append((int(node["right"]), -1))
            elif node["is_leaf"]:
                leaves.append(float(node["value"]))
                if len(leaves) > MAX_LEAVES:
                    return None
            else:
                stack.append((index, len(leaves)))
                stack.append((int(node["left"]), -1))
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return leaves, columns


def _goes_left(node: Any, bitsets: Any, missing_bin: int) -> Any:
    """For each bin value, whether `predict_binned` sends it to the node's left child."""
    bins = np.arange(256)
    if node["is_categorical"]:
        words = bitsets[int(node["bitset_idx"])].astype(np.uint64)
        left = ((words[bins // 32] >> (bins % 32).astype(np.uint64)) & 1).astype(bool)
    else:
        left = bins <= int(node["bin_threshold"])
    return np.where(bins == missing_bin, bool(node["missing_go_to_left"]), left)

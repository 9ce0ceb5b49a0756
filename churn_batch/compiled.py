"""A faster, exact scoring path compiled from a fitted pipeline.

Nearly all of a pipeline's scoring time goes into encoding categorical strings: the
encoders compare every value of every row with the learned levels in Python objects.
Here each batch's categorical columns are mapped to level indices by Arrow
(`index_in`, in C++), and the one-hot or ordinal matrix is built from those indices
with numpy. Everything after the encoding (scaler, imputer, classifier, calibration)
is the fitted estimator itself, unchanged, so the probabilities are the same numbers.

Gradient boosting goes one step further: the batch goes straight to the 1-byte bins
its trees were grown on, and the trees are walked on those (`treebins`). So does
logistic regression: no one-hot matrix at all, each level's weight is looked up
(`linear`).

`compile_scorer` returns None for a structure it does not know; the caller then keeps
the plain pipeline. The first batch is always checked against the plain pipeline.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

from churn_batch.linear import ArrowLinearParts, gathered_logistic
from churn_batch.treebins import tree_bins

ArrowScorer = Callable[[pa.Table], np.ndarray[Any, Any]]

# Bytes of encoded matrix scored at a time (rows per slice follow from its width): the
# one-hot matrix of 50 columns gets ~40k rows, a boosting model's 20 ordinal columns
# ~100k (scikit-learn's tree predictor is a third slower on 25k-row slices).
SLICE_BYTES = 16 * 2**20


class _Levels:
    """Maps one Arrow string column to indices into a fitted encoder's categories."""

    def __init__(self, categories: np.ndarray[Any, Any], missing_as: str | None) -> None:
        levels = [str(c) for c in categories if isinstance(c, str)]
        self.levels = pa.array(levels, pa.string())
        # Position of the level that missing values are imputed to, if one was learned.
        self.missing_index = levels.index(missing_as) if missing_as in levels else None

    def indices(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray[Any, Any]:
        """Level index per row; -1 for an unseen level or an unimputed missing value."""
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        parts = [self._chunk(chunk) for chunk in chunks]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def _chunk(self, chunk: pa.Array) -> np.ndarray[Any, Any]:
        missing = -1 if self.missing_index is None else self.missing_index
        if pa.types.is_dictionary(chunk.type):
            # Look up each distinct level once; rows only index into that small table.
            found = pc.fill_null(pc.index_in(chunk.dictionary, value_set=self.levels), -1)
            table = np.append(np.asarray(found.to_numpy(), np.int64), missing)
            codes = pc.fill_null(chunk.indices, len(chunk.dictionary)).to_numpy()
            return np.asarray(table[codes], np.int64)
        found = pc.index_in(chunk, value_set=self.levels)
        found = pc.if_else(pc.is_null(chunk), missing, found)
        return np.asarray(pc.fill_null(found, -1).to_numpy(zero_copy_only=False), np.int64)


class ArrowFeatures(BaseEstimator, TransformerMixin):  # type: ignore[misc]
    """Stands in for a fitted ColumnTransformer; takes the checked Arrow batch instead."""

    def __init__(self, fitted: ColumnTransformer, numeric: Sequence[str],
                 categorical: Sequence[str], branch: Any, kind: str) -> None:  # fmt: skip
        self.fitted = fitted
        self.numeric = list(numeric)
        self.categorical = list(categorical)
        self.branch = branch  # the fitted numeric transformer, or "passthrough"
        self.kind = kind  # "onehot" or "ordinal"
        encoder = _encoder(fitted)
        missing_as = _imputed_level(fitted)
        self.maps = [_Levels(c, missing_as) for c in encoder.categories_]
        self.widths = [len(c) for c in encoder.categories_]

    @property
    def width(self) -> int:
        """Columns of the encoded matrix, at most (numbers may add missing flags)."""
        levels = sum(self.widths) if self.kind == "onehot" else len(self.widths)
        return 2 * len(self.numeric) + levels

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def fit(self, table: Any, y: Any = None) -> ArrowFeatures:  # pragma: no cover - never refit
        raise TypeError("a compiled scorer is for scoring only")

    def parts(self, table: pa.Table) -> tuple[np.ndarray[Any, Any], list[np.ndarray[Any, Any]]]:
        """The numeric branch's output, and each categorical column's level indices."""
        numbers = pd.DataFrame(
            {name: table[name].to_numpy(zero_copy_only=False) for name in self.numeric},
            columns=self.numeric,
            dtype=np.float64,
        )
        numeric = (
            numbers.to_numpy() if self.branch == "passthrough" else self.branch.transform(numbers)
        )
        codes = [
            m.indices(table[name]) for m, name in zip(self.maps, self.categorical, strict=True)
        ]
        return np.asarray(numeric, np.float64), codes

    def transform(self, table: pa.Table) -> Any:
        numeric, codes = self.parts(table)
        if self.kind == "ordinal":
            ordinal = (
                np.column_stack(codes).astype(np.float64) if codes else np.empty((len(numeric), 0))
            )
            ordinal[ordinal < 0] = np.nan
            return np.hstack([numeric, ordinal])
        if self.fitted.sparse_output_:
            onehot = _one_hot(codes, self.widths, table.num_rows)
            return sp.hstack([sp.csr_matrix(numeric), onehot], format="csr")
        return _dense_one_hot(numeric, codes, self.widths)


def compile_scorer(
    estimator: Any, numeric: Sequence[str], categorical: Sequence[str]
) -> ArrowScorer | None:
    """A function of the checked Arrow batch giving P(class 1), or None if unsupported."""
    compiled = copy.deepcopy(estimator)
    pipelines = _pipelines(compiled)
    if not pipelines:
        return None
    width = 0  # of the widest encoded matrix: it sets the rows per slice
    for pipeline in pipelines:
        name, step = pipeline.steps[0]
        features = _arrow_features(step, numeric, categorical)
        if features is None:
            return None
        last, classifier = pipeline.steps[-1]
        gathered = gathered_logistic(features, classifier) if len(pipeline.steps) == 2 else None
        if gathered is not None:  # levels' weights looked up, no one-hot matrix
            pipeline.steps[0] = (name, ArrowLinearParts(features))
            pipeline.steps[-1] = (last, gathered)
        else:
            bins = tree_bins(features, classifier)
            pipeline.steps[0] = (name, features if bins is None else bins)
        width = max(width, features.width)
    classes = list(compiled.classes_)
    if 1 not in classes:
        return None
    positive = classes.index(1)

    def score(table: pa.Table) -> np.ndarray[Any, Any]:
        # In slices: the encoded matrix of a slice is all the memory scoring adds.
        rows = max(1, SLICE_BYTES // (8 * width))
        parts = [
            np.asarray(compiled.predict_proba(table.slice(start, rows))[:, positive])
            for start in range(0, table.num_rows, rows)
        ]
        return np.concatenate(parts).astype(np.float64, copy=False) if parts else np.empty(0)

    return score


def _pipelines(estimator: Any) -> list[Pipeline]:
    if isinstance(estimator, Pipeline):
        return [estimator]
    if isinstance(estimator, CalibratedClassifierCV):
        inner = [c.estimator for c in estimator.calibrated_classifiers_]
        if all(isinstance(p, Pipeline) for p in inner):
            return inner
    return []


def _arrow_features(
    step: Any, numeric: Sequence[str], categorical: Sequence[str]
) -> ArrowFeatures | None:
    if not isinstance(step, ColumnTransformer) or step.remainder not in ("drop",):
        return None
    parts = {
        name: (trans, list(cols)) for name, trans, cols in step.transformers_ if name != "remainder"
    }
    if set(parts) != {"numeric", "categorical"}:
        return None
    (num_trans, num_cols), cat_cols = parts["numeric"], parts["categorical"][1]
    if num_cols != list(numeric) or cat_cols != list(categorical):
        return None
    encoder = _encoder(step)
    if isinstance(encoder, OneHotEncoder):
        supported = encoder.drop is None and encoder.handle_unknown == "ignore"
        kind = "onehot"
    elif isinstance(encoder, OrdinalEncoder):
        supported = (
            encoder.handle_unknown == "use_encoded_value"
            and np.isnan(encoder.unknown_value)
            and np.isnan(encoder.encoded_missing_value)
        )
        kind = "ordinal"
    else:
        return None
    if not supported or getattr(encoder, "_infrequent_enabled", False):
        return None
    # Check the whole structure now (an unexpected imputer or encoder means: not ours).
    if kind == "onehot" and _imputed_level(step) is None:
        return None
    return ArrowFeatures(step, numeric, categorical, num_trans, kind)


def _categorical_steps(fitted: ColumnTransformer) -> list[Any]:
    trans = fitted.named_transformers_["categorical"]
    return [s for _, s in trans.steps] if isinstance(trans, Pipeline) else [trans]


def _encoder(fitted: ColumnTransformer) -> Any:
    return _categorical_steps(fitted)[-1]


def _imputed_level(fitted: ColumnTransformer) -> str | None:
    """The constant an imputer before the encoder fills missing levels with, if any."""
    steps = _categorical_steps(fitted)
    if len(steps) == 1:
        return None
    if len(steps) == 2 and isinstance(steps[0], SimpleImputer) and steps[0].strategy == "constant":
        value = steps[0].fill_value
        return value if isinstance(value, str) else None
    return None


def _dense_one_hot(
    numeric: np.ndarray[Any, Any], codes: list[np.ndarray[Any, Any]], widths: list[int]
) -> np.ndarray[Any, Any]:
    """[numeric | one-hot] as one dense matrix, the values hstack of the two would give.

    Written in place: one matrix instead of a sparse one, its dense copy and the hstack
    of both, about a third of the memory per batch.
    """
    rows, first = numeric.shape[0], numeric.shape[1]
    width = first + int(sum(widths))
    out = np.zeros((rows, width), np.float64)
    out[:, :first] = numeric
    # Each categorical column sets at most one cell per row: at row * width + its offset
    # + the level index (flat positions: a quarter faster than 2-D fancy indexing).
    flat, start = out.reshape(-1), np.arange(rows) * width + first
    for column_codes, column_width in zip(codes, widths, strict=True):
        cells = start + column_codes
        flat[cells if column_codes.min(initial=0) >= 0 else cells[column_codes >= 0]] = 1.0
        start += column_width  # -1 (unseen or missing) stays all zeros, as "ignore" does
    return out


def _one_hot(codes: list[np.ndarray[Any, Any]], widths: list[int], rows: int) -> sp.csr_matrix:
    """The one-hot matrix OneHotEncoder(handle_unknown='ignore') would build.

    Each categorical column puts at most one 1 in a row, at its offset plus the level
    index, so the CSR arrays come straight from a rows x columns grid: no sorting.
    """
    width = int(sum(widths))
    if not codes:
        return sp.csr_matrix((rows, width))
    offsets = np.cumsum([0, *widths[:-1]])
    grid = np.column_stack(codes)
    seen = grid >= 0
    indices = (grid + offsets)[seen]  # row-major: ascending columns within each row
    indptr = np.concatenate([[0], np.cumsum(seen.sum(axis=1))])
    data = np.ones(len(indices), dtype=np.float64)
    return sp.csr_matrix((data, indices, indptr), shape=(rows, width))

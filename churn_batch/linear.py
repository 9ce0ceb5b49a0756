"""Logistic regression scored by looking up each level's weight, not by a matrix product.

A one-hot column is 1 in at most one place per categorical column, so the product of
the one-hot matrix with the weights is, per row, the sum of one weight per column: the
weight of the row's level, or nothing for an unseen or missing level (all zeros, as
OneHotEncoder(handle_unknown="ignore") gives). Here the numbers (imputed and scaled by
the fitted steps themselves) are multiplied with their weights, and each categorical
column adds its levels' weights by a lookup: no 50-column matrix is written, checked
and multiplied, about two thirds of logistic regression's scoring time.

The sum is the same but added in another order, so a probability can differ from
`predict_proba` in the last bits (about 1e-16); the scoring tests require 1e-9.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.linear_model import LogisticRegression

if TYPE_CHECKING:
    from churn_batch.compiled import ArrowFeatures


class LinearParts(NamedTuple):
    numeric: np.ndarray[Any, Any]  # the numeric branch's output, rows x columns
    codes: list[np.ndarray[Any, Any]]  # per categorical column, level index or -1


class ArrowLinearParts(BaseEstimator, TransformerMixin):  # type: ignore[misc]
    """Stands in for a one-hot pipeline's ColumnTransformer; gives numbers and codes."""

    def __init__(self, features: ArrowFeatures) -> None:
        self.features = features

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def fit(self, table: Any, y: Any = None) -> ArrowLinearParts:  # pragma: no cover
        raise TypeError("a compiled scorer is for scoring only")

    def transform(self, table: pa.Table) -> LinearParts:
        return LinearParts(*self.features.parts(table))


class GatheredLogistic(BaseEstimator, ClassifierMixin):  # type: ignore[misc]
    """A fitted binary LogisticRegression over [numbers | one-hot], taking LinearParts."""

    def __init__(self, classifier: LogisticRegression, widths: list[int]) -> None:
        self.classifier = classifier
        self.widths = list(widths)
        weights = np.asarray(classifier.coef_[0], np.float64)
        first_level = len(weights) - int(sum(widths))
        self.numeric_weights = weights[:first_level]
        # Per categorical column its levels' weights and a 0 last, where code -1 lands.
        columns = np.split(weights[first_level:], np.cumsum(widths)[:-1])
        self.level_weights = [np.append(column, 0.0) for column in columns]
        self.intercept = float(classifier.intercept_[0])
        self.classes_ = classifier.classes_

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def fit(self, parts: Any, y: Any = None) -> GatheredLogistic:  # pragma: no cover
        raise TypeError("a compiled scorer is for scoring only")

    def decision_function(self, parts: LinearParts) -> np.ndarray[Any, Any]:
        if parts.numeric.shape[1] != len(self.numeric_weights):
            raise ValueError("the numeric branch gave another number of columns than fitted")
        total = parts.numeric @ self.numeric_weights
        for codes, weights in zip(parts.codes, self.level_weights, strict=True):
            total += weights[codes]  # -1 takes the 0 at the end
        total += self.intercept
        return total

    def predict_proba(self, parts: LinearParts) -> np.ndarray[Any, Any]:
        p = expit(self.decision_function(parts))
        return np.column_stack([1.0 - p, p])  # as LogisticRegression gives two classes


def gathered_logistic(features: ArrowFeatures, classifier: Any) -> GatheredLogistic | None:
    """The lookup scorer for a binary LogisticRegression after one-hot levels, or None."""
    if not (
        isinstance(classifier, LogisticRegression)
        and features.kind == "onehot"
        and len(classifier.classes_) == 2
        and classifier.coef_.shape[0] == 1
    ):
        return None
    # The classifier's columns: the numeric branch's, then every level of every column.
    try:
        numeric = features.fitted.output_indices_["numeric"]
        levels = features.fitted.output_indices_["categorical"]
    except (AttributeError, KeyError):
        return None
    width = int(sum(features.widths))
    if (numeric.start, numeric.stop, levels.start, levels.stop) != (
        0, levels.start, numeric.stop, numeric.stop + width,
    ) or classifier.coef_.shape[1] != levels.stop:  # fmt: skip
        return None
    return GatheredLogistic(classifier, features.widths)

"""Candidate churn models, their selection and evaluation: frames in, fitted models out.

Pure: no file I/O, no printing. Every pipeline takes `contract.features_frame` output
(numeric float64 with NaN, categorical object with NaN) at training and scoring time;
the customer id, the snapshot date and the label are never features.

Two candidates are tuned by grouped, stratified cross-validation on the training part
and compared on the holdout by ROC AUC; the winner is then calibrated if that lowers
its holdout Brier score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from sklearn.base import BaseEstimator, clone, is_classifier
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import NotFittedError
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import ParameterGrid, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler
from sklearn.utils.parallel import Parallel, delayed
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

LOGISTIC = "logistic_regression"
BOOSTING = "hist_gradient_boosting"
CANDIDATES = (LOGISTIC, BOOSTING)  # order breaks ties: the simpler model wins a draw

MISSING_LEVEL = "__missing__"
# HistGradientBoosting bins a categorical feature's codes into at most 255 bins, one of
# them for missing values; rarer levels beyond that are pooled into one "infrequent" code.
_MAX_TREE_LEVELS = 254
_STRIDE = 5  # trees between two points of a fold's AUC-by-number-of-trees curve, at most
_PATIENCE = 20  # trees without improvement before a tuning fit stops
_TOP_SHARES = (0.10, 0.20)
_DECILES = np.linspace(0.1, 0.9, 9)
_EPS = 1e-15

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SearchSpace:
    """Hyper-parameter grids, kept small so 100k rows train in well under two minutes.

    The boosting model's number of trees is tuned too, up to `boosting_max_iter`, from
    the same fits. `max_cv_rows` caps the rows cross-validation sees (a stratified
    sample); the chosen settings are then refitted on the whole training part.
    `n_jobs` worker processes run the folds, each with one thread (more processes
    pay off only on an otherwise idle machine).
    """

    logistic_c: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    boosting: Mapping[str, tuple[Any, ...]] = field(
        default_factory=lambda: MappingProxyType(
            {
                # Tree size matters most; the learning rate hardly does once the
                # number of trees is tuned, so the faster one is enough.
                "learning_rate": (0.1,),
                "max_leaf_nodes": (3, 7, 15, 31),
                "l2_regularization": (0.0, 1.0),
            }
        )
    )
    boosting_max_iter: int = 500
    max_cv_rows: int = 20_000
    n_jobs: int = 1
    candidates: tuple[str, ...] = CANDIDATES

    def __post_init__(self) -> None:
        unknown = [name for name in self.candidates if name not in CANDIDATES]
        if unknown or not self.candidates:
            raise ValueError(f"candidates must be among {CANDIDATES}, got {self.candidates}")


DEFAULT_SEARCH = SearchSpace()


@dataclass(frozen=True)
class Labelled:
    """Features, 0/1 labels and the customer of each row (for grouped folds)."""

    features: pd.DataFrame
    label: npt.NDArray[np.int8]
    customer: npt.NDArray[Any]

    def __post_init__(self) -> None:
        if not len(self.features) == len(self.label) == len(self.customer):
            raise ValueError("features, label and customer must have the same length")


@dataclass(frozen=True)
class Candidate:
    name: str
    params: dict[str, Any]
    cv_roc_auc: float
    holdout: dict[str, float]


@dataclass(frozen=True)
class Calibration:
    method: str
    applied: bool
    brier_uncalibrated: float
    brier_calibrated: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "applied": self.applied,
            "brier_uncalibrated": self.brier_uncalibrated,
            "brier_calibrated": self.brier_calibrated,
        }


@dataclass(frozen=True)
class FittedModel:
    """The winning estimator and everything the model card says about it."""

    estimator: Any
    winner: str
    candidates: dict[str, Candidate]
    calibration: Calibration
    holdout_metrics: dict[str, float]
    holdout_scores: FloatArray
    thresholds: dict[str, float]
    reference: dict[str, Any]


# -- pipelines ----------------------------------------------------------------------


def logistic_pipeline(
    numeric: Sequence[str], categorical: Sequence[str], *, c: float = 1.0
) -> Pipeline:
    """Median-imputed, scaled numbers (with missing flags) and one-hot levels into L2 LR."""
    numbers = Pipeline(
        [
            # keep_empty_features: a column missing everywhere keeps the layout stable.
            (
                "impute",
                SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
            ),
            ("scale", StandardScaler()),
        ]
    )
    levels = Pipeline(
        [
            ("impute", SimpleImputer(strategy="constant", fill_value=MISSING_LEVEL)),
            # Unseen levels at scoring time become all zeros: the baseline, no error.
            ("onehot", OneHotEncoder(handle_unknown="ignore")),
        ]
    )
    features = ColumnTransformer(
        [("numeric", numbers, list(numeric)), ("categorical", levels, list(categorical))]
    )
    classifier = LogisticRegression(C=c, max_iter=5000)
    return Pipeline([("features", features), ("classifier", classifier)])


def boosting_pipeline(
    numeric: Sequence[str],
    categorical: Sequence[str],
    *,
    seed: int,
    max_iter: int = 500,
    many_levels: bool = False,
    **params: Any,
) -> Pipeline:
    """Gradient-boosted trees with native categorical splits on ordinal-coded levels.

    `many_levels`: some categorical column has more levels than a tree can split on,
    so the rarest are pooled (only then: counting levels makes encoding 10x slower).
    """
    codes = OrdinalEncoder(
        handle_unknown="use_encoded_value",
        unknown_value=np.nan,  # an unseen level is scored like a missing one
        encoded_missing_value=np.nan,
        max_categories=_MAX_TREE_LEVELS if many_levels else None,
    )
    features = ColumnTransformer(
        [("numeric", "passthrough", list(numeric)), ("categorical", codes, list(categorical))]
    )
    # The transformer puts numeric columns first, so the categorical ones follow them.
    positions = list(range(len(numeric), len(numeric) + len(categorical))) or None
    classifier = HistGradientBoostingClassifier(
        categorical_features=positions,
        max_iter=max_iter,
        # No built-in early stopping: its random validation rows would share customers
        # with the training rows (daily snapshots repeat them), so it would stop too
        # late. The number of trees is tuned on grouped folds instead (`_fold_curve`).
        early_stopping=False,
        min_samples_leaf=40,
        random_state=seed,
        **params,
    )
    return Pipeline([("features", features), ("classifier", classifier)])


def estimator_problems(estimator: Any, features: Sequence[str]) -> list[str]:
    """Why `estimator` cannot score rows of these features in this order (empty: it can).

    A loaded artifact must be a fitted scikit-learn classifier with `predict_proba`, two
    classes 0 and 1, fitted on exactly `features` (its own `feature_names_in_`, or that
    of its first step): the card's feature list says what the model should be, this
    checks what it is.
    """
    if not isinstance(estimator, BaseEstimator) or not is_classifier(estimator):
        return [f"it is a {type(estimator).__module__}.{type(estimator).__qualname__}, "
                "not a scikit-learn classifier"]  # fmt: skip
    try:
        check_is_fitted(estimator)
    except (NotFittedError, TypeError):
        return ["it is not fitted"]
    problems = []
    if not callable(getattr(estimator, "predict_proba", None)):
        problems.append("it has no predict_proba")
    classes = [c.item() if isinstance(c, np.generic) else c for c in
               getattr(estimator, "classes_", [])]  # fmt: skip
    if sorted(classes, key=repr) != [0, 1]:
        problems.append(f"its classes are {classes}, not the two labels [0, 1]")
    fitted_on = getattr(estimator, "feature_names_in_", None)
    if fitted_on is None and isinstance(estimator, Pipeline) and estimator.steps:
        fitted_on = getattr(estimator.steps[0][1], "feature_names_in_", None)
    if fitted_on is None:
        problems.append("it records no feature names, so its features cannot be checked")
    elif list(fitted_on) != list(features):
        names = [str(n) for n in fitted_on]
        lacking = [f for f in features if f not in names]
        unknown = [n for n in names if n not in features]
        detail = "; ".join(
            part
            for part in (
                f"it was not fitted on {', '.join(lacking)}" if lacking else "",
                f"it was fitted on {', '.join(unknown)}, which the card does not list"
                if unknown
                else "",
            )
            if part
        )
        problems.append(
            f"it was fitted on {len(names)} feature(s) where the card lists {len(features)}"
            f" ({detail or 'in another order'})"
        )
    return problems


def positive_scores(estimator: Any, features: pd.DataFrame) -> FloatArray:
    """P(churn) for each row: the probability column of class 1."""
    classes = list(estimator.classes_)
    proba = estimator.predict_proba(features)
    return np.asarray(proba[:, classes.index(1)], dtype=np.float64)


# -- metrics ------------------------------------------------------------------------


def metrics(y_true: npt.ArrayLike, p: npt.ArrayLike) -> dict[str, float]:
    """Ranking and probability quality of scores `p` against 0/1 outcomes.

    ROC AUC and PR AUC are NaN when only one class is present (they are undefined).
    Precision and lift in the top 10% / 20% are what a campaign targeting the riskiest
    customers gets.
    """
    y = np.asarray(y_true, dtype=np.float64)
    scores = np.asarray(p, dtype=np.float64)
    if y.shape != scores.shape or y.ndim != 1:
        raise ValueError(f"y_true {y.shape} and p {scores.shape} must be equal 1-d shapes")
    n = len(y)
    base_rate = float(y.mean()) if n else math.nan
    both_classes = n > 0 and 0.0 < base_rate < 1.0
    clipped = np.clip(scores, _EPS, 1.0 - _EPS)
    out = {
        "rows": float(n),
        "positive_rate": base_rate,
        "roc_auc": float(roc_auc_score(y, scores)) if both_classes else math.nan,
        "pr_auc": float(average_precision_score(y, scores)) if both_classes else math.nan,
        "log_loss": float(-np.mean(y * np.log(clipped) + (1 - y) * np.log(1 - clipped)))
        if n
        else math.nan,
        "brier": float(np.mean((scores - y) ** 2)) if n else math.nan,
    }
    # Stable sort: ties keep input order, so the metric does not depend on a random tie-break.
    order = np.argsort(-scores, kind="stable")
    for share in _TOP_SHARES:
        key = f"top_{round(share * 100)}"
        k = max(1, math.ceil(share * n)) if n else 0
        precision = float(y[order[:k]].mean()) if k else math.nan
        out[f"precision_{key}"] = precision
        out[f"lift_{key}"] = precision / base_rate if n and base_rate > 0 else math.nan
    return out


# -- risk tiers -----------------------------------------------------------------------


def tier_thresholds(
    scores: npt.ArrayLike, high_share: float, medium_share: float
) -> dict[str, float]:
    """Score cut-offs so that about `high_share` of `scores` are high and the next
    `medium_share` medium."""
    values = np.asarray(scores, dtype=np.float64)
    if not len(values):
        raise ValueError("need at least one score to set tier thresholds")
    high = float(np.quantile(values, 1.0 - high_share))
    medium = float(np.quantile(values, max(0.0, 1.0 - high_share - medium_share)))
    return {"high": high, "medium": min(medium, high)}


TIER_NAMES = ("high", "medium", "low")


def tier_codes(p: npt.ArrayLike, thresholds: Mapping[str, float]) -> npt.NDArray[np.int8]:
    """Index into TIER_NAMES per score: 0 (high) where p >= thresholds["high"],
    1 (medium) where p >= thresholds["medium"], else 2 (low; a NaN score is low)."""
    scores = np.asarray(p, dtype=np.float64)
    codes = np.full(scores.shape, 2, dtype=np.int8)
    codes[scores >= thresholds["medium"]] = 1
    codes[scores >= thresholds["high"]] = 0
    return codes


def risk_tiers(p: npt.ArrayLike, thresholds: Mapping[str, float]) -> npt.NDArray[np.str_]:
    """The tier name of each score (see `tier_codes`)."""
    return np.asarray(TIER_NAMES, dtype=np.str_)[tier_codes(p, thresholds)]


# -- reference distributions for drift ------------------------------------------------------


def decile_histogram(values: npt.ArrayLike) -> dict[str, list[float]]:
    """Decile cut points of the non-missing values and the share of values in each bin.

    A value v falls in bin `np.searchsorted(edges, v, side="right")`. Cut points are
    observed values, not interpolations, and repeated ones (a flag, a spike at zero)
    collapse into one: a 0/1 flag gets the cut points 0 and 1, not a phantom 0.2. The
    bin below the smallest value can be empty. With no values, one bin holds everything.
    """
    array = np.asarray(values, dtype=np.float64)
    present = array[~np.isnan(array)]
    if not len(present):
        return {"edges": [], "fractions": [1.0]}
    edges = np.unique(np.quantile(present, _DECILES, method="lower"))
    counts = np.bincount(np.searchsorted(edges, present, side="right"), minlength=len(edges) + 1)
    return {
        "edges": [float(e) for e in edges],
        "fractions": [float(c) for c in counts / len(present)],
    }


def reference_distributions(
    features: pd.DataFrame,
    numeric: Sequence[str],
    categorical: Sequence[str],
    scores: npt.ArrayLike,
) -> dict[str, Any]:
    """What the monitoring module compares each scored snapshot against (PSI, missing rates).

    Features come from the training part; `scores` are the winner's holdout predictions.
    """
    total = max(len(features), 1)
    numbers: dict[str, Any] = {}
    for name in numeric:
        column = features[name].to_numpy(dtype=np.float64, na_value=np.nan)
        missing = int(np.isnan(column).sum())
        numbers[name] = {**decile_histogram(column), "missing_rate": missing / total}
    levels: dict[str, Any] = {}
    for name in categorical:
        values = features[name]
        present = values[values.notna()].astype(str)
        counts = present.value_counts(sort=False)
        shares = {str(k): float(v) / len(present) for k, v in sorted(counts.items())}
        levels[name] = {"levels": shares, "missing_rate": (len(values) - len(present)) / total}
    return {"numeric": numbers, "categorical": levels, "score": decile_histogram(scores)}


# -- fitting and selection -----------------------------------------------------------------


def fit_and_select(
    train: Labelled,
    holdout: Labelled,
    numeric: Sequence[str],
    categorical: Sequence[str],
    *,
    cv_folds: int,
    seed: int,
    high_share: float,
    medium_share: float,
    search: SearchSpace = DEFAULT_SEARCH,
) -> FittedModel:
    """Tune both candidates, keep the best on the holdout, calibrate it if that helps."""
    _require_both_classes(train.label, "training part")
    _require_both_classes(holdout.label, "holdout")
    # One BLAS/OpenMP thread per process, parallel work in processes: on a small shared
    # machine OpenMP threads that spin-wait for a busy core make boosting 5x slower.
    with threadpool_limits(limits=1):
        return _fit_and_select(
            train, holdout, numeric, categorical, cv_folds, seed, high_share, medium_share, search
        )


def _fit_and_select(
    train: Labelled,
    holdout: Labelled,
    numeric: Sequence[str],
    categorical: Sequence[str],
    cv_folds: int,
    seed: int,
    high_share: float,
    medium_share: float,
    search: SearchSpace,
) -> FittedModel:
    candidates: dict[str, Candidate] = {}
    fitted: dict[str, Any] = {}
    for name in search.candidates:
        estimator, params, cv_auc = _tune(name, train, numeric, categorical, cv_folds, seed, search)
        log.info("fitting %s %s on %d training rows", name, params, len(train.label))
        estimator.fit(train.features, train.label)
        scores = positive_scores(estimator, holdout.features)
        params = {**params, **_fitted_params(name, estimator)}
        candidates[name] = Candidate(name, params, cv_auc, metrics(holdout.label, scores))
        fitted[name] = estimator
        log.info("%s: holdout ROC AUC %.4f", name, candidates[name].holdout["roc_auc"])
    winner = max(search.candidates, key=lambda n: _rank_key(candidates[n].holdout["roc_auc"]))
    estimator, calibration = _calibrate(
        fitted[winner], train, holdout, cv_folds, seed, search.n_jobs
    )
    scores = positive_scores(estimator, holdout.features)
    return FittedModel(
        estimator=estimator,
        winner=winner,
        candidates=candidates,
        calibration=calibration,
        holdout_metrics=metrics(holdout.label, scores),
        holdout_scores=scores,
        thresholds=tier_thresholds(scores, high_share, medium_share),
        reference=reference_distributions(train.features, numeric, categorical, scores),
    )


def _rank_key(auc: float) -> float:
    return -math.inf if math.isnan(auc) else auc


def _require_both_classes(label: npt.NDArray[Any], part: str) -> None:
    positives = int(np.sum(label == 1))
    if positives == 0 or positives == len(label):
        raise ValueError(
            f"the {part} has only one label class ({positives} positive of {len(label)} rows)"
        )


def _candidate(
    name: str,
    train: Labelled,
    numeric: Sequence[str],
    categorical: Sequence[str],
    seed: int,
    search: SearchSpace,
) -> tuple[Pipeline, list[dict[str, Any]]]:
    """The untuned pipeline and the classifier settings to try."""
    if name == LOGISTIC:
        return logistic_pipeline(numeric, categorical), [{"C": c} for c in search.logistic_c]
    many = any(train.features[c].nunique() > _MAX_TREE_LEVELS for c in categorical)
    pipeline = boosting_pipeline(
        numeric, categorical, seed=seed, max_iter=search.boosting_max_iter, many_levels=many
    )
    return pipeline, [dict(p) for p in ParameterGrid(dict(search.boosting))]


def _tune(
    name: str,
    train: Labelled,
    numeric: Sequence[str],
    categorical: Sequence[str],
    cv_folds: int,
    seed: int,
    search: SearchSpace,
) -> tuple[Pipeline, dict[str, Any], float]:
    """Grouped cross-validation by ROC AUC; returns the unfitted pipeline with the best settings.

    Hand-rolled rather than GridSearchCV for two savings: each fold's features are
    encoded once for all settings (encoding strings is most of a logistic fit), and the
    boosting model's number of trees is tuned for free, scored after every few trees.
    """
    pipeline, settings = _candidate(name, train, numeric, categorical, seed, search)
    if len(settings) == 1 and name == LOGISTIC:  # nothing to choose: skip the CV
        return _with_params(pipeline, settings[0]), settings[0], math.nan
    rows = _cv_sample(train.label, search.max_cv_rows, seed)
    features, label = train.features.iloc[rows].reset_index(drop=True), train.label[rows]
    folds = _folds(label, train.customer[rows], cv_folds, seed)
    log.info(
        "tuning %s: %d settings x %d folds on %d rows", name, len(settings), cv_folds, len(rows)
    )
    classifiers = [_with_params(pipeline, params).named_steps["classifier"] for params in settings]
    per_fold = Parallel(n_jobs=search.n_jobs)(
        delayed(_fold_curves)(pipeline.named_steps["features"], classifiers, features, label, fold)
        for fold in folds
    )
    best_auc, best = -math.inf, dict(settings[0])
    for i, (params, classifier) in enumerate(zip(settings, classifiers, strict=True)):
        mean = _mean_curve([curves[i] for curves in per_fold])
        at = int(np.nanargmax(mean)) if not np.all(np.isnan(mean)) else len(mean) - 1
        if mean[at] > best_auc:
            best_auc = float(mean[at])
            trees = (
                {"max_iter": (at + 1) * _stride(classifier.max_iter)} if name == BOOSTING else {}
            )
            best = {**params, **trees}
    return _with_params(pipeline, best), best, best_auc if best_auc > -math.inf else math.nan


def _fold_curves(
    transform: Any,
    classifiers: Sequence[Any],
    features: pd.DataFrame,
    label: npt.NDArray[Any],
    fold: tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]],
) -> list[FloatArray]:
    """Validation ROC AUC of each classifier setting on one fold.

    For boosting, a curve: entry i is the AUC with (i + 1) * _stride(max_iter) trees;
    for logistic regression, one value. Runs in a worker process when `n_jobs` > 1.
    """
    fit_rows, check_rows = fold
    transform = clone(transform)
    fit_x, fit_y = transform.fit_transform(features.iloc[fit_rows]), label[fit_rows]
    check_x, check_y = transform.transform(features.iloc[check_rows]), label[check_rows]
    return [_curve(clone(c), fit_x, fit_y, check_x, check_y) for c in classifiers]


def _curve(
    classifier: Any,
    fit_x: Any,
    fit_y: npt.NDArray[Any],
    check_x: Any,
    check_y: npt.NDArray[Any],
) -> FloatArray:
    if not hasattr(classifier, "staged_decision_function"):
        classifier.fit(fit_x, fit_y)
        return np.array([_auc(check_y, classifier.decision_function(check_x))])
    # Stop adding trees once this fold's held-out loss stops improving: the AUC peak
    # is near, and settings that peak early then cost a fraction of `max_iter`.
    classifier.set_params(early_stopping=True, n_iter_no_change=_PATIENCE)
    classifier.fit(fit_x, fit_y, X_val=check_x, y_val=check_y)
    staged = classifier.staged_decision_function(check_x)
    stride = _stride(classifier.max_iter)
    return np.array(
        [_auc(check_y, raw) for i, raw in enumerate(staged, start=1) if i % stride == 0]
    )


def _stride(max_iter: int) -> int:
    """Trees between two points of an AUC curve: a few, fewer for tiny `max_iter`."""
    return max(1, min(_STRIDE, max_iter // 10))


def _auc(label: npt.NDArray[Any], scores: npt.ArrayLike) -> float:
    both = 0 < int(np.sum(label == 1)) < len(label)
    return float(roc_auc_score(label, scores)) if both else math.nan


def _mean_curve(per_fold: Sequence[FloatArray]) -> FloatArray:
    """Average the folds' AUC curves; a fold that stopped early keeps its last value."""
    longest = max(len(curve) for curve in per_fold)
    padded = np.vstack(
        [np.pad(curve, (0, longest - len(curve)), mode="edge") for curve in per_fold]
    )
    with np.errstate(invalid="ignore"):
        valid = ~np.isnan(padded)
        total = np.where(valid, padded, 0.0).sum(axis=0)
        return np.where(valid.any(axis=0), total / np.maximum(valid.sum(axis=0), 1), np.nan)


def _with_params(pipeline: Pipeline, params: Mapping[str, Any]) -> Pipeline:
    tuned: Pipeline = clone(pipeline).set_params(
        **{f"classifier__{key}": value for key, value in params.items()}
    )
    return tuned


def _fitted_params(name: str, estimator: Pipeline) -> dict[str, Any]:
    """What the fit itself decided: the number of trees actually grown."""
    if name == BOOSTING:
        return {"n_iter": int(estimator.named_steps["classifier"].n_iter_)}
    return {}


def _cv_sample(label: npt.NDArray[Any], limit: int, seed: int) -> npt.NDArray[np.intp]:
    """Row positions for tuning: all rows, or a stratified sample of `limit` rows."""
    n = len(label)
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = [
        rng.choice(members, size=round(limit * len(members) / n), replace=False)
        for members in (np.flatnonzero(label == 0), np.flatnonzero(label == 1))
    ]
    return np.sort(np.concatenate(picked))


def _folds(
    label: npt.NDArray[Any], customer: npt.NDArray[Any], k: int, seed: int
) -> list[tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]]:
    """Stratified folds that keep each customer's rows together.

    Daily snapshots repeat a customer with near-identical features and the same label;
    letting those copies straddle a fold rewards models that memorise customers.
    Customers, not rows, are dealt into folds, stratified by whether they ever churned
    (StratifiedGroupKFold does the same row-exactly but takes seconds per call).
    """
    codes, uniques = pd.factorize(pd.Series(customer))
    churned = np.zeros(len(uniques), dtype=np.int8)
    np.maximum.at(churned, codes, np.asarray(label, dtype=np.int8))
    fold_of = np.empty(len(uniques), dtype=np.intp)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, members) in enumerate(splitter.split(np.zeros(len(uniques)), churned)):
        fold_of[members] = i
    row_fold = fold_of[codes]
    return [(np.flatnonzero(row_fold != i), np.flatnonzero(row_fold == i)) for i in range(k)]


def _calibrate(
    estimator: Pipeline,
    train: Labelled,
    holdout: Labelled,
    cv_folds: int,
    seed: int,
    n_jobs: int,
) -> tuple[Any, Calibration]:
    """Platt-scale the winner on out-of-fold predictions; keep it only if Brier improves.

    Sigmoid, not isotonic: it is monotone, so ranking (ROC AUC, tiers) is unchanged and it
    cannot turn scores into a few plateaus; `ensemble=False` keeps scoring to one model.
    """
    calibrated = CalibratedClassifierCV(
        clone(estimator),
        method="sigmoid",
        cv=_folds(train.label, train.customer, cv_folds, seed),
        ensemble=False,
        n_jobs=n_jobs,
    )
    calibrated.fit(train.features, train.label)
    before = metrics(holdout.label, positive_scores(estimator, holdout.features))["brier"]
    after = metrics(holdout.label, positive_scores(calibrated, holdout.features))["brier"]
    applied = after < before
    log.info(
        "calibration (sigmoid): holdout Brier %.5f -> %.5f, %s",
        before,
        after,
        "kept" if applied else "dropped",
    )
    result = Calibration("sigmoid", applied, before, after)
    return (calibrated if applied else estimator), result

"""The compiled scoring path gives the fitted pipeline's predict_proba, for every model
family the trainer can produce, on the rows that make encoders differ: unseen and
missing levels, missing and non-finite numbers, blanks, and batches cut into slices."""

from __future__ import annotations

from datetime import date
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.pipeline import Pipeline

from churn_batch import compiled, linear, synthetic, treebins, treewalk
from churn_batch.config import ContractConfig
from churn_batch.contract import LABEL, check_batch, features_frame
from churn_batch.model import boosting_pipeline, logistic_pipeline
from churn_batch.registry import LoadedModel
from churn_batch.scoring import BatchScorer

NUMERIC = ("senior_citizen", "tenure_months", "monthly_charges", "total_charges")
CATEGORICAL = (
    "gender", "partner", "dependents", "phone_service", "multiple_lines", "internet_service",
    "online_security", "online_backup", "device_protection", "tech_support", "streaming_tv",
    "streaming_movies", "contract", "paperless_billing", "payment_method",
)  # fmt: skip
CONTRACT = ContractConfig(
    id_column="customer_id",
    date_column="snapshot_date",
    numeric=NUMERIC,
    categorical=CATEGORICAL,
    label_column="churned",
    positive_label="Yes",
)
DAY = date(2024, 6, 30)


def _training_rows() -> tuple[Any, np.ndarray[Any, Any]]:
    table = synthetic.generate_snapshot(3_000, DAY, seed=11)
    valid = check_batch(table, CONTRACT, label=True).valid
    return features_frame(valid, CONTRACT), valid[LABEL].to_numpy()


def _scoring_batch() -> pa.Table:
    """Scoring rows with everything the encoders treat specially, in every column."""
    table = synthetic.generate_snapshot(4_000, DAY, seed=12).drop_columns(["churned"])
    rng = np.random.default_rng(5)
    columns = {name: table[name].to_pylist() for name in table.column_names}
    n = table.num_rows
    for name in CATEGORICAL:
        values = columns[name]
        for i in rng.choice(n, 120, replace=False):
            values[i] = rng.choice([None, "", "  ", "never seen", f" {values[i]} "])
    for name in NUMERIC:
        values = columns[name]
        for i in rng.choice(n, 60, replace=False):
            values[i] = None
    charges = [float(v) if v is not None else None for v in columns["monthly_charges"]]
    for i in rng.choice(n, 20, replace=False):
        # The largest magnitudes the contract keeps (2**53 and beyond are rejected).
        charges[i] = float(rng.choice([np.nan, 2.0**53 - 1, -(2.0**53 - 1)]))
    columns["monthly_charges"] = charges
    return pa.table({k: pa.array(v) for k, v in columns.items()})


def _calibrated(pipeline: Pipeline, x: Any, y: Any) -> CalibratedClassifierCV:
    # As training does it: sigmoid on folds, one refitted pipeline (ensemble=False).
    return CalibratedClassifierCV(pipeline, method="sigmoid", cv=3, ensemble=False).fit(x, y)


FAMILIES = {
    "logistic": lambda x, y: logistic_pipeline(NUMERIC, CATEGORICAL).fit(x, y),
    "logistic+sigmoid": lambda x, y: _calibrated(logistic_pipeline(NUMERIC, CATEGORICAL), x, y),
    "boosting": lambda x, y: boosting_pipeline(NUMERIC, CATEGORICAL, seed=0, max_iter=30).fit(x, y),
    "boosting+sigmoid": lambda x, y: _calibrated(
        boosting_pipeline(NUMERIC, CATEGORICAL, seed=0, max_iter=30), x, y
    ),
    # Pooled rare levels (a column with too many levels for a tree): the pipeline path.
    "boosting, pooled levels": lambda x, y: boosting_pipeline(
        NUMERIC, CATEGORICAL, seed=0, max_iter=30, many_levels=True
    ).fit(x, y),
}
COMPILED = {"logistic", "logistic+sigmoid", "boosting", "boosting+sigmoid"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_published_probabilities_equal_predict_proba(
    family: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = _training_rows()
    estimator = FAMILIES[family](x, y)
    card = {
        "contract": {"numeric": list(NUMERIC), "categorical": list(CATEGORICAL)},
        "thresholds": {"high": 0.6, "medium": 0.3},
    }
    model = LoadedModel(version="v1", card=card, pipeline=estimator)
    monkeypatch.setattr(compiled, "SLICE_BYTES", 333 * 8 * 50)  # several slices per batch
    binned = _count_fast_paths(monkeypatch)
    scorer = BatchScorer(model, CONTRACT)
    assert scorer.path == ("compiled" if family in COMPILED else "pipeline")

    checked = check_batch(_scoring_batch(), CONTRACT)
    assert checked.valid.num_rows == 4_000  # odd values are scored, not rejected
    batches = [checked.valid.slice(0, 1_700), checked.valid.slice(1_700)]
    got = np.concatenate([scorer.score(b)["churn_probability"].to_numpy() for b in batches])
    expected = model.predict_proba(features_frame(checked.valid, CONTRACT))
    assert scorer.path == ("compiled" if family in COMPILED else "pipeline"), "kept after check"
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= 1e-9
    # Boosting's trees were walked on bins by leaf masks (each slice of each scored
    # batch), and the registered model itself was left scoring raw values.
    assert (binned[0] > 0) == (family in {"boosting", "boosting+sigmoid"})
    assert binned[1] == binned[0]
    # Logistic regression looked its levels' weights up instead (each slice).
    assert (binned[2] > 0) == (family in {"logistic", "logistic+sigmoid"})
    assert not any(hasattr(c, "_in_fit") for c in _classifiers(estimator))


def test_trees_on_bins_match_at_the_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Numbers exactly on a split's threshold and one ulp either side: where a value's
    bin and its float comparison would part if the binning were off by one."""
    x, y = _training_rows()
    estimator = boosting_pipeline(NUMERIC, CATEGORICAL, seed=0, max_iter=30).fit(x, y)
    classifier = estimator.steps[-1][1]
    splits: dict[int, list[float]] = {}
    for (tree,) in classifier._predictors:
        for node in tree.nodes:
            if not node["is_leaf"] and not node["is_categorical"]:
                splits.setdefault(int(node["feature_idx"]), []).append(float(node["num_threshold"]))
    # The classifier sees the categorical columns first, then the numbers in order.
    position = {len(CATEGORICAL) + i: name for i, name in enumerate(NUMERIC)}
    table = synthetic.generate_snapshot(4_000, DAY, seed=13).drop_columns(["churned"])
    columns = {name: table[name].to_pylist() for name in table.column_names}
    rng = np.random.default_rng(8)
    for feature, thresholds in splits.items():
        name = position[feature]
        values = [np.nextafter(v, d) for v in thresholds for d in (-np.inf, v, np.inf)]
        rows = rng.choice(table.num_rows, len(values), replace=False)
        for i, value in zip(rows, values, strict=True):
            columns[name][i] = float(value)
    batch = pa.table({k: pa.array(v) for k, v in columns.items()})
    checked = check_batch(batch, CONTRACT).valid
    assert checked.num_rows == 4_000
    card = {
        "contract": {"numeric": list(NUMERIC), "categorical": list(CATEGORICAL)},
        "thresholds": {"high": 0.6, "medium": 0.3},
    }
    model = LoadedModel(version="v1", card=card, pipeline=estimator)
    binned = _count_fast_paths(monkeypatch)
    scorer = BatchScorer(model, CONTRACT)
    got = scorer.score(checked)["churn_probability"].to_numpy()
    expected = model.predict_proba(features_frame(checked, CONTRACT))
    assert binned[0] > 0 and binned[1] == binned[0] and scorer.path == "compiled"
    assert np.array_equal(got, expected)


def _count_fast_paths(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of the bins step, of the leaf-mask walk on bins, of the weights lookup."""
    calls = [0, 0, 0]
    transform = treebins.ArrowTreeBins.transform
    walk = treewalk.LeafMaskWalk.__call__

    def counted(self: Any, matrix: Any) -> Any:
        calls[0] += 1
        return transform(self, matrix)

    def walked(self: Any, x: Any, *args: Any) -> None:
        calls[1] += x.dtype == np.uint8
        walk(self, x, *args)

    monkeypatch.setattr(treebins.ArrowTreeBins, "transform", counted)
    monkeypatch.setattr(treewalk.LeafMaskWalk, "__call__", walked)
    decide = linear.GatheredLogistic.decision_function

    def gathered(self: Any, parts: Any) -> Any:
        calls[2] += 1
        return decide(self, parts)

    monkeypatch.setattr(linear.GatheredLogistic, "decision_function", gathered)
    return calls


def _classifiers(estimator: Any) -> list[Any]:
    if isinstance(estimator, CalibratedClassifierCV):
        return [c.estimator.steps[-1][1] for c in estimator.calibrated_classifiers_]
    return [estimator.steps[-1][1]]

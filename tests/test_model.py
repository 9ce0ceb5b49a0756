"""The pure model layer: pipelines, metrics, tiers, reference distributions, behaviour."""

from __future__ import annotations

import math
from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from churn_batch import synthetic
from churn_batch.config import PROJECT_ROOT, ContractConfig, load_config
from churn_batch.contract import LABEL, check_batch, features_frame
from churn_batch.model import (
    BOOSTING,
    CANDIDATES,
    LOGISTIC,
    FittedModel,
    Labelled,
    SearchSpace,
    boosting_pipeline,
    decile_histogram,
    fit_and_select,
    logistic_pipeline,
    metrics,
    positive_scores,
    reference_distributions,
    risk_tiers,
    tier_thresholds,
)

FAST = SearchSpace(
    logistic_c=(0.1, 1.0),
    boosting={"max_leaf_nodes": (7,), "learning_rate": (0.1,)},
    boosting_max_iter=80,
)


@pytest.fixture(scope="module")
def contract() -> ContractConfig:
    return load_config(PROJECT_ROOT / "configs" / "default.toml").contract


def _labelled(table: pa.Table, contract: ContractConfig) -> tuple[pa.Table, Labelled]:
    valid = check_batch(table, contract, label=True).valid
    frame = features_frame(valid, contract)
    label = valid[LABEL].to_numpy().astype(np.int8)
    return valid, Labelled(frame, label, valid[contract.id_column].to_numpy())


@pytest.fixture(scope="module")
def data(contract: ContractConfig) -> tuple[Labelled, Labelled, pa.Table]:
    """Two independent customer bases: one to train on, one held out."""
    _, train = _labelled(synthetic.generate_snapshot(3000, date(2024, 1, 1), seed=1), contract)
    valid, holdout = _labelled(
        synthetic.generate_snapshot(1500, date(2024, 1, 2), seed=2), contract
    )
    return train, holdout, valid


@pytest.fixture(scope="module")
def fitted(data: tuple[Labelled, Labelled, pa.Table], contract: ContractConfig) -> FittedModel:
    train, holdout, _ = data
    return fit_and_select(
        train,
        holdout,
        contract.numeric,
        contract.categorical,
        cv_folds=2,
        seed=0,
        high_share=0.1,
        medium_share=0.2,
        search=FAST,
    )


# -- metrics ------------------------------------------------------------------------------


def test_metrics_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.3 * y + 0.7 * rng.random(500), 0.0, 1.0)
    got = metrics(y, p)
    assert got["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert got["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert got["log_loss"] == pytest.approx(log_loss(y, p))
    assert got["brier"] == pytest.approx(brier_score_loss(y, p))
    assert got["rows"] == 500
    assert got["positive_rate"] == pytest.approx(y.mean())


def test_precision_and_lift_in_the_top_shares() -> None:
    # 10 customers, 2 churners; the riskiest score is a churner, the second is not.
    y = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    p = np.linspace(0.9, 0.0, 10)
    got = metrics(y, p)
    assert got["precision_top_10"] == 1.0  # top 1 of 10
    assert got["lift_top_10"] == pytest.approx(1.0 / 0.2)
    assert got["precision_top_20"] == 0.5  # top 2 of 10
    assert got["lift_top_20"] == pytest.approx(0.5 / 0.2)


def test_metrics_with_one_class_are_nan_not_an_error() -> None:
    got = metrics(np.zeros(5), np.full(5, 0.1))
    assert math.isnan(got["roc_auc"])
    assert math.isnan(got["pr_auc"])
    assert got["brier"] == pytest.approx(0.01)


# -- tiers ---------------------------------------------------------------------------------


def test_tier_thresholds_split_the_scores_by_share() -> None:
    scores = np.linspace(0.0, 1.0, 1001)
    thresholds = tier_thresholds(scores, 0.1, 0.2)
    assert thresholds["high"] == pytest.approx(0.9)
    assert thresholds["medium"] == pytest.approx(0.7)
    tiers = risk_tiers(scores, thresholds)
    assert np.mean(tiers == "high") == pytest.approx(0.1, abs=0.002)
    assert np.mean(tiers == "medium") == pytest.approx(0.2, abs=0.002)


def test_risk_tiers_boundaries_are_inclusive() -> None:
    thresholds = {"high": 0.6, "medium": 0.3}
    tiers = risk_tiers(np.array([0.6, 0.59, 0.3, 0.29, np.nan, 1.0]), thresholds)
    assert tiers.tolist() == ["high", "medium", "medium", "low", "low", "high"]


# -- reference distributions ------------------------------------------------------------------


def test_decile_histogram_bins_match_searchsorted() -> None:
    values = np.array([*range(100), np.nan, np.nan], dtype=float)
    hist = decile_histogram(values)
    edges = np.array(hist["edges"])
    assert len(edges) == 9 and np.all(np.diff(edges) > 0)
    assert len(hist["fractions"]) == len(edges) + 1
    assert sum(hist["fractions"]) == pytest.approx(1.0)
    present = values[~np.isnan(values)]
    counts = np.bincount(np.searchsorted(edges, present, side="right"), minlength=len(edges) + 1)
    assert hist["fractions"] == pytest.approx(list(counts / len(present)))


def test_decile_histogram_deduplicates_repeated_cut_points() -> None:
    hist = decile_histogram(np.array([0.0] * 80 + [1.0] * 20))
    assert hist == {"edges": [0.0, 1.0], "fractions": [0.0, 0.8, 0.2]}
    assert decile_histogram(np.array([np.nan])) == {"edges": [], "fractions": [1.0]}


def test_reference_distributions_have_the_documented_shape() -> None:
    frame = pd.DataFrame(
        {
            "tenure": [1.0, 2.0, np.nan, 4.0],
            "contract": pd.Series(["A", "B", "A", np.nan], dtype=object),
        }
    )
    ref = reference_distributions(frame, ["tenure"], ["contract"], np.array([0.1, 0.2, 0.3, 0.4]))
    assert set(ref) == {"numeric", "categorical", "score"}
    tenure = ref["numeric"]["tenure"]
    assert set(tenure) == {"edges", "fractions", "missing_rate"}
    assert tenure["missing_rate"] == 0.25
    assert sum(tenure["fractions"]) == pytest.approx(1.0)
    assert ref["categorical"]["contract"] == {
        "levels": {"A": pytest.approx(2 / 3), "B": pytest.approx(1 / 3)},
        "missing_rate": 0.25,
    }
    assert set(ref["score"]) == {"edges", "fractions"}


# -- pipelines -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CANDIDATES)
def test_pipelines_score_unseen_levels_and_missing_values(
    name: str, data: tuple[Labelled, Labelled, pa.Table], contract: ContractConfig
) -> None:
    train, _, _ = data
    numeric, categorical = contract.numeric, contract.categorical
    pipeline = (
        logistic_pipeline(numeric, categorical)
        if name == LOGISTIC
        else boosting_pipeline(numeric, categorical, seed=0, max_iter=20)
    )
    pipeline.fit(train.features.iloc[:800], train.label[:800])
    odd = train.features.iloc[:3].copy()
    odd["contract"] = pd.Series(["Ten year", np.nan, "Month-to-month"], dtype=object)
    odd["tenure_months"] = [np.nan, np.nan, 5.0]
    scores = positive_scores(pipeline, odd)
    assert scores.shape == (3,)
    assert np.all((scores >= 0) & (scores <= 1))


def test_fit_and_select_picks_the_best_holdout_auc(fitted: FittedModel) -> None:
    assert set(fitted.candidates) == {LOGISTIC, BOOSTING}
    best = max(c.holdout["roc_auc"] for c in fitted.candidates.values())
    assert fitted.candidates[fitted.winner].holdout["roc_auc"] == best
    assert fitted.holdout_metrics["roc_auc"] > 0.75
    assert fitted.calibration.method == "sigmoid"
    # Kept only if it lowered the holdout Brier score, and the card says which.
    if fitted.calibration.applied:
        assert fitted.calibration.brier_calibrated < fitted.calibration.brier_uncalibrated
    assert fitted.holdout_metrics["brier"] == pytest.approx(
        min(fitted.calibration.brier_calibrated, fitted.calibration.brier_uncalibrated)
    )
    assert fitted.candidates[BOOSTING].params["n_iter"] >= 1
    assert 0 < fitted.thresholds["medium"] <= fitted.thresholds["high"] < 1


def test_only_contract_features_are_model_inputs(
    fitted: FittedModel, contract: ContractConfig
) -> None:
    assert list(fitted.estimator.feature_names_in_) == list(contract.features)


# -- behaviour ----------------------------------------------------------------------------


def test_two_year_contract_scores_lower_than_month_to_month(
    fitted: FittedModel, data: tuple[Labelled, Labelled, pa.Table]
) -> None:
    _, holdout, _ = data
    monthly = holdout.features.assign(contract="Month-to-month")
    two_year = holdout.features.assign(contract="Two year")
    for contract_frame in (monthly, two_year):
        contract_frame["contract"] = contract_frame["contract"].astype(object)
    p_monthly = positive_scores(fitted.estimator, monthly)
    p_two_year = positive_scores(fitted.estimator, two_year)
    assert p_two_year.mean() < p_monthly.mean()
    assert np.mean(p_two_year <= p_monthly) > 0.95


def test_customer_id_does_not_change_a_score(
    fitted: FittedModel, data: tuple[Labelled, Labelled, pa.Table], contract: ContractConfig
) -> None:
    _, _, valid = data
    renamed = valid.set_column(
        valid.schema.get_field_index(contract.id_column),
        contract.id_column,
        pa.array([f"X{i:08d}" for i in range(valid.num_rows)]),
    )
    before = positive_scores(fitted.estimator, features_frame(valid, contract))
    after = positive_scores(fitted.estimator, features_frame(renamed, contract))
    np.testing.assert_array_equal(before, after)


def test_permuting_rows_permutes_the_scores(
    fitted: FittedModel, data: tuple[Labelled, Labelled, pa.Table]
) -> None:
    _, holdout, _ = data
    order = np.random.default_rng(3).permutation(len(holdout.features))
    scores = positive_scores(fitted.estimator, holdout.features)
    shuffled = positive_scores(fitted.estimator, holdout.features.iloc[order])
    np.testing.assert_allclose(shuffled, scores[order], rtol=0, atol=1e-12)


def test_training_is_deterministic(
    data: tuple[Labelled, Labelled, pa.Table], contract: ContractConfig
) -> None:
    train, holdout, _ = data
    small = Labelled(train.features.iloc[:1200], train.label[:1200], train.customer[:1200])
    search = SearchSpace(logistic_c=(1.0,), boosting={"max_leaf_nodes": (7,)}, boosting_max_iter=30)
    runs = [
        fit_and_select(
            small,
            holdout,
            contract.numeric,
            contract.categorical,
            cv_folds=2,
            seed=5,
            high_share=0.1,
            medium_share=0.2,
            search=search,
        ).holdout_scores
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])

"""PSI against hand-computed values, the accumulator, and the gate's three outcomes."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from churn_batch.config import DriftThresholds, MonitoringConfig
from churn_batch.monitoring import DriftMonitor, Level, bin_counts, gate, psi

REFERENCE = {
    "numeric": {"charges": {"edges": [10.0, 20.0], "fractions": [0.25, 0.5, 0.25],
                            "missing_rate": 0.0}},
    "categorical": {"plan": {"levels": {"basic": 0.5, "plus": 0.5}, "missing_rate": 0.1}},
    "score": {"edges": [0.5], "fractions": [0.5, 0.5]},
}  # fmt: skip


def test_psi_hand_computed() -> None:
    # (0.5-0.25)*ln(0.5/0.25) + (0.25-0.5)*ln(0.25/0.5) + 0 = 0.5*ln 2
    assert psi([0.25, 0.5, 0.25], [0.5, 0.25, 0.25]) == pytest.approx(0.5 * math.log(2))
    assert psi([0.3, 0.7], [0.3, 0.7]) == 0.0
    # an empty bin is floored at 1e-4 rather than dividing by zero
    expected = (0.5 - 1e-4) * math.log(0.5 / 1e-4) + (0.5 - 1.0) * math.log(0.5 / 1.0)
    assert psi([0.5, 0.5], [0.0, 1.0]) == pytest.approx(expected)


def test_bin_counts_right_closed_edges() -> None:
    values = np.array([5.0, 10.0, 15.0, 20.0, 25.0])
    assert bin_counts(values, [10.0, 20.0]).tolist() == [1, 2, 2]


def observe(monitor: DriftMonitor, charges: list[float | None], plans: list[str | None]) -> None:
    probabilities = np.linspace(0.0, 1.0, len(charges))
    tiers = pa.array(["high" if p >= 0.5 else "low" for p in probabilities])
    table = pa.table({"charges": pa.array(charges, pa.float64()), "plan": pa.array(plans)})
    monitor.observe(table, probabilities, tiers)


def test_incremental_equals_one_pass() -> None:
    charges: list[float | None] = [5.0, 12.0, 15.0, 25.0, None, 19.0, 11.0, 30.0]
    plans: list[str | None] = ["basic", "plus", "gold", None, "basic", "plus", "basic", "gold"]
    whole = DriftMonitor(REFERENCE)
    observe(whole, charges, plans)
    parts = DriftMonitor(REFERENCE)
    observe(parts, charges[:3], plans[:3])
    observe(parts, charges[3:], plans[3:])
    a, b = whole.report(), parts.report()
    assert [f.psi for f in a.features] == pytest.approx([f.psi for f in b.features])
    charges_drift, plan_drift = a.features
    # charges: 7 present → bins [1, 4, 2]
    assert charges_drift.psi == pytest.approx(psi([0.25, 0.5, 0.25], [1 / 7, 4 / 7, 2 / 7]))
    assert charges_drift.missing_rate == pytest.approx(1 / 8)
    # plan: basic 3, plus 2, unseen gold 2 of 7 present; reference has no unseen bucket
    assert plan_drift.unseen == 2
    assert plan_drift.psi == pytest.approx(psi([0.5, 0.5, 0.0], [3 / 7, 2 / 7, 2 / 7]))
    assert plan_drift.missing_change == pytest.approx(1 / 8 - 0.1)


def test_gate_three_outcomes_and_per_feature_thresholds() -> None:
    monitor = DriftMonitor(REFERENCE)
    observe(monitor, [5.0, 15.0, 15.0, 25.0], ["basic", "plus", "basic", "plus"])
    report = monitor.report()
    assert gate(report, MonitoringConfig()).level is Level.ok

    shifted = DriftMonitor(REFERENCE)
    observe(shifted, [25.0, 26.0, 27.0, 28.0], ["basic", "plus", "basic", "plus"])
    decision = gate(shifted.report(), MonitoringConfig())
    assert decision.level is Level.block
    assert decision.findings[0].startswith("charges PSI ")
    assert "plan" not in decision.message()
    loose = MonitoringConfig(features={"charges": DriftThresholds(psi_warn=0.1, psi_block=9.0)})
    assert gate(shifted.report(), loose).level is Level.warn

    nulls = DriftMonitor(REFERENCE)
    observe(nulls, [5.0, 15.0, 15.0, 25.0], [None, None, "basic", "plus"])
    decision = gate(nulls.report(), MonitoringConfig())
    assert decision.level is Level.block
    assert "plan missing rate 50.0% (reference 10.0%, +40.0% > 20%)" in decision.message()


def test_report_summary_and_metric_rows() -> None:
    monitor = DriftMonitor(REFERENCE)
    observe(monitor, [5.0, 15.0, 15.0, 25.0], ["basic", "plus", "basic", "plus"])
    report = monitor.report()
    summary = report.summary()
    assert set(summary["drift"]) == {"charges", "plan"}
    assert summary["scores"]["tier_shares"] == {"high": 0.5, "medium": 0.0, "low": 0.5}
    assert summary["scores"]["histogram"] == [2, 2]
    metrics = {(f, m) for f, m, _ in report.metric_rows()}
    assert ("charges", "psi") in metrics
    assert ("__score__", "mean") in metrics

"""No false alarms on undrifted days; the gate fires on the feature that moved."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import sqlalchemy as sa
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from churn_batch import synthetic
from churn_batch.cli import app
from churn_batch.config import Config, MonitoringConfig
from churn_batch.contract import LABEL, check_batch
from churn_batch.evaluation import TABLE
from churn_batch.monitoring import DriftMonitor, DriftReport, Level, gate
from churn_batch.registry import LoadedModel, Registry
from churn_batch.scoring import BatchScorer
from churn_batch.sinks import Sink

from .scoring_fixtures import LAST


def champion(config: Config) -> LoadedModel:
    return Registry(config.model.registry, config.model.name).load("champion")


def drift(model: LoadedModel, config: Config, snapshot: pa.Table) -> DriftReport:
    valid = check_batch(snapshot, config.contract).valid
    monitor = DriftMonitor(model.card["reference"])
    predictions = BatchScorer(model, config.contract).score(valid)
    monitor.observe(valid, predictions["churn_probability"].to_numpy(),
                    predictions["risk_tier"].combine_chunks())  # fmt: skip
    return monitor.report()


def test_thirty_undrifted_days_raise_nothing(project: Config) -> None:
    model = champion(project)
    worst = 0.0
    days = synthetic.generate_snapshots(3000, date(2024, 7, 1), 30, seed=11)
    for day, snapshot in days:
        report = drift(model, project, snapshot)
        decision = gate(report, MonitoringConfig())
        feature_warnings = [f for f in decision.findings if not f.startswith("score")]
        assert decision.level is not Level.block, f"{day}: {decision.message()}"
        assert not feature_warnings, f"{day}: {decision.message()}"
        worst = max(worst, *(f.psi for f in report.features))
    assert worst < 0.1


def shift_contract(t: pa.Table) -> pa.Table:
    rng = np.random.default_rng(0)
    moved = pa.array(rng.random(t.num_rows) < 0.6)
    column = pc.if_else(moved, "Month-to-month", t["contract"])
    return t.set_column(t.schema.get_field_index("contract"), "contract", column)


def scale_charges(t: pa.Table) -> pa.Table:
    i = t.schema.get_field_index("monthly_charges")
    return t.set_column(i, "monthly_charges", pc.multiply(t["monthly_charges"], 1.6))


def null_tech_support(t: pa.Table) -> pa.Table:
    i = t.schema.get_field_index("tech_support")
    return t.set_column(i, "tech_support", pa.nulls(t.num_rows, pa.string()))


@pytest.mark.parametrize(
    ("shift", "feature", "finding"),
    [
        (shift_contract, "contract", "contract PSI"),
        (scale_charges, "monthly_charges", "monthly_charges PSI"),
        (null_tech_support, "tech_support", "tech_support missing rate 100.0%"),
    ],
)
def test_gate_blocks_on_the_shifted_feature(
    project: Config, shift: object, feature: str, finding: str
) -> None:
    assert callable(shift)
    model = champion(project)
    snapshot = synthetic.generate_snapshot(3000, date(2024, 7, 1), seed=11)
    assert gate(drift(model, project, snapshot), MonitoringConfig()).level is Level.ok
    decision = gate(drift(model, project, shift(snapshot)), MonitoringConfig())
    assert decision.level is Level.block
    blocked = [f for f in decision.findings if "PSI" in f or "missing" in f]
    assert any(f.startswith(finding) for f in blocked), decision.message()
    others = {"gender", "partner", "dependents", "payment_method", "senior_citizen"}
    assert not any(f.split()[0] in others for f in blocked), decision.message()


def test_evaluate_stores_the_realized_auc(project: Config) -> None:
    runner = CliRunner()
    args = ["--config", str(project.path)]
    assert runner.invoke(app, [*args, "score", "--date", LAST.isoformat()]).exit_code == 0
    result = runner.invoke(app, [*args, "evaluate", "--date", LAST.isoformat()])
    assert result.exit_code == 0, result.output
    with Sink(project.sink) as sink:
        published = sink.predictions(LAST)
    engine = sa.create_engine(project.sink.url)
    query = sa.text("SELECT * FROM customer_snapshots WHERE snapshot_date = :d")
    with engine.connect() as conn:
        rows = conn.execute(query, {"d": LAST.isoformat()})
        snapshot = pa.Table.from_pylist([dict(r._mapping) for r in rows])
        stored = conn.execute(sa.text(f"SELECT roc_auc, rows_matched FROM {TABLE}")).one()
    engine.dispose()
    labels = check_batch(snapshot, project.contract, label=True).valid
    truth = dict(zip(labels["customer_id"].to_pylist(), labels[LABEL].to_pylist(), strict=True))
    ids = published["customer_id"].to_pylist()
    y = [truth[i] for i in ids]
    expected = roc_auc_score(y, published["churn_probability"].to_numpy())
    assert stored.rows_matched == len(ids)
    assert stored.roc_auc == pytest.approx(expected, abs=1e-12)
    assert expected > 0.75
    assert f"roc_auc           {expected:.4f}" in result.stdout
    again = runner.invoke(app, [*args, "evaluate", "--date", LAST.isoformat()])
    assert again.exit_code == 0
    missing = runner.invoke(
        app, [*args, "evaluate", "--date", (LAST - timedelta(days=30)).isoformat()]
    )
    assert missing.exit_code == 3
    assert "no snapshot rows for" in missing.output and "published predictions" in missing.output

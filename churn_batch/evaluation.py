"""Realized performance: join a date's published predictions with the outcomes that arrived.

Outcomes come from the source's label column for that snapshot date (a later export
of the same date has it filled in). The result (ROC AUC, PR AUC, precision and lift in
the top decile, Brier, a calibration table) is stored per date in `churn_evaluations`,
replacing an earlier evaluation of the same date, so the report can show the trend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa

from churn_batch.config import Config
from churn_batch.contract import LABEL, check_batch
from churn_batch.db import create_engine, retrying
from churn_batch.errors import ConfigError, NoSnapshotRows
from churn_batch.model import metrics
from churn_batch.sinks import Sink
from churn_batch.sources import open_source

TABLE = "churn_evaluations"
CALIBRATION_BINS = 10


def evaluations_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        TABLE, metadata,
        sa.Column("snapshot_date", sa.Date, primary_key=True),
        sa.Column("evaluated_at", sa.DateTime, nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("rows_matched", sa.BigInteger, nullable=False),
        sa.Column("positive_rate", sa.Double),
        sa.Column("roc_auc", sa.Double),
        sa.Column("pr_auc", sa.Double),
        sa.Column("precision_top_10", sa.Double),
        sa.Column("lift_top_10", sa.Double),
        sa.Column("brier", sa.Double),
        sa.Column("log_loss", sa.Double),
        sa.Column("calibration", sa.Text),
    )  # fmt: skip


@dataclass(frozen=True)
class Evaluation:
    snapshot_date: date
    model_version: str
    rows_matched: int
    rows_unlabelled: int
    metrics: dict[str, float]
    calibration: list[dict[str, float]]


def calibration_table(y: np.ndarray[Any, Any], p: np.ndarray[Any, Any]) -> list[dict[str, float]]:
    """Equal-width bins of predicted probability: mean prediction vs observed rate."""
    index = np.minimum((p * CALIBRATION_BINS).astype(int), CALIBRATION_BINS - 1)
    rows = []
    for b in range(CALIBRATION_BINS):
        mask = index == b
        if mask.any():
            rows.append(
                {
                    "bin_low": b / CALIBRATION_BINS,
                    "bin_high": (b + 1) / CALIBRATION_BINS,
                    "rows": int(mask.sum()),
                    "mean_predicted": float(p[mask].mean()),
                    "observed_rate": float(y[mask].mean()),
                }
            )
    return rows


def evaluate(config: Config, snapshot_date: date) -> Evaluation:
    """Score the published predictions of `snapshot_date` against realized outcomes."""
    contract = config.contract
    if contract.label_column is None:
        raise ConfigError("evaluate needs [contract] label_column", key="contract.label_column")
    with Sink(config.sink) as sink:
        sink.prepare()
        predictions = sink.predictions(snapshot_date)
    if predictions.num_rows == 0:
        raise NoSnapshotRows(snapshot_date, f"published predictions ({config.sink.table})")
    outcomes = _outcomes(config, snapshot_date)
    joined = predictions.join(outcomes, "customer_id", join_type="inner")
    labelled = joined.filter(pc.is_valid(joined[LABEL]))
    if labelled.num_rows == 0:
        raise NoSnapshotRows(snapshot_date, "outcomes (no labelled rows match the predictions)")
    y = labelled[LABEL].to_numpy().astype(np.float64)
    p = labelled["churn_probability"].to_numpy()
    versions = pc.unique(labelled["model_version"]).to_pylist()
    result = Evaluation(
        snapshot_date=snapshot_date,
        model_version=",".join(sorted(versions)),
        rows_matched=labelled.num_rows,
        rows_unlabelled=predictions.num_rows - labelled.num_rows,
        metrics=metrics(y, p),
        calibration=calibration_table(y, p),
    )
    _store(config, result)
    return result


def _outcomes(config: Config, snapshot_date: date) -> pa.Table:
    contract = config.contract
    source = open_source(config.source, contract)
    parts = [
        check_batch(batch, contract, label=True).valid.select([contract.id_column, LABEL])
        for batch in source.read_range(snapshot_date, snapshot_date, label=True)
    ]
    if not parts:
        raise NoSnapshotRows(snapshot_date, source.describe())
    return pa.concat_tables(parts).rename_columns(["customer_id", LABEL])


def _store(config: Config, result: Evaluation) -> None:
    engine = create_engine(config.sink.url)
    table = evaluations_table(sa.MetaData())
    m = result.metrics
    row = {
        "snapshot_date": result.snapshot_date,
        "evaluated_at": datetime.now(UTC).replace(tzinfo=None),
        "model_version": result.model_version[:64],
        "rows_matched": result.rows_matched,
        "positive_rate": _finite(m["positive_rate"]),
        "roc_auc": _finite(m["roc_auc"]),
        "pr_auc": _finite(m["pr_auc"]),
        "precision_top_10": _finite(m["precision_top_10"]),
        "lift_top_10": _finite(m["lift_top_10"]),
        "brier": _finite(m["brier"]),
        "log_loss": _finite(m["log_loss"]),
        "calibration": json.dumps(result.calibration),
    }

    def write() -> None:
        with engine.begin() as conn:
            table.create(conn, checkfirst=True)
            conn.execute(sa.delete(table).where(table.c.snapshot_date == result.snapshot_date))
            conn.execute(sa.insert(table), [row])

    try:
        retrying(write, f"{TABLE} at {config.sink.url}")
    finally:
        engine.dispose()


def history(config: Config) -> list[dict[str, Any]]:
    """Every stored evaluation, oldest first (for the report's trend)."""
    engine = create_engine(config.sink.url)
    table = evaluations_table(sa.MetaData())
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(TABLE):
                return []
            rows = conn.execute(sa.select(table).order_by(table.c.snapshot_date))
            return [dict(r._mapping) for r in rows]
    finally:
        engine.dispose()


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)

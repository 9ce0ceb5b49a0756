"""`demo`: the whole job on a fresh machine, from an empty directory to a query."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from churn_batch.cli.app import app
from churn_batch.cli.common import reports_errors, state
from churn_batch.config import redact_url


@app.command()
@reports_errors
def demo(
    ctx: typer.Context,
    customers: Annotated[int, typer.Option(help="Customers per daily snapshot.", min=100)] = 5000,
    days: Annotated[int, typer.Option(help="Daily snapshots, ending yesterday (UTC).", min=2)] = 30,
    train_days: Annotated[
        int, typer.Option(help="Train on the latest N days (the rest stay for backfills).", min=2)
    ] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic customer base.")] = 0,
) -> None:
    """Seed synthetic snapshots, train and promote a model, score the latest date."""
    from churn_batch import demo as demo_lib
    from churn_batch import job, training

    config = state(ctx).config
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    seeded = demo_lib.seed(config, customers=customers, days=days, last=yesterday, seed=seed)
    typer.echo(
        f"1/3 Seeded {seeded.rows:,} snapshot rows for {seeded.first} .. {seeded.last} "
        f"into {seeded.where}"
    )
    start = max(seeded.first, seeded.last - timedelta(days=min(train_days, days) - 1))
    trained = training.train(config, start, seeded.last, promote=True)
    auc = trained.metrics.get("roc_auc", float("nan"))
    typer.echo(
        f"2/3 Trained model {trained.version} ({trained.winner}, holdout ROC AUC {auc:.3f}) "
        f"on {start} .. {seeded.last}: {trained.reason}"
    )
    outcome = job.score_date(config, seeded.last)
    typer.echo(
        f"3/3 Published {outcome.rows_scored:,} predictions for {seeded.last} "
        f"with model {outcome.model_version} (run {outcome.run_id})"
    )
    for warning in outcome.warnings:
        typer.echo(f"    warning: {warning}")
    typer.echo("")
    typer.echo(f"Predictions: table {config.sink.table} (and view {config.sink.table}_latest)")
    typer.echo(f"  in {redact_url(config.sink.url)}")
    typer.echo("Top high-risk month-to-month customers, ready to paste:")
    typer.echo("")
    typer.echo(demo_lib.campaign_query(config))

"""`demo`: make the whole thing work on a fresh machine."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from churn_batch import demo as demo_lib
from churn_batch.cli.app import app
from churn_batch.cli.common import reports_errors, state


@app.command()
@reports_errors
def demo(
    ctx: typer.Context,
    customers: Annotated[int, typer.Option(help="Customers per daily snapshot.", min=100)] = 5000,
    days: Annotated[int, typer.Option(help="Daily snapshots, ending yesterday (UTC).", min=2)] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic customer base.")] = 0,
) -> None:
    """Seed synthetic snapshots into the configured source (the embedded default: SQLite)."""
    config = state(ctx).config
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    seeded = demo_lib.seed(config, customers=customers, days=days, last=yesterday, seed=seed)
    typer.echo(
        f"Seeded {seeded.rows:,} snapshot rows for {seeded.first} .. {seeded.last} "
        f"into {seeded.where}"
    )

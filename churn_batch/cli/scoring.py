"""`score`, `backfill` and `runs`: the nightly job and its history."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from churn_batch.cli.app import app
from churn_batch.cli.common import fail, parse_date, reports_errors, scrub, state
from churn_batch.errors import ChurnBatchError, ConfigError

if TYPE_CHECKING:
    from churn_batch.job import Progress

DateArg = Annotated[
    str, typer.Option("--date", help="Snapshot date: YYYY-MM-DD, 'today' or 'yesterday' (UTC).")
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Model version or alias (default: [model] alias, 'champion')."),
]
AllowDrift = Annotated[
    bool,
    typer.Option("--allow-drift", help="Publish even if the drift gate blocks; the run says so."),
]


@contextmanager
def _progress() -> Iterator[Progress | None]:
    """A progress bar on a terminal; under cron, nothing (the log lines say enough)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("scoring", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@app.command()
@reports_errors
def score(
    ctx: typer.Context,
    date: DateArg,
    model: ModelOpt = None,
    allow_drift: AllowDrift = False,
) -> None:
    """Score one snapshot date and publish it atomically to the predictions table."""
    from churn_batch import job

    config = state(ctx).config
    snapshot_date = parse_date(date)
    with _progress() as progress:
        outcome = job.score_date(
            config, snapshot_date, model_ref=model, allow_drift=allow_drift, progress=progress
        )
    typer.echo(
        f"Published {outcome.rows_scored:,} predictions for {snapshot_date} "
        f"to {config.sink.table} (model {outcome.model_version}, "
        f"{outcome.rows_rejected:,} rows rejected, {outcome.seconds:.1f}s, run {outcome.run_id})"
    )
    for warning in outcome.warnings:
        typer.echo(f"Warning: {scrub(warning)}", err=True)


@app.command()
def backfill(
    ctx: typer.Context,
    start: Annotated[str, typer.Option("--start", help="First snapshot date (YYYY-MM-DD).")],
    end: Annotated[str, typer.Option("--end", help="Last snapshot date, inclusive.")],
    model: ModelOpt = None,
    allow_drift: AllowDrift = False,
) -> None:
    """Score each date from START to END in turn; exit non-zero if any date failed."""
    from churn_batch import job

    try:
        config = state(ctx).config
        first, last = parse_date(start), parse_date(end)
    except ChurnBatchError as exc:
        raise fail(str(exc), exc.exit_code) from None
    if last < first:
        raise fail(f"--end {last} is before --start {first}", ConfigError.exit_code)
    rows: list[tuple[str, str, int, str]] = []
    worst = 0
    day = first
    while day <= last:
        try:
            outcome = job.score_date(config, day, model_ref=model, allow_drift=allow_drift)
            rows.append((day.isoformat(), "published", 0, f"{outcome.rows_scored:,} rows"))
        except ChurnBatchError as exc:
            rows.append((day.isoformat(), "failed", exc.exit_code, scrub(str(exc))))
            worst = worst or exc.exit_code
        day += timedelta(days=1)
    typer.echo(f"{'date':<12}{'outcome':<11}{'exit':<6}detail")
    for row in rows:
        typer.echo(f"{row[0]:<12}{row[1]:<11}{row[2]:<6}{row[3]}")
    failed = sum(1 for r in rows if r[2])
    typer.echo(f"{len(rows) - failed} of {len(rows)} dates published")
    if worst:
        # The first failure's code, so a wrapper can still tell "retry later" (7, 8) apart.
        raise typer.Exit(worst)


@app.command()
@reports_errors
def runs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="How many runs, newest first.", min=1)] = 20,
    date: Annotated[str | None, typer.Option("--date", help="Only runs for this date.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Recent runs from the runs table."""
    from churn_batch.sinks import Sink

    config = state(ctx).config
    sink = Sink(config.sink)
    sink.prepare()
    records = sink.runs(limit=limit, snapshot_date=parse_date(date) if date else None)
    if as_json:
        for record in records:
            typer.echo(json.dumps(record, default=str))
        return
    typer.echo(f"{'started (UTC)':<20}{'date':<12}{'status':<11}{'model':<8}"
               f"{'scored':>10}{'rejected':>10}  run_id / error")  # fmt: skip
    for r in records:
        started = str(r["started_at"])[:19]
        typer.echo(
            f"{started:<20}{r['snapshot_date']!s:<12}{r['status']:<11}"
            f"{r['model_version'] or '-':<8}{r['rows_scored'] or 0:>10,}"
            f"{r['rows_rejected'] or 0:>10,}  {r['run_id']}"
            + (f"  {scrub(r['error'])}" if r.get("error") else "")
        )


@app.command()
@reports_errors
def evaluate(ctx: typer.Context, date: DateArg) -> None:
    """Realized performance of a published date, once its outcomes have arrived."""
    from churn_batch import evaluation

    result = evaluation.evaluate(state(ctx).config, parse_date(date))
    m = result.metrics
    typer.echo(
        f"Evaluated {result.snapshot_date} (model {result.model_version}): "
        f"{result.rows_matched:,} customers with outcomes, {result.rows_unlabelled:,} without"
    )
    for key in ("roc_auc", "pr_auc", "precision_top_10", "lift_top_10", "brier", "log_loss"):
        typer.echo(f"  {key:<18}{m[key]:.4f}")
    typer.echo(f"Stored in {evaluation.TABLE}.")

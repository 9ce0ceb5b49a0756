"""`score`, `backfill` and `runs`: the nightly job and its history."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from churn_batch.cli.app import app
from churn_batch.cli.common import (
    fail,
    parse_date,
    report_unexpected,
    reports_errors,
    scrub,
    state,
)
from churn_batch.errors import ChurnBatchError, ConfigError, Interrupted

if TYPE_CHECKING:
    from churn_batch.config import Config
    from churn_batch.job import Progress

# Ten years of daily snapshots: a longer range is most likely a typo in a year (0224 for
# 2024), and would record a failed run for every empty day in it.
MAX_BACKFILL_DAYS = 3660

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
    try:
        with _progress() as progress:
            outcome = job.score_date(
                config, snapshot_date, model_ref=model, allow_drift=allow_drift, progress=progress
            )
    except Interrupted as exc:
        raise fail(f"{exc} while scoring {snapshot_date}; {_UNTOUCHED}", exc.exit_code) from None
    typer.echo(
        f"Published {outcome.rows_scored:,} predictions for {snapshot_date} "
        f"to {config.sink.table} (model {outcome.model_version}, "
        f"{outcome.rows_rejected:,} rows rejected, {outcome.seconds:.1f}s, run {outcome.run_id})"
    )
    for warning in outcome.warnings:
        typer.echo(f"Warning: {scrub(warning)}", err=True)
    if outcome.stop_signal is not None:
        # Published: exit 0 says so. The stop came too late to undo anything, and there
        # is nothing left to stop.
        name = signal.Signals(outcome.stop_signal).name
        typer.echo(f"Warning: {name} arrived while the run committed; it is published", err=True)


_UNTOUCHED = "nothing was published: the previous predictions of the date stay as they were"


@app.command()
@reports_errors
def backfill(
    ctx: typer.Context,
    start: Annotated[str, typer.Option("--start", help="First snapshot date (YYYY-MM-DD).")],
    end: Annotated[str, typer.Option("--end", help="Last snapshot date, inclusive.")],
    model: ModelOpt = None,
    allow_drift: AllowDrift = False,
) -> None:
    """Score each date from START to END in turn; exit non-zero if any date failed.

    Interrupted (Ctrl-C, SIGTERM), it rolls back the date in progress, prints what it
    finished and exits 130 / 143.
    """
    config = state(ctx).config
    first, last = parse_date(start, what="--start"), parse_date(end, what="--end")
    if last < first:
        raise fail(f"--end {last} is before --start {first}", ConfigError.exit_code)
    days = (last - first).days + 1
    if days > MAX_BACKFILL_DAYS:
        raise fail(
            f"--start {first} to --end {last} is {days:,} dates; a backfill takes at most "
            f"{MAX_BACKFILL_DAYS:,} (ten years): split the range",
            ConfigError.exit_code,
        )
    dates = [first + timedelta(days=n) for n in range(days)]
    rows: list[Row] = []
    stopped: Interrupted | None = None
    try:
        for day in dates:
            row, stop = _backfill_date(config, day, model, allow_drift)
            rows.append(row)
            if stop is not None and (row[1] == "interrupted" or day < last):
                stopped = stop
                break
    except Interrupted as exc:  # between two dates
        stopped = exc
    _print_backfill(rows, dates, stopped)
    if stopped is not None:
        raise typer.Exit(stopped.exit_code)
    worst = next((row[2] for row in rows if row[2]), 0)
    if worst:
        # The first failure's code, so a wrapper can still tell "retry later" (7, 8) apart.
        raise typer.Exit(worst)


Row = tuple[str, str, int, str]  # a line of the backfill table: date, outcome, exit, detail


def _backfill_date(
    config: Config, day: date, model: str | None, allow_drift: bool
) -> tuple[Row, Interrupted | None]:
    """Score one date of a backfill: its row, and the stop signal that ends the backfill."""
    from churn_batch import job

    try:
        outcome = job.score_date(config, day, model_ref=model, allow_drift=allow_drift)
    except ChurnBatchError as exc:
        return (day.isoformat(), "failed", exc.exit_code, scrub(str(exc))), None
    except Interrupted as exc:
        return (day.isoformat(), "interrupted", exc.exit_code, f"{exc}; {_UNTOUCHED}"), exc
    except Exception as exc:
        message = report_unexpected(exc, f"scoring {day}")
        return (day.isoformat(), "failed", 1, scrub(message)), None
    row = (day.isoformat(), "published", 0, f"{outcome.rows_scored:,} rows")
    # A stop that arrived while this date committed still stops the backfill here.
    stop = outcome.stop_signal
    return row, Interrupted(stop) if stop is not None else None


def _print_backfill(rows: list[Row], dates: list[date], stopped: Interrupted | None) -> None:
    # As wide as "published" unless a date was "interrupted".
    width = max([len("published"), *(len(row[1]) for row in rows)]) + 2
    typer.echo(f"{'date':<12}{'outcome':<{width}}{'exit':<6}detail")
    for row in rows:
        typer.echo(f"{row[0]:<12}{row[1]:<{width}}{row[2]:<6}{row[3]}")
    published = sum(1 for row in rows if row[1] == "published")
    summary = f"{published} of {len(dates)} dates published"
    if stopped is not None:
        summary += f"; {stopped}"
        if len(rows) < len(dates):
            rest = dates[len(rows) :]
            summary += f", not started: {rest[0]}" + (f" .. {rest[-1]}" if len(rest) > 1 else "")
    typer.echo(summary)


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

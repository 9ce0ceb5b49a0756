"""`report`: the papermill-executed HTML report of one run, for analysts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from churn_batch.cli.app import app
from churn_batch.cli.common import parse_date, reports_errors, state
from churn_batch.config import REPORTS_ENV_VAR


@app.command()
@reports_errors
def report(
    ctx: typer.Context,
    date: Annotated[
        str,
        typer.Option("--date", help="Snapshot date: YYYY-MM-DD, 'today' or 'yesterday' (UTC)."),
    ],
    output_dir: Annotated[
        Path | None,
        typer.Option(
            "--output-dir",
            envvar=REPORTS_ENV_VAR,
            help="Reports directory (default: reports/ in the config's project).",
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Execute notebooks/churn_report.ipynb for one date → reports/DATE/ .ipynb + .html."""
    from churn_batch import reports

    config = state(ctx).config
    snapshot_date = parse_date(date)
    files = reports.build_report(config, snapshot_date, reports_dir=output_dir)
    typer.echo(f"Report for {snapshot_date}: {files.html}")
    typer.echo(f"Executed notebook: {files.notebook}")

"""The root typer app and its global options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import churn_batch
from churn_batch.cli.common import LogFormat, State, setup_logging
from churn_batch.config import ENV_VAR, default_config_path

app = typer.Typer(
    name="churn-batch",
    help="Nightly churn scoring, published atomically to SQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        # Looked up only when asked: the package metadata costs every start-up ~60 ms.
        typer.echo(f"churn-batch {churn_batch.__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar=ENV_VAR,
            help="Config file (default: $CHURN_BATCH_CONFIG, else configs/default.toml).",
            dir_okay=False,
        ),
    ] = None,
    log_format: Annotated[
        LogFormat, typer.Option("--log-format", help="Log lines on stderr as text or JSON.")
    ] = LogFormat.text,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Score customers for churn risk and publish the scores to SQL."""
    setup_logging(log_format)
    ctx.obj = State(config_path=config or default_config_path(), log_format=log_format)

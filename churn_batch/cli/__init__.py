"""The `churn-batch` command line: a thin layer over the library.

One root app (`cli.app`) with global options in its callback; each concern's commands
live in their own module and register themselves on `app` when imported here.
"""

from __future__ import annotations

import faulthandler
import io
import signal
import sys

import typer

from churn_batch.cli import data as data  # each import registers its commands on `app`
from churn_batch.cli import models as models
from churn_batch.cli import ops as ops
from churn_batch.cli import scoring as scoring
from churn_batch.cli.app import app
from churn_batch.cli.common import handle_stop_signals
from churn_batch.errors import Interrupted

__all__ = ["app", "main"]


def main() -> None:
    _enable_faulthandler()
    handle_stop_signals()
    try:
        app()
    except Interrupted as exc:  # a signal outside the commands' own handling (start-up)
        typer.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)


def _enable_faulthandler() -> None:
    """A native crash prints every thread's Python stack to stderr before the process dies.

    SIGSEGV, SIGBUS, SIGFPE, SIGABRT and SIGILL (a bug in a driver or an extension)
    otherwise end the process with no word at all. stderr is where the log lines go:
    under cron, `jobs/lib.sh` puts it in `logs/<job>.log`. SIGUSR1 prints the same
    stacks and lets the process run on: `kill -USR1 <pid>` shows where a hung run waits.
    """
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return  # a stderr without a file descriptor (an embedding host): nothing to write to
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)

"""The `churn-batch` command line: a thin layer over the library.

One root app (`cli.app`) with global options in its callback; each concern's commands
live in their own module and register themselves on `app` when imported here.
"""

from __future__ import annotations

from churn_batch.cli import data as data  # each import registers its commands on `app`
from churn_batch.cli import models as models
from churn_batch.cli import ops as ops
from churn_batch.cli import scoring as scoring
from churn_batch.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    app()

"""What every command shares: the loaded config, logging, and turning errors into exit codes.

The library raises `ChurnBatchError` subclasses and never prints; this module is the
one place that turns them into one short message on stderr and the documented exit code.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import ParamSpec, TypeVar

import typer

from churn_batch.config import Config, load_config, redact_urls_in
from churn_batch.dates import parse_date as parse_date  # the CLI's --date
from churn_batch.errors import ChurnBatchError

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("churn_batch")


class LogFormat(StrEnum):
    text = "text"
    json = "json"


@dataclass
class State:
    """Set by the root callback; commands load the config only when they need it."""

    config_path: Path
    log_format: LogFormat = LogFormat.text
    _config: Config | None = field(default=None, repr=False)

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
            _SECRETS[:] = self._config.secrets
        return self._config


_SECRETS: list[str] = []  # scrubbed from every log line once a config is loaded


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    assert isinstance(obj, State), "the root callback sets the state"
    return obj


def scrub(text: str) -> str:
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return redact_urls_in(text)


class _RedactingFormatter(logging.Formatter):
    def __init__(self, fmt: LogFormat) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z")
        self.kind = fmt

    def format(self, record: logging.LogRecord) -> str:
        if self.kind is LogFormat.json:
            payload = {
                "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": scrub(record.getMessage()),
            }
            return json.dumps(payload)
        return scrub(super().format(record))


def setup_logging(fmt: LogFormat, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(fmt))
    root = logging.getLogger("churn_batch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def fail(message: str, code: int) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    typer.echo(f"Error: {scrub(message)}", err=True)
    return typer.Exit(code)


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Map library errors to (message, exit code); anything unexpected is exit 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except ChurnBatchError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            log.debug("unexpected error", exc_info=True)
            raise fail(f"unexpected {type(exc).__name__}: {exc}", 1) from None

    return wrapper

"""What every command shares: the loaded config, logging, and turning errors into exit codes.

The library raises `ChurnBatchError` subclasses and never prints; this module is the
one place that turns them into one short message on stderr and the documented exit code.
A stop signal (Ctrl-C, SIGTERM, SIGHUP) becomes `Interrupted`, exit 128 + its number.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import select
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import FrameType, TracebackType
from typing import ParamSpec, TypeVar

import typer

from churn_batch.config import Config, load_config, redact_urls_in
from churn_batch.dates import parse_date as parse_date  # the CLI's --date
from churn_batch.errors import ChurnBatchError, Interrupted

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
    """`text` without the config's secrets, URL passwords or SQL parameters (customer data)."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return _PARAMETERS.sub("[parameters: hidden]", redact_urls_in(text))


# The line SQLAlchemy adds to a database error's text with the statement's bound values.
_PARAMETERS = re.compile(r"^\[parameters: .*$", re.MULTILINE)
# Where SQLAlchemy's text of an error goes on past the driver's message: the whole
# statement (kilobytes for a multi-row INSERT), its parameters, a link.
_STATEMENT = re.compile(r"\s*\n\[SQL: |\s*\n\[parameters: |\s*\(Background on this error at: ")
MESSAGE_MAX = 500  # characters of an unexpected error's first line (job.MESSAGE_MAX)
TRACEBACK_LINE_MAX = 1000


def one_line(exc: BaseException) -> str:
    """An unexpected error as the runs table records it (`job.describe_failure`).

    Its type and the first line of its message; for a database error that line is
    SQLAlchemy's "(driver error class) driver message", without the statement and the
    parameters that follow it. Kept apart from `job` so that an error in a command that
    never imported the job does not pay for importing it.
    """
    lines = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return line if len(line) <= MESSAGE_MAX else line[: MESSAGE_MAX - 1] + "…"


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
            if record.exc_info:
                payload["traceback"] = self.formatException(record.exc_info)
            return json.dumps(payload)
        return scrub(super().format(record))

    def formatException(
        self,
        ei: tuple[type[BaseException], BaseException, TracebackType | None]
        | tuple[None, None, None],
    ) -> str:
        # Scrubbed here too: logging caches this text on the record (`exc_text`). A
        # multi-row INSERT's statement is one line of thousands of placeholders: cut.
        lines = scrub(super().formatException(ei)).splitlines()
        return "\n".join(
            line if len(line) <= TRACEBACK_LINE_MAX else f"{line[:TRACEBACK_LINE_MAX]}… (cut)"
            for line in lines
        )


def setup_logging(fmt: LogFormat, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(fmt))
    root = logging.getLogger("churn_batch")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def fail(message: str, code: int) -> typer.Exit:
    """Print the message to stderr and return the Exit to raise.

    Whatever the message embeds, never a SQL statement or its parameters (a driver
    error quoted in a library error carries SQLAlchemy's whole text).
    """
    message = _STATEMENT.split(message, maxsplit=1)[0]
    typer.echo(f"Error: {scrub(message)}", err=True)
    return typer.Exit(code)


def report_unexpected(exc: BaseException, doing: str) -> str:
    """Log a bug's traceback at ERROR (under cron, the only clue); return its one line."""
    log.error("unexpected error %s", doing, exc_info=exc)
    return f"unexpected {one_line(exc)}"


def reports_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Map library errors to (message, exit code); anything unexpected is exit 1."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except ChurnBatchError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except Interrupted as exc:
            raise fail(str(exc), exc.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except BrokenPipeError as exc:
            if not _stdout_reader_gone():
                raise fail(report_unexpected(exc, f"in {command.__name__}"), 1) from None
            # `churn-batch runs | head`: the reader has what it wanted; nothing failed.
            # stdout goes to /dev/null so that the flush at exit does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except Exception as exc:
            message = report_unexpected(exc, f"in {command.__name__}")
            raise fail(message, 1) from None

    return wrapper


def _stdout_reader_gone() -> bool:
    """True if stdout is a pipe whose reading end is closed (poll reports an error)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), 0)  # errors are reported whatever is asked
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


# -- stop signals --------------------------------------------------------------------------

# Ctrl-C; cron's timeout, systemd, Kubernetes; a closed terminal. The same as
# `job.STOP_SIGNALS`, which the job holds while a run commits or records its end.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_stopping = False


def handle_stop_signals() -> None:
    """Make a stop signal raise `Interrupted` in the main thread, unless it is ignored.

    Raised wherever the main thread is (waiting on a queue, a lock or a failpoint), it
    unwinds the run: the publication rolls back, the run is recorded as failed, the
    command says so and exits 128 + the signal's number instead of dying by it. A
    signal someone chose to ignore (`nohup` ignores SIGHUP) stays ignored.
    """
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _stop)


def _stop(signum: int, frame: FrameType | None) -> None:
    global _stopping
    if _stopping:
        # Asked again while the first request unwinds (say, a rollback waiting on a server
        # that went away): go at once. Safe: an uncommitted publication dies with its
        # connection, and the next run of the date marks this one abandoned.
        name = signal.Signals(signum).name
        os.write(2, f"Error: {name} again while stopping: exiting at once\n".encode())
        os._exit(128 + signum)
    _stopping = True
    raise Interrupted(signum)

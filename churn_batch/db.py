"""Engines and connections, with retries that end in `StorageUnavailable` (exit 7).

Every message that leaves this module has passwords masked: drivers like to echo the
URL they failed to reach.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.pool import NullPool

from churn_batch.config import redact_url, redact_urls_in
from churn_batch.errors import ConfigError, StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_DELAYS = (0.5, 2.0, 5.0)  # seconds between attempts; a cron job can afford ~8 s

_DRIVER_EXTRAS = {"postgresql": "postgres", "mysql": "mariadb", "mariadb": "mariadb"}


def create_engine(url: str, *, must_exist: bool = False) -> sa.Engine:
    """An engine for `url`; `must_exist` refuses a SQLite file that is not there.

    (SQLite would otherwise create an empty database and report a missing table.)
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"not a SQLAlchemy URL: {redact_url(url)!r}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database or "")
        if must_exist and not path.exists():
            raise ConfigError(f"SQLite database {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # No pool: a batch job opens a handful of connections per run, and a pooled
        # idle connection outliving its engine is a leak warning, not a speed-up.
        return sa.create_engine(parsed, poolclass=NullPool)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        extra = _DRIVER_EXTRAS.get(backend)
        hint = f"; install it with: pip install 'churn-batch[{extra}]'" if extra else ""
        raise ConfigError(f"no database driver for {redact_url(url)!r} ({exc}){hint}") from None


def retrying(action: Callable[[], T], what: str, delays: tuple[float, ...] | None = None) -> T:
    """Run `action`, retrying connection failures; give up with `StorageUnavailable`."""
    delays = RETRY_DELAYS if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return action()
        except DBAPIError as exc:
            if not is_unavailable(exc):
                raise
            message = describe_error(exc)
            if attempt == len(delays):
                raise StorageUnavailable(
                    f"cannot reach {what} after {attempt + 1} attempts: {message}"
                ) from None
            log.warning("cannot reach %s (%s); retrying in %.1fs", what, message, delays[attempt])
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")  # pragma: no cover - the loop always returns or raises


def is_unavailable(exc: DBAPIError) -> bool:
    """True for failures that a later retry may fix (server down, connection dropped)."""
    if exc.connection_invalidated:
        return True
    if isinstance(exc, sa.exc.InterfaceError):
        return True
    if isinstance(exc, sa.exc.OperationalError):
        text = str(exc.orig).lower()
        retryable = (
            "connection", "connect", "server closed", "timeout", "timed out",
            "can't connect", "lost connection", "gone away", "database is locked",
            "could not translate host", "name or service not known", "refused",
        )  # fmt: skip
        return any(word in text for word in retryable)
    return False


def describe_error(exc: BaseException) -> str:
    """One line of a driver error, passwords masked."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return redact_urls_in(text[0] if text else type(orig).__name__)

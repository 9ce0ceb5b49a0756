"""Engines and connections, with retries that end in `StorageUnavailable` (exit 7).

Every message that leaves this module has passwords masked: drivers like to echo the
URL they failed to reach.
"""

from __future__ import annotations

import logging
import re
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
        # hide_parameters: a driver error must never carry bound values (customer data).
        return sa.create_engine(
            parsed, poolclass=NullPool, connect_args=_connect_args(parsed), hide_parameters=True
        )
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        extra = _DRIVER_EXTRAS.get(backend)
        hint = f"; install it with: pip install 'churn-batch[{extra}]'" if extra else ""
        raise ConfigError(f"no database driver for {redact_url(url)!r} ({exc}){hint}") from None


APPLICATION_NAME = "churn-batch"


def _connect_args(url: sa.URL) -> dict[str, str]:
    """PostgreSQL sessions named `churn-batch` in pg_stat_activity, unless the URL or
    PGAPPNAME names them (libpq's fallback_application_name yields to both)."""
    if url.get_backend_name() == "postgresql" and url.get_driver_name() in ("psycopg", "psycopg2"):
        return {"fallback_application_name": APPLICATION_NAME}
    return {}


def retrying(action: Callable[[], T], what: str, delays: tuple[float, ...] | None = None) -> T:
    """Run `action`, retrying connection failures; give up with `StorageUnavailable`.

    A failure no retry can fix (wrong password, unknown database or host) is a
    `ConfigError` at once: retrying it would only make cron report "try later" forever.
    """
    delays = RETRY_DELAYS if delays is None else delays
    for attempt in range(len(delays) + 1):
        try:
            return action()
        except DBAPIError as exc:
            problem = config_problem(exc)
            if problem is not None:
                raise ConfigError(
                    f"cannot use {what}: {problem} ({describe_error(exc)}); "
                    "not retried: fix the URL or the server's accounts"
                ) from None
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


# Connection failures that are mistakes in the URL or the server's accounts, by driver
# code; a retry gives the same answer. MySQL/MariaDB error numbers:
_MYSQL_CONFIG_CODES = {
    1044: "access to the database denied",
    1045: "access denied: wrong user or password",
    1049: "the database does not exist",
    1698: "access denied: wrong user or password",
    2005: "unknown server host",
}
# SQLSTATEs PostgreSQL gives once connected (psycopg has none for a refused login:
# libpq keeps the server's FATAL message only, hence the texts below).
_POSTGRES_CONFIG_STATES = {
    "28P01": "password authentication failed",
    "28000": "authorization failed",
    "3D000": "the database does not exist",
}
# The server's and resolver's own words (PostgreSQL's C locale, libc), lower case.
# Checked after the transient ones: "temporary failure in name resolution" is retried.
_CONFIG_TEXTS = (
    (re.compile(r'database "[^"]*" does not exist'), "the database does not exist"),
    (re.compile(r"password authentication failed"), "password authentication failed"),
    (re.compile(r'role "[^"]*" does not exist'), "the user (role) does not exist"),
    (re.compile(r"no pg_hba\.conf entry"), "the server's pg_hba.conf refuses this login"),
    (re.compile(r"(ident|peer|scram|md5) authentication failed"), "authentication failed"),
    (re.compile(r"no password supplied"), "the server wants a password and none was given"),
    (re.compile(r"permission denied for database"), "no CONNECT permission on the database"),
    (re.compile(r'role "[^"]*" is not permitted to log in'), "the user (role) may not log in"),
    (re.compile(r"name or service not known|nodename nor servname|no address associated"
                r"|unknown (mysql )?server host"), "unknown server host"),
)  # fmt: skip
_TRANSIENT_TEXTS = ("temporary failure in name resolution",)

# PostgreSQL SQLSTATEs a later attempt may not meet: connection exceptions (class 08),
# the server shutting down or starting up (57P01-57P03), too many clients (53300).
_POSTGRES_TRANSIENT_STATES = ("57P01", "57P02", "57P03", "53300")
# MySQL/MariaDB: cannot connect (2002, 2003), server gone or connection lost (2006,
# 2013), connection killed (1927), server shutdown (1053), too many connections (1040).
_MYSQL_TRANSIENT_CODES = {1040, 1053, 1927, 2002, 2003, 2006, 2013}


def config_problem(exc: DBAPIError) -> str | None:
    """Why `exc` is a configuration mistake no retry fixes, or None if it is not one."""
    orig = getattr(exc, "orig", None)
    code = _mysql_code(orig)
    if code in _MYSQL_CONFIG_CODES:
        return _MYSQL_CONFIG_CODES[code]
    state = getattr(orig, "sqlstate", None)
    if isinstance(state, str) and state in _POSTGRES_CONFIG_STATES and code is None:
        return _POSTGRES_CONFIG_STATES[state]
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return config_problem_text(str(orig if orig is not None else exc))
    return None


def config_problem_text(text: str) -> str | None:
    """`config_problem` for a driver's message alone (for drivers outside SQLAlchemy: ADBC)."""
    lowered = text.lower()
    if any(word in lowered for word in _TRANSIENT_TEXTS):
        return None
    for pattern, problem in _CONFIG_TEXTS:
        if pattern.search(lowered):
            return problem
    return None


def is_unavailable(exc: DBAPIError) -> bool:
    """True for failures that a later retry may fix (server down, connection dropped)."""
    if config_problem(exc) is not None:
        return False
    if exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", None)
    if _mysql_code(orig) in _MYSQL_TRANSIENT_CODES:
        return True
    state = getattr(orig, "sqlstate", None)
    if isinstance(state, str) and (state.startswith("08") or state in _POSTGRES_TRANSIENT_STATES):
        return True
    if isinstance(exc, sa.exc.InterfaceError):
        return True
    if isinstance(exc, sa.exc.OperationalError):
        text = str(exc.orig).lower()
        retryable = (
            "connection", "connect", "server closed", "timeout", "timed out",
            "can't connect", "lost connection", "gone away", "database is locked",
            "refused", "terminating connection", "too many clients",
            "the database system is", "temporary failure in name resolution",
        )  # fmt: skip
        return any(word in text for word in retryable)
    return False


def _mysql_code(orig: object) -> int | None:
    """The error number of a PyMySQL / mysqlclient error (its first argument), else None."""
    module = type(orig).__module__
    if not (module.startswith("pymysql") or module.startswith("MySQLdb")):
        return None
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def describe_error(exc: BaseException) -> str:
    """One line of a driver error, passwords masked."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return redact_urls_in(text[0] if text else type(orig).__name__)

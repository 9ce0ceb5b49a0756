"""One run per snapshot date at a time, using the database's own locking where it has one.

- PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`) on a dedicated
  connection held for the lock's lifetime.
- MariaDB/MySQL: a named user lock (`GET_LOCK(name, 0)`) on a dedicated connection.

  Both belong to their session: if the server ends it (`pg_terminate_backend`, `KILL`,
  a restart, a dropped network), the lock is gone and another run may take the date.
  So `date_lock` hands that connection to the caller, which writes its run record and
  its publication on it: they then live and die with the lock, and a run whose lock
  session was lost cannot commit anything (the sink turns that into exit 7).
- SQLite and anything else: an exclusive, non-blocking `flock` on a lock file beside
  the database file; a process-local lock for an in-memory SQLite database.

All of these belong to a connection or an open file, so the kernel or the server frees
them when the holder dies, even by SIGKILL: a crashed run never leaves a stale lock.
Nothing here waits: a date that is taken raises `RunLocked` at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from churn_batch.db import describe_error, retrying
from churn_batch.errors import RunLocked, StorageUnavailable

log = logging.getLogger(__name__)

_MYSQL_LOCK_NAME_MAX = 64  # the server refuses longer GET_LOCK names

# For in-memory SQLite (one process by definition): the locks this process holds.
_process_locks: dict[tuple[str, str], threading.Lock] = {}
_process_locks_guard = threading.Lock()


@contextlib.contextmanager
def date_lock(engine: sa.Engine, table: str, snapshot_date: date) -> Iterator[sa.Connection | None]:
    """Hold the lock for (`table`, `snapshot_date`) in the database behind `engine`.

    Yields the connection whose session holds a server lock (None for a lock file or
    an in-process lock). Use it only in `with conn.begin():` blocks, so that no
    transaction stays open between them, and never after `conn.invalidated`: SQLAlchemy
    would silently reconnect, to a new session that does not hold the lock.

    Raises `RunLocked` at once if another process (or another connection of this one)
    holds it, `StorageUnavailable` if the database cannot be reached.
    """
    backend = engine.url.get_backend_name()
    holder: contextlib.AbstractContextManager[sa.Connection | None]
    if backend == "postgresql":
        holder = _session_lock(
            engine, snapshot_date, lambda conn: _try_postgres(conn, table, snapshot_date)
        )
    elif backend in ("mysql", "mariadb"):
        holder = _session_lock(
            engine, snapshot_date, lambda conn: _try_mysql(conn, table, snapshot_date)
        )
    elif backend == "sqlite" and engine.url.database in (None, "", ":memory:"):
        holder = _process_lock(table, snapshot_date)
    else:
        holder = _file_lock(_lock_file(engine, table, snapshot_date), snapshot_date)
    with holder as conn:
        yield conn


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for `name` (Python's `hash()` changes between processes)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def mysql_lock_name(database: str, subject: str) -> str:
    """The `GET_LOCK` name: readable when it fits in 64 characters, hashed when not.

    User locks are server-wide, so the name carries the database as well as the subject.
    """
    name = f"churn_batch:{database}.{subject}"
    if len(name) <= _MYSQL_LOCK_NAME_MAX:
        return name
    return "churn_batch:" + hashlib.blake2b(name.encode(), digest_size=24).hexdigest()


def _locked(snapshot_date: date, how: str) -> RunLocked:
    return RunLocked(f"another run holds the lock for {snapshot_date} ({how})")


@dataclass(frozen=True)
class _Attempt:
    """What trying a server-side lock on a connection gave."""

    taken: bool
    how: str  # named in `RunLocked`
    release: sa.TextClause
    params: dict[str, object]


def _try_postgres(conn: sa.Connection, table: str, snapshot_date: date) -> _Attempt:
    # Advisory keys are per database; the schema tells two sinks with one table name apart.
    schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one_or_none() or ""
    key = advisory_key(f"{schema}.{table}:{snapshot_date.isoformat()}")
    taken = conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
    return _Attempt(
        bool(taken),
        f"PostgreSQL advisory lock {key}",
        sa.text("SELECT pg_advisory_unlock(:key)"),
        {"key": key},
    )


def _try_mysql(conn: sa.Connection, table: str, snapshot_date: date) -> _Attempt:
    database = conn.execute(sa.text("SELECT DATABASE()")).scalar_one_or_none() or ""
    name = mysql_lock_name(database, f"{table}:{snapshot_date.isoformat()}")
    taken = conn.execute(sa.text("SELECT GET_LOCK(:name, 0)"), {"name": name}).scalar()
    return _Attempt(
        taken == 1,
        f"MariaDB/MySQL lock {name!r}",
        sa.text("SELECT RELEASE_LOCK(:name)"),
        {"name": name},
    )


@contextlib.contextmanager
def _session_lock(
    engine: sa.Engine,
    snapshot_date: date,
    attempt: Callable[[sa.Connection], _Attempt],
) -> Iterator[sa.Connection]:
    """A lock owned by a dedicated connection, held while the body runs; yields it.

    Session-level locks ignore transactions (a rollback keeps them), so the connection
    can run the caller's transactions too. Every statement here runs in a short
    `begin()` block: the lock must not keep a transaction open for the whole run. If
    the release fails the connection is thrown away; closing the session frees its locks.
    """

    def acquire() -> tuple[sa.Connection, _Attempt]:
        conn = engine.connect()
        try:
            with conn.begin():
                return conn, attempt(conn)
        except BaseException:
            conn.close()
            raise

    conn, result = retrying(acquire, engine.url.render_as_string(hide_password=True))
    if not result.taken:
        conn.close()
        raise _locked(snapshot_date, result.how)
    try:
        yield conn
    finally:
        _release(conn, result)


def _release(conn: sa.Connection, result: _Attempt) -> None:
    try:
        if conn.invalidated or conn.closed:
            # Using it would open a new session; the lost one took its lock with it.
            log.warning("the session holding the run lock was lost; so was its lock")
            return
        if conn.in_transaction():  # the caller's, left open by an error: not ours to keep
            conn.rollback()
        with conn.begin():
            conn.execute(result.release, result.params)
    except DBAPIError as exc:
        log.warning(
            "could not release the run lock (%s); dropping its connection", describe_error(exc)
        )
        conn.invalidate()
    finally:
        conn.close()


def _lock_file(engine: sa.Engine, table: str, snapshot_date: date) -> Path:
    """`<db>.locks/<table>-<date>.lock` beside a SQLite file; under the temp dir otherwise."""
    name = f"{table}-{snapshot_date.isoformat()}.lock"
    if engine.url.get_backend_name() == "sqlite":
        return Path(f"{engine.url.database}.locks") / name
    target = engine.url.render_as_string(hide_password=True)
    digest = hashlib.blake2b(target.encode(), digest_size=12).hexdigest()
    return Path(tempfile.gettempdir()) / "churn-batch-locks" / digest / name


@contextlib.contextmanager
def _file_lock(path: Path, snapshot_date: date) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The file is never deleted: removing it while another process waits to open it
    # would let two processes lock two different files of the same name.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _locked(snapshot_date, f"lock file {path}") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _process_lock(table: str, snapshot_date: date) -> Iterator[None]:
    key = (table, snapshot_date.isoformat())
    with _process_locks_guard:
        lock = _process_locks.setdefault(key, threading.Lock())
    if not lock.acquire(blocking=False):
        raise _locked(snapshot_date, "in-memory database, held in this process")
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def schema_lock(conn: sa.Connection, timeout_seconds: int = 60) -> Iterator[None]:
    """Serialise table creation between processes; call inside `conn`'s open transaction.

    Two runs starting at once would otherwise both find a table missing and both
    create it. PostgreSQL: a transaction-level advisory lock (its DDL is transactional,
    so the lock lasts until the tables are committed). MariaDB/MySQL: a named lock held
    until the block ends (its DDL commits as it goes). SQLite: nothing to do, the
    caller's `BEGIN IMMEDIATE` already admits one writer at a time.
    """
    backend = conn.dialect.name
    if backend == "postgresql":
        key = advisory_key("churn_batch:schema")
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        yield
    elif backend in ("mysql", "mariadb"):
        database = conn.execute(sa.text("SELECT DATABASE()")).scalar_one_or_none() or ""
        name = mysql_lock_name(database, "schema")
        got = conn.execute(
            sa.text("SELECT GET_LOCK(:name, :timeout)"), {"name": name, "timeout": timeout_seconds}
        ).scalar()
        if got != 1:
            raise StorageUnavailable(
                f"waited {timeout_seconds} s for lock {name!r} to create the churn-batch tables"
            )
        try:
            yield
        finally:
            with contextlib.suppress(DBAPIError):  # a dead session has released it already
                conn.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": name})
    else:
        yield

"""One run per date: the database's own locks (advisory, GET_LOCK) or a lock file.

Tests use a table name of their own, so locks never collide between tests on a shared
server; locks need no tables.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa

from churn_batch import locks
from churn_batch.config import SinkConfig
from churn_batch.errors import RunLocked
from churn_batch.sinks import Sink

D1 = date(2024, 3, 1)
D2 = date(2024, 3, 2)


@pytest.fixture
def make_sink(any_db_url: str) -> Iterator[Callable[[], Sink]]:
    """Sinks (separate engines, so separate connections) sharing one table name."""
    table = f"lock_{uuid.uuid4().hex[:8]}"
    made: list[Sink] = []

    def make() -> Sink:
        sink = Sink(SinkConfig(url=any_db_url, table=table))
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def assert_locked_at_once(sink: Sink, day: date) -> None:
    started = time.monotonic()
    with pytest.raises(RunLocked) as caught, sink.lock(day):
        pass
    assert time.monotonic() - started < 1.0, "a taken lock must fail at once, not wait"
    assert str(caught.value).startswith(f"another run holds the lock for {day} (")
    assert caught.value.exit_code == 8


def test_a_second_lock_on_the_same_date_fails_at_once_and_other_dates_are_free(
    make_sink: Callable[[], Sink],
) -> None:
    first, second = make_sink(), make_sink()
    with first.lock(D1):
        assert_locked_at_once(second, D1)
        assert_locked_at_once(first, D1)  # another connection of the same sink, too
        with second.lock(D2):
            assert_locked_at_once(first, D2)
    with second.lock(D1):  # released on exit
        pass


def test_the_lock_is_released_when_the_body_raises(make_sink: Callable[[], Sink]) -> None:
    sink = make_sink()
    with pytest.raises(ZeroDivisionError), sink.lock(D1):
        _ = 1 / 0
    with make_sink().lock(D1):
        pass


HOLDER = """
import sys, time
from datetime import date
from churn_batch.config import SinkConfig
from churn_batch.sinks import Sink

sink = Sink(SinkConfig(url=sys.argv[1], table=sys.argv[2]))
with sink.lock(date.fromisoformat(sys.argv[3])):
    print("ready", flush=True)
    time.sleep(120)
"""


def test_a_lock_held_by_another_process_is_freed_when_it_is_killed(
    make_sink: Callable[[], Sink],
) -> None:
    sink = make_sink()
    url = sink.config.url
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, sink.config.table, D1.isoformat()],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready and proc.stdout.readline().strip() == "ready"
            assert_locked_at_once(sink, D1)
            with sink.lock(D2):
                pass
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    # The server notices the closed socket within moments; the kernel drops a flock at once.
    deadline = time.monotonic() + 15
    while True:
        try:
            with sink.lock(D1):
                break
        except RunLocked:
            assert time.monotonic() < deadline, "the killed holder's lock was never freed"
            time.sleep(0.1)


def test_sqlite_lock_file_lives_beside_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'churn.db'}"
    with Sink(SinkConfig(url=url)) as sink, sink.lock(D1):
        assert (tmp_path / "churn.db.locks" / "churn_predictions-2024-03-01.lock").exists()


def test_in_memory_sqlite_uses_a_process_local_lock() -> None:
    engine = sa.create_engine("sqlite://")
    try:
        with locks.date_lock(engine, "t", D1):
            with pytest.raises(RunLocked, match="in-memory"), locks.date_lock(engine, "t", D1):
                pass
            with locks.date_lock(engine, "t", D2):
                pass
        with locks.date_lock(engine, "t", D1):
            pass
    finally:
        engine.dispose()


def test_lock_names_are_stable_and_fit_the_servers() -> None:
    # blake2b, not hash(): the same key in every process, signed 64-bit for PostgreSQL.
    # Pinned: two versions of the job running side by side must agree on the key.
    key = locks.advisory_key("public.churn_predictions:2024-03-01")
    assert key == 6859979152235984625
    assert key != locks.advisory_key("public.churn_predictions:2024-03-02")
    assert locks.mysql_lock_name("analytics", "churn_predictions:2024-03-01") == (
        "churn_batch:analytics.churn_predictions:2024-03-01"
    )
    long = locks.mysql_lock_name("d" * 64, "t" * 64 + ":2024-03-01")
    assert len(long) <= 64
    assert long != locks.mysql_lock_name("d" * 64, "t" * 64 + ":2024-03-02")

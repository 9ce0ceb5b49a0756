"""The sink against real databases: SQLite always, PostgreSQL and MariaDB when configured.

Each test gets a database of its own (a file on SQLite, a schema on PostgreSQL, a
database on MariaDB), so the fixed-name run tables never collide between tests.
"""

from __future__ import annotations

import functools
import math
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import sqlalchemy as sa

from churn_batch import db, sinks
from churn_batch.config import SinkConfig
from churn_batch.errors import ConfigError, DriftBlocked, RunLocked, StorageUnavailable
from churn_batch.sinks import Sink

D1 = date(2024, 3, 1)
D2 = date(2024, 3, 2)
T0 = datetime(2024, 3, 3, 1, 0, tzinfo=UTC)

# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def sink_url(any_db_url: str) -> Iterator[str]:
    """A URL to an empty database of this test's own."""
    url = sa.make_url(any_db_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        yield any_db_url
        return
    name = f"cbt_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        if backend == "postgresql":
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE SCHEMA {name}")
            own = url.update_query_dict({"options": f"-csearch_path={name}"})
            drop = f"DROP SCHEMA {name} CASCADE"
        else:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
            own = url.set(database=name)
            drop = f"DROP DATABASE {name}"
        yield own.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if backend == "postgresql":
                # A killed child's backend may still be exiting; do not wait on it forever.
                conn.exec_driver_sql("SET lock_timeout = '20s'")
            conn.exec_driver_sql(drop)
        admin.dispose()


@pytest.fixture
def make_sink(sink_url: str) -> Iterator[Callable[..., Sink]]:
    """Sinks on this test's database, closed at the end."""
    made: list[Sink] = []

    def make(table: str = "churn_predictions") -> Sink:
        sink = Sink(SinkConfig(url=sink_url, table=table))
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


@pytest.fixture
def sink(make_sink: Callable[..., Sink]) -> Sink:
    prepared = make_sink()
    prepared.prepare()
    return prepared


# -- helpers ------------------------------------------------------------------------------


def batch(ids: list[str], probabilities: list[float], tiers: list[str] | None = None) -> pa.Table:
    return pa.table(
        {
            "customer_id": pa.array(ids, pa.string()),
            "churn_probability": pa.array(probabilities, pa.float64()),
            "risk_tier": pa.array(tiers or ["low"] * len(ids), pa.string()),
        }
    )


def publish(sink: Sink, day: date, rows: pa.Table, run_id: str, model_version: str = "v1") -> None:
    with sink.lock(day):
        sink.begin_run(run_id, day, T0, model_version)
        with sink.publication(day, run_id, model_version, T0) as pub:
            pub.write_predictions(rows)
            pub.finish_run(
                run_id, "succeeded", rows_read=rows.num_rows, rows_scored=rows.num_rows,
                rows_rejected=0, error=None, summary={"rows": rows.num_rows},
            )  # fmt: skip


def contents(sink: Sink, table: str | None = None) -> list[tuple[Any, ...]]:
    """Every row of a table, all columns, sorted: what 'exactly as before' compares."""
    engine = db.create_engine(sink.config.url)
    try:
        with engine.connect() as conn:
            name = table or sink.config.table
            rows = conn.execute(sa.text(f"SELECT * FROM {name}")).all()  # test-only name
        return sorted(tuple(row) for row in rows)
    finally:
        engine.dispose()


def columns_of(engine: sa.Engine, table: str) -> list[tuple[str, str, bool]]:
    columns = sa.inspect(engine).get_columns(table)
    return [(column["name"], repr(column["type"]), column["nullable"]) for column in columns]


def count_where_run(sink: Sink, table: str, run_id: str) -> int:
    engine = db.create_engine(sink.config.url)
    try:
        with engine.connect() as conn:
            query = sa.text(f"SELECT COUNT(*) FROM {table} WHERE run_id = :run_id")
            return int(conn.execute(query, {"run_id": run_id}).scalar_one())
    finally:
        engine.dispose()


# -- schema ---------------------------------------------------------------------------------


def test_prepare_creates_tables_and_view_and_is_idempotent(
    make_sink: Callable[..., Sink],
) -> None:
    sink = make_sink()
    sink.prepare()
    sink.prepare()
    engine = db.create_engine(sink.config.url)
    try:
        inspector = sa.inspect(engine)
        assert {
            "churn_predictions", "churn_scoring_runs", "churn_rejected_rows", "churn_drift_metrics"
        } <= set(inspector.get_table_names())  # fmt: skip
        assert "churn_predictions_latest" in inspector.get_view_names()
        key = inspector.get_pk_constraint("churn_predictions")["constrained_columns"]
        assert key == ["snapshot_date", "customer_id"]
    finally:
        engine.dispose()
    assert sink.published_dates() == []
    assert "churn_predictions at " in sink.describe()


def test_prepare_is_safe_when_several_runs_start_at_once(
    make_sink: Callable[..., Sink],
) -> None:
    racers = [make_sink() for _ in range(4)]
    start = threading.Barrier(len(racers))
    errors: list[BaseException] = []

    def race(sink: Sink) -> None:
        start.wait()
        try:
            sink.prepare()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(sink,)) for sink in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    publish(racers[0], D1, batch(["a"], [0.5]), "r1")


def test_prepare_refuses_an_existing_table_that_does_not_match(
    make_sink: Callable[..., Sink],
) -> None:
    sink = make_sink("legacy_predictions")
    engine = db.create_engine(sink.config.url)
    server = engine.dialect.name != "sqlite"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE legacy_predictions (snapshot_date DATE NOT NULL, "
            "customer_id VARCHAR(128) NOT NULL, churn_probability VARCHAR(10) NOT NULL, "
            "risk_tier VARCHAR(8) NOT NULL, model_version VARCHAR(64) NOT NULL, "
            "run_id VARCHAR(36) NOT NULL, PRIMARY KEY (snapshot_date, customer_id))"
        )
        if server:  # single precision: would not keep probabilities to 1e-9
            single = "REAL" if engine.dialect.name == "postgresql" else "FLOAT"
            conn.exec_driver_sql(
                "CREATE TABLE single_predictions (snapshot_date DATE NOT NULL, "
                f"customer_id VARCHAR(128) NOT NULL, churn_probability {single} NOT NULL, "
                "risk_tier VARCHAR(8) NOT NULL, model_version VARCHAR(64) NOT NULL, "
                "run_id VARCHAR(36) NOT NULL, scored_at TIMESTAMP NOT NULL, "
                "PRIMARY KEY (snapshot_date, customer_id))"
            )
    before = columns_of(engine, "legacy_predictions")
    engine.dispose()

    with pytest.raises(ConfigError) as caught:
        sink.prepare()
    message = str(caught.value)
    assert "existing table legacy_predictions" in message
    assert "column churn_probability is VARCHAR(10), expected a floating-point column" in message
    assert "column scored_at is missing" in message

    engine = db.create_engine(sink.config.url)
    assert columns_of(engine, "legacy_predictions") == before  # never altered
    engine.dispose()

    if server:
        with pytest.raises(ConfigError, match=r"churn_probability is .*single precision"):
            make_sink("single_predictions").prepare()


def test_an_unreachable_database_is_storage_unavailable_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sinks, "retrying", functools.partial(db.retrying, delays=(0.0,)))
    url = "postgresql+psycopg://churn:s3cret-pw@127.0.0.1:1/nowhere"
    sink = Sink(SinkConfig(url=url))
    try:
        assert "s3cret-pw" not in sink.describe()
        with pytest.raises(StorageUnavailable) as caught:
            sink.prepare()
        assert "s3cret-pw" not in str(caught.value)
        assert "after 2 attempts" in str(caught.value)
    finally:
        sink.close()


# -- publication ----------------------------------------------------------------------------


def test_republishing_a_date_replaces_it_and_leaves_other_dates_alone(sink: Sink) -> None:
    publish(sink, D1, batch(["a", "b", "c"], [0.1, 0.2, 0.3]), "r1")
    publish(sink, D2, batch(["a", "b"], [0.4, 0.5], ["high", "medium"]), "r2")
    d2_before = sink.predictions(D2)

    publish(sink, D1, batch(["b", "d"], [0.7, 0.8], ["high", "high"]), "r3", "v2")

    d1 = sink.predictions(D1)
    assert d1.to_pylist() == [
        {"customer_id": "b", "churn_probability": 0.7, "risk_tier": "high",
         "model_version": "v2", "run_id": "r3"},
        {"customer_id": "d", "churn_probability": 0.8, "risk_tier": "high",
         "model_version": "v2", "run_id": "r3"},
    ]  # fmt: skip
    assert sink.predictions(D2).equals(d2_before)
    assert len(contents(sink)) == 4  # no duplicates anywhere
    assert sink.published_dates() == [D1, D2]
    latest = contents(sink, "churn_predictions_latest")
    assert {(str(row[0]), row[1]) for row in latest} == {(str(D2), "a"), (str(D2), "b")}


def test_an_exception_inside_the_publication_rolls_everything_back(sink: Sink) -> None:
    publish(sink, D1, batch(["a", "b", "c"], [0.1, 0.2, 0.3]), "r1")
    publish(sink, D2, batch(["x"], [0.9]), "r2")
    before = contents(sink)
    rejected = pa.table(
        {"customer_id": ["z", None], "reason": ["bad", "missing id"], "raw": ['{"a": 1}', "{}"]}
    )

    with sink.lock(D1):
        sink.begin_run("r3", D1, T0, "v2")
        with (
            pytest.raises(DriftBlocked),
            sink.publication(D1, "r3", "v2", T0) as pub,
        ):
            pub.write_predictions(batch(["a", "new"], [0.6, 0.7]))
            pub.write_rejected(rejected)
            pub.write_metrics([("tenure", "psi", 0.4)])
            raise DriftBlocked("drift gate blocked publication")
        assert contents(sink) == before
        assert count_where_run(sink, "churn_rejected_rows", "r3") == 0
        assert count_where_run(sink, "churn_drift_metrics", "r3") == 0

        # What a failed run keeps afterwards, each in its own transaction.
        sink.finish_run(
            "r3", "blocked", rows_read=2, rows_scored=2, rows_rejected=2,
            error="drift gate blocked publication", summary={"psi": {"tenure": 0.4}},
        )  # fmt: skip
        sink.write_rejected("r3", D1, rejected)
        sink.write_metrics("r3", D1, [("tenure", "psi", 0.4), ("contract", "psi", math.nan)])
    assert count_where_run(sink, "churn_rejected_rows", "r3") == 2
    assert count_where_run(sink, "churn_drift_metrics", "r3") == 2
    assert sink.runs(1, D1)[0]["status"] == "blocked"
    assert contents(sink) == before


def test_bad_predictions_are_refused_before_they_reach_the_table(sink: Sink) -> None:
    publish(sink, D1, batch(["a"], [0.1]), "r1")
    before = contents(sink)
    bad = [
        (batch(["a"], [math.nan]), "must lie in"),
        (batch(["a"], [1.5]), "must lie in"),
        (batch(["x" * 129], [0.5]), "longer than 128"),
        (pa.table({"customer_id": ["a"], "churn_probability": [0.5]}), "lacks column"),
        (pa.table({"customer_id": [None], "churn_probability": [0.5], "risk_tier": ["low"]}),
         "null customer_id"),
    ]  # fmt: skip
    for rows, message in bad:
        with pytest.raises(ValueError, match=message), sink.publication(D1, "r2", "v1", T0) as pub:
            pub.write_predictions(rows)
    with pytest.raises(ValueError, match="timezone-aware"):
        sink.publication(D1, "r2", "v1", datetime(2024, 1, 1)).__enter__()
    # A repeated id is the primary key's to refuse, on every write path (COPY included).
    with pytest.raises(sa.exc.IntegrityError), sink.publication(D1, "r2", "v1", T0) as pub:
        pub.write_predictions(batch(["dup", "dup"], [0.1, 0.2]))
    assert contents(sink) == before


def test_sinks_that_cannot_work_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="in-memory SQLite"):
        Sink(SinkConfig(url="sqlite://"))
    with pytest.raises(ConfigError, match=r"sink\.table: at most 56 characters"):
        Sink(SinkConfig(url=f"sqlite:///{tmp_path / 'x.db'}", table="t" * 57))


def test_probabilities_and_ids_round_trip_exactly(
    sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    edge = [0.0, 1.0, 5e-324, 2.2250738585072014e-308, 1 - 2**-53, 0.1, 1 / 3, 0.30000000000000004]
    generator = random.Random(7)
    probabilities = edge + [generator.random() for _ in range(3000)]
    ids = [f"c{i:05d}" for i in range(len(probabilities))]
    # Distinct ids that case- or pad-insensitive collations would merge.
    ids[:6] = ["abc", "ABC", "abc ", "straße", "strasse", "Ω"]
    publish(sink, D1, batch(ids, probabilities), "r1")

    got = sink.predictions(D1)
    assert got.schema == sinks.PREDICTION_SCHEMA
    expected = dict(zip(ids, probabilities, strict=True))
    assert got.num_rows == len(expected)
    assert dict(zip(got["customer_id"].to_pylist(), got["churn_probability"].to_pylist(),
                    strict=True)) == expected  # fmt: skip
    assert got["customer_id"].to_pylist() == sorted(ids, key=lambda s: s.encode())
    # The constant columns too, whichever path wrote them (binary COPY on PostgreSQL).
    p = sink.tables.predictions
    engine = db.create_engine(sink.config.url)
    with engine.connect() as conn:
        query = sa.select(p.c.snapshot_date, p.c.model_version, p.c.run_id, p.c.scored_at)
        assert set(conn.execute(query.distinct()).all()) == {(D1, "v1", "r1", T0)}
    fast_path = {
        "postgresql": sinks._copy_predictions_psycopg,
        "sqlite": sinks._insert_predictions_sqlite,  # 3,008 rows: full and partial statements
    }
    assert sinks._prediction_writer(engine.dialect) is fast_path.get(
        engine.dialect.name, sinks._insert_predictions
    )
    engine.dispose()

    # The portable executemany path (PostgreSQL and SQLite normally take theirs) is exact too.
    monkeypatch.setattr(sinks, "_prediction_writer", lambda dialect: sinks._insert_predictions)
    publish(sink, D2, batch(ids[:50], probabilities[:50]), "r2")
    again = sink.predictions(D2)
    stored = zip(
        again["customer_id"].to_pylist(), again["churn_probability"].to_pylist(), strict=True
    )
    assert dict(stored) == dict(zip(ids[:50], probabilities[:50], strict=True))


# -- runs -----------------------------------------------------------------------------------


def test_runs_abandon_leftovers_finish_with_a_status_and_list_newest_first(sink: Sink) -> None:
    with sink.lock(D1):
        assert sink.begin_run("r1", D1, T0, None) == 0  # then the process "dies"
    with sink.lock(D2):
        assert sink.begin_run("other-date", D2, T0 + timedelta(minutes=1), None) == 0
    with sink.lock(D1):
        assert sink.begin_run("r2", D1, T0 + timedelta(minutes=2), "v1") == 1
        sink.finish_run(
            "r2", "failed", rows_read=10, rows_scored=0, rows_rejected=10,
            error="cannot reach postgresql://churn:hunter22@db/x", summary={"psi": math.inf},
            model_version="v2",
        )  # fmt: skip

    runs = sink.runs()
    assert [run["run_id"] for run in runs] == ["r2", "other-date", "r1"]
    r2, other, r1 = runs
    assert r1["status"] == "abandoned"
    assert r1["error"] == sinks.ABANDONED_ERROR
    assert r1["finished_at"] is not None and r1["finished_at"].tzinfo is not None
    assert other["status"] == "running"  # another date's run is not this run's leftover
    assert r2["status"] == "failed"
    assert r2["started_at"] == T0 + timedelta(minutes=2)
    assert r2["model_version"] == "v2"
    assert (r2["rows_read"], r2["rows_scored"], r2["rows_rejected"]) == (10, 0, 10)
    assert "hunter22" not in r2["error"]
    assert r2["summary"] == {"psi": None}
    assert [run["run_id"] for run in sink.runs(limit=1)] == ["r2"]
    assert [run["run_id"] for run in sink.runs(snapshot_date=D2)] == ["other-date"]

    for status in ("succeeded", "blocked"):
        sink.finish_run("other-date", status, rows_read=1, rows_scored=1, rows_rejected=0,
                        error=None, summary=None)  # fmt: skip
        assert sink.runs(snapshot_date=D2)[0]["status"] == status
    with pytest.raises(ValueError, match="not 'running'"):
        sink.finish_run("r2", "running", rows_read=None, rows_scored=None, rows_rejected=None,
                        error=None, summary=None)  # fmt: skip
    with pytest.raises(LookupError, match="no run 'nope'"):
        sink.finish_run("nope", "failed", rows_read=None, rows_scored=None, rows_rejected=None,
                        error=None, summary=None)  # fmt: skip


# -- a run killed in the middle of its publication ---------------------------------------------

KILLED_PUBLISHER = """
import sys, time
from datetime import UTC, date, datetime
import pyarrow as pa
from churn_batch.config import SinkConfig
from churn_batch.sinks import Sink

url, day = sys.argv[1], date.fromisoformat(sys.argv[2])
sink = Sink(SinkConfig(url=url))
with sink.lock(day):
    sink.begin_run("killed", day, datetime.now(UTC), "v-killed")
    with sink.publication(day, "killed", "v-killed", datetime.now(UTC)) as pub:
        ids = [f"k{i:05d}" for i in range(5000)]
        pub.write_predictions(pa.table({
            "customer_id": ids, "churn_probability": [0.99] * len(ids),
            "risk_tier": ["high"] * len(ids),
        }))
        print("ready", flush=True)
        time.sleep(120)
"""


def wait_for_line(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the child never reported"
    return proc.stdout.readline().strip()


def retry_until(action: Callable[[], Any], timeout: float = 15) -> Any:
    """The server frees a killed session's locks when it notices the socket closed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except RunLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_run_killed_mid_publication_leaves_the_previous_predictions(
    sink: Sink, make_sink: Callable[..., Sink]
) -> None:
    publish(sink, D1, batch(["a", "b", "c"], [0.1, 0.2, 0.3]), "r1")
    publish(sink, D2, batch(["x"], [0.9]), "r2")
    before = contents(sink)
    d1_before = sink.predictions(D1)

    with subprocess.Popen(
        [sys.executable, "-c", KILLED_PUBLISHER, sink.config.url, D1.isoformat()],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    ) as proc:  # fmt: skip
        try:
            assert wait_for_line(proc) == "ready"
            # Mid-publication: readers still see the old rows, and the date is locked.
            assert sink.predictions(D1).equals(d1_before)
            started = time.monotonic()
            with pytest.raises(RunLocked, match=f"another run holds the lock for {D1}"):
                sink.lock(D1).__enter__()
            assert time.monotonic() - started < 2
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert contents(sink) == before
    assert sink.predictions(D1).equals(d1_before)
    again = make_sink()
    lock = retry_until(lambda: _entered(again.lock(D1)))
    try:
        assert again.begin_run("r3", D1, T0, "v3") == 1  # the killed run, now 'abandoned'
        with again.publication(D1, "r3", "v3", T0) as pub:
            pub.write_predictions(batch(["a", "z"], [0.5, 0.6]))
    finally:
        lock.__exit__(None, None, None)
    assert again.predictions(D1)["customer_id"].to_pylist() == ["a", "z"]
    statuses = {run["run_id"]: run["status"] for run in again.runs(snapshot_date=D1)}
    assert statuses == {"r1": "succeeded", "killed": "abandoned", "r3": "running"}


def _entered(manager: Any) -> Any:
    manager.__enter__()
    return manager

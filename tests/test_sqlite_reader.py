"""SQLite is read by ADBC in a child process: the job's own process has one SQLite library.

Two copies of SQLite in one process on one file corrupt it (see churn_batch.sqlite_reader):
these tests prove the job's process never maps ADBC's copy while the reader child does,
that the child streams exactly what the row path reads, and that it is always reaped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import pyarrow as pa
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from churn_batch import sqlite_reader, synthetic
from churn_batch.config import Config
from churn_batch.sql_source import SQLITE_CHILD_MIN_ROWS
from churn_batch.sqlite_reader import PortablePathNeeded, ReaderFailed, ReadRequest

from .processes import kill_and_reap, wait_for_file
from .scoring_fixtures import LAST, predictions, run_cli, sqlite_db, write_config

ADBC_SQLITE_LIBRARY = "libadbc_driver_sqlite"
DEADLINE_SECONDS = 120.0


def _publish(project: Config) -> list[tuple[object, ...]]:
    """Score LAST once; its published rows, which a failed run must leave as they are."""
    result = run_cli("--config", str(project.path), "score", "--date", LAST.isoformat())
    assert result.returncode == 0, result.stderr
    rows = predictions(project.path.parent / "data" / "churn.db", LAST)
    assert rows
    return rows


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(child) for child in text)
    return found


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_the_job_process_never_loads_adbc_sqlite_while_its_reader_child_does(
    project: Config, tmp_path: Path
) -> None:
    root = project.path.parent
    # Enough rows for the reader process (fewer are read in-process, as rows).
    engine = sa.create_engine(f"sqlite:///{root / 'data' / 'churn.db'}", poolclass=NullPool)
    day = synthetic.generate_snapshot(SQLITE_CHILD_MIN_ROWS + 1000, LAST, seed=5)
    synthetic.write_sql([(LAST, day)], engine)
    engine.dispose()
    write_config(root, batch_size=5000)  # several batches, so the reader is still streaming
    before = _publish(project)
    pauses = tmp_path / "pauses"
    env = {
        **os.environ,
        "CHURN_BATCH_FAILPOINTS": "publish.write@2=pause",
        "CHURN_BATCH_FAILPOINT_DIR": str(pauses),
    }
    exe = Path(sys.executable).parent / "churn-batch"
    child = subprocess.Popen(
        [str(exe), "--config", str(project.path), "score", "--date", LAST.isoformat()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_file(pauses / "publish.write", child)
        assert ADBC_SQLITE_LIBRARY not in _maps(child.pid)
        readers = [pid for pid in _children(child.pid) if ADBC_SQLITE_LIBRARY in _maps(pid)]
        assert len(readers) == 1, "the snapshot is read by ADBC in one child process"
    finally:
        kill_and_reap(child, group=True)
    assert predictions(root / "data" / "churn.db", LAST) == before


def _table(db: Path, rows: list[tuple[object, ...]], declared: str = "") -> None:
    with sqlite_db(db) as conn:
        conn.execute(f"CREATE TABLE t (id {declared}, x {declared})")
        conn.executemany("INSERT INTO t VALUES (?, ?)", rows)


def _request(db: Path, numeric: list[str], batch_rows: int = 2) -> ReadRequest:
    return ReadRequest(
        database=str(db),
        sql="SELECT id, x FROM t WHERE x >= ? ORDER BY id",
        params=[0],
        batch_rows=batch_rows,
        numeric_columns=numeric,
    )


def test_the_child_streams_every_row_in_bounded_batches(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    rows = [(i, float(i) / 3) for i in range(11)]
    _table(db, rows, "REAL")
    batches = list(sqlite_reader.read(_request(db, ["id", "x"], batch_rows=4)))
    assert [b.num_rows for b in batches] == [4, 4, 3]
    table = pa.Table.from_batches(batches)
    assert list(zip(*(c.to_pylist() for c in table.columns), strict=True)) == rows


def test_text_in_a_numeric_column_needs_the_row_path(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    _table(db, [("a", 1.0), ("b", 2.0)])
    with pytest.raises(PortablePathNeeded, match="column id holds text"):
        list(sqlite_reader.read(_request(db, ["id", "x"])))


def test_a_later_value_of_another_storage_class_needs_the_row_path(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    _table(db, [(1, 1.0), (2, 2.0), (3, 3.0), ("x", 4.0)])
    with pytest.raises(PortablePathNeeded, match="mixes storage classes"):
        list(sqlite_reader.read(_request(db, ["id", "x"])))


def test_a_failing_query_is_reported_with_the_drivers_message(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    _table(db, [(1, 1.0)])
    bad = ReadRequest(str(db), "SELECT nope FROM t", [], 10, [])
    with pytest.raises(ReaderFailed, match="no such column: nope"):
        list(sqlite_reader.read(bad))


def test_stopping_early_kills_and_reaps_the_child(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    _table(db, [(i, float(i)) for i in range(20_000)], "REAL")
    stream = sqlite_reader.read(_request(db, ["id", "x"], batch_rows=10))
    next(stream)
    mine = set(_children(os.getpid()))
    assert mine, "a reader child is running"
    stream.close()
    assert not set(_children(os.getpid())) & mine, "the child was reaped"


def test_a_source_table_without_the_id_column_is_a_contract_violation(
    project: Config,
) -> None:
    db = project.path.parent / "data" / "churn.db"
    before = _publish(project)
    with sqlite_db(db) as conn:
        conn.execute("ALTER TABLE customer_snapshots RENAME COLUMN customer_id TO cust")
    result = run_cli("--config", str(project.path), "score", "--date", LAST.isoformat())
    assert result.returncode == 4, result.stderr
    assert "Error: snapshot is missing required column(s): customer_id (found: " in result.stderr
    assert predictions(db, LAST) == before


def test_a_query_without_the_id_column_is_a_contract_violation(project: Config) -> None:
    db = project.path.parent / "data" / "churn.db"
    with sqlite_db(db) as conn:
        names = [r[1] for r in conn.execute("PRAGMA table_info(customer_snapshots)")]
    kept = ", ".join(n for n in names if n != "customer_id")
    query = f"SELECT {kept} FROM customer_snapshots WHERE snapshot_date = :snapshot_date"
    project.path.write_text(
        project.path.read_text().replace('table = "customer_snapshots"', f'query = "{query}"')
    )
    result = run_cli("--config", str(project.path), "score", "--date", LAST.isoformat())
    assert result.returncode == 4, result.stderr
    assert "Error: snapshot is missing required column(s): customer_id (found: " in result.stderr


def test_ids_that_differ_only_in_case_are_two_customers_on_a_nocase_column(
    project: Config,
) -> None:
    """SQLite's NOCASE collation, like MariaDB's default, must not merge ids."""
    db = project.path.parent / "data" / "churn.db"
    day = LAST.isoformat()
    with sqlite_db(db) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(customer_snapshots)")]
        conn.execute("ALTER TABLE customer_snapshots RENAME TO old_snapshots")
        declared = ", ".join(
            f"{c} TEXT COLLATE NOCASE" if c == "customer_id" else c for c in columns
        )
        conn.execute(f"CREATE TABLE customer_snapshots ({declared})")
        conn.execute("INSERT INTO customer_snapshots SELECT * FROM old_snapshots")
        first = conn.execute(
            "SELECT customer_id FROM customer_snapshots WHERE snapshot_date = ? "
            "ORDER BY customer_id LIMIT 1",
            (day,),
        ).fetchone()[0]
        twin = first.lower() if first != first.lower() else first.upper()
        assert twin != first
        conn.execute(
            "INSERT INTO customer_snapshots SELECT * FROM old_snapshots "
            "WHERE snapshot_date = ? AND customer_id = ?",
            (day, first),
        )
        conn.execute(
            "UPDATE customer_snapshots SET customer_id = ? WHERE rowid = (SELECT MAX(rowid) "
            "FROM customer_snapshots)",
            (twin,),
        )
        expected = conn.execute(
            "SELECT COUNT(*) FROM customer_snapshots WHERE snapshot_date = ?", (day,)
        ).fetchone()[0]
    result = run_cli("--config", str(project.path), "score", "--date", day)
    assert result.returncode == 0, result.stderr
    published = {row[1] for row in predictions(db, date.fromisoformat(day))}
    assert {first, twin} <= published
    assert len(published) == expected

"""Crashes: SIGKILL at every failpoint of a run loses, duplicates and half-publishes nothing.

For each (database, failpoint) a real `churn-batch score` process is killed by SIGKILL
at exactly that moment (the failpoint kills its own process, so the moment is reached
for certain, not guessed with a timer; return code -9 proves it). Then:

- every published row (the killed date's and the other date's) is exactly what it was,
  `run_id` and `scored_at` included;
- the killed run's record is left `running`, as a dead process leaves it;
- the next normal run marks that record `abandoned`, succeeds, and publishes exactly the
  rows a clean run publishes;
- on SQLite the file passes `PRAGMA integrity_check` after the kill and after the re-run.

The snapshots are small (600 customers) and read in batches of 97 rows, so a date is
six batches and "a later batch" is really mid-stream.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner

from churn_batch import synthetic
from churn_batch.cli import app
from churn_batch.config import load_config
from churn_batch.errors import RunLocked
from churn_batch.sinks import Sink

from .conftest import MARIADB_ENV, POSTGRES_ENV, server_url
from .scoring_fixtures import CUSTOMERS, DAYS, FIRST, LAST, run_cli, write_config

BATCH = 97  # rows per batch: the killed date is read, checked, scored and written in 6
DEADLINE = 120.0  # seconds to wait for a dead run's lock to be freed (server side)

# (failpoint, n-th hit to kill at). Every point a run passes, in the order it passes them.
POINTS = [
    ("run.started", 1),  # the run record is committed, nothing read yet
    ("read.batch", 2),  # read thread, second batch
    ("check.batch", 2),  # check thread, second batch
    ("score.batch", 2),  # main thread, second batch scored, not yet queued for writing
    ("publish.write", 1),  # first batch queued into the open publication
    ("publish.write", 5),  # mid-stream: four batches already in the open transaction
    ("publish.before_commit", 1),  # everything written, run marked succeeded, no commit
    ("run.record_failure", 1),  # the run failed for a contract reason and rolled back
]
# MariaDB costs a server round trip per test like PostgreSQL; the points where its
# transaction holds the most (mid-write, before commit) and the failure path suffice.
MARIADB_POINTS = [("publish.write", 5), ("publish.before_commit", 1), ("run.record_failure", 1)]

# The failing run for `run.record_failure`: the snapshot lacks a required column (exit 4
# when not killed). A query instead of the table, so the data itself stays as it is.
_KEPT = [c for c in synthetic.COLUMNS if c != "tech_support"]
MISSING_COLUMN_QUERY = (
    f"SELECT {', '.join(_KEPT)} FROM customer_snapshots WHERE snapshot_date = :snapshot_date"
)

runner = CliRunner()


def _cases() -> list[Any]:
    cases = []
    for database, points, marks in [
        ("sqlite", POINTS, ()),
        ("postgres", POINTS, (pytest.mark.postgres,)),
        ("mariadb", MARIADB_POINTS, (pytest.mark.mariadb,)),
    ]:
        for point, nth in points:
            cases.append(
                pytest.param(database, point, nth, marks=marks, id=f"{database}-{point}@{nth}")
            )
    return cases


@dataclass
class Store:
    """A project whose snapshots and predictions live in one database."""

    root: Path
    url: str

    @property
    def config_path(self) -> Path:
        return self.root / "churn.toml"

    def rows(self, statement: str) -> list[tuple[Any, ...]]:
        engine = sa.create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(sa.text(statement))]
        finally:
            engine.dispose()

    def predictions(self) -> list[tuple[Any, ...]]:
        """Every published row of every date, every column, in a fixed order."""
        return sorted(self.rows("SELECT * FROM churn_predictions"))

    def runs(self) -> dict[str, str]:
        return {
            str(r[0]): str(r[1]) for r in self.rows("SELECT run_id, status FROM churn_scoring_runs")
        }

    def integrity(self) -> list[tuple[Any, ...]]:
        return self.rows("PRAGMA integrity_check")


def _score_in_process(config_path: Path, day: str) -> str:
    result = runner.invoke(app, ["--config", str(config_path), "score", "--date", day])
    assert result.exit_code == 0, result.output
    return result.output


def _publish_baseline(root: Path, url: str) -> None:
    """Publish FIRST and LAST with the same batch size the killed run will use."""
    write_config(root, source_url=url, batch_size=BATCH)
    for day in (FIRST, LAST):
        _score_in_process(root / "churn.toml", day.isoformat())


@pytest.fixture(scope="module")
def sqlite_baseline(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite project with FIRST and LAST published, built once and copied per test."""
    root = tmp_path_factory.mktemp("crash-baseline")
    shutil.copytree(template.parent, root, dirs_exist_ok=True)
    _publish_baseline(root, "sqlite:///data/churn.db")
    return root


@contextmanager
def _server_namespace(env: str, postgres: bool) -> Iterator[str]:
    """A URL into a fresh PostgreSQL schema or MariaDB database, dropped afterwards
    (the pattern of `namespace_url` in test_job_servers.py)."""
    base = server_url(env)
    name = f"cbc_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base, poolclass=NullPool)
    url = sa.make_url(base)
    kind, cascade = ("SCHEMA", " CASCADE") if postgres else ("DATABASE", "")
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE {kind} {name}"))
    if postgres:
        url = url.update_query_dict({"options": f"-csearch_path={name}"})
    else:
        url = url.set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP {kind} IF EXISTS {name}{cascade}"))
        admin.dispose()


@pytest.fixture
def store(request: pytest.FixtureRequest, template: Path, tmp_path: Path) -> Iterator[Store]:
    database = request.node.callspec.params["database"]
    root = tmp_path / "p"
    if database == "sqlite":
        shutil.copytree(request.getfixturevalue("sqlite_baseline"), root)
        yield Store(root, f"sqlite:///{root / 'data' / 'churn.db'}")
        return
    postgres = database == "postgres"
    with _server_namespace(POSTGRES_ENV if postgres else MARIADB_ENV, postgres) as url:
        root.mkdir()
        shutil.copytree(template.parent / "models", root / "models")
        engine = sa.create_engine(url, poolclass=NullPool)
        synthetic.write_sql(synthetic.generate_snapshots(CUSTOMERS, FIRST, DAYS, seed=3), engine)
        engine.dispose()
        _publish_baseline(root, url)
        yield Store(root, url)


def _wait_until_lock_is_free(store: Store) -> None:
    """A server notices a dead client's socket a moment later; until then its session,
    and the run lock on it, live on. Wait for the lock itself, not for a while."""
    deadline = time.monotonic() + DEADLINE
    with Sink(load_config(store.config_path).sink) as sink:
        while True:
            try:
                with sink.lock(LAST):
                    return
            except RunLocked:
                assert time.monotonic() < deadline, f"the dead run's lock on {LAST} was kept"
                time.sleep(0.05)


@pytest.mark.parametrize(("database", "point", "nth"), _cases())
def test_sigkill_at_a_failpoint_loses_nothing(
    store: Store, database: str, point: str, nth: int
) -> None:
    before = store.predictions()
    runs_before = store.runs()
    assert {str(r[0]) for r in before} == {FIRST.isoformat(), LAST.isoformat()}
    assert set(runs_before.values()) == {"succeeded"}

    config_path = store.config_path
    if point == "run.record_failure":
        config_path = store.root / "failing.toml"
        text = store.config_path.read_text()
        config_path.write_text(
            text.replace('table = "customer_snapshots"', f'query = "{MISSING_COLUMN_QUERY}"')
        )
    env = {**os.environ, "CHURN_BATCH_FAILPOINTS": f"{point}=kill@{nth}"}
    killed = run_cli("--config", str(config_path), "score", "--date", LAST.isoformat(), env=env)
    assert killed.returncode == -9, f"not killed at {point}@{nth}:\n{killed.stderr}"

    assert store.predictions() == before, "every published row exactly as it was"
    runs = store.runs()
    (dead,) = runs.keys() - runs_before.keys()
    assert runs == {**runs_before, dead: "running"}
    if database == "sqlite":
        assert store.integrity() == [("ok",)]

    _wait_until_lock_is_free(store)
    output = _score_in_process(store.config_path, LAST.isoformat())
    published = [r for r in before if str(r[0]) == LAST.isoformat()]
    assert f"Published {len(published):,} predictions for {LAST}" in output
    runs = store.runs()
    (again,) = runs.keys() - runs_before.keys() - {dead}
    assert runs == {**runs_before, dead: "abandoned", again: "succeeded"}

    after = store.predictions()
    assert [r for r in after if str(r[0]) != LAST.isoformat()] == [
        r for r in before if str(r[0]) != LAST.isoformat()
    ], "the other date untouched"
    rescored = [r for r in after if str(r[0]) == LAST.isoformat()]
    # Same snapshot, model and batches: the same rows, now from the new run.
    assert [r[:5] for r in rescored] == [r[:5] for r in published]
    assert {r[5] for r in rescored} == {again}
    assert len({r[6] for r in rescored}) == 1
    assert {r[6] for r in rescored} != {r[6] for r in published}
    if database == "sqlite":
        assert store.integrity() == [("ok",)]

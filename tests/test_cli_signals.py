"""A stop signal (SIGTERM, Ctrl-C) ends `score` and `backfill` with a word and an exit code.

Each run is stopped at an exact moment reached by a failpoint (a `pause` touches a file
and waits in the main thread; a `term` signals the process itself), never guessed with a
timer. The signal unwinds the run: the publication rolls back, the run is recorded as
failed with the signal's name, the process exits 128 + the signal's number (never dies
by it), the date keeps its previous predictions byte for byte, and the next run works.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from churn_batch import job, synthetic
from churn_batch import prefetch as prefetch_module
from churn_batch.config import load_config
from churn_batch.prefetch import prefetch

from .conftest import MARIADB_ENV, POSTGRES_ENV, server_url
from .processes import kill_and_reap, wait_for_file
from .scoring_fixtures import (
    CUSTOMERS,
    FIRST,
    LAST,
    copy_project,
    predictions,
    run_cli,
    sqlite_db,
    write_config,
)

EXE = Path(sys.executable).parent / "churn-batch"
DEADLINE = 120.0  # seconds: generous on a loaded 2-core machine; nothing here sleeps
RECORDED = "nothing was published, the previous predictions stay"  # in the runs table
UNTOUCHED = "nothing was published: the previous predictions of the date stay as they were"
BATCHES = -(-CUSTOMERS // 250)  # the fixtures' batch_size: publish.write hits per date


def db(root: Path) -> Path:
    return root / "data" / "churn.db"


def publish(root: Path, day: date) -> None:
    """Score `day` in this process, for the runs around the stopped one: the children run
    the CLI's own path, and a CLI start-up costs seconds on a loaded machine."""
    job.score_date(load_config(root / "churn.toml"), day)


def runs(root: Path, day: date) -> list[dict[str, Any]]:
    """The runs of `day`, oldest first."""
    with sqlite_db(db(root)) as conn:
        conn.row_factory = lambda cursor, row: {
            col[0]: value for col, value in zip(cursor.description, row, strict=True)
        }
        return list(
            conn.execute(
                "SELECT * FROM churn_scoring_runs WHERE snapshot_date = ? ORDER BY started_at",
                (day.isoformat(),),
            )
        )


def start(root: Path, failpoints: str, *args: str) -> tuple[subprocess.Popen[str], Path]:
    """The CLI in a child process, armed with `failpoints`; its stdout/stderr go to files."""
    paused = root / "failpoints"
    env = {**os.environ, "CHURN_BATCH_FAILPOINTS": failpoints,
           "CHURN_BATCH_FAILPOINT_DIR": str(paused)}  # fmt: skip
    out, err = (root / "child.out").open("w"), (root / "child.err").open("w")
    with out, err:  # the child holds its own copies of the descriptors
        child = subprocess.Popen(
            [str(EXE), "--config", str(root / "churn.toml"), *args],
            stdout=out, stderr=err, env=env, text=True, preexec_fn=_stop_signals_by_default,
        )  # fmt: skip
    return child, paused


def _stop_signals_by_default() -> None:
    """In the child, before exec: stop signals at their defaults. A test run started in
    the background of a non-interactive shell (nohup, some CI runners) inherits SIGINT
    ignored, and churn-batch, like Python itself, leaves an ignored signal ignored."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def output(root: Path) -> tuple[str, str]:
    return (root / "child.out").read_text(), (root / "child.err").read_text()


@pytest.fixture
def root(template: Path, tmp_path: Path) -> Path:
    return copy_project(template, tmp_path / "project").path.parent


STOPS = [pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
         pytest.param(signal.SIGINT, 130, id="SIGINT")]  # fmt: skip


@pytest.mark.parametrize(("signum", "code"), STOPS)
def test_a_stop_signal_rolls_score_back_and_records_why(
    root: Path, signum: signal.Signals, code: int
) -> None:
    publish(root, LAST)
    before = predictions(db(root))
    (published,) = runs(root, LAST)

    # Paused in the main thread with its second batch queued into the open publication.
    child, paused = start(root, "publish.write=pause@2", "score", "--date", str(LAST))
    try:
        wait_for_file(paused / "publish.write", child)
        (running,) = (r for r in runs(root, LAST) if r["run_id"] != published["run_id"])
        assert running["status"] == "running"
        child.send_signal(signum)
        assert child.wait(timeout=DEADLINE) == code
    finally:
        kill_and_reap(child)

    stdout, stderr = output(root)
    assert stdout == ""
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (
        f"Error: interrupted by {signum.name} while scoring {LAST}; {UNTOUCHED}"
    )
    assert predictions(db(root)) == before
    stopped = runs(root, LAST)[-1]
    assert stopped["run_id"] == running["run_id"]
    assert stopped["status"] == "failed"
    assert stopped["error"] == f"interrupted by {signum.name}; {RECORDED}"
    assert stopped["rows_scored"] == 0 and stopped["finished_at"] is not None

    publish(root, LAST)  # the next run
    assert [r["status"] for r in runs(root, LAST)] == ["succeeded", "failed", "succeeded"]
    assert len(predictions(db(root), LAST)) == len([r for r in before if r[0] == str(LAST)])


def test_a_signal_just_before_the_commit_rolls_back(root: Path) -> None:
    """`term` sends SIGTERM from inside the publication, after the run's record is written."""
    publish(root, LAST)
    before = predictions(db(root))
    result = run_cli(
        "--config", str(root / "churn.toml"), "score", "--date", str(LAST),
        env={**os.environ, "CHURN_BATCH_FAILPOINTS": "publish.before_commit=term"},
    )  # fmt: skip
    assert result.returncode == 143, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"Error: interrupted by SIGTERM while scoring {LAST}; {UNTOUCHED}"
    )
    assert predictions(db(root)) == before
    assert [r["status"] for r in runs(root, LAST)] == ["succeeded", "failed"]


def test_a_signal_while_the_run_commits_waits_for_it(root: Path) -> None:
    """After the commit a signal is held: the run stays published and recorded as such."""
    result = run_cli(
        "--config", str(root / "churn.toml"), "score", "--date", str(LAST),
        env={**os.environ, "CHURN_BATCH_FAILPOINTS": "publish.committed=term"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Published {CUSTOMERS:,} predictions for {LAST} ")
    assert result.stderr.splitlines()[-1] == (
        "Warning: SIGTERM arrived while the run committed; it is published"
    )
    (run,) = runs(root, LAST)
    assert run["status"] == "succeeded" and run["error"] is None
    assert len(predictions(db(root), LAST)) == CUSTOMERS


def test_a_signal_while_a_failure_is_recorded_waits_for_the_record(root: Path) -> None:
    result = run_cli(
        "--config", str(root / "churn.toml"), "score", "--date", str(LAST),
        env={**os.environ, "CHURN_BATCH_FAILPOINTS": "check.batch=raise,run.record_failure=term"},
    )  # fmt: skip
    assert result.returncode == 143, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"Error: interrupted by SIGTERM while scoring {LAST}; {UNTOUCHED}"
    )
    (run,) = runs(root, LAST)
    # The record says what ended the run; the signal only waited for it to be written.
    assert run["status"] == "failed"
    assert run["error"] == "InjectedFault: failpoint check.batch"
    assert predictions(db(root)) == []


def test_an_interrupted_backfill_reports_what_it_finished(root: Path) -> None:
    """Ctrl-C; the next test stops a backfill by SIGTERM (the same path, exit 143)."""
    signum, code = signal.SIGINT, 130
    second = FIRST + timedelta(days=1)
    publish(root, second)
    before = predictions(db(root), second)
    # Paused in the second date's publication, after its second batch.
    child, paused = start(root, f"publish.write=pause@{BATCHES + 2}",
                          "backfill", "--start", str(FIRST), "--end", str(LAST))  # fmt: skip
    try:
        wait_for_file(paused / "publish.write", child)
        child.send_signal(signum)
        assert child.wait(timeout=DEADLINE) == code
    finally:
        kill_and_reap(child)

    stdout, stderr = output(root)
    assert "Traceback" not in stderr
    assert stdout.splitlines() == [
        "date        outcome      exit  detail",
        f"{FIRST}  published    0     {CUSTOMERS:,} rows",
        f"{second}  interrupted  {code:<4}  interrupted by {signum.name}; {UNTOUCHED}",
        f"1 of 4 dates published; interrupted by {signum.name}, "
        f"not started: {second + timedelta(days=1)} .. {LAST}",
    ]
    assert len(predictions(db(root), FIRST)) == CUSTOMERS
    assert predictions(db(root), second) == before
    assert predictions(db(root), LAST) == []
    assert [r["status"] for r in runs(root, FIRST)] == ["succeeded"]
    assert [(r["status"], r["error"]) for r in runs(root, second)] == [
        ("succeeded", None),
        ("failed", f"interrupted by {signum.name}; {RECORDED}"),
    ]
    assert runs(root, LAST) == []

    publish(root, second)  # the next run
    assert [r["status"] for r in runs(root, second)] == ["succeeded", "failed", "succeeded"]


def test_a_backfill_stops_after_a_date_whose_commit_a_signal_met(root: Path) -> None:
    result = run_cli(
        "--config", str(root / "churn.toml"), "backfill", "--start", str(FIRST), "--end", str(LAST),
        env={**os.environ, "CHURN_BATCH_FAILPOINTS": "publish.committed=term"},
    )  # fmt: skip
    assert result.returncode == 143, result.stderr
    assert result.stdout.splitlines() == [
        "date        outcome    exit  detail",
        f"{FIRST}  published  0     {CUSTOMERS:,} rows",
        f"1 of 4 dates published; interrupted by SIGTERM, "
        f"not started: {FIRST + timedelta(days=1)} .. {LAST}",
    ]
    assert [r["status"] for r in runs(root, FIRST)] == ["succeeded"]
    assert runs(root, FIRST + timedelta(days=1)) == []


def test_a_run_that_started_over_can_still_be_stopped(root: Path) -> None:
    """An id padded with blanks makes the run roll back and start over; the rollback held
    the stop signals, and the new attempt must let them through again."""
    publish(root, LAST)
    before = predictions(db(root))
    with sqlite_db(db(root)) as conn:
        conn.execute(
            "CREATE TEMP TABLE padded AS SELECT * FROM customer_snapshots "
            "WHERE snapshot_date = ? AND customer_id = 'C0000001'",
            (str(LAST),),
        )
        conn.execute("UPDATE padded SET customer_id = ' C0000001'")
        conn.execute("INSERT INTO customer_snapshots SELECT * FROM padded")
    child, paused = start(root, "publish.restart=pause", "score", "--date", str(LAST))
    try:
        wait_for_file(paused / "publish.restart", child)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=DEADLINE) == 143
    finally:
        kill_and_reap(child)
    stderr = output(root)[1]
    assert "starting the publication over" in stderr
    assert stderr.splitlines()[-1] == (
        f"Error: interrupted by SIGTERM while scoring {LAST}; {UNTOUCHED}"
    )
    assert predictions(db(root)) == before
    assert [(r["status"], r["error"]) for r in runs(root, LAST)] == [
        ("succeeded", None),
        ("failed", f"interrupted by SIGTERM; {RECORDED}"),
    ]


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("mariadb", marks=pytest.mark.mariadb)])  # fmt: skip
def server_root(
    request: pytest.FixtureRequest, template: Path, tmp_path: Path
) -> Iterator[tuple[Path, sa.Engine]]:
    """A project whose snapshots and predictions live in a fresh PostgreSQL schema or
    MariaDB database (dropped afterwards), and an engine on it."""
    base = server_url(POSTGRES_ENV if request.param == "postgres" else MARIADB_ENV)
    name = f"cbsig_{uuid.uuid4().hex[:8]}"
    kind = "SCHEMA" if request.param == "postgres" else "DATABASE"
    admin = sa.create_engine(base, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE {kind} {name}"))
    url = sa.make_url(base)
    if request.param == "postgres":
        url = url.update_query_dict({"options": f"-csearch_path={name}"})
    else:
        url = url.set(database=name)
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        root = tmp_path / "project"
        shutil.copytree(template.parent / "models", root / "models")
        write_config(root, source_url=url.render_as_string(hide_password=False))
        synthetic.write_sql(synthetic.generate_snapshots(CUSTOMERS, FIRST, 4, seed=3), engine)
        yield root, engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            cascade = " CASCADE" if kind == "SCHEMA" else ""
            conn.execute(sa.text(f"DROP {kind} IF EXISTS {name}{cascade}"))
        admin.dispose()


def test_sigterm_rolls_back_on_a_server(server_root: tuple[Path, sa.Engine]) -> None:
    """The write-behind thread is mid-statement on the server's connection when the main
    thread unwinds: the publication waits for it, rolls back, and the run is recorded."""
    root, engine = server_root

    def table(query: str) -> list[tuple[Any, ...]]:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(query))]

    ordered = "SELECT * FROM churn_predictions ORDER BY snapshot_date, customer_id"
    publish(root, LAST)
    before = table(ordered)
    child, paused = start(root, "publish.write=pause@2", "score", "--date", str(LAST))
    try:
        wait_for_file(paused / "publish.write", child)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=DEADLINE) == 143
    finally:
        kill_and_reap(child)
    assert output(root)[1].splitlines()[-1] == (
        f"Error: interrupted by SIGTERM while scoring {LAST}; {UNTOUCHED}"
    )
    assert table(ordered) == before and len(before) == CUSTOMERS
    assert table("SELECT status, error FROM churn_scoring_runs ORDER BY started_at") == [
        ("succeeded", None),
        ("failed", f"interrupted by SIGTERM; {RECORDED}"),
    ]
    publish(root, LAST)  # the next run


class Messages(logging.Handler):
    """The messages of one logger's records, whatever other tests did to logging."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_producer_stuck_in_a_read_does_not_hold_up_its_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run stopped while its read thread waits on the database still ends promptly."""
    monkeypatch.setattr(prefetch_module, "STOP_WAIT_SECONDS", 1.0)
    release, closed = threading.Event(), threading.Event()

    def slow() -> Iterator[int]:
        try:
            yield 1
            release.wait()  # a driver call that does not return for a long time
            yield 2
        finally:
            closed.set()

    # Were the wait unbounded, the watchdog would end it, and the timing below would fail.
    watchdog = threading.Timer(DEADLINE, release.set)
    logger, logged = logging.getLogger("churn_batch.prefetch"), Messages()
    logger.addHandler(logged)
    watchdog.start()
    try:
        items = prefetch(slow(), depth=1, name="stuck-read")
        assert next(items) == 1
        started = time.monotonic()
        items.close()
        assert time.monotonic() - started < DEADLINE / 2
        assert logged.messages == [
            "the stuck-read thread is still busy 1s after its consumer stopped; "
            "leaving it to stop after its current item"
        ]
        assert not closed.is_set()
        release.set()  # the read returns: the producer sees it was stopped, closes its source
        assert closed.wait(DEADLINE)
    finally:
        logger.removeHandler(logged)
        watchdog.cancel()
        release.set()


def test_the_cli_handles_the_signals_the_job_holds() -> None:
    from churn_batch.cli import common

    assert common.STOP_SIGNALS == job.STOP_SIGNALS

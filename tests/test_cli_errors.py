"""What the CLI says when something goes wrong: one readable line, the documented code.

Dates at the edges of the calendar are usage errors (2) or empty dates (3), never a
crash; a bug (exit 1) leaves its traceback in the log at ERROR, which cron keeps; a
database error shows the driver's message, never the statement or its parameters.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import typer
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner

from churn_batch import job
from churn_batch.cli import app, common
from churn_batch.config import Config
from churn_batch.errors import StorageUnavailable

from .scoring_fixtures import LAST, predictions, run_cli, sqlite_db

runner = CliRunner()
DATE_HINT = "use YYYY-MM-DD, 'today' or 'yesterday'"


def db(config: Config) -> Path:
    return config.path.parent / "data" / "churn.db"


def cli(config: Config, *args: str) -> tuple[int, str, str]:
    """In this process: enough for what the arguments decide (the entry point is below)."""
    result = runner.invoke(app, ["--config", str(config.path), *args])
    return result.exit_code, result.stdout, result.stderr


def last_runs(config: Config) -> list[tuple[str, str, str | None]]:
    with sqlite_db(db(config)) as conn:
        if not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'churn_scoring_runs'"
        ).fetchall():
            return []  # no run ever began
        return list(
            conn.execute(
                "SELECT snapshot_date, status, error FROM churn_scoring_runs ORDER BY started_at"
            )
        )


def no_rows(config: Config, day: str) -> str:
    return (
        f"Error: no snapshot rows for {day} in table customer_snapshots at sqlite:///{db(config)}"
    )


@pytest.mark.parametrize(
    ("value", "code", "message"),
    [
        ("9999-12-31", 2, "Error: date 9999-12-31 is out of range: the latest snapshot date is "
                          "9999-12-30"),
        ("9999-12-30", 3, None),
        ("0001-01-01", 3, None),
        ("", 2, f"Error: invalid date '': {DATE_HINT}"),
        ("  ", 2, f"Error: invalid date '  ': {DATE_HINT}"),
        ("20240604", 2, f"Error: invalid date '20240604': {DATE_HINT}"),
        ("2024-W23-2", 2, f"Error: invalid date '2024-W23-2': {DATE_HINT}"),
        ("2024-02-30", 2, f"Error: invalid date '2024-02-30': {DATE_HINT}"),
        ("2024-06-04T00:00", 2, f"Error: invalid date '2024-06-04T00:00': {DATE_HINT}"),
        ("٢٠٢٤-٠٦-٠٤", 2, f"Error: invalid date '٢٠٢٤-٠٦-٠٤': {DATE_HINT}"),
    ],
)  # fmt: skip
def test_dates_at_the_edges_get_a_code_and_a_clear_message(
    project: Config, value: str, code: int, message: str | None
) -> None:
    assert cli(project, "score", "--date", str(LAST))[0] == 0
    before = predictions(db(project))
    exit_code, stdout, stderr = cli(project, "score", "--date", value)
    assert (exit_code, stdout) == (code, ""), stderr
    assert stderr.splitlines()[-1] == (message or no_rows(project, value))
    assert predictions(db(project)) == before


def test_the_last_day_of_the_calendar_through_the_installed_cli(project: Config) -> None:
    result = run_cli("--config", str(project.path), "score", "--date", "9999-12-31")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "Error: date 9999-12-31 is out of range: the latest snapshot date is 9999-12-30\n"
    )
    assert not db(project).with_suffix(".db.locks").exists()  # refused before any run began


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("0001-01-01", "9999-12-30", "Error: --start 0001-01-01 to --end 9999-12-30 is "
                                     "3,652,058 dates; a backfill takes at most 3,660 (ten "
                                     "years): split the range"),
        ("9999-12-29", "9999-12-31", "Error: --end 9999-12-31 is out of range: the latest "
                                     "snapshot date is 9999-12-30"),
        ("x", "2024-06-04", f"Error: invalid --start 'x': {DATE_HINT}"),
        ("2024-06-04", "2024-06-03", "Error: --end 2024-06-03 is before --start 2024-06-04"),
    ],
)  # fmt: skip
def test_backfill_ranges_that_cannot_run_are_usage_errors(
    project: Config, start: str, end: str, message: str
) -> None:
    assert cli(project, "backfill", "--start", start, "--end", end) == (2, "", message + "\n")
    assert last_runs(project) == []


def test_a_backfill_up_to_the_last_day_it_can_score(project: Config) -> None:
    """The day after each date is computed (the range a run reads): never an overflow."""
    code, stdout, stderr = cli(project, "backfill", "--start", "9999-12-29", "--end", "9999-12-30")
    assert code == 3, stderr
    detail = no_rows(project, "{}").removeprefix("Error: ")
    assert stdout.splitlines() == [
        "date        outcome    exit  detail",
        f"9999-12-29  failed     3     {detail.format('9999-12-29')}",
        f"9999-12-30  failed     3     {detail.format('9999-12-30')}",
        "0 of 2 dates published",
    ]
    assert [run[:2] for run in last_runs(project)] == [("9999-12-29", "failed"),
                                                       ("9999-12-30", "failed")]  # fmt: skip


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_bug_logs_its_traceback_at_error_and_says_one_line(
    project: Config, log_format: str
) -> None:
    env = {**os.environ, "CHURN_BATCH_FAILPOINTS": "check.batch=raise"}
    result = run_cli("--config", str(project.path), "--log-format", log_format,
                     "score", "--date", str(LAST), env=env)  # fmt: skip
    assert (result.returncode, result.stdout) == (1, "")
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("Error:")] == [
        "Error: unexpected InjectedFault: failpoint check.batch"
    ]
    assert lines[-1] == "Error: unexpected InjectedFault: failpoint check.batch"
    if log_format == "text":
        (logged,) = (i for i, line in enumerate(lines) if " ERROR " in line)
        assert lines[logged].endswith(" ERROR churn_batch: unexpected error in score")
        assert lines[logged + 1] == "Traceback (most recent call last):"
        assert "churn_batch.failpoints.InjectedFault: failpoint check.batch" in lines
    else:
        records = [json.loads(line) for line in lines[:-1]]
        (error,) = (r for r in records if r["level"] == "error")
        assert error["message"] == "unexpected error in score"
        assert error["traceback"].startswith("Traceback (most recent call last):")
        assert error["traceback"].endswith(
            "churn_batch.failpoints.InjectedFault: failpoint check.batch"
        )
    assert last_runs(project) == [(str(LAST), "failed", "InjectedFault: failpoint check.batch")]


def test_a_database_error_shows_the_driver_message_not_the_statement(project: Config) -> None:
    """A sink table whose trigger refuses every row: SQLite's own error, raised mid-INSERT."""
    with sqlite_db(db(project)) as conn:
        ids = [
            row[0] for row in conn.execute("SELECT DISTINCT customer_id FROM customer_snapshots")
        ]
    assert cli(project, "score", "--date", str(LAST))[0] == 0  # creates the tables
    before = predictions(db(project))
    with sqlite_db(db(project)) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON churn_predictions "
            "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )
    said = "unexpected IntegrityError: (sqlite3.IntegrityError) disk says no"

    result = run_cli("--config", str(project.path), "score", "--date", str(LAST))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines()[-1] == f"Error: {said}"
    # The traceback keeps the statement, cut, and never the bound values (customer ids).
    # SQLAlchemy itself leaves them out (engines are made with hide_parameters).
    assert "[SQL parameters hidden due to hide_parameters=True]" in result.stderr
    assert "[parameters:" not in result.stderr
    assert not [i for i in ids if i in result.stderr]
    assert max(map(len, result.stderr.splitlines())) < 1100

    backfill = run_cli("--config", str(project.path), "backfill", "--start", str(LAST),
                       "--end", str(LAST))  # fmt: skip
    assert backfill.returncode == 1, backfill.stderr
    assert backfill.stdout.splitlines()[1] == f"{LAST}  failed     1     {said}"
    assert "Traceback (most recent call last):" in backfill.stderr
    assert predictions(db(project)) == before
    assert [run[1:] for run in last_runs(project)] == [
        ("succeeded", None),
        *[("failed", "IntegrityError: (sqlite3.IntegrityError) disk says no")] * 2,
    ]


CUSTOMER = "C00000" + "42"  # not in any source line a traceback shows


def real_database_error() -> sa.exc.DBAPIError:
    """A real driver error with SQLAlchemy's statement and parameters in its text."""
    engine = sa.create_engine("sqlite://", poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("INSERT INTO nowhere VALUES (:id)"), {"id": CUSTOMER})
    except sa.exc.DBAPIError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("the insert into a missing table succeeded")


def test_a_library_error_quoting_a_driver_error_is_cut_before_the_statement(
    capsys: pytest.CaptureFixture[str],
) -> None:
    exc = real_database_error()
    assert "[SQL: INSERT INTO nowhere" in str(exc) and CUSTOMER in str(exc)

    @common.reports_errors
    def command() -> None:
        raise StorageUnavailable(f"reading the snapshots failed: {exc}")

    with pytest.raises(typer.Exit) as ended:
        command()
    assert ended.value.exit_code == 7
    assert capsys.readouterr().err == (
        "Error: reading the snapshots failed: (sqlite3.OperationalError) no such table: nowhere\n"
    )
    # The run record and the CLI word an unexpected one alike.
    assert (
        job.describe_failure(exc)
        == common.one_line(exc)
        == ("OperationalError: (sqlite3.OperationalError) no such table: nowhere")
    )


def test_log_tracebacks_are_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_SECRETS", ["hunter2-secret"])
    try:
        raise RuntimeError("cannot reach postgresql://app:hunter2-secret@db/prod") from (
            real_database_error()
        )
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("churn_batch", logging.ERROR, __file__, 1, "boom", (), exc_info)
    for kind in common.LogFormat:
        text = common._RedactingFormatter(kind).format(record)
        record.exc_text = None  # each formatter renders the traceback anew
        assert "Traceback (most recent call last):" in text
        assert "no such table: nowhere" in text
        assert "[parameters: hidden]" in text
        assert "hunter2-secret" not in text and CUSTOMER not in text
        assert "postgresql://app:***@db/prod" in text


def test_a_reader_that_stops_reading_is_not_an_error(project: Config) -> None:
    """`churn-batch runs | head -1`: the reader closes the pipe; no traceback, exit 0."""
    assert cli(project, "score", "--date", str(LAST))[0] == 0
    exe = Path(sys.executable).parent / "churn-batch"
    child = subprocess.Popen([str(exe), "--config", str(project.path), "runs"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None and child.stderr is not None
        child.stdout.close()  # long before the child has imported its modules and written
        stderr = child.stderr.read()
        assert child.wait(timeout=300) == 0, stderr
        assert stderr == ""
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        if child.stderr is not None:
            child.stderr.close()

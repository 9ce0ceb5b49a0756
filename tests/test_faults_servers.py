"""Database trouble and concurrency on PostgreSQL and MariaDB, through the installed CLI.

- A config mistake in the URL (wrong password, unknown database, role or host) is exit 2
  at once, naming the problem, never retried, the password masked.
- A server nothing listens on: bounded retries with back-off, then exit 7.
- The run's database session dropped mid-publication (`pg_terminate_backend`, `KILL`):
  exit 7, the previous predictions exactly as they were, the run recorded failed, the
  next run publishes.
- The session holding the run lock ended while the run waits to commit: that run can
  no longer commit (exit 7), and the run that takes the freed lock publishes alone.
- Two runs of one date at once, many times: every exit 0 or 8, never two runs inside
  the lock at once, the date whole. Four dates at once: all publish, counts exact.

Runs reach an exact moment with the `wait` failpoint: the child stops there and says
so with a file; the test acts on the database, then lets it go on.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from churn_batch import db, job, locks
from churn_batch.config import Config, SinkConfig, redact_url
from churn_batch.errors import RunLocked, StorageUnavailable
from churn_batch.sinks import Sink

from .conftest import MARIADB_ENV, POSTGRES_ENV, server_url
from .scoring_fixtures import FIRST, LAST, published, run_cli, server_project, write_config

DEADLINE = 120.0  # seconds any wait for an event may take on a loaded 2-core machine
EXE = str(Path(sys.executable).parent / "churn-batch")


def runs_of(config: Config, day: date) -> list[dict[str, Any]]:
    with Sink(config.sink) as sink:
        return sink.runs(limit=100, snapshot_date=day)


def wait_for(condition: Callable[[], bool], what: str, child: subprocess.Popen[str] | None = None,
             deadline: float = DEADLINE) -> None:  # fmt: skip
    """Poll `condition` until true; fail naming `what` (and the child's stderr if it died)."""
    end = time.monotonic() + deadline
    while not condition():
        if child is not None and child.poll() is not None:
            _, err = child.communicate()
            pytest.fail(f"the run ended (exit {child.returncode}) before {what}: {err}")
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def start(config: Config, day: date, *, failpoints: str = "",
          fault_dir: Path | None = None) -> subprocess.Popen[str]:  # fmt: skip
    env = {**os.environ, "CHURN_BATCH_FAILPOINTS": failpoints}
    if fault_dir is not None:
        env["CHURN_BATCH_FAILPOINT_DIR"] = str(fault_dir)
    return subprocess.Popen(
        [EXE, "--config", str(config.path), "score", "--date", day.isoformat()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def finish(child: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = child.communicate(timeout=300)
    return child.returncode, err


def reap(*children: subprocess.Popen[str]) -> None:
    for child in children:
        if child.poll() is None:
            child.kill()
        child.communicate()


# -- the run's lock session, seen from outside -----------------------------------------------


def lock_session(config: Config | SinkConfig, day: date) -> int | None:
    """The server's id for the session holding `day`'s run lock, None when free."""
    sink_config = config.sink if isinstance(config, Config) else config
    engine = sa.create_engine(sink_config.url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                schema = conn.execute(sa.text("SELECT current_schema()")).scalar_one()
                key = locks.advisory_key(f"{schema}.{sink_config.table}:{day.isoformat()}")
                # A bigint advisory key shows as classid (high 32 bits), objid (low 32 bits).
                pid = conn.execute(
                    sa.text("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                            "AND objsubid = 1 AND classid::bigint = :hi AND objid::bigint = :lo"),
                    {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
                ).scalar_one_or_none()  # fmt: skip
                return None if pid is None else int(pid)
            database = conn.execute(sa.text("SELECT DATABASE()")).scalar_one()
            name = locks.mysql_lock_name(database, f"{sink_config.table}:{day.isoformat()}")
            holder = conn.execute(sa.text("SELECT IS_USED_LOCK(:n)"), {"n": name}).scalar()
            return None if holder is None else int(holder)
    finally:
        engine.dispose()


def end_session(config: Config | SinkConfig, session: int) -> None:
    """What an administrator (or a failover) does to a session: end it from the server."""
    url = (config.sink if isinstance(config, Config) else config).url
    engine = sa.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                ended = conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"),
                                     {"pid": session}).scalar()  # fmt: skip
                assert ended is True
            else:
                conn.execute(sa.text("KILL CONNECTION :id"), {"id": session})
    finally:
        engine.dispose()


# -- config mistakes: exit 2 at once ------------------------------------------------------------


PASSWORD = "s3cret-Pa55word"


def _bad_urls() -> list[Any]:
    cases = []
    for env, kind in ((POSTGRES_ENV, "postgres"), (MARIADB_ENV, "mariadb")):
        for case in ("unknown database", "unknown user", "unknown host", "wrong password"):
            if case == "wrong password" and kind == "postgres":
                continue  # the test server trusts every local login: no password is wrong
            marks = getattr(pytest.mark, kind)
            cases.append(pytest.param(env, case, marks=marks, id=f"{kind}-{case}"))
    return cases


EXPECTED_PROBLEM = {
    "unknown database": "the database does not exist",
    "unknown user": ("the user (role) does not exist", "access denied: wrong user or password"),
    "unknown host": "unknown server host",
    "wrong password": "access denied: wrong user or password",
}


@pytest.mark.parametrize(("env", "case"), _bad_urls())
def test_a_url_mistake_is_a_config_error_at_once_with_the_password_masked(
    template: Path, tmp_path: Path, env: str, case: str
) -> None:
    base = sa.make_url(server_url(env))
    postgres = base.get_backend_name() == "postgresql"
    if case == "unknown database":
        url = base.set(database="cb_no_such_db")
    elif case == "unknown user":
        url = base.set(username="cb_no_such_user")
    elif case == "unknown host":
        url = base.set(host="cb-no-such-host.invalid")
    else:
        # The password comes from the environment, as the README tells users to do it.
        url = base.set(password="PASSWORD")
    text = url.render_as_string(hide_password=False)
    text = text.replace(":PASSWORD@", ":${CB_TEST_DB_PASSWORD}@")
    if url.password:
        url = url.set(password=PASSWORD)
    root = tmp_path / "p"
    root.mkdir()
    (root / "models").symlink_to(template.parent / "models")
    path = write_config(root, source_url=text)
    env_vars = {**os.environ, "CB_TEST_DB_PASSWORD": PASSWORD}
    started = time.monotonic()
    result = run_cli("--config", str(path), "score", "--date", LAST.isoformat(), env=env_vars)
    elapsed = time.monotonic() - started

    assert result.returncode == 2, result.stderr
    assert "retrying" not in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    shown = redact_url(url.render_as_string(hide_password=False))
    assert (":***@" in shown) == (case == "wrong password")
    last = result.stderr.strip().splitlines()[-1]
    problems = EXPECTED_PROBLEM[case]
    problem = problems[0 if postgres else 1] if isinstance(problems, tuple) else problems
    prefix = f"Error: cannot use table churn_predictions at {shown}: {problem} ("
    assert last.startswith(prefix), last
    assert last.endswith("); not retried: fix the URL or the server's accounts"), last
    if case == "unknown database":
        assert "cb_no_such_db" in last  # the message names the database
    assert elapsed < 60  # not the ~8 s of retries (a loaded machine starts Python slowly)


@pytest.mark.parametrize(("message", "problem"), [
    ('connection failed: connection to server at "10.0.0.1", port 5432 failed: FATAL:  '
     'password authentication failed for user "churn"', "password authentication failed"),
    ('connection to server at "db", port 5432 failed: FATAL:  no pg_hba.conf entry for host '
     '"10.0.0.2", user "churn", database "dw", no encryption',
     "the server's pg_hba.conf refuses this login"),
    ('could not translate host name "db.example" to address: Temporary failure in name '
     "resolution", None),
    ('connection to server at "127.0.0.1", port 5432 failed: Connection refused', None),
    ('connection to server at "127.0.0.1", port 5432 failed: FATAL:  role "churn" is not '
     "permitted to log in", "the user (role) may not log in"),
    ("IO: [libpq] Failed to connect: connection to server at \"127.0.0.1\", port 5432 failed: "
     'FATAL:  database "dw" does not exist', "the database does not exist"),
])  # fmt: skip
def test_what_no_retry_fixes_is_told_from_what_a_retry_may(
    message: str, problem: str | None
) -> None:
    """Messages the test servers cannot produce (they trust local logins, resolve no
    names). The ADBC driver's message (last) reaches `config_problem_text` alone."""
    assert db.config_problem_text(message) == problem


def test_a_lost_lock_session_fails_the_run_record_and_the_publication(
    namespace_url: str,
) -> None:
    sink_config = SinkConfig(url=namespace_url, table="lost_lock")
    with Sink(sink_config) as sink, Sink(sink_config) as other:
        sink.prepare()
        with sink.lock(LAST):
            session = lock_session(sink_config, LAST)
            assert session is not None
            end_session(sink_config, session)
            wait_for(lambda: lock_session(sink_config, LAST) is None, "the lock to be freed")
            with other.lock(LAST):  # really free: another run could start now
                pass
            lost = (
                f"lost the database session holding the run lock for {LAST} "
                f"({sink.describe()}); another run may take the date now, so this one "
                "stopped and published nothing: "
            )
            with pytest.raises(StorageUnavailable) as caught:
                sink.begin_run("r1", LAST, datetime.now(UTC), None)
            assert str(caught.value).startswith(lost)
            assert caught.value.exit_code == 7
            publication = sink.publication(LAST, "r1", "v1", datetime.now(UTC))
            with pytest.raises(StorageUnavailable) as caught, publication:
                pytest.fail("a publication on a lost lock session must not start")
            assert str(caught.value) == lost + "the connection was closed"
        assert sink.runs() == []  # nothing was written through a new session either
        with other.lock(LAST):
            pass


# -- the server unreachable at start ------------------------------------------------------------


def test_a_server_nothing_listens_on_is_retried_with_back_off_then_exit_7(
    template: Path, tmp_path: Path
) -> None:
    bases = [server_url(POSTGRES_ENV), server_url(MARIADB_ENV)]
    # A port bound but not listening refuses every connection for as long as it is held.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        port = blocker.getsockname()[1]
        children = []
        try:
            for i, base in enumerate(bases):
                url = sa.make_url(base).set(host="127.0.0.1", port=port)
                root = tmp_path / f"p{i}"
                root.mkdir()
                (root / "models").symlink_to(template.parent / "models")
                path = write_config(root, source_url=url.render_as_string(hide_password=False))
                children.append((url, subprocess.Popen(
                    [EXE, "--config", str(path), "score", "--date", LAST.isoformat()],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )))  # fmt: skip
            results = [(url, *finish(child)) for url, child in children]
        finally:
            reap(*(child for _, child in children))
    for url, code, err in results:
        assert code == 7, err
        lines = err.strip().splitlines()
        shown = f"table churn_predictions at {url.render_as_string(hide_password=True)}"
        retries = [line for line in lines if f"cannot reach {shown} (" in line]
        assert [line.rsplit("retrying in ", 1)[1] for line in retries] == ["0.5s", "2.0s", "5.0s"]
        assert lines[-1].startswith(f"Error: cannot reach {shown} after 4 attempts: "), lines[-1]
        assert "refused" in lines[-1].lower()


# -- the connection dropped mid-run -------------------------------------------------------------


def test_a_session_dropped_mid_publication_exits_7_and_loses_nothing(
    template: Path, tmp_path: Path, namespace_url: str
) -> None:
    config = server_project(template, tmp_path / "p", namespace_url, 1200, 150)
    first = run_cli("--config", str(config.path), "score", "--date", LAST.isoformat())
    assert first.returncode == 0, first.stderr
    before = published(config, LAST)
    assert before.num_rows > 1000

    faults = tmp_path / "faults"
    child = start(config, LAST, failpoints="publish.write=wait@3", fault_dir=faults)
    try:
        wait_for((faults / "publish.write").exists, "the third batch was queued", child)
        session = lock_session(config, LAST)
        assert session is not None, "the run holds its lock while it publishes"
        end_session(config, session)
        (faults / "publish.write.go").touch()
        code, err = finish(child)
    finally:
        reap(child)

    assert code == 7, err
    last = err.strip().splitlines()[-1]
    with Sink(config.sink) as sink:
        where = sink.describe()
    assert last.startswith(
        f"Error: lost the database session holding the run lock for {LAST} ({where}); "
        "another run may take the date now, so this one stopped and published nothing: "
    ), last
    after = published(config, LAST)
    assert after.equals(before), "previous predictions exactly as they were"
    failed = runs_of(config, LAST)[0]
    assert failed["status"] == "failed"
    assert failed["error"] == last.removeprefix("Error: ")
    assert lock_session(config, LAST) is None

    again = run_cli("--config", str(config.path), "score", "--date", LAST.isoformat())
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in runs_of(config, LAST)] == ["succeeded", "failed", "succeeded"]
    assert published(config, LAST).num_rows == before.num_rows


def test_a_run_whose_lock_session_ended_cannot_commit_beside_the_run_that_took_the_lock(
    template: Path, tmp_path: Path, namespace_url: str
) -> None:
    """Issue #13, item 8: run A waits to commit; its lock session is ended from the
    server; run B takes the freed lock and publishes. A must not publish after it."""
    config = server_project(template, tmp_path / "p", namespace_url, 600, 97)
    faults = tmp_path / "faults"
    a = start(config, LAST, failpoints="publish.before_commit=wait", fault_dir=faults)
    b: subprocess.Popen[str] | None = None
    try:
        wait_for((faults / "publish.before_commit").exists, "A was about to commit", a)
        session = lock_session(config, LAST)
        assert session is not None
        end_session(config, session)
        # The server frees the lock once the ended session is gone: wait for that.
        wait_for(lambda: lock_session(config, LAST) is None, "A's lock to be freed")
        b = start(config, LAST)
        # B takes the freed lock while A still waits to commit; then A goes on.
        wait_for(lambda: b.poll() is not None or lock_session(config, LAST) is not None,
                 "B to take the lock")  # fmt: skip
        (faults / "publish.before_commit.go").touch()
        a_code, a_err = finish(a)
        b_code, b_err = finish(b)
    finally:
        reap(a, *([b] if b else []))

    assert b_code == 0, b_err
    assert a_code == 7, a_err
    assert "lost the database session holding the run lock" in a_err.strip().splitlines()[-1]
    runs = runs_of(config, LAST)
    by_status = {r["status"]: r for r in runs}
    assert sorted(r["status"] for r in runs) == ["failed", "succeeded"]
    rows = published(config, LAST)
    assert set(rows["run_id"].to_pylist()) == {by_status["succeeded"]["run_id"]}
    assert rows.num_rows == by_status["succeeded"]["rows_scored"]


# -- concurrency ----------------------------------------------------------------------------------


def test_two_runs_of_one_date_at_once_never_overlap_and_the_date_ends_whole(
    template: Path, tmp_path: Path, namespace_url: str
) -> None:
    """Ten trials of two runs started together (threads of this process: each run has
    its own connections and sessions, as two processes would). Each trial: every run
    exits 0 or 8 (RunLocked), at least one publishes, no two runs were inside the lock
    at the same time, and the date holds exactly one run's full set of rows."""
    config = server_project(template, tmp_path / "p", namespace_url, 300, 100)
    trials, locked_out = 10, 0
    for _ in range(trials):
        barrier = threading.Barrier(2)
        codes: list[int] = []

        def run(barrier: threading.Barrier = barrier, codes: list[int] = codes) -> None:
            barrier.wait()
            try:
                job.score_date(config, LAST)
                codes.append(0)
            except RunLocked as exc:
                codes.append(exc.exit_code)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=DEADLINE)
            assert not thread.is_alive(), "a run hung"
        assert sorted(codes) in ([0, 0], [0, 8]), codes
        locked_out += codes.count(8)
    runs = runs_of(config, LAST)
    assert len(runs) == 2 * trials - locked_out  # a locked-out run records nothing
    assert {r["status"] for r in runs} == {"succeeded"}
    spans = sorted((r["started_at"], r["finished_at"]) for r in runs)
    for (_, end), (next_start, _) in itertools.pairwise(spans):
        assert end <= next_start, "two runs of one date were inside the lock at once"
    rows = published(config, LAST)
    assert set(rows["run_id"].to_pylist()) == {max(runs, key=lambda r: r["finished_at"])["run_id"]}
    assert rows.num_rows == runs[0]["rows_scored"] > 250
    assert lock_session(config, LAST) is None


def test_four_dates_at_once_all_publish_with_exact_counts(
    template: Path, tmp_path: Path, namespace_url: str
) -> None:
    config = server_project(template, tmp_path / "p", namespace_url, 400, 50)
    days = [FIRST + timedelta(days=i) for i in range(4)]
    assert days[-1] == LAST
    children = [start(config, day) for day in days]
    try:
        results = [finish(child) for child in children]
    finally:
        reap(*children)
    for code, err in results:
        assert code == 0, err
    engine = sa.create_engine(namespace_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            counts = conn.execute(sa.text(
                "SELECT snapshot_date, COUNT(*) FROM customer_snapshots GROUP BY snapshot_date"
            ))  # fmt: skip
            expected = dict(counts.all())
    finally:
        engine.dispose()
    for day in days:
        rows = published(config, day)
        runs = runs_of(config, day)
        assert [r["status"] for r in runs] == ["succeeded"]
        assert rows.num_rows == runs[0]["rows_scored"]
        assert rows.num_rows + runs[0]["rows_rejected"] == expected[day] == runs[0]["rows_read"]
        assert set(rows["run_id"].to_pylist()) == {runs[0]["run_id"]}

"""Load on PostgreSQL: 30 nightly runs, then a 30-day backfill over the same dates.

What must hold after many runs, not just one: every date's row count exact (a re-run
replaces, never duplicates), no connection left open, no advisory lock left held, no
table left behind, and memory flat across the in-process runs.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from churn_batch import job, synthetic
from churn_batch.config import Config, load_config
from churn_batch.sinks import Sink

from .conftest import POSTGRES_ENV, server_url
from .scoring_fixtures import FIRST, run_cli, write_config

NIGHTS = 30
CUSTOMERS = 120
RSS_GROWTH_LIMIT = 40 * 2**20  # bytes: allocator noise, not a leak (a leak grows per run)

pytestmark = pytest.mark.postgres


@pytest.fixture
def schema_url() -> Iterator[tuple[str, str]]:
    """(URL into a fresh schema whose sessions carry the schema's name, that name)."""
    base = server_url(POSTGRES_ENV)
    name = f"cbl_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {name}"))
    url = sa.make_url(base).update_query_dict(
        {"options": f"-csearch_path={name}", "application_name": name}
    )
    try:
        yield url.render_as_string(hide_password=False), name
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text("SET lock_timeout = '20s'"))
            conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
        admin.dispose()


def server_state(admin: sa.Connection, name: str) -> dict[str, object]:
    """What a run could leak: sessions, advisory locks, temporary and unexpected tables."""

    def scalar(sql: str) -> object:
        return admin.execute(sa.text(sql), {"app": name, "schema": name}).scalar()

    return {
        "sessions": scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = :app"),
        "advisory locks": scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.locktype = 'advisory' AND a.application_name = :app"
        ),
        "temporary tables": scalar("SELECT count(*) FROM pg_class WHERE relpersistence = 't'"),
        "tables": sorted(
            admin.execute(
                sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                {"s": name},
            ).scalars()
        ),
    }


def assert_no_sessions_left(admin: sa.Connection, name: str, day: date) -> None:
    """No session of the job's left: the client closed them all (NullPool).

    A closed session's backend leaves pg_stat_activity a moment after the client hung
    up, so one still listed is waited for; a leaked one stays, still "idle".
    """
    deadline = time.monotonic() + 30
    while (state := server_state(admin, name))["sessions"] or state["advisory locks"]:
        if time.monotonic() > deadline:
            left = admin.execute(
                sa.text("SELECT pid, state, backend_type, query FROM pg_stat_activity "
                        "WHERE application_name = :app"), {"app": name}
            ).all()  # fmt: skip
            pytest.fail(f"after the run of {day}: {state}; sessions: {left}")
        time.sleep(0.05)


def test_thirty_nights_then_a_thirty_day_backfill_leak_nothing(
    template: Path, tmp_path: Path, schema_url: tuple[str, str]
) -> None:
    url, name = schema_url
    root = tmp_path / "p"
    root.mkdir()
    shutil.copytree(template.parent / "models", root / "models")
    config: Config = load_config(write_config(root, source_url=url, batch_size=50))
    engine = sa.create_engine(url, poolclass=NullPool)
    synthetic.write_sql(synthetic.generate_snapshots(CUSTOMERS, FIRST, NIGHTS, seed=5), engine)
    with engine.connect() as conn:
        counts = conn.execute(sa.text(
            "SELECT snapshot_date, COUNT(*) FROM customer_snapshots GROUP BY snapshot_date"
        ))  # fmt: skip
        snapshot_rows = dict(counts.all())
    engine.dispose()
    days = [FIRST + timedelta(days=i) for i in range(NIGHTS)]
    assert sorted(snapshot_rows) == days

    admin_engine = sa.create_engine(server_url(POSTGRES_ENV), poolclass=NullPool,
                                    isolation_level="AUTOCOMMIT")  # fmt: skip
    try:
        with admin_engine.connect() as admin:
            temporary_before = server_state(admin, name)["temporary tables"]
            me = psutil.Process()
            rss: list[int] = []
            for day in days:  # one nightly cron run after another, in this process
                outcome = job.score_date(config, day)
                assert outcome.exit_code == 0
                assert outcome.rows_read == snapshot_rows[day]
                rss.append(me.memory_info().rss)
                assert_no_sessions_left(admin, name, day)
            tables = server_state(admin, name)["tables"]

            first, last = days[0].isoformat(), days[-1].isoformat()
            result = run_cli("--config", str(config.path), "backfill", "--start", first,
                             "--end", last)  # fmt: skip
            assert result.returncode == 0, result.stderr
            outcomes = [line.split()[:3] for line in result.stdout.splitlines()
                        if re.match(r"\d{4}-\d\d-\d\d ", line)]  # fmt: skip
            assert outcomes == [[day.isoformat(), "published", "0"] for day in days]

            after = server_state(admin, name)
    finally:
        admin_engine.dispose()

    assert after == {"sessions": 0, "advisory locks": 0, "temporary tables": temporary_before,
                     "tables": tables}  # fmt: skip
    assert tables == sorted(["churn_drift_metrics", "churn_predictions",
                             "churn_predictions_latest", "churn_rejected_rows",
                             "churn_scoring_runs", "customer_snapshots"])  # fmt: skip

    with Sink(config.sink) as sink:
        assert sink.published_dates() == days
        for day in days:
            rows = sink.predictions(day)
            runs = sink.runs(limit=10, snapshot_date=day)
            assert [r["status"] for r in runs] == ["succeeded", "succeeded"], day
            latest = runs[0]
            # Exact: every snapshot row read once, published or rejected, never twice.
            assert latest["rows_read"] == snapshot_rows[day]
            assert (
                rows.num_rows
                == latest["rows_scored"]
                == snapshot_rows[day] - latest["rows_rejected"]
            )
            assert set(rows["run_id"].to_pylist()) == {latest["run_id"]}

    # Flat: after the first runs warmed caches and pools, no run adds to the last.
    warm = rss[4]
    assert max(rss[5:]) - warm < RSS_GROWTH_LIMIT, [r // 2**20 for r in rss]

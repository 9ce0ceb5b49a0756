"""The whole job on PostgreSQL and MariaDB for real: publish, exactness, re-run, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from churn_batch.contract import DUPLICATE_ID, check_batch, features_frame
from churn_batch.errors import RunLocked
from churn_batch.registry import Registry
from churn_batch.sinks import Sink
from churn_batch.sources import open_source

from .processes import kill_and_reap, wait_for_file
from .scoring_fixtures import FIRST, LAST, published, run_cli, server_project, write_config


def test_score_publishes_exactly_and_reruns_idempotently(
    template: Path, tmp_path: Path, namespace_url: str
) -> None:
    config = server_project(template, tmp_path / "p", namespace_url, 600, 97)
    result = run_cli("--config", str(config.path), "score", "--date", LAST.isoformat())
    assert result.returncode == 0, result.stderr
    first = published(config, LAST)

    model = Registry(config.model.registry, config.model.name).load("champion")
    batches = list(open_source(config.source, config.contract).read(LAST))
    valid = check_batch(pa.Table.from_batches(batches), config.contract).valid
    expected = dict(zip(valid["customer_id"].to_pylist(),
                        model.predict_proba(features_frame(valid, config.contract)),
                        strict=True))  # fmt: skip
    got = dict(zip(first["customer_id"].to_pylist(), first["churn_probability"].to_pylist(),
                   strict=True))  # fmt: skip
    assert got.keys() == expected.keys()
    assert max(abs(got[k] - expected[k]) for k in got) <= 1e-9

    again = run_cli("--config", str(config.path), "score", "--date", FIRST.isoformat())
    assert again.returncode == 0, again.stderr
    rerun = run_cli("--config", str(config.path), "score", "--date", LAST.isoformat())
    assert rerun.returncode == 0, rerun.stderr
    second = published(config, LAST)
    assert second.num_rows == first.num_rows
    assert second["customer_id"].to_pylist() == first["customer_id"].to_pylist()
    assert np.array_equal(second["churn_probability"].to_numpy(),
                          first["churn_probability"].to_numpy())  # fmt: skip
    assert set(second["run_id"].to_pylist()).isdisjoint(first["run_id"].to_pylist())
    with Sink(config.sink) as sink:
        statuses = [r["status"] for r in sink.runs(limit=10)]
        assert published(config, FIRST).num_rows > 500
    assert statuses == ["succeeded"] * 3


def test_a_keyed_table_skips_the_repeat_scan_but_padded_ids_still_count_as_repeats(
    template: Path, tmp_path: Path, namespace_url: str
) -> None:
    """The snapshot table's key (date, id) rules out stored repeats, so the run skips
    looking for them; ' <id>' is another key value yet the same id once trimmed. The run
    notices, starts over judging repeats on trimmed ids, and rejects both rows."""
    config = server_project(template, tmp_path / "p", namespace_url, 600, 97)
    source = open_source(config.source, config.contract)
    assert source.summarize(LAST).as_stored
    assert not source.summarize(LAST, cleaned_ids=True).as_stored

    clean = run_cli("--config", str(config.path), "score", "--date", LAST.isoformat())
    assert clean.returncode == 0, clean.stderr
    assert "starting the publication over" not in clean.stderr
    before = published(config, LAST)

    engine = sa.create_engine(namespace_url, poolclass=NullPool)
    table = sa.Table("customer_snapshots", sa.MetaData(), autoload_with=engine)
    victim = before["customer_id"][len(before) // 2].as_py()
    with engine.begin() as conn:
        row = (
            conn.execute(
                sa.select(table).where(table.c.snapshot_date == LAST, table.c.customer_id == victim)
            )
            .one()
            ._asdict()
        )
        conn.execute(sa.insert(table).values({**row, "customer_id": " " + victim}))
    engine.dispose()

    padded = run_cli("--config", str(config.path), "score", "--date", LAST.isoformat())
    assert padded.returncode == 0, padded.stderr
    assert "starting the publication over" in padded.stderr
    after = published(config, LAST)
    assert set(after["customer_id"].to_pylist()) == set(before["customer_id"].to_pylist()) - {
        victim
    }
    with Sink(config.sink) as sink:
        run = sink.runs(limit=1)[0]
    assert run["status"] == "succeeded"
    assert (run["rows_read"], run["rows_rejected"]) == (before.num_rows + 1, 2)
    assert run["summary"]["rejected_reasons"] == {DUPLICATE_ID: 2}


def test_sigkill_mid_write_leaves_previous_predictions(
    template: Path, tmp_path: Path, namespace_url: str
) -> None:
    config = server_project(template, tmp_path / "p", namespace_url, 4000, 20)
    write_config(config.path.parent, source_url=namespace_url, batch_size=10_000)
    assert (
        run_cli("--config", str(config.path), "score", "--date", LAST.isoformat()).returncode == 0
    )
    before = published(config, LAST)
    write_config(config.path.parent, source_url=namespace_url, batch_size=500)
    # The run stops with its third batch queued into the open publication, alive and
    # holding the date's lock: the moment is reached by the failpoint, not guessed.
    paused = tmp_path / "failpoints"
    env = {**os.environ, "CHURN_BATCH_FAILPOINTS": "publish.write=pause@3",
           "CHURN_BATCH_FAILPOINT_DIR": str(paused)}  # fmt: skip
    child = subprocess.Popen(
        [str(Path(sys.executable).parent / "churn-batch"), "--config", str(config.path),
         "score", "--date", LAST.isoformat()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        wait_for_file(paused / "publish.write", child)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        kill_and_reap(child)
    after = published(config, LAST)
    assert after.equals(before), "previous predictions exactly as they were"
    with Sink(config.sink) as sink:
        assert [r["status"] for r in sink.runs(limit=5)] == ["running", "succeeded"]
        # The server frees the dead session's lock once it notices the closed socket:
        # wait for that (the lock itself), not for a while.
        deadline = time.monotonic() + 120
        while True:
            try:
                with sink.lock(LAST):
                    break
            except RunLocked:
                assert time.monotonic() < deadline, "the dead run's lock was never freed"
                time.sleep(0.05)
    write_config(config.path.parent, source_url=namespace_url, batch_size=10_000)
    result = run_cli("--config", str(config.path), "score", "--date", LAST.isoformat())
    assert result.returncode == 0, result.stderr
    with Sink(config.sink) as sink:
        statuses = [r["status"] for r in sink.runs(limit=5)]
    assert statuses == ["succeeded", "abandoned", "succeeded"]
    rescored = published(config, LAST)
    assert rescored["customer_id"].to_pylist() == before["customer_id"].to_pylist()

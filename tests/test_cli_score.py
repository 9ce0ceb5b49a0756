"""The nightly job through its CLI: every exit code, idempotency, exactness, atomicity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import joblib
import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from churn_batch import sql_source, synthetic
from churn_batch.cli import app
from churn_batch.config import Config
from churn_batch.contract import check_batch, features_frame
from churn_batch.registry import Registry
from churn_batch.sinks import Sink
from churn_batch.sources import open_source

from .processes import kill_and_reap, wait_for_file
from .scoring_fixtures import (
    CUSTOMERS,
    DAYS,
    FIRST,
    LAST,
    copy_project,
    predictions,
    run_cli,
    sqlite_db,
    write_config,
)

runner = CliRunner()


def score(config: Config, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["--config", str(config.path), "score", *args])
    return result.exit_code, result.output


def db(config: Config) -> Path:
    return config.path.parent / "data" / "churn.db"


def sql(config: Config, statement: str, params: tuple[object, ...] = ()) -> None:
    with sqlite_db(db(config)) as conn:
        conn.execute(statement, params)


def run_rows(config: Config) -> list[dict[str, object]]:
    with Sink(config.sink) as sink:
        return sink.runs(limit=50)


def test_publishes_every_customer_and_records_the_run(project: Config) -> None:
    code, output = score(project, "--date", LAST.isoformat())
    assert code == 0, output
    rows = predictions(db(project), LAST)
    snapshot = sum(b.num_rows for b in open_source(project.source, project.contract).read(LAST))
    assert len(rows) == snapshot > CUSTOMERS * 0.9
    assert f"Published {len(rows):,} predictions for {LAST} to churn_predictions" in output
    assert {r[3] for r in rows} == {"high", "medium", "low"}
    assert all(0.0 <= r[2] <= 1.0 for r in rows)
    (run,) = run_rows(project)
    assert run["status"] == "succeeded"
    assert run["rows_scored"] == run["rows_read"] == len(rows)
    assert run["model_version"] == "v1"
    summary = run["summary"]
    assert isinstance(summary, dict)
    assert summary["gate"]["level"] in {"ok", "warn"}
    assert set(summary["drift"]) == set(project.contract.features)


def test_rerun_replaces_the_date_and_leaves_other_dates(project: Config) -> None:
    assert score(project, "--date", FIRST.isoformat())[0] == 0
    assert score(project, "--date", LAST.isoformat())[0] == 0
    first_day = predictions(db(project), FIRST)
    before = predictions(db(project), LAST)
    assert score(project, "--date", LAST.isoformat())[0] == 0
    after = predictions(db(project), LAST)
    assert len(after) == len(before), "no duplicates"
    assert [r[:4] for r in after] == [r[:4] for r in before]
    assert {r[5] for r in after} != {r[5] for r in before}, "the new run's rows"
    assert predictions(db(project), FIRST) == first_day


@pytest.mark.parametrize("batch_size", [7, 10_000])
def test_published_probability_is_predict_proba(
    template: Path, tmp_path: Path, batch_size: int
) -> None:
    config = copy_project(template, tmp_path / "p")
    write_config(config.path.parent, batch_size=batch_size)
    assert score(config, "--date", LAST.isoformat())[0] == 0
    model = Registry(config.model.registry, config.model.name).load("champion")
    table = pa.Table.from_batches(list(open_source(config.source, config.contract).read(LAST)))
    valid = check_batch(table, config.contract).valid
    scores = model.predict_proba(features_frame(valid, config.contract))
    expected = dict(zip(valid["customer_id"].to_pylist(), scores, strict=True))
    published = {r[1]: r[2] for r in predictions(db(config), LAST)}
    assert published.keys() == expected.keys()
    gap = max(abs(published[k] - expected[k]) for k in expected)
    assert gap <= 1e-9


def test_a_column_mixing_storage_classes_restarts_on_the_row_path(
    template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Arrow reader stops at a blank among the numbers of a later batch: the run
    rolls back, starts over reading rows, and publishes what the row path reads."""
    # The Arrow reader even for this small date (it is started for 50,000 rows and up).
    monkeypatch.setattr(sql_source, "SQLITE_CHILD_MIN_ROWS", 0)
    config = copy_project(template, tmp_path / "p")
    write_config(config.path.parent, batch_size=50)
    with sqlite_db(db(config)) as conn:
        ids = [r[0] for r in conn.execute(
            "SELECT customer_id FROM customer_snapshots WHERE snapshot_date = ? "
            "ORDER BY rowid", (LAST.isoformat(),))]  # fmt: skip
    sql(config, "UPDATE customer_snapshots SET monthly_charges = ' ' "
        "WHERE snapshot_date = ? AND customer_id = ?", (LAST.isoformat(), ids[200]))  # fmt: skip
    code, output = score(config, "--date", LAST.isoformat())
    assert code == 0, output
    assert "starting the publication over, reading row by row" in output
    rows = predictions(db(config), LAST)
    assert len(rows) == len(ids)  # the blank is a missing number, scored like one
    (run,) = run_rows(config)
    assert run["rows_read"] == run["rows_scored"] == len(ids)
    summary = run["summary"]
    assert isinstance(summary, dict)
    assert summary["invalid_numbers"] == {"monthly_charges": 1}

    model = Registry(config.model.registry, config.model.name).load("champion")
    source = open_source(config.source, config.contract)
    source.use_portable_path()  # type: ignore[attr-defined]
    # Batch by batch: the row path types each batch on its own.
    valid = pa.concat_tables([check_batch(b, config.contract).valid for b in source.read(LAST)])
    expected = dict(zip(valid["customer_id"].to_pylist(),
                        model.predict_proba(features_frame(valid, config.contract)),
                        strict=True))  # fmt: skip
    assert max(abs(r[2] - expected[r[1]]) for r in rows) <= 1e-9


def test_exit_2_usage_and_config(project: Config, tmp_path: Path) -> None:
    code, output = score(project, "--date", "2024-13-01")
    assert (code, output.strip()) == (
        2, "Error: invalid date '2024-13-01': use YYYY-MM-DD, 'today' or 'yesterday'"
    )  # fmt: skip
    bad = tmp_path / "bad.toml"
    bad.write_text(project.path.read_text().replace('kind = "sql"', 'kind = "csv"'))
    result = runner.invoke(app, ["--config", str(bad), "score", "--date", "today"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"Error: {bad}: source.kind: unknown source kind 'csv' (expected 'sql' or 'parquet')"
    )


def test_exit_3_no_rows(project: Config) -> None:
    code, output = score(project, "--date", "2020-01-01")
    assert code == 3
    assert output.strip().endswith(
        "Error: no snapshot rows for 2020-01-01 in table customer_snapshots at "
        f"sqlite:///{db(project)}"
    )
    assert run_rows(project)[0]["status"] == "failed"


def test_exit_4_missing_column_and_too_many_invalid(project: Config) -> None:
    assert score(project, "--date", LAST.isoformat())[0] == 0
    before = predictions(db(project))
    # Ids the predictions key cannot hold (the snapshot's own key forbids blanks here).
    sql(project, "UPDATE customer_snapshots SET customer_id = printf('%0200d', rowid) "
                 "WHERE snapshot_date = ? AND rowid % 10 = 0", (LAST.isoformat(),))  # fmt: skip
    code, output = score(project, "--date", LAST.isoformat())
    assert code == 4
    assert "rows rejected" in output and "more than max_invalid_fraction 5.0%" in output
    assert "customer id longer than 128 characters" in output
    assert predictions(db(project)) == before, "previous predictions untouched"
    run = run_rows(project)[0]
    assert run["status"] == "failed" and int(str(run["rows_rejected"])) > 0
    with sqlite_db(db(project)) as conn:
        kept = conn.execute("SELECT COUNT(*), MIN(reason) FROM churn_rejected_rows "
                            "WHERE run_id = ?", (run["run_id"],)).fetchone()  # fmt: skip
    assert kept[0] == run["rows_rejected"]
    assert kept[1] == "customer id longer than 128 characters or containing control characters"

    sql(project, "ALTER TABLE customer_snapshots DROP COLUMN tech_support")
    code, output = score(project, "--date", LAST.isoformat())
    assert code == 4
    assert "Error: snapshot is missing required column(s): tech_support (found: " in output
    assert predictions(db(project)) == before


def test_exit_5_drift_blocks_and_allow_drift_publishes(project: Config) -> None:
    assert score(project, "--date", LAST.isoformat())[0] == 0
    before = predictions(db(project))
    sql(project, "UPDATE customer_snapshots SET monthly_charges = monthly_charges * 3 "
                 "WHERE snapshot_date = ?", (LAST.isoformat(),))  # fmt: skip
    code, output = score(project, "--date", LAST.isoformat())
    assert code == 5
    assert f"Error: drift gate blocked publication of {LAST}: monthly_charges PSI" in output
    assert "--allow-drift" in output
    assert predictions(db(project)) == before
    assert run_rows(project)[0]["status"] == "blocked"

    code, output = score(project, "--date", LAST.isoformat(), "--allow-drift")
    assert code == 0, output
    assert "published despite drift (--allow-drift): monthly_charges PSI" in output
    run = run_rows(project)[0]
    assert run["status"] == "succeeded"
    assert isinstance(run["summary"], dict) and run["summary"]["allow_drift"] is True
    assert predictions(db(project)) != before


def test_exit_6_tampered_model(project: Config) -> None:
    assert score(project, "--date", LAST.isoformat())[0] == 0
    before = predictions(db(project))
    artifact = project.model.registry / "churn" / "v1" / "model.joblib"
    estimator = joblib.load(artifact)
    joblib.dump(estimator, artifact, compress=1)  # same model, different bytes
    code, output = score(project, "--date", LAST.isoformat())
    assert code == 6
    assert "sha256" in output and str(artifact) in output
    assert predictions(db(project)) == before
    code, output = score(project, "--date", LAST.isoformat(), "--model", "v9")
    assert code == 6 and "v9" in output


def test_exit_7_unreachable_sink(project: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("churn_batch.db.RETRY_DELAYS", (0.0, 0.0))
    url = "postgresql+psycopg://churn:hunter22@127.0.0.1:9/nowhere"
    monkeypatch.setenv("SINK_URL", url)
    text = project.path.read_text()
    project.path.write_text(text[: text.index("[sink]")] + '[sink]\nurl = "${SINK_URL}"\n')
    code, output = score(project, "--date", LAST.isoformat())
    assert code == 7
    assert (
        output.strip()
        .splitlines()[-1]
        .startswith(
            "Error: cannot reach table churn_predictions at "
            "postgresql+psycopg://churn:***@127.0.0.1:9/nowhere after 3 attempts: "
        )
    )
    assert "hunter22" not in output


def test_exit_8_date_locked_other_dates_free(project: Config) -> None:
    with Sink(project.sink) as sink, sink.lock(LAST):
        code, output = score(project, "--date", LAST.isoformat())
        assert code == 8
        assert f"another run holds the lock for {LAST}" in output
        assert score(project, "--date", FIRST.isoformat())[0] == 0
    assert score(project, "--date", LAST.isoformat())[0] == 0


def test_backfill_reports_each_date_and_fails_if_any_failed(project: Config) -> None:
    day_before = FIRST - timedelta(days=1)
    args = ["backfill", "--start", day_before.isoformat(), "--end", LAST.isoformat()]
    result = runner.invoke(app, ["--config", str(project.path), *args])
    assert result.exit_code == 3
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["date", "outcome", "exit", "detail"]
    assert lines[1].startswith(f"{day_before}  failed     3     no snapshot rows")
    assert [line.split()[1] for line in lines[2:6]] == ["published"] * 4
    assert lines[-1] == "4 of 5 dates published"
    runs = runner.invoke(app, ["--config", str(project.path), "runs", "--limit", "3"])
    assert runs.exit_code == 0
    assert len(runs.stdout.splitlines()) == 4
    assert "succeeded" in runs.stdout.splitlines()[1]


def test_abandoned_run_is_marked_by_the_next(project: Config) -> None:
    with Sink(project.sink) as sink:
        sink.prepare()
        with sink.lock(LAST):
            sink.begin_run("dead-run", LAST, __import__("datetime").datetime.now(
                __import__("datetime").UTC), None)  # fmt: skip
    assert score(project, "--date", LAST.isoformat())[0] == 0
    statuses = {r["run_id"]: r["status"] for r in run_rows(project)}
    assert statuses["dead-run"] == "abandoned"


# -- real processes -----------------------------------------------------------------


def test_sigkill_mid_write_leaves_previous_predictions(template: Path, tmp_path: Path) -> None:
    config = copy_project(template, tmp_path / "p")
    write_config(config.path.parent, batch_size=50)  # a dozen batches: mid-write is real
    assert score(config, "--date", LAST.isoformat())[0] == 0
    before = predictions(db(config))
    (published,) = run_rows(config)
    # The run stops, alive and holding the lock, with its second batch queued into the
    # open publication: a moment reached by the failpoint, not guessed with a timer.
    paused = tmp_path / "failpoints"
    env = {**os.environ, "CHURN_BATCH_FAILPOINTS": "publish.write=pause@2",
           "CHURN_BATCH_FAILPOINT_DIR": str(paused)}  # fmt: skip
    child = subprocess.Popen(
        [str(Path(sys.executable).parent / "churn-batch"), "--config", str(config.path),
         "score", "--date", LAST.isoformat()],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        wait_for_file(paused / "publish.write", child)

        # A second run for the same date is refused at once while the first holds the lock.
        second = run_cli("--config", str(config.path), "score", "--date", LAST.isoformat())
        assert second.returncode == 8, second.stderr
        lock_file = f"{db(config)}.locks/churn_predictions-{LAST}.lock"
        assert second.stderr.strip().splitlines()[-1] == (
            f"Error: another run holds the lock for {LAST} (lock file {lock_file})"
        )
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        kill_and_reap(child)
    assert predictions(db(config)) == before
    statuses = {r["run_id"]: r["status"] for r in run_rows(config)}
    (dead,) = statuses.keys() - {published["run_id"]}
    assert statuses == {published["run_id"]: "succeeded", dead: "running"}

    result = run_cli("--config", str(config.path), "score", "--date", LAST.isoformat())
    assert result.returncode == 0, result.stderr
    statuses = {r["run_id"]: r["status"] for r in run_rows(config)}
    (again,) = statuses.keys() - {published["run_id"], dead}
    assert statuses == {published["run_id"]: "succeeded", dead: "abandoned", again: "succeeded"}
    assert [r[:5] for r in predictions(db(config))] == [r[:5] for r in before]


def test_installed_entry_point_smoke(tmp_path: Path) -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("churn-batch ")
    result = run_cli("score", "--date", "today", env={**os.environ,
                     "CHURN_BATCH_CONFIG": str(tmp_path / "missing.toml")})  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == f"Error: {tmp_path / 'missing.toml'}: config file not found"


def test_demo_from_an_empty_directory(tmp_path: Path) -> None:
    root = tmp_path / "fresh"
    (root / "configs").mkdir(parents=True)
    shipped = (Path(__file__).parent.parent / "configs" / "default.toml").read_text()
    (root / "configs" / "default.toml").write_text(shipped)
    result = run_cli("demo", "--customers", "400", "--days", "3", "--train-days", "3", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "3/3 Published" in result.stdout
    assert "SELECT p.customer_id" in result.stdout
    with sqlite_db(root / "data" / "churn.db") as conn:
        (n,) = conn.execute("SELECT COUNT(*) FROM churn_predictions_latest").fetchone()
        (high,) = conn.execute(
            "SELECT COUNT(*) FROM churn_predictions WHERE risk_tier = 'high'"
        ).fetchone()
    assert n > 350 and 0 < high < n
    assert (root / "models" / "churn" / "registry.json").exists()
    assert np.isfinite(n)


def test_parquet_source_publishes_the_same_predictions(project: Config) -> None:
    assert score(project, "--date", LAST.isoformat())[0] == 0
    from_sql = [r[:4] for r in predictions(db(project), LAST)]
    root = project.path.parent
    synthetic.write_parquet(
        synthetic.generate_snapshots(CUSTOMERS, FIRST, DAYS, seed=3), root / "pq"
    )
    text = project.path.read_text()
    source = text[text.index("[source]") : text.index("[contract]")]
    project.path.write_text(
        text.replace(source, '[source]\nkind = "parquet"\npath = "pq"\nbatch_size = 111\n\n')
    )
    code, output = score(project, "--date", LAST.isoformat())
    assert code == 0, output
    assert [r[:4] for r in predictions(db(project), LAST)] == from_sql


def test_drift_warning_publishes_and_says_so(project: Config) -> None:
    # A zero warn threshold makes any PSI a warning: the gate's middle outcome.
    text = project.path.read_text()
    project.path.write_text(text + "\n[monitoring.features.tenure_months]\npsi_warn = 0.0\n")
    code, output = score(project, "--date", LAST.isoformat())
    assert code == 0, output
    assert "Warning: drift warning: tenure_months PSI " in output
    assert len(predictions(db(project), LAST)) > 0
    (run,) = run_rows(project)
    assert run["status"] == "succeeded"
    assert isinstance(run["summary"], dict)
    assert run["summary"]["gate"]["level"] == "warn"

"""A small trained project on disk, built once per session and copied per test."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from churn_batch import synthetic, training
from churn_batch.config import Config, load_config
from churn_batch.model import SearchSpace
from churn_batch.sinks import Sink

FIRST = date(2024, 6, 1)
DAYS = 4
LAST = date(2024, 6, 4)
CUSTOMERS = 600
# One setting per family and few trees: the tests check the job, not the model search.
SMALL_SEARCH = SearchSpace(
    logistic_c=(1.0,),
    boosting={"learning_rate": (0.1,), "max_leaf_nodes": (15,), "l2_regularization": (0.0,)},
    boosting_max_iter=40,
    max_cv_rows=3_000,
)

CONFIG = """
[source]
kind = "sql"
url = "{source_url}"
table = "customer_snapshots"
batch_size = {batch_size}

[contract]
id_column = "customer_id"
date_column = "snapshot_date"
label_column = "churned"
positive_label = "Yes"
numeric = ["senior_citizen", "tenure_months", "monthly_charges", "total_charges"]
categorical = ["gender", "partner", "dependents", "phone_service", "multiple_lines",
    "internet_service", "online_security", "online_backup", "device_protection",
    "tech_support", "streaming_tv", "streaming_movies", "contract",
    "paperless_billing", "payment_method"]
max_invalid_fraction = 0.05

[model]
registry = "models"

[sink]
url = "{sink_url}"
"""


def write_config(
    root: Path, *, source_url: str = "sqlite:///data/churn.db", sink_url: str | None = None,
    batch_size: int = 250,
) -> Path:  # fmt: skip
    path = root / "churn.toml"
    path.write_text(CONFIG.format(source_url=source_url, sink_url=sink_url or source_url,
                                  batch_size=batch_size))  # fmt: skip
    return path


def build_project(root: Path) -> Path:
    """Seed SQLite snapshots and train + promote a model under `root`."""
    (root / "data").mkdir(parents=True)
    path = write_config(root)
    config = load_config(path)
    engine = sa.create_engine(f"sqlite:///{root / 'data' / 'churn.db'}", poolclass=NullPool)
    synthetic.write_sql(synthetic.generate_snapshots(CUSTOMERS, FIRST, DAYS, seed=3), engine)
    engine.dispose()
    training.train(config, None, None, promote=True, search=SMALL_SEARCH)
    return path


def copy_project(template: Path, root: Path) -> Config:
    shutil.copytree(template.parent, root, dirs_exist_ok=True)
    return load_config(root / "churn.toml")


def run_cli(*args: str, cwd: Path | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """The installed entry point, in a real subprocess."""
    exe = Path(sys.executable).parent / "churn-batch"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, **kwargs)  # fmt: skip


@contextmanager
def sqlite_db(path: Path) -> Iterator[sqlite3.Connection]:
    """A sqlite3 connection, committed and closed on leaving.

    `with sqlite3.connect(...)` only commits: the connection stays open until garbage
    collection. Left open in the test process, it kept the WAL index of a file that the
    next in-process run's ADBC driver (its own copy of SQLite) checkpointed and deleted
    on closing, and the next read here failed with "disk I/O error".
    """
    conn = sqlite3.connect(path)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def predictions(db: Path, day: date | None = None) -> list[tuple[Any, ...]]:
    """Every published row, sorted: what 'byte-for-byte the same' compares."""
    with sqlite_db(db) as conn:
        query = "SELECT * FROM churn_predictions"
        params: tuple[str, ...] = ()
        if day:
            query += " WHERE snapshot_date = ?"
            params = (day.isoformat(),)
        return sorted(conn.execute(query + " ORDER BY snapshot_date, customer_id", params))


def server_project(template: Path, root: Path, url: str, customers: int, batch: int) -> Config:
    root.mkdir(parents=True)
    shutil.copytree(template.parent / "models", root / "models")
    path = write_config(root, source_url=url, batch_size=batch)
    engine = sa.create_engine(url, poolclass=NullPool)
    synthetic.write_sql(synthetic.generate_snapshots(customers, FIRST, 4, seed=3), engine)
    engine.dispose()
    return load_config(path)


def published(config: Config, day: date) -> pa.Table:
    with Sink(config.sink) as sink:
        return sink.predictions(day)

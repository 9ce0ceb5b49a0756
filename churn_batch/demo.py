"""The fresh-machine path: fill the configured source with synthetic snapshots."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

import pyarrow as pa

from churn_batch import synthetic
from churn_batch.config import Config
from churn_batch.db import create_engine, retrying
from churn_batch.errors import ConfigError


@dataclass(frozen=True)
class Seeded:
    first: date
    last: date
    rows: int
    where: str


def seed(config: Config, *, customers: int, days: int, last: date, seed: int = 0) -> Seeded:
    """Write `days` daily snapshots of about `customers` customers, ending on `last`."""
    if customers < 100 or days < 2:
        raise ConfigError("the demo needs at least 100 customers and 2 days")
    first = last - timedelta(days=days - 1)
    snapshots = synthetic.generate_snapshots(customers, first, days, seed=seed)
    source = config.source
    if source.kind == "parquet":
        assert source.path is not None
        rows = 0

        def counted() -> Iterator[tuple[date, pa.Table]]:
            nonlocal rows
            for day, snapshot in snapshots:
                rows += snapshot.num_rows
                yield day, snapshot

        synthetic.write_parquet(counted(), source.path)
        return Seeded(first, last, rows, source.describe())
    if source.table is None:
        raise ConfigError(
            "the demo writes snapshots into a source 'table'; this config reads a 'query'",
            key="source.query",
        )
    assert source.url is not None
    engine = create_engine(source.url)
    try:
        # Check the store is reachable (with retries) before generating anything.
        retrying(lambda: engine.connect().close(), source.describe())
        rows = synthetic.write_sql(snapshots, engine, source.table)
    finally:
        engine.dispose()
    return Seeded(first, last, rows, source.describe())


def campaign_query(config: Config) -> str:
    """The campaign team's first query, as a shell line for the embedded SQLite default."""
    table = config.sink.table
    source_table = config.source.table or "customer_snapshots"
    c = config.contract
    sql = (
        f"SELECT p.customer_id, ROUND(p.churn_probability, 3) AS churn_probability, "
        f"s.monthly_charges FROM {table}_latest p "
        f"JOIN {source_table} s ON s.{c.id_column} = p.customer_id "
        f"AND s.{c.date_column} = p.snapshot_date "
        f"WHERE p.risk_tier = 'high' AND s.contract = 'Month-to-month' "
        f"ORDER BY p.churn_probability DESC LIMIT 20;"
    )
    url = config.sink.url
    if url.startswith("sqlite:///"):
        return f'sqlite3 {url.removeprefix("sqlite:///")} "{sql}"'
    return sql

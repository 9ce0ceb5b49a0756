"""The repeated-id search compares ids exactly as the predictions' key does, on every database.

The key compares bytes (see `sinks.CustomerKey`); a search grouping by the column's
collation would call `C0000001` and `c0000001` one customer and reject one of them.
"""

from __future__ import annotations

from datetime import date

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from churn_batch.config import ContractConfig, SourceConfig
from churn_batch.sql_source import SqlSource

DAY = date(2024, 6, 4)


def _case_insensitive_id(dialect: str) -> sa.types.TypeEngine[str]:
    """A text type whose comparisons ignore case on this database, where one exists."""
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        return mysql.VARCHAR(32, charset="utf8mb4", collation="utf8mb4_general_ci")
    if dialect == "sqlite":
        return sa.String(32, collation="NOCASE")
    return sa.String(32)  # PostgreSQL's default collations are deterministic


def test_ids_differing_in_case_or_trailing_space_are_not_repeats(
    any_db_url: str, table_name: str
) -> None:
    engine = sa.create_engine(any_db_url, poolclass=NullPool)
    table = sa.Table(
        table_name,
        sa.MetaData(),
        sa.Column("snapshot_date", sa.Date()),
        sa.Column("customer_id", _case_insensitive_id(engine.dialect.name)),
        sa.Column("x", sa.Float()),
    )
    ids = ["C0000001", "c0000001", "C0000002", "C0000002", "C0000003", "C0000003 "]
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(
            sa.insert(table),
            [{"snapshot_date": DAY, "customer_id": i, "x": 1.0} for i in ids],
        )
    engine.dispose()
    source = SqlSource(
        SourceConfig(kind="sql", url=any_db_url, table=table_name, batch_size=100),
        ContractConfig(
            id_column="customer_id", date_column="snapshot_date", numeric=("x",), categorical=()
        ),
    )
    summary = source.summarize(DAY)
    source.engine.dispose()
    assert summary.rows == len(ids)
    assert summary.duplicate_ids.to_pylist() == ["C0000002"]

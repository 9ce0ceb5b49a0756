"""Every source layout, on SQLite, PostgreSQL and MariaDB for real, and on Parquet."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from churn_batch import sources, sql_source
from churn_batch.config import ContractConfig, SourceConfig
from churn_batch.contract import check_batch
from churn_batch.errors import (
    ConfigError,
    ContractViolation,
    MissingColumns,
    NoSnapshotRows,
    StorageUnavailable,
)
from churn_batch.sources import open_source
from churn_batch.sql_source import PortablePathNeeded, SqlSource

CONTRACT = ContractConfig(
    id_column="customer_id",
    date_column="snapshot_date",
    numeric=("charges",),
    categorical=("plan",),
    label_column="churned",
)
D1, D2, D3 = date(2024, 5, 1), date(2024, 5, 2), date(2024, 5, 3)


def rows() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for day, n in ((D1, 7), (D2, 5), (D3, 3)):
        out += [
            {"customer_id": f"c{i}", "snapshot_date": day, "charges": i * 1.25,
             "plan": "basic" if i % 2 else "plus", "churned": "Yes" if i == 1 else "No"}
            for i in range(n)
        ]  # fmt: skip
    out.append(dict(out[0], charges=99.0))  # a duplicated id on D1
    return out


def fill(
    url: str,
    name: str,
    date_type: sa.types.TypeEngine[object],
    charges_type: sa.types.TypeEngine[object] | None = None,
) -> None:
    engine = sa.create_engine(url)
    table = sa.Table(
        name, sa.MetaData(),
        sa.Column("customer_id", sa.String(20)), sa.Column("snapshot_date", date_type),
        sa.Column("charges", charges_type or sa.Numeric(10, 2)), sa.Column("plan", sa.String(10)),
        sa.Column("churned", sa.String(5)), sa.Column("extra", sa.Integer),
    )  # fmt: skip
    data = rows()
    for row in data:
        day = row["snapshot_date"]
        assert isinstance(day, date)
        if isinstance(date_type, sa.String):
            row["snapshot_date"] = day.isoformat()
        elif isinstance(date_type, sa.DateTime):
            row["snapshot_date"] = datetime.combine(day, datetime.min.time())
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(table.insert(), data)
    engine.dispose()


DATE_TYPES = [sa.Date(), sa.String(10), sa.DateTime()]


@pytest.mark.parametrize("date_type", DATE_TYPES, ids=["DATE", "ISO-text", "TIMESTAMP"])
def test_sql_table_streams_one_date(
    any_db_url: str, table_name: str, date_type: sa.types.TypeEngine[object]
) -> None:
    fill(any_db_url, table_name, date_type)
    config = SourceConfig(kind="sql", url=any_db_url, table=table_name, batch_size=3)
    source = open_source(config, CONTRACT)
    summary = source.summarize(D1)
    assert summary.rows == 8
    assert summary.duplicate_ids.to_pylist() == ["c0"]
    batches = list(source.read(D1))
    assert [b.num_rows for b in batches] == [3, 3, 2], "bounded batches"
    checked = [check_batch(b, CONTRACT, duplicate_ids=summary.duplicate_ids) for b in batches]
    valid = pa.concat_tables([c.valid for c in checked])
    assert sorted(valid["customer_id"].to_pylist()) == [f"c{i}" for i in range(1, 7)]
    assert set(valid["snapshot_date"].to_pylist()) == {D1}
    assert sum(c.rejected.num_rows for c in checked) == 2
    assert source.dates() == [D1, D2, D3]
    assert sum(b.num_rows for b in source.read_range(D2, D3)) == 8
    assert sum(b.num_rows for b in source.read_range(None, D1)) == 8
    with pytest.raises(NoSnapshotRows) as info:
        source.summarize(date(2024, 4, 30))
    assert info.value.exit_code == 3
    assert str(info.value).startswith(f"no snapshot rows for 2024-04-30 in table {table_name} at")


def test_sql_query_binds_snapshot_date(any_db_url: str, table_name: str) -> None:
    fill(any_db_url, table_name, sa.Date())
    query = f"SELECT * FROM {table_name} WHERE snapshot_date = :snapshot_date AND charges < 5"
    source = open_source(SourceConfig(kind="sql", url=any_db_url, query=query), CONTRACT)
    summary = source.summarize(D2)
    assert summary.rows == 4
    assert summary.duplicate_ids.to_pylist() == []
    ids = [i for b in source.read(D2) for i in b.column("customer_id").to_pylist()]
    assert sorted(ids) == ["c0", "c1", "c2", "c3"]


@pytest.mark.postgres
@pytest.mark.parametrize("layout", ["table", "query"])
def test_postgres_reads_the_date_settings_once_per_query(postgres_url: str, layout: str) -> None:
    """The ADBC read takes its dates from session settings; evaluated per row in a
    sequential scan's filter, they made the server's side of the read 3x slower."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    fill(postgres_url, name, sa.Date())
    query = f"SELECT * FROM {name} WHERE snapshot_date = :snapshot_date"
    config = SourceConfig(
        kind="sql", url=postgres_url, **({"table": name} if layout == "table" else {"query": query})
    )
    source = SqlSource(config, CONTRACT)
    engine = sa.create_engine(postgres_url, poolclass=NullPool)
    try:
        # The plan of a big date, in a small table.
        plan, rows = _read_plan(engine, source, D1, "SET enable_indexscan = off",
                                "SET enable_bitmapscan = off")  # fmt: skip
        assert rows == 8
        ids = sorted(i for b in source.read(D1) for i in b.column("customer_id").to_pylist())
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {name}")
        engine.dispose()
    assert any("Seq Scan" in line for line in plan)
    assert not [line for line in plan if "Filter" in line and "current_setting" in line], plan
    assert ids == sorted(["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c0"])


@pytest.mark.postgres
@pytest.mark.parametrize("days", [1, 40])
def test_postgres_plans_the_read_of_a_day_by_how_much_of_the_table_a_day_is(
    postgres_url: str, days: int
) -> None:
    """A table holding one date is scanned in order; one of many dates through the key."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(postgres_url, poolclass=NullPool)
    table = sa.Table(
        name, sa.MetaData(),
        sa.Column("snapshot_date", sa.Date, primary_key=True),
        sa.Column("customer_id", sa.String(20), primary_key=True),
        sa.Column("charges", sa.Float), sa.Column("plan", sa.String(10)),
    )  # fmt: skip
    first = date(2024, 1, 1)
    per_day = 20_000 // days
    try:
        with engine.begin() as conn:
            table.create(conn)
            conn.execute(
                table.insert(),
                [{"snapshot_date": date.fromordinal(first.toordinal() + d),
                  "customer_id": f"c{i}", "charges": 1.0, "plan": "basic"}
                 for d in range(days) for i in range(per_day)],
            )  # fmt: skip
            conn.exec_driver_sql(f"ANALYZE {name}")
        source = SqlSource(SourceConfig(kind="sql", url=postgres_url, table=name), CONTRACT)
        plan, rows = _read_plan(engine, source, first)
        assert rows == per_day
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
        engine.dispose()
    assert ("Seq Scan" in plan[0]) == (days == 1), plan
    assert not [line for line in plan if "Filter" in line and "current_setting" in line], plan


def _read_plan(
    engine: sa.Engine, source: SqlSource, day: date, *settings: str
) -> tuple[list[str], int]:
    """The plan PostgreSQL gives the ADBC read of `day` (its dates set as the read sets
    them), and the rows the query returns."""
    query = source._selectable(day, sources.next_day(day), None, via_settings=True)
    sql = str(query.compile(dialect=sql_source._numeric_dollar_dialect()))
    with engine.begin() as conn:
        for setting in settings:
            conn.exec_driver_sql(setting)
        for name, value in (("lo", day), ("hi", sources.next_day(day))):
            conn.exec_driver_sql(f"SELECT set_config('churn_batch.{name}', '{value}', true)")
        plan = [row[0] for row in conn.exec_driver_sql(f"EXPLAIN {sql}")]
        return plan, len(conn.exec_driver_sql(sql).fetchall())


@pytest.mark.parametrize("stretch", [1, 2, 3, 7, 1000])
def test_repeats_found_across_stretches_of_the_sorted_ids(
    stretch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "REPEAT_STRETCH", stretch)
    rng = random.Random(stretch)
    ids = [f"c{rng.randrange(40)}" for _ in range(60)] + [" c5 ", "c5"]
    batches = [pa.array(ids[i : i + 9]) for i in range(0, len(ids), 9)]
    summary = sources.summary_of_ids(batches, D1, "test")
    counts = Counter(i.strip() for i in ids)
    assert summary.rows == len(ids)
    assert sorted(summary.duplicate_ids.to_pylist()) == sorted(
        i for i, n in counts.items() if n > 1
    )


@pytest.mark.parametrize("date_type", [sa.Date(), sa.DateTime()], ids=["DATE", "TIMESTAMP"])
def test_repeats_are_judged_on_stored_ids_then_on_cleaned_ids_when_asked(
    any_db_url: str, table_name: str, date_type: sa.types.TypeEngine[object]
) -> None:
    engine = sa.create_engine(any_db_url, poolclass=NullPool)
    table = sa.Table(
        table_name, sa.MetaData(),
        sa.Column("customer_id", sa.String(20), primary_key=True),
        sa.Column("snapshot_date", date_type, primary_key=True),
        sa.Column("charges", sa.Float), sa.Column("plan", sa.String(10)),
    )  # fmt: skip
    day = D1 if isinstance(date_type, sa.Date) else datetime(2024, 5, 1)
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(table.insert(), [
            {"customer_id": i, "snapshot_date": day, "charges": 1.0, "plan": "basic"}
            for i in ("a", " a", "b", "c")
        ])  # fmt: skip
    engine.dispose()
    source = SqlSource(SourceConfig(kind="sql", url=any_db_url, table=table_name), CONTRACT)
    # The key (date, id) rules out stored repeats only where a DATE is a date and the
    # declared types bind (not SQLite); elsewhere the database groups the stored ids.
    trusted = isinstance(date_type, sa.Date) and not any_db_url.startswith("sqlite")
    assert source._key_makes_ids_unique() is trusted
    stored = source.summarize(D1)
    assert (stored.rows, stored.duplicate_ids.to_pylist(), stored.as_stored) == (4, [], True)
    # ' a' is 'a' once trimmed: only a look at the cleaned ids finds that repeat.
    cleaned = source.summarize(D1, cleaned_ids=True)
    assert (cleaned.rows, cleaned.duplicate_ids.to_pylist(), cleaned.as_stored) == (4, ["a"], False)
    checked = check_batch(pa.Table.from_batches(list(source.read(D1))), CONTRACT,
                          duplicate_ids=stored.duplicate_ids)  # fmt: skip
    assert checked.ids_rewritten == 1


def test_missing_table_and_columns(any_db_url: str, table_name: str) -> None:
    sa.create_engine(any_db_url, poolclass=NullPool).connect().close()  # a database, no table
    with pytest.raises(ConfigError, match=f"source table '{table_name}' does not exist"):
        open_source(SourceConfig(kind="sql", url=any_db_url, table=table_name), CONTRACT).read(D1)
    fill(any_db_url, table_name, sa.Date())
    wider = ContractConfig(**{**CONTRACT.__dict__, "categorical": ("plan", "region", "tier")})
    source = open_source(SourceConfig(kind="sql", url=any_db_url, table=table_name), wider)
    with pytest.raises(MissingColumns, match=r"missing required column\(s\): region, tier"):
        source.read(D1)


def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.db"
    with pytest.raises(ConfigError, match=r"SQLite database .*absent\.db does not exist"):
        open_source(SourceConfig(kind="sql", url=f"sqlite:///{path}", table="t"), CONTRACT)
    assert not path.exists()


def test_unreachable_server_is_exit_7(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("churn_batch.db.RETRY_DELAYS", (0.0,))
    url = "postgresql+psycopg://postgres:topsecret@127.0.0.1:1/test"
    source = open_source(SourceConfig(kind="sql", url=url, table="t"), CONTRACT)
    with pytest.raises(StorageUnavailable) as info:
        source.summarize(D1)
    assert info.value.exit_code == 7
    assert "cannot reach table t at postgresql+psycopg://postgres:***@127.0.0.1:1/test" in str(
        info.value
    )
    assert "topsecret" not in str(info.value)


# -- Parquet -------------------------------------------------------------------------


def arrow_rows() -> pa.Table:
    return pa.Table.from_pylist(rows())


def test_parquet_single_file(tmp_path: Path) -> None:
    pq.write_table(arrow_rows(), tmp_path / "snap.parquet", row_group_size=4)
    check_parquet(tmp_path / "snap.parquet")


def test_parquet_directory_of_files(tmp_path: Path) -> None:
    table = arrow_rows()
    pq.write_table(table.slice(0, 9), tmp_path / "a.parquet")
    pq.write_table(table.slice(9), tmp_path / "b.parquet")
    check_parquet(tmp_path)


def test_parquet_files_of_other_types_arrive_as_the_dataset_schema(tmp_path: Path) -> None:
    table = arrow_rows()
    pq.write_table(table.slice(0, 9), tmp_path / "a.parquet")
    later = table.slice(9).set_column(2, "charges", pa.array([7, 8, 9, 10, 11, 12, 13]))
    pq.write_table(later, tmp_path / "b.parquet")  # whole-number charges stored as int64
    source = open_source(SourceConfig(kind="parquet", path=tmp_path, batch_size=3), CONTRACT)
    batches = list(source.read_range(D1, D3))
    assert {b.schema.field("charges").type for b in batches} == {pa.float64()}
    assert sum(b.num_rows for b in batches) == 16
    charges = pa.concat_tables(pa.Table.from_batches([b]) for b in batches)["charges"]
    assert charges.to_pylist()[-7:] == [7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0]


def test_parquet_file_whose_column_cannot_take_the_dataset_type_is_named(tmp_path: Path) -> None:
    table = arrow_rows()
    pq.write_table(table.slice(0, 9), tmp_path / "a.parquet")
    later = table.slice(9).set_column(2, "charges", pa.array(["n/a"] * 7))
    pq.write_table(later, tmp_path / "b.parquet")  # text where a.parquet has doubles
    source = open_source(SourceConfig(kind="parquet", path=tmp_path, batch_size=3), CONTRACT)
    with pytest.raises(ContractViolation, match=r"b\.parquet: column charges is string .* double"):
        list(source.read_range(D1, D3))


def test_parquet_rows_of_other_dates_or_none_are_left_out(tmp_path: Path) -> None:
    table = arrow_rows()
    dates = table["snapshot_date"].to_pylist()
    dates[1] = None  # a D1 row without a date belongs to no date
    pq.write_table(table.set_column(1, "snapshot_date", pa.array(dates, pa.date32())),
                   tmp_path / "snap.parquet", row_group_size=5)  # fmt: skip
    source = open_source(SourceConfig(kind="parquet", path=tmp_path, batch_size=4), CONTRACT)
    read = pa.Table.from_batches(list(source.read(D1)))
    assert read.num_rows == 7
    assert set(read["snapshot_date"].to_pylist()) == {D1}
    assert sum(b.num_rows for b in source.read(D3)) == 3
    assert sum(b.num_rows for b in source.read_range(None, None)) == 16


def test_parquet_hive_partitions_prune_other_dates(tmp_path: Path) -> None:
    table = arrow_rows()
    for day in (D1, D2, D3):
        part = tmp_path / f"snapshot_date={day.isoformat()}"
        part.mkdir()
        mask = pa.compute.equal(table["snapshot_date"], pa.scalar(day, pa.date32()))
        pq.write_table(table.filter(mask).drop_columns(["snapshot_date"]), part / "0.parquet")
    # A corrupt file in another date's partition proves that date is never opened.
    (tmp_path / f"snapshot_date={D3.isoformat()}" / "0.parquet").write_bytes(b"PAR1garbage")
    source = open_source(SourceConfig(kind="parquet", path=tmp_path, batch_size=3), CONTRACT)
    assert source.summarize(D2).rows == 5
    assert sum(b.num_rows for b in source.read(D1)) == 8
    with pytest.raises(NoSnapshotRows):
        source.summarize(date(2024, 4, 30))
    # Reads that need the date do open it, and name the file.
    broken = tmp_path / f"snapshot_date={D3.isoformat()}" / "0.parquet"
    with pytest.raises(ContractViolation, match=rf"Parquet file {broken} cannot be read: "):
        source.dates()
    with pytest.raises(ContractViolation, match=rf"Parquet file {broken} cannot be read: "):
        list(source.read_range(D2, None))


def test_parquet_reads_a_big_row_group_a_batch_at_a_time(tmp_path: Path) -> None:
    """Arrow memory while streaming one 200k-row row group stays near one batch's, not
    the group's: the dataset scanner decoded whole row groups (~110 MB per million)."""
    n = 200_000
    table = pa.table({
        "customer_id": [f"customer-{i:09d}" for i in range(n)],
        "snapshot_date": pa.array([D1] * n, pa.date32()),
        "charges": [i * 0.5 for i in range(n)],
        "plan": ["basic", "plus", "premium", "family"] * (n // 4),
        "churned": ["No"] * n,
    })  # fmt: skip
    # Dictionary pages (decoded whole, up to 1 MB each) only where the levels are few.
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=n, use_dictionary=["plan"])
    decoded = table.nbytes
    del table
    source = open_source(SourceConfig(kind="parquet", path=tmp_path, batch_size=5_000), CONTRACT)
    pool = pa.default_memory_pool()
    before, most, rows_read = pool.bytes_allocated(), 0, 0
    for batch in source.read(D1):
        rows_read += batch.num_rows
        most = max(most, pool.bytes_allocated() - before)
        del batch
    assert rows_read == n
    assert most < decoded / 3, f"{most} bytes held while reading, the group is {decoded}"


def check_parquet(path: Path) -> None:
    source = open_source(SourceConfig(kind="parquet", path=path, batch_size=3), CONTRACT)
    summary = source.summarize(D1)
    assert (summary.rows, summary.duplicate_ids.to_pylist()) == (8, ["c0"])
    batches = list(source.read(D1))
    assert all(b.num_rows <= 3 for b in batches)
    assert sum(b.num_rows for b in batches) == 8
    assert source.dates() == [D1, D2, D3]
    with pytest.raises(NoSnapshotRows):
        source.summarize(date(2024, 4, 30))


def test_parquet_missing_path(tmp_path: Path) -> None:
    source = open_source(SourceConfig(kind="parquet", path=tmp_path / "nope"), CONTRACT)
    with pytest.raises(ConfigError, match=r"Parquet source .*nope does not exist"):
        source.summarize(D1)


def test_parquet_file_without_the_label_gives_rows_without_one(tmp_path: Path) -> None:
    """Labels exist for the past only: a newer file may lack the column altogether."""
    table = arrow_rows()
    pq.write_table(table.slice(0, 12), tmp_path / "a.parquet")
    pq.write_table(table.slice(12).drop_columns(["churned"]), tmp_path / "b.parquet")
    source = open_source(SourceConfig(kind="parquet", path=tmp_path, batch_size=3), CONTRACT)
    read = pa.Table.from_batches(list(source.read_range(None, None)))
    assert read.num_rows == 16
    assert read["churned"].to_pylist()[-4:] == [None] * 4
    assert read["churned"].null_count == 4
    assert sum(b.num_rows for b in source.read(D3)) == 3  # scoring needs no label

    pq.write_table(table.slice(0, 12).drop_columns(["churned"]), tmp_path / "a.parquet")
    with pytest.raises(MissingColumns, match=r"missing required column\(s\): churned \(found"):
        list(source.read_range(None, None))


def test_parquet_file_without_a_feature_is_named_when_its_rows_are_read(tmp_path: Path) -> None:
    table = arrow_rows()
    d1 = pa.compute.equal(table["snapshot_date"], pa.scalar(D1, pa.date32()))
    pq.write_table(table.filter(d1), tmp_path / "a.parquet")
    later = table.filter(pa.compute.invert(d1)).drop_columns(["charges"])
    pq.write_table(later, tmp_path / "b.parquet")
    source = open_source(SourceConfig(kind="parquet", path=tmp_path, batch_size=3), CONTRACT)
    # b.parquet's statistics say it holds no D1 row: it is not read, nor its columns judged.
    assert sum(b.num_rows for b in source.read(D1)) == 8
    missing = (
        rf"Parquet file {tmp_path / 'b.parquet'} is missing required column\(s\): charges "
        r"\(found: customer_id, snapshot_date, plan, churned\)"
    )
    with pytest.raises(MissingColumns, match=missing):
        source.summarize(D2)  # the first pass judges every column, though it reads the ids
    with pytest.raises(MissingColumns, match=missing):
        list(source.read_range(None, None))


def test_parquet_broken_file_is_named_by_every_read_that_needs_it(tmp_path: Path) -> None:
    pq.write_table(arrow_rows(), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"")
    source = open_source(SourceConfig(kind="parquet", path=tmp_path, batch_size=3), CONTRACT)
    message = (
        rf"Parquet file {tmp_path / 'b.parquet'} cannot be read: Parquet file size is 0 bytes$"
    )
    for read in (source.dates, lambda: source.summarize(D1), lambda: list(source.read(D1))):
        with pytest.raises(ContractViolation, match=message):
            read()


def test_parquet_directory_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "_SUCCESS").write_bytes(b"")
    (tmp_path / ".a.parquet.crc").write_bytes(b"crc")
    source = open_source(SourceConfig(kind="parquet", path=tmp_path, batch_size=3), CONTRACT)
    assert source.dates() == []
    with pytest.raises(NoSnapshotRows, match=r"for 2024-05-01 in parquet .*, which holds no data"):
        source.summarize(D1)
    with pytest.raises(NoSnapshotRows, match=r"for 2024-05-01\.\.the last date in parquet"):
        list(source.read_range(D1, None))


def test_sqlite_mixed_storage_classes_take_the_row_path(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'mixed.db'}"
    # REAL, not NUMERIC: SQLite stores a NUMERIC 0.0 as the integer 0 (two classes).
    fill(url, "snap", sa.Date(), sa.Float())
    config = SourceConfig(kind="sql", url=url, table="snap", batch_size=2)
    source = open_source(config, CONTRACT)
    assert isinstance(source, SqlSource)
    columns = list(CONTRACT.required_columns)
    assert source._one_storage_class(D1, D2, columns), "uniform: the ADBC path"
    uniform = list(source.read(D1))
    assert not source.portable
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:  # a blank among numbers, as real exports have
        conn.execute(sa.text("UPDATE snap SET charges = ' ' WHERE customer_id = 'c3'"))
    engine.dispose()
    assert not source._one_storage_class(D1, D2, columns)
    # The nightly read skips that check: ADBC stops at the blank (second batch), after
    # handing out a batch, so the caller must start over; the source reads rows then.
    with pytest.raises(PortablePathNeeded, match="mixes storage classes"):
        list(source.read(D1))
    source.use_portable_path()
    # Batch by batch, as the job does: the row path types each batch on its own.
    dups = source.summarize(D1).duplicate_ids
    mixed = [check_batch(b, CONTRACT, duplicate_ids=dups) for b in source.read(D1)]
    valid = pa.concat_tables([m.valid for m in mixed])
    before = check_batch(pa.Table.from_batches(uniform), CONTRACT, duplicate_ids=dups).valid
    assert sum(m.invalid_numbers["charges"] for m in mixed) == 1
    assert valid["customer_id"].to_pylist() == before["customer_id"].to_pylist()
    expected = [None if i == "c3" else v for i, v in zip(before["customer_id"].to_pylist(),
                before["charges"].to_pylist(), strict=True)]  # fmt: skip
    assert valid["charges"].to_pylist() == expected


def test_sqlite_text_in_a_number_column_never_reaches_the_arrow_reader(tmp_path: Path) -> None:
    """ADBC would type the column as text from its first rows and print the later reals
    with 7 digits ('1.234568e+05'): the source reads those rows one by one instead."""
    url = f"sqlite:///{tmp_path / 'numeric.db'}"
    fill(url, "snap", sa.Date(), sa.Numeric(10, 2))
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE snap SET charges = ' ' WHERE customer_id = 'c1'"))
        conn.execute(
            sa.text("UPDATE snap SET charges = 123456.78901234567 WHERE customer_id = 'c5'")
        )
    engine.dispose()
    source = open_source(SourceConfig(kind="sql", url=url, table="snap", batch_size=100), CONTRACT)
    assert isinstance(source, SqlSource)
    table = pa.Table.from_batches(list(source.read(D1)))  # no error: before the first batch
    assert source.portable
    valid = check_batch(table, CONTRACT).valid
    charges = dict(zip(valid["customer_id"].to_pylist(), valid["charges"].to_pylist(),
                       strict=True))  # fmt: skip
    assert charges["c5"] == 123456.78901234567
    assert charges["c1"] is None  # the blank: an invalid number, as on every path

"""The SQL snapshot source: a table (reflected) or a query binding `:snapshot_date`.

Each database gets its fastest reader that reads values as the portable row path
would: PostgreSQL through ADBC's binary COPY, SQLite through ADBC in a child process
(see `sqlite_reader`), everything else as SQLAlchemy rows.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Iterator, Sequence
from datetime import date, datetime, time
from time import sleep
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import CompileError, DBAPIError, NoSuchTableError

from churn_batch import sqlite_reader
from churn_batch.config import ContractConfig, SourceConfig, redact_urls_in
from churn_batch.contract import as_dates, require_columns
from churn_batch.db import (
    RETRY_DELAYS,
    config_problem_text,
    create_engine,
    describe_error,
    retrying,
)
from churn_batch.errors import (
    ConfigError,
    MissingColumns,
    NoSnapshotRows,
    StorageUnavailable,
)
from churn_batch.sources import SnapshotSummary, ids_as_strings, next_day, summary_of_ids
from churn_batch.sqlite_reader import PortablePathNeeded as PortablePathNeeded

log = logging.getLogger(__name__)

# Fewer rows than this on SQLite are read as rows in this process: the reader process
# takes ~0.3 s to start, the time the row path needs for about 50,000 rows.
SQLITE_CHILD_MIN_ROWS = 50_000


class SqlSource:
    """A table (reflected, so the date filter matches its column type) or a query."""

    def __init__(self, config: SourceConfig, contract: ContractConfig) -> None:
        assert config.url is not None
        self.config = config
        self.contract = contract
        self.engine = create_engine(config.url, must_exist=True)
        self._table: sa.Table | None = None
        self._portable = False  # SQLite: rows through SQLAlchemy, not ADBC (see _stream)
        self._rows_of: dict[date, int] = {}  # counted by `summarize`, to choose the reader

    def describe(self) -> str:
        return self.config.describe()

    # The query or table, as a selectable with a date filter for [lo, hi).
    def _selectable(
        self,
        lo: date | None,
        hi: date | None,
        columns: Sequence[str] | None,
        *,
        via_settings: bool = False,
    ) -> Any:
        """The query or table as a selectable filtered to lo <= date < hi.

        `via_settings` (PostgreSQL): the dates are read from session settings, set with
        bound parameters just before, so the statement itself has no parameters and the
        ADBC driver can stream it with COPY instead of buffering the whole result.
        """
        if self.config.query is not None:
            if lo is None or hi is None or hi != next_day(lo):
                raise ConfigError(
                    "a source 'query' selects one :snapshot_date; train on a source "
                    "'table' to read a range of dates",
                    key="source.query",
                )
            if via_settings:
                setting = str(_setting("lo", sa.Date()).compile(dialect=_numeric_dollar_dialect()))
                return sa.text(_BIND.sub(lambda _: setting, self.config.query))
            return sa.text(self.config.query).bindparams(
                sa.bindparam("snapshot_date", lo, type_=sa.Date())
            )
        table = self._reflect()
        names = list(columns) if columns is not None else [c.name for c in table.columns]
        # Untyped column references: values come back raw (SQLite DATE text would
        # otherwise be parsed by SQLAlchemy and fail on one odd value).
        cols: list[sa.ColumnClause[Any]] = [sa.column(name) for name in names]
        query = sa.select(*cols).select_from(sa.table(table.name, schema=table.schema))
        date_col = table.columns[self.contract.date_column]
        bound: sa.ColumnClause[Any] = sa.column(self.contract.date_column)
        one_day = lo is not None and hi is not None and hi == next_day(lo)
        if via_settings and one_day and type(_date_type(date_col.type)) is sa.Date:
            # One day of a real DATE column (PostgreSQL): an equality, which the planner
            # estimates from the column's distinct dates even without the value, so a
            # date that is most of the table is read by a sequential scan, not the key.
            return query.where(bound == _setting("lo", sa.Date()))
        for value, op in ((lo, "lo"), (hi, "hi")):
            if value is not None:
                param = (
                    _setting(op, _date_type(date_col.type))
                    if via_settings
                    else _date_param(date_col.type, value)
                )
                query = query.where(bound >= param if op == "lo" else bound < param)
        return query

    def _reflect(self) -> sa.Table:
        if self._table is None:
            assert self.config.table is not None
            schema, _, name = self.config.table.rpartition(".")

            def reflect() -> sa.Table:
                with self.engine.connect() as conn:
                    return sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=conn)

            try:
                self._table = retrying(reflect, self.describe())
            except NoSuchTableError:
                raise ConfigError(
                    f"source table {self.config.table!r} does not exist ({self.describe()})",
                    key="source.table",
                ) from None
            present = [c.name for c in self._table.columns]
            if self.contract.date_column not in present:
                raise MissingColumns([self.contract.date_column], present)
        return self._table

    def _needed_columns(self, label: bool) -> list[str] | None:
        if self.config.query is not None:
            return None
        return require_columns(
            [c.name for c in self._reflect().columns], self.contract, label=label
        )

    def summarize(self, snapshot_date: date, *, cleaned_ids: bool = False) -> SnapshotSummary:
        lo, hi = snapshot_date, next_day(snapshot_date)
        if cleaned_ids:
            # Every id, cleaned here: memory grows with the ids (see `_summary_of_ids`).
            name = self.contract.id_column
            ids = (b.column(name) for b in self._stream(lo, hi, [name]))
            return summary_of_ids(ids, snapshot_date, self.describe())
        # The contract's columns first: the repeat search below needs the id column, and
        # a missing one is the snapshot's fault (exit 4), not a failed query.
        self._require_columns(lo, hi)
        unique = self._key_makes_ids_unique()
        inner = self._selectable(lo, hi, None)
        if isinstance(inner, sa.TextClause):
            sub = inner.columns(sa.column(self.contract.id_column)).subquery("snapshot")
        else:
            sub = inner.subquery("snapshot")
        id_col = sub.c[self.contract.id_column]
        exact = _exact_id(id_col, self.engine.dialect.name)
        count_q = sa.select(sa.func.count()).select_from(sub)
        # Grouped on the ids' exact text, as the predictions' key compares them: a
        # case-insensitive collation (MariaDB's default, SQLite's NOCASE) would call
        # C0000001 and c0000001 one customer, reject one and publish the other.
        dup_q = sa.select(sa.func.min(id_col)).group_by(exact).having(sa.func.count() > 1)

        def run() -> tuple[int, list[Any]]:
            with self.engine.connect() as conn:
                n = int(conn.execute(count_q).scalar_one())
                dups = [row[0] for row in conn.execute(dup_q)] if n and not unique else []
                return n, dups

        rows, dups = self._run(run)
        if rows == 0:
            raise NoSnapshotRows(snapshot_date, self.describe())
        self._rows_of[snapshot_date] = rows
        return SnapshotSummary(rows, ids_as_strings(_to_array(dups)), as_stored=True)

    def _require_columns(self, lo: date, hi: date) -> None:
        """`MissingColumns` (exit 4) unless the table or query has the contract's columns."""
        if self.config.query is None:
            self._needed_columns(False)
            return
        inner = self._selectable(lo, hi, None)
        assert isinstance(inner, sa.TextClause)
        probe: sa.Select[Any] = sa.select(sa.literal_column("*")).select_from(
            inner.columns().subquery("q")
        )

        def run() -> list[str]:
            with self.engine.connect() as conn:
                return list(conn.execute(probe.limit(0)).keys())

        require_columns(self._run(run), self.contract, label=False)

    def _key_makes_ids_unique(self) -> bool:
        """True when a primary key or unique constraint/index allows one row per id and date.

        Only where the stored values mean what the contract reads: the id column an
        integer or a string (distinct floats can print alike), the date column a real
        DATE (a timestamp or text column holds many values per day), and not on SQLite,
        whose declared types bind nothing (1 and '1' are distinct there).
        """
        if self.config.query is not None or self.engine.dialect.name == "sqlite":
            return False
        table = self._reflect()
        id_name, date_name = self.contract.id_column, self.contract.date_column
        id_col = table.columns.get(id_name)
        if id_col is None or not isinstance(id_col.type, sa.Integer | sa.String):
            return False
        keys = [{c.name for c in table.primary_key.columns}]
        keys += [
            {c.name for c in constraint.columns}
            for constraint in table.constraints
            if isinstance(constraint, sa.UniqueConstraint)
        ]
        keys += [{c.name for c in index.columns} for index in table.indexes if index.unique]
        date_is_date = isinstance(table.columns[date_name].type, sa.Date) and not isinstance(
            table.columns[date_name].type, sa.DateTime
        )
        return any(
            key == {id_name} or (key == {id_name, date_name} and date_is_date) for key in keys
        )

    def read(self, snapshot_date: date) -> Iterator[pa.RecordBatch]:
        columns = self._needed_columns(False)
        return self._stream(
            snapshot_date, next_day(snapshot_date), columns,
            optimistic=True, rows=self._rows_of.get(snapshot_date),
        )  # fmt: skip

    def read_range(
        self, start: date | None, end: date | None, *, label: bool = True
    ) -> Iterator[pa.RecordBatch]:
        if self.config.query is not None and start is not None and start == end:
            return self.read(start)
        hi = next_day(end) if end is not None else None
        return self._stream(start, hi, self._needed_columns(label))

    def dates(self) -> list[date]:
        if self.config.query is not None:
            raise ConfigError(
                "a source 'query' cannot list its dates; give --date", key="source.query"
            )
        table = self._reflect()
        col: sa.ColumnClause[Any] = sa.column(self.contract.date_column)
        query = sa.select(col).distinct().select_from(sa.table(table.name, schema=table.schema))

        def run() -> list[Any]:
            with self.engine.connect() as conn:
                return [row[0] for row in conn.execute(query)]

        values, ok = as_dates(_to_array(self._run(run)))
        return sorted(set(values.filter(ok).to_pylist()))

    def _run(self, action: Any) -> Any:
        try:
            return retrying(action, self.describe())
        except DBAPIError as exc:
            raise ConfigError(f"query on {self.describe()} failed: {describe_error(exc)}") from None

    @property
    def portable(self) -> bool:
        return self._portable

    def use_portable_path(self) -> None:
        """Read with SQLAlchemy rows from now on (after `PortablePathNeeded`)."""
        self._portable = True

    def _stream(
        self,
        lo: date | None,
        hi: date | None,
        columns: Sequence[str] | None,
        *,
        optimistic: bool = False,
        rows: int | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """The rows in [lo, hi) by the fastest path that reads them as the row path would.

        SQLite through ADBC needs each column to hold one storage class. `optimistic`
        (the nightly read, whose caller can start over) skips the full pass that checks
        it and relies on the guards in `_adbc_sqlite_stream` instead. `rows`, when known,
        keeps a small read in this process: starting the reader costs more than that.
        """
        dialect = self.engine.dialect.name
        if dialect == "postgresql" and _adbc_available("postgresql"):
            return _rebatch(self._adbc_stream(lo, hi, columns), self.config.batch_size)
        if (
            dialect == "sqlite"
            and columns is not None
            and not self._portable
            and (rows is None or rows >= SQLITE_CHILD_MIN_ROWS)
            and _adbc_available("sqlite")
            and (optimistic or self._one_storage_class(lo, hi, columns))
        ):
            return self._sqlite_arrow_or_rows(lo, hi, columns)
        return self._rows_stream(self._selectable(lo, hi, columns))

    def _sqlite_arrow_or_rows(
        self, lo: date | None, hi: date | None, columns: Sequence[str]
    ) -> Iterator[pa.RecordBatch]:
        """ADBC batches; the row path instead if ADBC cannot read the first batch as the
        row path would. Past the first batch that is the caller's `PortablePathNeeded`."""
        started = False
        try:
            for batch in self._adbc_sqlite_stream(lo, hi, columns):
                started = True
                yield batch
        except PortablePathNeeded as exc:
            if started:
                raise  # the caller starts over, after `use_portable_path`
            self.use_portable_path()
            log.info("%s; reading %s row by row", exc, self.describe())
            yield from self._rows_stream(self._selectable(lo, hi, columns))

    def _one_storage_class(self, lo: date | None, hi: date | None, columns: Sequence[str]) -> bool:
        """True when each column holds one SQLite storage class (besides NULL) in range.

        SQLite lets a column mix text and numbers; the ADBC driver types a column from
        its first rows and fails on a later mismatch, so it only gets uniform columns
        (checked in one pass; real exports with " " among numbers take the row path).
        """
        sub = self._selectable(lo, hi, columns).subquery("snapshot")
        # MIN and MAX skip NULLs, so only present values' classes are compared; they
        # need no hash set per column, unlike COUNT(DISTINCT ...).
        classes = [
            sa.case((sub.c[name].is_not(None), sa.func.typeof(sub.c[name]))) for name in columns
        ]
        query = sa.select(
            *[f(kind) for kind in classes for f in (sa.func.min, sa.func.max)]
        ).select_from(sub)

        def run() -> Any:
            with self.engine.connect() as conn:
                return conn.execute(query).one()

        bounds = list(self._run(run))
        return all(low == high for low, high in zip(bounds[::2], bounds[1::2], strict=True))

    def _adbc_sqlite_stream(
        self, lo: date | None, hi: date | None, columns: Sequence[str]
    ) -> Iterator[pa.RecordBatch]:
        """SQLite rows straight into Arrow batches, read by ADBC in a child process.

        Never in this process: see `sqlite_reader` for why one process must not hold
        two SQLite libraries on one file. The values are bound as parameters.
        """
        compiled = self._selectable(lo, hi, columns).compile(dialect=self.engine.dialect)
        params = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            process = bind.type.dialect_impl(self.engine.dialect).bind_processor(
                self.engine.dialect
            )
            value = compiled.params[name]
            params.append(process(value) if process else value)
        numeric = _sqlite_numeric_columns(self._reflect(), columns, self.contract.date_column)
        request = sqlite_reader.ReadRequest(
            database=str(self.engine.url.database),
            sql=compiled.string,
            params=params,
            batch_rows=self.config.batch_size,
            numeric_columns=numeric,
        )
        try:
            yield from sqlite_reader.read(request)
        except sqlite_reader.ReaderFailed as exc:
            raise StorageUnavailable(
                f"reading {self.describe()} failed: {redact_urls_in(str(exc))}"
            ) from None

    def _adbc_stream(
        self, lo: date | None, hi: date | None, columns: Sequence[str] | None
    ) -> Iterator[pa.RecordBatch]:
        """PostgreSQL's binary COPY straight into Arrow: no Python object per value."""
        import adbc_driver_manager
        import adbc_driver_postgresql.dbapi as adbc

        query = self._selectable(lo, hi, columns, via_settings=True)
        sql = str(query.compile(dialect=_numeric_dollar_dialect()))
        values = {"lo": lo, "hi": hi}
        uri = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

        def open_reader() -> tuple[Any, Any, Any]:
            conn = adbc.connect(uri)
            try:
                cursor = conn.cursor()
                # The values, bound, into this session's settings (the only parameters).
                names = [name for name, value in values.items() if value is not None]
                if names:
                    calls = ", ".join(
                        f"set_config('{_SETTING_PREFIX}{name}', ${i}, false)"
                        for i, name in enumerate(names, start=1)
                    )
                    cursor.execute(f"SELECT {calls}", [_iso(values[n]) for n in names])
                    cursor.fetchall()
                cursor.execute(sql)
                return conn, cursor, cursor.fetch_record_batch()
            except BaseException:
                conn.close()
                raise

        # As `db.retrying` does for SQLAlchemy: a mistake in the URL is a config error at
        # once; a server that is away gets the same back-off, then "retry later" (exit 7).
        for attempt, delay in enumerate((*RETRY_DELAYS, None)):
            try:
                conn, cursor, reader = open_reader()
                break
            except adbc_driver_manager.OperationalError as exc:
                message = redact_urls_in(str(exc).splitlines()[0])
                problem = config_problem_text(str(exc))
                if problem is not None:
                    raise ConfigError(
                        f"cannot use {self.describe()}: {problem} ({message})"
                    ) from None
                if delay is None:
                    raise StorageUnavailable(
                        f"cannot reach {self.describe()} after {attempt + 1} attempts: {message}"
                    ) from None
                log.warning(
                    "cannot reach %s (%s); retrying in %.1fs", self.describe(), message, delay
                )
                sleep(delay)
            except adbc_driver_manager.Error as exc:
                message = redact_urls_in(str(exc).splitlines()[0])
                raise ConfigError(f"query on {self.describe()} failed: {message}") from None
        try:
            yield from reader
        finally:
            cursor.close()
            conn.close()

    def _rows_stream(self, query: Any) -> Iterator[pa.RecordBatch]:
        size = self.config.batch_size

        def open_result() -> tuple[sa.Connection, sa.CursorResult[Any]]:
            conn = self.engine.connect().execution_options(stream_results=True, yield_per=size)
            try:
                return conn, conn.execute(query)
            except BaseException:
                conn.close()
                raise

        conn, result = self._run(open_result)
        try:
            names = list(result.keys())
            for rows in result.partitions(size):
                if rows:
                    yield _rows_to_batch(names, rows)
        finally:
            result.close()
            conn.close()


_SETTING_PREFIX = "churn_batch."
# How SQLAlchemy's text() finds a bound parameter; used to swap :snapshot_date.
_BIND = re.compile(r"(?<![:\w\\]):snapshot_date\b(?!:)")


_SQLITE_DIALECT = sqlite_dialect.dialect()


def _sqlite_numeric_columns(table: sa.Table, columns: Sequence[str], date_column: str) -> list[str]:
    """The columns that ADBC must give as numbers to read every value exactly.

    ADBC types a column from its first batch, then stops with a type mismatch at a later
    value of another storage class, EXCEPT in a column it typed as text: there it turns
    numbers into text, reals as '%e' with 7 digits. So a column may come as text only
    where SQLite cannot hold numbers in it: TEXT affinity (a declared type containing
    CHAR, CLOB or TEXT, and not INT: SQLite's own rules) converts them to text on
    insert. The date column may come as text anyway: a number there is no date on
    either path.
    """
    numeric = []
    for name in columns:
        try:
            declared = str(table.columns[name].type.compile(dialect=_SQLITE_DIALECT)).upper()
        except CompileError:  # a type SQLAlchemy does not know: not TEXT affinity
            declared = ""
        text_affinity = "INT" not in declared and any(
            word in declared for word in ("CHAR", "CLOB", "TEXT")
        )
        if name != date_column and not text_affinity:
            numeric.append(name)
    return numeric


def _exact_id(column: Any, dialect: str) -> Any:
    """The id as text compared byte for byte, whatever the column's collation."""
    if dialect in ("mysql", "mariadb"):
        return sa.cast(column, sa.LargeBinary())  # CAST(... AS BINARY)
    if dialect == "postgresql":
        return sa.cast(column, sa.Text()).collate("C")
    if dialect == "sqlite":
        return column.collate("BINARY")
    return column


def _setting(name: str, kind: sa.types.TypeEngine[Any]) -> Any:
    """The session setting `name`, cast to the date column's type (see _adbc_stream).

    As a scalar subquery: PostgreSQL then reads it once per query (an InitPlan) rather
    than once per row of a sequential scan, which made the read 3x slower on the server.
    """
    expr = sa.func.current_setting(sa.literal_column(f"'{_SETTING_PREFIX}{name}'"))
    return sa.select(sa.cast(expr, kind)).scalar_subquery()


def _date_type(column_type: sa.types.TypeEngine[Any]) -> sa.types.TypeEngine[Any]:
    if isinstance(column_type, sa.DateTime):
        return sa.DateTime()
    if isinstance(column_type, sa.Date):
        return sa.Date()
    return sa.String()


def _iso(value: date | None) -> str:
    assert value is not None
    return value.isoformat()


def _adbc_available(database: str) -> bool:
    """Whether the optional ADBC driver for `database` is installed.

    Found, not imported: SQLite's driver must never be loaded into this process (see
    `sqlite_reader`), and an import costs start-up time the read may never need.
    """
    return importlib.util.find_spec(f"adbc_driver_{database}") is not None


def _numeric_dollar_dialect() -> sa.Dialect:
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    return PGDialect_psycopg(paramstyle="numeric_dollar")  # type: ignore[no-untyped-call]


def _rebatch(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Cut the driver's batches (sized in bytes) to at most `size` rows."""
    for batch in batches:
        for offset in range(0, batch.num_rows, size):
            yield batch.slice(offset, size)


def _date_param(column_type: sa.types.TypeEngine[Any], value: date) -> Any:
    """A bound parameter typed like the column, so DATE, TIMESTAMP and ISO text all compare."""
    if isinstance(column_type, sa.DateTime):
        return sa.bindparam(None, datetime.combine(value, time()), type_=sa.DateTime())
    if isinstance(column_type, sa.Date):
        return sa.bindparam(None, value, type_=sa.Date())
    return sa.bindparam(None, value.isoformat(), type_=sa.String())


def _to_array(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # SQLite lets one column hold text in one row and a number in the next.
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _rows_to_batch(names: list[str], rows: Sequence[Any]) -> pa.RecordBatch:
    columns = list(zip(*rows, strict=True))
    return pa.RecordBatch.from_arrays([_to_array(list(c)) for c in columns], names=names)

"""The Parquet snapshot source: a file, a directory of files, or hive partitions.

Read file by file and batch by batch with each file's own reader, so memory stays
bounded by the batch size whatever the row groups; the dataset only finds the files
and prunes hive partitions, each file's footer prunes its row groups.

No file is ever skipped: every file under the path whose name (or folder's name) does
not start with '.' or '_' is data (those prefixes are what Spark, Hadoop and this
package's own writer use for `_SUCCESS`, `.crc`, `_metadata` and half-written folders).
A data file that cannot be read, or that lacks a required column, stops the read with
an error naming it (exit 4): dropping it would publish a date with rows missing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from churn_batch.config import ContractConfig, SourceConfig
from churn_batch.contract import as_dates
from churn_batch.errors import ConfigError, ContractViolation, MissingColumns, NoSnapshotRows
from churn_batch.sources import SnapshotSummary, next_day, summary_of_ids

# Names (of files or of any folder on their path) that are not data; Arrow's default.
IGNORED_PREFIXES = (".", "_")
# What reading a damaged file raises: ArrowInvalid for a bad footer or magic, OSError
# for undecodable thrift, a page that fails to decompress, or no permission to open.
_READ_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError)


class UnreadableParquetFile(ContractViolation):
    """A data file of the source cannot be read (exit 4): its rows are never left out."""

    def __init__(self, path: str, reason: object) -> None:
        self.path = path
        # Arrow repeats the path in its own message: keep only what went wrong, one line.
        text = re.sub(r"^Could not open Parquet input source '.*?': ", "", str(reason))
        super().__init__(f"Parquet file {path} cannot be read: {' '.join(text.split())}")


class FileMissingColumns(MissingColumns):
    """A data file lacks a column every row needs (exit 4), named with the file."""

    def __init__(self, path: str, missing: list[str], available: list[str]) -> None:
        super().__init__(missing, available)
        self.path = path
        self.args = (
            f"Parquet file {path} is missing required column(s): {', '.join(missing)} "
            f"(found: {', '.join(available)})",
        )


@dataclass(frozen=True)
class _Part:
    """One file to read: which row groups, its hive keys, and the columns it holds."""

    fragment: Any
    groups: list[int]
    keys: dict[str, Any]
    names: frozenset[str]


def _rows_in(
    batch: pa.RecordBatch, dates: pa.Array, bounds: list[tuple[str, pa.Scalar]]
) -> pa.RecordBatch:
    """The rows whose date is within `bounds` (a null date is not).

    Compared with Arrow compute, not by filtering on the dataset expression: that runs
    an Acero plan per batch, which held ~40 MB more memory over a 1M-row read.
    """
    mask: Any = None
    for op, scalar in bounds:
        part = pc.greater_equal(dates, scalar) if op == "ge" else pc.less(dates, scalar)
        mask = part if mask is None else pc.and_(mask, part)
    if mask is None or pc.all(mask, skip_nulls=False).as_py() is True:
        return batch  # a file of the one date: nothing to copy
    return batch.filter(mask)


def _as_type(column: pa.Array, kind: pa.DataType, name: str, path: str) -> pa.Array:
    """A file's column as the read's type (the first file's), as a scanner would."""
    if column.type == kind:
        return column
    try:
        return column.cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ContractViolation(
            f"Parquet file {path}: column {name} is {column.type} and does not read as "
            f"{kind}, its type in the source's other files ({exc})"
        ) from None


def _bounds(lo: date | None, hi: date | None, kind: pa.DataType) -> list[tuple[str, pa.Scalar]]:
    """[lo, hi) as ("ge" | "lt", value) pairs typed like a date column of type `kind`."""
    bounds = []
    for value, op in ((lo, "ge"), (hi, "lt")):
        if value is None:
            continue
        if pa.types.is_timestamp(kind):
            scalar = pa.scalar(datetime.combine(value, time()), kind)
        elif pa.types.is_date(kind):
            scalar = pa.scalar(value, kind)
        else:
            scalar = pa.scalar(value.isoformat(), pa.string())
        bounds.append((op, scalar))
    return bounds


def _filter(column: str, bounds: list[tuple[str, pa.Scalar]]) -> ds.Expression | None:
    field = ds.field(column)
    expr: ds.Expression | None = None
    for op, scalar in bounds:
        part = field >= scalar if op == "ge" else field < scalar
        expr = part if expr is None else expr & part
    return expr


def _span(lo: date | None, hi: date | None) -> str:
    """[lo, hi) as the date, or the dates, a user asked for."""
    if lo is not None and hi == next_day(lo):
        return str(lo)
    last = hi - timedelta(days=1) if hi is not None else None
    return f"{lo or 'the first date'}..{last or 'the last date'}"


def _refuse_special_files(base: str) -> None:
    """Arrow's listing drops a dangling link or a pipe without a word: refuse them."""

    def fail(exc: OSError) -> None:
        raise ConfigError(f"cannot list Parquet source {base}: {exc}") from None

    for folder, dirs, files in os.walk(base, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(IGNORED_PREFIXES)]
        for name in files:
            path = os.path.join(folder, name)
            if not name.startswith(IGNORED_PREFIXES) and not os.path.isfile(path):
                raise UnreadableParquetFile(path, "not a regular file (a dangling link?)")


class ParquetSource:
    """A file, a directory of files, or hive-partitioned `snapshot_date=YYYY-MM-DD/`."""

    def __init__(self, config: SourceConfig, contract: ContractConfig) -> None:
        assert config.path is not None
        self.config = config
        self.contract = contract
        self.path = Path(config.path)
        self._dataset: ds.FileSystemDataset | None = None

    def describe(self) -> str:
        return self.config.describe()

    @property
    def dataset(self) -> ds.FileSystemDataset:
        """The data files and their hive keys; its schema holds the partition keys only.

        No file is opened here (Arrow's `ds.dataset` reads the first file's footer and,
        with `exclude_invalid_files`, every footer, dropping the files that fail): each
        read opens the files it needs and names any that cannot be read.
        """
        if self._dataset is None:
            if not self.path.exists():
                raise ConfigError(f"Parquet source {self.path} does not exist", key="source.path")
            base = os.path.abspath(self.path)
            options = ds.FileSystemFactoryOptions(
                exclude_invalid_files=False, selector_ignore_prefixes=list(IGNORED_PREFIXES)
            )
            paths: Any = [base]
            if self.path.is_dir():
                _refuse_special_files(base)
                options.partition_base_dir = base
                options.partitioning_factory = ds.HivePartitioning.discover()
                paths = pafs.FileSelector(base, recursive=True)
            # Categorical text arrives dictionary-encoded, as Parquet stores it: the
            # contract then cleans each level once, not each row.
            read = ds.ParquetReadOptions(dictionary_columns=set(self.contract.categorical))
            try:
                factory = ds.FileSystemDatasetFactory(
                    pafs.LocalFileSystem(), paths, ds.ParquetFileFormat(read_options=read), options
                )
                self._dataset = factory.finish(factory.inspect(fragments=0))
            except (pa.ArrowInvalid, OSError) as exc:
                raise ConfigError(f"cannot read Parquet source {self.path}: {exc}") from None
        return self._dataset

    def summarize(self, snapshot_date: date, *, cleaned_ids: bool = False) -> SnapshotSummary:
        # Always judged on cleaned ids: there is no database to ask, nor keys to trust.
        # Only the ids are read, but every file of the date is checked for all the
        # contract's columns, so a bad file stops the run before anything is scored.
        id_column = self.contract.id_column
        batches = self._batches(
            snapshot_date, next_day(snapshot_date), [id_column], check=self._required(False)
        )
        return summary_of_ids(
            (b.column(id_column) for b in batches), snapshot_date, self.describe()
        )

    def read(self, snapshot_date: date) -> Iterator[pa.RecordBatch]:
        return self._batches(snapshot_date, next_day(snapshot_date), self._required(False))

    def read_range(
        self, start: date | None, end: date | None, *, label: bool = True
    ) -> Iterator[pa.RecordBatch]:
        hi = next_day(end) if end is not None else None
        return self._batches(start, hi, self._required(label))

    def dates(self) -> list[date]:
        # The one column, whole: a date per row is small next to a batch of features.
        column = self.contract.date_column
        if not self.dataset.files:
            return []
        chunks = [b.column(column) for b in self._batches(None, None, [column])]
        if not chunks:
            return []
        values, ok = as_dates(pa.chunked_array(chunks))
        return sorted(set(pc.unique(values.filter(ok)).to_pylist()))

    def _required(self, label: bool) -> list[str]:
        needed = list(self.contract.required_columns)
        if label and self.contract.label_column:
            needed.append(self.contract.label_column)
        return needed

    def _batches(
        self, lo: date | None, hi: date | None, columns: list[str], check: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """`columns` of the rows dated within [lo, hi), `batch_size` at a time, file by
        file, every file checked for the `check` columns (default: `columns`).

        Not the dataset scanner: it decodes a whole row group before cutting it into
        batches (a 1M-row group held ~110 MB of Arrow memory, and a bigger group more).
        The file reader decodes a batch at a time (~30 MB for 100k rows). Every file is
        planned before the first batch, so a broken one fails the read before any row
        of the date is used.
        """
        if not self.dataset.files:
            raise NoSnapshotRows(_span(lo, hi), f"{self.describe()}, which holds no data file")
        parts, types = self._plan(lo, hi, check or columns)
        date_column = self.contract.date_column
        bounds = _bounds(lo, hi, types[date_column]) if parts else []
        for part in parts:
            in_path = date_column in part.keys  # a hive partition of the date: all in bounds
            yield from self._part_batches(part, types, [] if in_path else bounds, columns)

    def _plan(
        self, lo: date | None, hi: date | None, columns: list[str]
    ) -> tuple[list[_Part], dict[str, pa.DataType]]:
        """The files that may hold rows dated [lo, hi), each checked for `columns`, and
        the type each column is read as: the first file's, as Arrow's scanner does.

        A hive partition of another date is pruned unopened (a broken file there fails
        the reads of that date only); every other candidate file's footer is read and
        its row groups pruned on the date's statistics.
        """
        keys_schema, date_column = self.dataset.schema, self.contract.date_column
        label = self.contract.label_column
        hive_date = date_column in keys_schema.names
        expr = (
            _filter(date_column, _bounds(lo, hi, keys_schema.field(date_column).type))
            if hive_date
            else None
        )
        parts, types, seen = [], dict[str, pa.DataType](), set[str]()
        fmt, files = self.dataset.format, self.dataset.filesystem
        for listed in self.dataset.get_fragments(filter=expr):
            # A fragment keeps the footer it read: made anew, each read sees the file as
            # it is now, not as an earlier read of this source saw it.
            keys = ds.get_partition_keys(listed.partition_expression)
            fragment = fmt.make_fragment(listed.path, files, listed.partition_expression)
            try:
                schema = fragment.physical_schema
                names = frozenset(schema.names)
                stats = None
                if not hive_date and date_column in names:
                    kind = schema.field(date_column).type
                    stats = _filter(date_column, _bounds(lo, hi, kind))
                groups = [g.id for p in fragment.split_by_row_group(stats) for g in p.row_groups]
            except _READ_ERRORS as exc:
                raise UnreadableParquetFile(fragment.path, exc) from None
            if not groups:  # no row of the dates in it: its columns do not matter
                continue
            # A label is needed where the outcome is known only: a file without one
            # (the newest dates, say) gives rows without a label, left out of training.
            missing = [c for c in columns if c not in keys and c not in names and c != label]
            if missing:
                raise FileMissingColumns(fragment.path, missing, schema.names)
            seen |= names
            for name in columns:
                if name in keys:
                    types.setdefault(name, keys_schema.field(name).type)
                elif name in names:
                    types.setdefault(name, schema.field(name).type)
            parts.append(_Part(fragment, groups, keys, names))
        if label in columns and parts and label not in types:
            raise MissingColumns([label], sorted(seen))
        return parts, types

    def _part_batches(
        self,
        part: _Part,
        types: dict[str, pa.DataType],
        bounds: list[tuple[str, pa.Scalar]],
        columns: list[str],
    ) -> Iterator[pa.RecordBatch]:
        date_column, path = self.contract.date_column, part.fragment.path
        needed = list(dict.fromkeys([*columns, *([date_column] if bounds else [])]))
        # Hive partition values are in the path, not the file: added as constant columns.
        in_file = [c for c in needed if c not in part.keys and c in part.names]
        for batch in self._file_batches(path, part.groups, in_file):
            arrays = []
            for name in needed:
                if name in part.keys:
                    arrays.append(
                        pa.repeat(pa.scalar(part.keys[name], types[name]), batch.num_rows)
                    )
                elif name in part.names:
                    arrays.append(_as_type(batch.column(name), types[name], name, path))
                else:  # a label this file does not have
                    arrays.append(pa.nulls(batch.num_rows, types[name]))
            table = pa.record_batch(arrays, names=needed)
            if bounds:
                table = _rows_in(table, table.column(date_column), bounds)
            if table.num_rows:
                yield table.select(columns)

    def _file_batches(
        self, path: str, groups: list[int], columns: list[str]
    ) -> Iterator[pa.RecordBatch]:
        """A file's batches; a file that fails to decode midway is named (exit 4)."""
        categorical = [c for c in columns if c in self.contract.categorical]
        try:
            # A column chunk is read 256 KiB at a time, not whole (its compressed bytes).
            with self.dataset.filesystem.open_input_file(path) as handle:
                reader = pq.ParquetFile(
                    handle, read_dictionary=categorical, pre_buffer=False, buffer_size=1 << 18
                )
                yield from reader.iter_batches(
                    batch_size=self.config.batch_size, row_groups=groups, columns=columns,
                    use_threads=False,
                )  # fmt: skip
        except _READ_ERRORS as exc:
            raise UnreadableParquetFile(path, exc) from None

"""The Parquet snapshot source: a file, a directory of files, or hive partitions.

Read file by file and batch by batch with each file's own reader, so memory stays
bounded by the batch size whatever the row groups; the dataset only finds the files,
prunes partitions and row groups, and gives the schema every file is cast to.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from churn_batch.config import ContractConfig, SourceConfig
from churn_batch.contract import as_dates, require_columns
from churn_batch.errors import ConfigError, ContractViolation, MissingColumns
from churn_batch.sources import SnapshotSummary, next_day, summary_of_ids

log = logging.getLogger(__name__)


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
    """A file's column as the dataset's type (the first file's), as its scanner would."""
    if column.type == kind:
        return column
    try:
        return column.cast(kind)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ContractViolation(
            f"Parquet file {path}: column {name} is {column.type} and does not read as "
            f"{kind}, its type in the source's other files ({exc})"
        ) from None


class ParquetSource:
    """A file, a directory of files, or hive-partitioned `snapshot_date=YYYY-MM-DD/`."""

    def __init__(self, config: SourceConfig, contract: ContractConfig) -> None:
        assert config.path is not None
        self.config = config
        self.contract = contract
        self.path = Path(config.path)
        self._dataset: ds.Dataset | None = None

    def describe(self) -> str:
        return self.config.describe()

    @property
    def dataset(self) -> ds.Dataset:
        if self._dataset is None:
            if not self.path.exists():
                raise ConfigError(f"Parquet source {self.path} does not exist", key="source.path")
            try:
                # Categorical text arrives dictionary-encoded, as Parquet stores it:
                # the contract then cleans each level once, not each row.
                options = ds.ParquetReadOptions(dictionary_columns=set(self.contract.categorical))
                self._dataset = ds.dataset(
                    self.path,
                    format=ds.ParquetFileFormat(read_options=options),
                    partitioning="hive",
                    exclude_invalid_files=True,
                )
            except (pa.ArrowInvalid, OSError) as exc:
                raise ConfigError(f"cannot read Parquet source {self.path}: {exc}") from None
            present = self._dataset.schema.names
            if self.contract.date_column not in present:
                raise MissingColumns([self.contract.date_column], present)
        return self._dataset

    def _bounds(self, lo: date | None, hi: date | None) -> list[tuple[str, pa.Scalar]]:
        """[lo, hi) as ("ge" | "lt", value) pairs typed like the dataset's date column."""
        kind = self.dataset.schema.field(self.contract.date_column).type
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

    def _filter(self, bounds: list[tuple[str, pa.Scalar]]) -> ds.Expression | None:
        field = ds.field(self.contract.date_column)
        expr: ds.Expression | None = None
        for op, scalar in bounds:
            part = field >= scalar if op == "ge" else field < scalar
            expr = part if expr is None else expr & part
        return expr

    def _columns(self, label: bool) -> list[str]:
        return require_columns(self.dataset.schema.names, self.contract, label=label)

    def summarize(self, snapshot_date: date, *, cleaned_ids: bool = False) -> SnapshotSummary:
        # Always judged on cleaned ids: there is no database to ask, nor keys to trust.
        bounds = self._bounds(snapshot_date, next_day(snapshot_date))
        batches = self._batches(bounds, [self.contract.id_column])
        ids = (b.column(self.contract.id_column) for b in batches)
        return summary_of_ids(ids, snapshot_date, self.describe())

    def read(self, snapshot_date: date) -> Iterator[pa.RecordBatch]:
        bounds = self._bounds(snapshot_date, next_day(snapshot_date))
        return self._batches(bounds, self._columns(False))

    def read_range(
        self, start: date | None, end: date | None, *, label: bool = True
    ) -> Iterator[pa.RecordBatch]:
        hi = next_day(end) if end is not None else None
        return self._batches(self._bounds(start, hi), self._columns(label))

    def dates(self) -> list[date]:
        # The one column, whole: a date per row is small next to a batch of features.
        column = self.dataset.to_table(columns=[self.contract.date_column])
        values, ok = as_dates(column[self.contract.date_column])
        return sorted(set(pc.unique(values.filter(ok)).to_pylist()))

    def _batches(
        self, bounds: list[tuple[str, pa.Scalar]], columns: list[str]
    ) -> Iterator[pa.RecordBatch]:
        """The rows with a date within `bounds`, `batch_size` at a time, file by file.

        Not the dataset scanner: it decodes a whole row group before cutting it into
        batches (a 1M-row group held ~110 MB of Arrow memory, and a bigger group more).
        The file reader decodes a batch at a time (~30 MB for 100k rows). The dataset
        still finds the files, prunes hive partitions and row groups by their
        statistics, and gives the schema every file is cast to, as its scanner would.
        """
        expr = self._filter(bounds)
        for fragment in self.dataset.get_fragments(filter=expr):
            # Row groups are pruned on the date's statistics where the file holds the
            # date; a hive partition's date is in its path, already matched above.
            stats = expr if self.contract.date_column in fragment.physical_schema.names else None
            groups = [g.id for part in fragment.split_by_row_group(stats) for g in part.row_groups]
            if groups:
                yield from self._fragment_batches(fragment, groups, bounds, columns)

    def _fragment_batches(
        self,
        fragment: Any,
        groups: list[int],
        bounds: list[tuple[str, pa.Scalar]],
        columns: list[str],
    ) -> Iterator[pa.RecordBatch]:
        schema, date_column = self.dataset.schema, self.contract.date_column
        # Hive partition values are in the path, not the file: added as constant columns.
        keys = ds.get_partition_keys(fragment.partition_expression)
        # A hive partition of the date matched the bounds already: every row is in them.
        bounds = [] if date_column in keys else bounds
        needed = list(dict.fromkeys([*columns, *([date_column] if bounds else [])]))
        in_file = [c for c in needed if c not in keys]
        categorical = [c for c in in_file if c in self.contract.categorical]
        # A column chunk is read 256 KiB at a time, not whole (its compressed bytes).
        with self.dataset.filesystem.open_input_file(fragment.path) as handle:
            reader = pq.ParquetFile(
                handle, read_dictionary=categorical, pre_buffer=False, buffer_size=1 << 18
            )
            for batch in reader.iter_batches(
                batch_size=self.config.batch_size, row_groups=groups, columns=in_file,
                use_threads=False,
            ):  # fmt: skip
                arrays = []
                for name in needed:
                    kind = schema.field(name).type
                    if name in keys:
                        arrays.append(pa.repeat(pa.scalar(keys[name], kind), batch.num_rows))
                    else:
                        arrays.append(_as_type(batch.column(name), kind, name, fragment.path))
                table = pa.record_batch(arrays, names=needed)
                if bounds:
                    table = _rows_in(table, table.column(date_column), bounds)
                if table.num_rows:
                    yield table.select(columns)

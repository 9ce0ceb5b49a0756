"""Snapshot sources: stream Arrow record batches of bounded size for one snapshot date.

Two kinds, one module each: SQL (`sql_source`: a table or a query binding
`:snapshot_date`, through SQLAlchemy) and Parquet (`parquet_source`: a file, a directory,
or a hive-partitioned dataset). This module holds what they share: the interface, the
summary of a date, and the search for repeated ids. Values arrive as the store holds
them; the contract types them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc

from churn_batch.config import ContractConfig, SourceConfig
from churn_batch.contract import as_strings
from churn_batch.errors import NoSnapshotRows


@dataclass(frozen=True)
class SnapshotSummary:
    """What a cheap first pass over one date tells: its size and its repeated ids."""

    rows: int
    duplicate_ids: pa.Array  # string ids seen more than once on that date
    # True when repeats were judged among the ids as stored: found by the database, or
    # ruled out by the table's key. The contract's cleaning (trimming whitespace) can
    # still make two stored ids one, so the reader must check that it changed none, and
    # otherwise ask again with `cleaned_ids=True`.
    as_stored: bool = False


class SnapshotSource(Protocol):
    def describe(self) -> str: ...

    def summarize(self, snapshot_date: date, *, cleaned_ids: bool = False) -> SnapshotSummary:
        """Count the date's rows and find repeated ids; `NoSnapshotRows` if there are none.

        A source may judge repeats among the ids as stored, cheaply, and say so
        (`as_stored`); `cleaned_ids` makes it judge them as the contract cleans them.
        """
        ...

    def read(self, snapshot_date: date) -> Iterator[pa.RecordBatch]:
        """The date's rows in batches of at most `batch_size` rows."""
        ...

    def read_range(
        self, start: date | None, end: date | None, *, label: bool = True
    ) -> Iterator[pa.RecordBatch]:
        """All rows with start <= date <= end (open ends allowed), for training."""
        ...

    def dates(self) -> list[date]:
        """The snapshot dates present, oldest first."""
        ...


def open_source(config: SourceConfig, contract: ContractConfig) -> SnapshotSource:
    # Imported here: each kind's module builds on this one.
    if config.kind == "parquet":
        from churn_batch.parquet_source import ParquetSource

        return ParquetSource(config, contract)
    from churn_batch.sql_source import SqlSource

    return SqlSource(config, contract)


def next_day(d: date) -> date:
    return d + timedelta(days=1)


def ids_as_strings(values: pa.Array) -> pa.Array:
    return pc.drop_null(as_strings(values))


# Ids taken in sorted order at a time when looking for repeats (about 2 MB of them).
REPEAT_STRETCH = 100_000


def summary_of_ids(columns: Iterable[pa.Array], snapshot_date: date, where: str) -> SnapshotSummary:
    """Count ids and find repeats among them cleaned as the contract cleans them.

    Only the id column is read, batch by batch. Memory grows with the number of ids
    (about 30 bytes each, the sort's indices included): unlike the rest of a run, not
    bounded by the batch size.
    """
    chunks = [ids_as_strings(column) for column in columns if len(column)]
    rows = sum(len(c) for c in chunks)
    if rows == 0:
        raise NoSnapshotRows(snapshot_date, where)
    # Sorting needs a third of a hash table's memory. At the peak: the ids, their sort
    # indices and one stretch of the ids in sorted order (not a whole sorted copy).
    ids = pa.concat_arrays(chunks)
    del chunks
    repeated = _repeats_in_order(ids, pc.sort_indices(ids))
    del ids
    # Hand the ids' memory back to the system before the stream starts: the allocator
    # would keep it, and the run's peak would be this pass's plus the stream's.
    pa.default_memory_pool().release_unused()
    return SnapshotSummary(rows, repeated)


def _repeats_in_order(values: pa.Array, order: pa.Array) -> pa.Array:
    """The values occurring more than once, walking them in sorted `order` a stretch of
    REPEAT_STRETCH at a time; each stretch starts on the last value of the one before,
    so a repeat across two stretches is seen."""
    found = []
    for start in range(0, len(order), REPEAT_STRETCH):
        first = max(start - 1, 0)
        stretch = values.take(order.slice(first, start + REPEAT_STRETCH - first))
        found.append(_adjacent_repeats(stretch))
    return pc.unique(pa.concat_arrays(found)) if found else pa.array([], pa.string())


def _adjacent_repeats(ordered: pa.Array) -> pa.Array:
    """The values of a sorted array that occur more than once."""
    if len(ordered) < 2:
        return pa.array([], pa.string())
    same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
    return pc.unique(ordered.slice(1).filter(same))

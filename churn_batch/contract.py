"""The data contract: split a batch of snapshot rows into typed valid rows and rejected rows.

Pure functions over Arrow data; no I/O. Whatever the source stored (text or numbers,
DATE or ISO text, dictionary-encoded or plain strings), the valid rows come out with
one fixed type per column:

- id column: string; date column: date32
- numeric features: float64, null where the value was missing, unparseable or NaN;
  a row with an infinite number or one of magnitude 2**53 or more is rejected (see
  `MAX_MAGNITUDE`)
- categorical features: dictionary-encoded strings, stripped, null where missing or
  blank (each level is encoded once per batch; the scorer and monitor work on codes)
- label (when asked for): int8 1/0 (null where the snapshot has no outcome yet)
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from churn_batch.config import ContractConfig
from churn_batch.errors import MissingColumns, TooManyInvalidRows

LABEL = "__label__"  # name of the label column in checked batches, whatever the source calls it

REJECTED_SCHEMA = pa.schema(
    [("customer_id", pa.string()), ("reason", pa.string()), ("raw", pa.string())]
)

MISSING_ID = "missing customer id"
BAD_ID = "customer id longer than 128 characters or containing control characters"
ID_MAX_LENGTH = 128  # the predictions table's key column
DUPLICATE_ID = "duplicate customer id within the snapshot date"
INVALID_DATE = "snapshot date is not a valid date"
INEXACT_ID = "customer id is a number a float cannot hold exactly (infinite or 2**53 or more)"
# The largest magnitude a number may have: 2**53 - 1, the last integer before float64
# (what every model here computes in) stops holding integers exactly; from 2**53 on,
# text like "9007199254740993" already reads as a neighbour. No count, duration or
# amount of one customer comes near it; a value beyond it (1e308, an int64 sentinel such as
# 9223372036854775807, an overflowed export) or an infinity is a broken measurement, not
# a missing one, and the model never saw anything like it: the row is rejected with a
# reason naming the column, rather than scored on an imputed value (as a missing number
# is) or on a value whose sums overflow inside the pipeline (numpy RuntimeWarnings, and
# probabilities of exactly 0 or 1 from a linear model).
MAX_MAGNITUDE = 2.0**53 - 1
OUT_OF_RANGE = "number out of range (infinite, or magnitude 2**53 or more) in "

# A plain decimal number, as real exports write them; anything else (" ", "abc",
# "1,234", "N/A", "nan") is a value we cannot read: as good as missing, it becomes null.
_NUMBER = r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"
# Infinity spelt out is read as one (and so rejects its row, as a float infinity does).
_INFINITY = r"^[+-]?(inf|infinity)$"


@dataclass(frozen=True)
class CheckedBatch:
    """The outcome of checking one batch against the contract."""

    valid: pa.Table
    rejected: pa.Table
    # Per numeric feature: values present in the input but unparseable or NaN (now null).
    invalid_numbers: Mapping[str, int] = field(default_factory=dict)
    # Per categorical feature: values not among the levels the model was trained on.
    unseen_levels: Mapping[str, int] = field(default_factory=dict)
    # Ids that cleaning changed (surrounding whitespace): two ids a database key keeps
    # apart may have become one, so a key alone no longer rules out repeats.
    ids_rewritten: int = 0

    @property
    def rows_in(self) -> int:
        return int(self.valid.num_rows + self.rejected.num_rows)


def require_columns(
    available: Iterable[str], contract: ContractConfig, *, label: bool
) -> list[str]:
    """The columns the contract reads; `MissingColumns` (exit 4) unless all are present."""
    names = list(available)
    needed = list(contract.required_columns)
    if label and contract.label_column:
        needed.append(contract.label_column)
    missing = [c for c in needed if c not in names]
    if missing:
        raise MissingColumns(missing, names)
    return needed


def check_batch(
    batch: pa.RecordBatch | pa.Table,
    contract: ContractConfig,
    *,
    duplicate_ids: pa.Array | None = None,
    known_levels: Mapping[str, Collection[str]] | None = None,
    label: bool = False,
) -> CheckedBatch:
    """Split `batch` into valid rows (typed as the model expects) and rejected rows.

    `duplicate_ids` are ids seen more than once in the whole snapshot date (a streaming
    caller finds them up front); without it, duplicates are looked for within `batch`.
    Every copy of a duplicated id is rejected: we cannot know which copy is right.
    """
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    require_columns(table.column_names, contract, label=label)

    ids = as_strings(table[contract.id_column])
    ids_rewritten = _rewritten(table[contract.id_column], ids)
    inexact_id = _inexact(table[contract.id_column])
    dates, date_ok = as_dates(table[contract.date_column])
    missing_id = pc.fill_null(pc.equal(pc.utf8_length(ids), 0), True)
    if duplicate_ids is None:
        duplicate_ids = _repeated(ids)
    duplicated = pc.fill_null(pc.is_in(ids, value_set=duplicate_ids.cast(pa.string())), False)
    bad_date = pc.invert(date_ok)
    bad_id = pc.fill_null(
        pc.or_(
            pc.greater(pc.utf8_length(ids), ID_MAX_LENGTH),
            pc.match_substring_regex(ids, r"[\x00-\x1f\x7f]"),
        ),
        False,
    )

    columns: dict[str, pa.ChunkedArray | pa.Array] = {
        contract.id_column: ids,
        contract.date_column: dates,
    }
    invalid: dict[str, int] = {}
    out_of_range: dict[str, pa.Array] = {}
    for name in contract.numeric:
        values, n_invalid, beyond = _numbers(table[name])
        columns[name] = values
        invalid[name] = n_invalid
        if pc.any(beyond).as_py():
            out_of_range[name] = beyond

    # One reason per row, the most basic one: each mask below overrides the ones before
    # it, so a missing id wins over everything and an out-of-range number over nothing.
    reason = _out_of_range_reason(out_of_range, table.num_rows)
    for mask, text in (
        (bad_date, INVALID_DATE),
        (duplicated, DUPLICATE_ID),
        (inexact_id, INEXACT_ID),
        (bad_id, BAD_ID),
        (missing_id, MISSING_ID),
    ):
        reason = pc.if_else(mask, text, reason)
    keep = pc.is_null(reason)

    for name in contract.categorical:
        columns[name] = as_levels(table[name])
    if label:
        assert contract.label_column is not None
        columns[LABEL] = _label(table[contract.label_column], contract.positive_label)

    typed = pa.table(columns)
    valid = typed.filter(keep)
    unseen = _unseen(valid, contract, known_levels) if known_levels is not None else {}
    rejected = _rejected(table, ids, reason, pc.invert(keep))
    return CheckedBatch(valid, rejected, invalid, unseen, ids_rewritten)


def enforce_invalid_fraction(
    rejected: int, total: int, contract: ContractConfig, reasons: Mapping[str, int]
) -> None:
    """Raise `TooManyInvalidRows` (exit 4) when rejected rows exceed the contract's limit."""
    if total and rejected / total > contract.max_invalid_fraction:
        raise TooManyInvalidRows(rejected, total, contract.max_invalid_fraction, dict(reasons))


def reason_counts(rejected: pa.Table) -> Counter[str]:
    counts = pc.value_counts(rejected["reason"]).to_pylist() if rejected.num_rows else []
    return Counter({c["values"]: c["counts"] for c in counts})


def features_frame(valid: pa.Table, contract: ContractConfig) -> pd.DataFrame:
    """The feature columns as the scikit-learn pipelines take them.

    Numeric as float64 with NaN; categorical as object arrays of str with NaN for
    missing (one missing marker, so encoders see one "missing" level, not two).
    """
    data: dict[str, Any] = {}
    for name in contract.numeric:
        data[name] = pd.Series(valid[name].to_numpy(zero_copy_only=False), dtype=np.float64)
    for name in contract.categorical:
        # Decode by cast: to_numpy on chunks with different dictionaries mixes them up.
        column = valid[name].cast(pa.string())
        values = column.to_numpy(zero_copy_only=False).astype(object, copy=False)
        values[pd.isna(values)] = np.nan
        # object, not pandas' string dtype: what the encoders were fitted on, in any pandas
        data[name] = pd.Series(values, dtype=object)
    return pd.DataFrame(data, columns=list(contract.features))


# -- column normalisers ------------------------------------------------------------


def _plain(array: pa.ChunkedArray | pa.Array) -> pa.Array:
    """One contiguous array of plain values (dictionary columns decoded)."""
    array = _combine(array)
    if pa.types.is_dictionary(array.type):
        return array.cast(array.type.value_type)
    return array


def _combine(array: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(array, pa.ChunkedArray):
        return array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    return array


def as_strings(array: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Any column as stripped strings; blank becomes null, 1.0 becomes "1"."""
    array = _plain(array)
    kind = array.type
    if pa.types.is_null(kind):
        return pa.nulls(len(array), pa.string())
    if pa.types.is_floating(kind):
        array = pc.if_else(pc.is_nan(array), None, array)
        # 0/1 flags exported as floats must match the same flag stored as integers. Only
        # where float64 holds integers exactly: from 2**53 on (and for infinities) the cast
        # would wrap (1e20 and 1.5e20 both became "-9223372036854775808", one id).
        exact = pc.less_equal(pc.abs(array), MAX_MAGNITUDE)
        integral = pc.and_(pc.equal(pc.floor(array), array), exact)
        as_int = pc.if_else(integral, array, None).cast(pa.int64(), safe=False)
        array = pc.if_else(integral, as_int.cast(pa.string()), array.cast(pa.string()))
    elif pa.types.is_decimal(kind):
        # As text, exactly (a NUMERIC(20) id does not fit a float), without the trailing
        # zeros of the scale, so 1.50 and 5.00 read as the floats 1.5 and 5 do.
        text = array.cast(pa.string())
        if kind.scale > 0:
            text = pc.replace_substring_regex(text, r"\.?0+$", "")
        array = text
    elif not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        array = array.cast(pa.string())
    array = pc.utf8_trim_whitespace(array.cast(pa.string()))
    return pc.if_else(pc.equal(pc.utf8_length(array), 0), None, array)


def as_levels(array: pa.ChunkedArray | pa.Array) -> pa.DictionaryArray:
    """A categorical column as dictionary-encoded `as_strings` values.

    Encoded first, cleaned after: trimming and blank-to-null run over the few distinct
    levels instead of every row, then the rows' codes are remapped in one numpy take.
    """
    array = _combine(array)
    if not pa.types.is_dictionary(array.type):
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            return pc.dictionary_encode(as_strings(array))
        array = pc.dictionary_encode(array)
    cleaned = pc.dictionary_encode(as_strings(array.dictionary))
    # old code -> new code; the extra last slot takes the rows that were null already.
    remap = np.append(pc.fill_null(cleaned.indices, -1).to_numpy(), -1).astype(np.int32)
    codes = remap[pc.fill_null(array.indices, len(array.dictionary)).to_numpy()]
    indices = pa.array(codes, pa.int32(), mask=codes < 0)
    return pa.DictionaryArray.from_arrays(indices, cleaned.dictionary)


def _numbers(array: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, int, pa.Array]:
    """Any column as float64, how many present values were unreadable or NaN (now null),
    and a mask of the rows whose number is out of range (infinite or beyond MAX_MAGNITUDE).

    Out-of-range values are null in the returned values too; the caller rejects their rows.
    """
    array = _plain(array)
    kind = array.type
    present = len(array) - array.null_count
    beyond: pa.Array | None = None
    if pa.types.is_null(kind):
        return pa.nulls(len(array), pa.float64()), 0, pa.nulls(len(array), pa.bool_())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        text = pc.utf8_trim_whitespace(array.cast(pa.string()))
        parsable = pc.match_substring_regex(text, _NUMBER)
        # "1e999" parses to an infinity, which the range check below catches.
        values = pc.if_else(parsable, text, None).cast(pa.float64())
        beyond = pc.match_substring_regex(text, _INFINITY, ignore_case=True)
    elif pa.types.is_integer(kind):
        if kind.bit_width == 64:
            # Compared as integers: an int64 beyond 2**53 does not even cast to float64.
            limit = int(MAX_MAGNITUDE)
            beyond = pc.greater(array, pa.scalar(limit, kind))
            if pa.types.is_signed_integer(kind):
                beyond = pc.or_(beyond, pc.less(array, pa.scalar(-limit, kind)))
            array = pc.if_else(beyond, None, array)
        values = array.cast(pa.float64())
    elif pa.types.is_boolean(kind) or pa.types.is_floating(kind):
        values = array.cast(pa.float64())
    elif pa.types.is_decimal(kind):
        values = array.cast(pa.float64(), safe=False)
    else:
        return _numbers(pc.cast(as_strings(array), pa.string()))
    large = pc.greater(pc.abs(values), MAX_MAGNITUDE)  # infinities included; NaN is not
    # Kleene: a row already out of range stays so where `large` is null (nulled above).
    beyond = large if beyond is None else pc.or_kleene(beyond, large)
    beyond = pc.fill_null(beyond, False)
    usable = pc.and_(pc.is_finite(values), pc.invert(beyond))
    values = pc.if_else(usable, values, None)
    n_beyond = int(pc.sum(beyond).as_py() or 0)
    return values, present - (len(values) - values.null_count) - n_beyond, beyond


def _out_of_range_reason(masks: Mapping[str, pa.Array], rows: int) -> pa.Array:
    """Per row: the out-of-range reason naming its columns, or null."""
    text = pa.nulls(rows, pa.string())
    for name, mask in masks.items():
        named = pc.if_else(
            pc.is_null(text),
            pa.scalar(OUT_OF_RANGE + name),
            pc.binary_join_element_wise(text, pa.scalar(name), pa.scalar(", ")),
        )
        text = pc.if_else(mask, named, text)
    return text


def _inexact(array: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Rows whose id is a float no id can be read from exactly (infinite, from 2**53 on)."""
    plain = _plain(array)
    if not pa.types.is_floating(plain.type):
        return pa.array(np.zeros(len(plain), dtype=bool))
    values = plain.cast(pa.float64())
    inexact = pc.or_(pc.is_inf(values), pc.greater(pc.abs(values), MAX_MAGNITUDE))
    return pc.fill_null(inexact, False)


def as_dates(array: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """Any date-like column as date32, and a mask of rows whose date could be read."""
    array = _combine(array)
    if _is_text(array.type) or (
        pa.types.is_dictionary(array.type) and _is_text(array.type.value_type)
    ):
        # Text dates (SQLite, CSV-born tables): parse each distinct value once. A
        # snapshot holds one date, so a million rows cost one hash pass, not a million
        # parses (4 s per million rows before).
        encoded = array if pa.types.is_dictionary(array.type) else pc.dictionary_encode(array)
        values = _iso_dates(encoded.dictionary).take(encoded.indices)
    else:
        array = _plain(array)
        kind = array.type
        if pa.types.is_date32(kind):
            values = array
        elif pa.types.is_date(kind) or pa.types.is_timestamp(kind):
            values = array.cast(pa.date32())
        else:
            values = pa.nulls(len(array), pa.date32())
    return values, pc.is_valid(values)


def _is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _iso_dates(text: pa.Array) -> pa.Array:
    """ISO text, with or without a time part, as date32: the date is the first ten
    characters; anything else is null."""
    head = pc.utf8_slice_codeunits(pc.utf8_trim_whitespace(text.cast(pa.string())), 0, 10)
    well_formed = pc.match_substring_regex(head, r"^\d{4}-\d{2}-\d{2}$")
    parsed = pc.strptime(pc.if_else(well_formed, head, None), "%Y-%m-%d", "s", error_is_null=True)
    # strptime rolls 2024-02-30 over into March; a real date formats back to itself.
    exact = pc.equal(pc.strftime(parsed, "%Y-%m-%d"), head)
    return pc.if_else(exact, parsed, None).cast(pa.date32())


def _label(array: pa.ChunkedArray | pa.Array, positive: str | int | float | bool) -> pa.Array:
    """1 where the label equals `positive_label`, 0 where it is another value, null if absent."""
    if isinstance(positive, int | float) and not isinstance(positive, bool):
        # A numeric positive label compares as a number: "1", 1 and 1.0 all match 1.
        values, _, _ = _numbers(array)
        present = pc.is_valid(values)
        hit = pc.equal(values, float(positive))
    else:
        text = as_strings(array)
        present = pc.is_valid(text)
        hit = pc.equal(text, _canonical(positive))
    return pc.if_else(present, pc.if_else(hit, 1, 0), None).cast(pa.int8())


def _canonical(value: str | bool) -> str:
    """The label value as `as_strings` renders it (booleans as Arrow writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value.strip()


def _rewritten(raw: pa.ChunkedArray | pa.Array, ids: pa.Array) -> int:
    """How many string ids `as_strings` changed (trimming only shortens them)."""
    plain = _plain(raw)
    if not _is_text(plain.type):
        return 0  # numbers print one way each; nothing to merge
    changed = pc.not_equal(pc.utf8_length(plain), pc.utf8_length(ids))
    return int(pc.sum(pc.fill_null(changed, False)).as_py() or 0)


def _repeated(ids: pa.Array) -> pa.Array:
    counts = pc.value_counts(pc.drop_null(ids))
    return counts.field("values").filter(pc.greater(counts.field("counts"), 1))


def level_counts(column: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """Rows per level of a (dictionary-encoded) string column; nulls are not counted."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    counts: dict[str, int] = {}
    for chunk in chunks:
        if pa.types.is_dictionary(chunk.type):
            codes = pc.drop_null(chunk.indices).to_numpy()
            per_code = np.bincount(codes, minlength=len(chunk.dictionary))
            pairs = list(zip(chunk.dictionary.to_pylist(), per_code.tolist(), strict=True))
        else:
            found = pc.value_counts(pc.drop_null(chunk)).to_pylist()
            pairs = [(item["values"], item["counts"]) for item in found]
        for level, n in pairs:
            if n:
                counts[level] = counts.get(level, 0) + int(n)
    return counts


def _unseen(
    valid: pa.Table, contract: ContractConfig, known: Mapping[str, Collection[str]]
) -> dict[str, int]:
    out: dict[str, int] = {}
    for name in contract.categorical:
        if name in known:
            levels = known[name]
            counts = level_counts(valid[name])
            out[name] = sum(n for level, n in counts.items() if level not in levels)
    return out


def _rejected(table: pa.Table, ids: pa.Array, reason: pa.Array, mask: pa.Array) -> pa.Table:
    if not pc.any(mask).as_py():
        return REJECTED_SCHEMA.empty_table()
    raw_rows = table.filter(mask).to_pylist()
    return pa.table(
        {
            "customer_id": ids.filter(mask),
            "reason": reason.filter(mask),
            "raw": pa.array([_raw_json(row) for row in raw_rows], pa.string()),
        },
        schema=REJECTED_SCHEMA,
    )


def _raw_json(row: dict[str, Any]) -> str:
    """The row as strict JSON: a non-finite float (a reason to reject it) as its name,
    "inf" or "nan", since JSON has no such numbers (Python's `Infinity` is not JSON)."""
    return json.dumps(_finite(row), default=_json_default, allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(value: object) -> object:
    if isinstance(value, date | datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)

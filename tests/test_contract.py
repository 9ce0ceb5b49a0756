from __future__ import annotations

import json
import math
from datetime import date
from decimal import Decimal

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from churn_batch.config import ContractConfig
from churn_batch.contract import (
    BAD_ID,
    DUPLICATE_ID,
    INEXACT_ID,
    INVALID_DATE,
    LABEL,
    MAX_MAGNITUDE,
    MISSING_ID,
    OUT_OF_RANGE,
    check_batch,
    enforce_invalid_fraction,
    features_frame,
    reason_counts,
)
from churn_batch.errors import MissingColumns, TooManyInvalidRows

CONTRACT = ContractConfig(
    id_column="cust",
    date_column="day",
    numeric=("charges", "flag"),
    categorical=("plan",),
    label_column="left",
    positive_label="Yes",
    max_invalid_fraction=0.25,
)


def table(**columns: list[object]) -> pa.Table:
    base: dict[str, list[object]] = {
        "cust": ["a", "b", "c"],
        "day": ["2024-03-01"] * 3,
        "charges": [1.5, 2.0, 3.0],
        "flag": [0, 1, 0],
        "plan": ["x", "y", "x"],
        "left": ["Yes", "No", "No"],
    }
    base.update(columns)
    return pa.table(base)


def test_three_row_fixture_passes_through_typed() -> None:
    result = check_batch(table(), CONTRACT, label=True)
    assert result.rejected.num_rows == 0
    valid = result.valid
    assert valid.schema.field("day").type == pa.date32()
    assert valid.schema.field("charges").type == pa.float64()
    assert valid.schema.field("plan").type == pa.dictionary(pa.int32(), pa.string())
    assert valid["day"].to_pylist() == [date(2024, 3, 1)] * 3
    assert valid[LABEL].to_pylist() == [1, 0, 0]


def test_missing_required_columns_name_them() -> None:
    with pytest.raises(MissingColumns) as info:
        check_batch(table().drop_columns(["plan", "flag"]), CONTRACT)
    assert info.value.exit_code == 4
    assert str(info.value).startswith("snapshot is missing required column(s): flag, plan")


def test_extra_columns_and_order_do_not_matter() -> None:
    shuffled = table().select(["plan", "left", "day", "flag", "cust", "charges"])
    shuffled = shuffled.append_column("noise", pa.array([9, 9, 9]))
    a = check_batch(table(), CONTRACT).valid
    b = check_batch(shuffled, CONTRACT).valid
    assert a.equals(b)


def test_sql_type_differences_do_not_matter() -> None:
    as_text = table(charges=["1.5", "2", "3.0"], flag=["0", "1", "0"])
    as_dates = table(day=[date(2024, 3, 1)] * 3)
    a = check_batch(table(), CONTRACT).valid
    assert check_batch(as_text, CONTRACT).valid.equals(a)
    assert check_batch(as_dates, CONTRACT).valid.equals(a)
    with_time = table(day=["2024-03-01 00:00:00"] * 3)
    assert check_batch(with_time, CONTRACT).valid.equals(a)


def test_unparseable_numbers_become_null_and_are_counted() -> None:
    result = check_batch(table(charges=[" ", "abc", "7"], flag=[float("nan"), 0.0, 1.0]), CONTRACT)
    assert result.rejected.num_rows == 0
    assert result.valid["charges"].to_pylist() == [None, None, 7.0]
    assert result.valid["flag"].to_pylist() == [None, 0.0, 1.0]
    assert result.invalid_numbers == {"charges": 2, "flag": 1}


@pytest.mark.parametrize(
    "broken",
    [math.inf, -math.inf, 1e308, -1e308, MAX_MAGNITUDE * 2, "1e999", " -Infinity ", "inf"],
)
def test_infinite_or_huge_numbers_reject_their_row_naming_the_column(broken: object) -> None:
    charges = pa.array([broken, 2.0, 3.0] if isinstance(broken, float) else [broken, "2", "3"])
    result = check_batch(table(charges=charges), CONTRACT)
    assert result.valid["cust"].to_pylist() == ["b", "c"]
    assert result.valid["charges"].to_pylist() == [2.0, 3.0]
    assert result.rejected["customer_id"].to_pylist() == ["a"]
    assert result.rejected["reason"].to_pylist() == [OUT_OF_RANGE + "charges"]
    assert result.invalid_numbers == {"charges": 0, "flag": 0}
    raw = result.rejected["raw"][0].as_py()
    # Strict JSON (no bare Infinity, which PostgreSQL's json type refuses), value kept.
    assert json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in {raw}"))["cust"] == "a"


def test_the_range_limit_is_inclusive_and_every_broken_column_is_named() -> None:
    limit = int(MAX_MAGNITUDE)
    result = check_batch(
        table(charges=[MAX_MAGNITUDE, -MAX_MAGNITUDE, math.inf],
              flag=pa.array([limit, limit + 1, -(2**63)], pa.int64())),
        CONTRACT,
    )  # fmt: skip
    assert result.valid["charges"].to_pylist() == [MAX_MAGNITUDE]
    assert result.valid["flag"].to_pylist() == [MAX_MAGNITUDE]
    assert result.rejected["reason"].to_pylist() == [
        OUT_OF_RANGE + "flag",
        OUT_OF_RANGE + "charges, flag",
    ]
    # An unsigned 64-bit column past int64 too (Parquet writes them).
    big = check_batch(table(flag=pa.array([2**64 - 1, 1, 0], pa.uint64())), CONTRACT)
    assert big.rejected["reason"].to_pylist() == [OUT_OF_RANGE + "flag"]


def test_nulls_in_features_are_allowed() -> None:
    result = check_batch(table(charges=[None, None, 1.0], plan=[None, " ", "x"]), CONTRACT)
    assert result.rejected.num_rows == 0
    assert result.invalid_numbers == {"charges": 0, "flag": 0}
    assert result.valid["plan"].to_pylist() == [None, None, "x"]


def test_null_or_empty_id_is_rejected_with_reason_and_raw_row() -> None:
    result = check_batch(table(cust=[None, "  ", "c"]), CONTRACT)
    assert result.valid["cust"].to_pylist() == ["c"]
    assert result.rejected["reason"].to_pylist() == [MISSING_ID, MISSING_ID]
    raw = json.loads(result.rejected["raw"][1].as_py())
    assert raw["cust"] == "  "
    assert raw["day"] == "2024-03-01"


def test_ids_the_predictions_key_cannot_hold_are_rejected() -> None:
    result = check_batch(table(cust=["a" * 129, "b\x00c", "a" * 128]), CONTRACT)
    assert result.valid["cust"].to_pylist() == ["a" * 128]
    assert result.rejected["reason"].to_pylist() == [BAD_ID, BAD_ID]


def test_every_copy_of_a_duplicated_id_is_rejected() -> None:
    result = check_batch(table(cust=["a", "b", "a"]), CONTRACT)
    assert result.valid["cust"].to_pylist() == ["b"]
    assert result.rejected["customer_id"].to_pylist() == ["a", "a"]
    assert set(result.rejected["reason"].to_pylist()) == {DUPLICATE_ID}


def test_duplicates_found_in_other_batches_are_rejected_here_too() -> None:
    result = check_batch(table(), CONTRACT, duplicate_ids=pa.array(["c"]))
    assert result.valid["cust"].to_pylist() == ["a", "b"]
    assert result.rejected["reason"].to_pylist() == [DUPLICATE_ID]


def test_numeric_ids_and_float_flags_match_text() -> None:
    result = check_batch(table(cust=[1, 2, 3], plan=[1.0, 0.0, None]), CONTRACT)
    assert result.valid["cust"].to_pylist() == ["1", "2", "3"]
    assert result.valid["plan"].to_pylist() == ["1", "0", None]


def test_float_ids_beyond_exact_integers_are_rejected_not_wrapped() -> None:
    # Cast to int64 unchecked, 1e20 and 1.5e20 both became "-9223372036854775808": two
    # customers published (or rejected as repeats) under one id nobody has.
    result = check_batch(table(cust=[1e20, 1.5e20, MAX_MAGNITUDE]), CONTRACT)
    assert result.valid["cust"].to_pylist() == [str(int(MAX_MAGNITUDE))]
    assert result.rejected["customer_id"].to_pylist() == ["1e+20", "1.5e+20"]
    assert result.rejected["reason"].to_pylist() == [INEXACT_ID, INEXACT_ID]


def test_decimal_ids_are_read_exactly() -> None:
    ids = pa.array([Decimal("12345678901234567891"), Decimal("12345678901234567892"),
                    Decimal("7")], pa.decimal128(20, 0))  # fmt: skip
    result = check_batch(table(cust=ids), CONTRACT)
    assert result.valid["cust"].to_pylist() == ["12345678901234567891", "12345678901234567892", "7"]
    scaled = pa.array([Decimal("1.50"), Decimal("5.00"), Decimal("100.00")], pa.decimal128(10, 2))
    assert check_batch(table(cust=scaled), CONTRACT).valid["cust"].to_pylist() == [
        "1.5",
        "5",
        "100",
    ]


def test_bad_date_is_rejected() -> None:
    result = check_batch(table(day=["2024-03-01", "not a date", "2024-02-30"]), CONTRACT)
    assert result.valid["cust"].to_pylist() == ["a"]
    assert result.rejected["reason"].to_pylist() == [INVALID_DATE, INVALID_DATE]


def test_unseen_levels_are_allowed_and_counted() -> None:
    result = check_batch(table(plan=["x", "new", "newer"]), CONTRACT, known_levels={"plan": {"x"}})
    assert result.valid.num_rows == 3
    assert result.unseen_levels == {"plan": 2}


def test_label_matches_positive_label_of_any_type() -> None:
    numeric = ContractConfig(**{**CONTRACT.__dict__, "positive_label": 1})
    result = check_batch(table(left=[1, 0, None]), numeric, label=True)
    assert result.valid[LABEL].to_pylist() == [1, 0, None]
    result = check_batch(table(left=["1", "0", "1.0"]), numeric, label=True)
    assert result.valid[LABEL].to_pylist() == [1, 0, 1]


def test_too_many_invalid_rows() -> None:
    result = check_batch(table(cust=[None, "a", "a"]), CONTRACT)
    counts = reason_counts(result.rejected)
    assert counts == {MISSING_ID: 1, DUPLICATE_ID: 2}
    with pytest.raises(TooManyInvalidRows) as info:
        enforce_invalid_fraction(3, 3, CONTRACT, counts)
    assert info.value.exit_code == 4
    assert str(info.value) == (
        "3 of 3 rows rejected (100.0%), more than max_invalid_fraction 25.0% "
        f"({DUPLICATE_ID}: 2, {MISSING_ID}: 1)"
    )
    enforce_invalid_fraction(1, 4, CONTRACT, counts)  # exactly at the limit is allowed


def test_features_frame_is_what_the_model_takes() -> None:
    valid = check_batch(table(charges=[None, "2", "x"], plan=["x", None, "y"]), CONTRACT).valid
    frame = features_frame(valid, CONTRACT)
    assert list(frame.columns) == ["charges", "flag", "plan"]
    assert frame["charges"].dtype == "float64"
    assert frame["plan"].dtype == object
    assert frame["plan"].isna().tolist() == [False, True, False]


# -- properties --------------------------------------------------------------------

ids = st.one_of(st.none(), st.sampled_from(["", " ", "a", "b", "c", "d", "e"]), st.text(max_size=4))
numbers = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", " ", "abc", "1.5", "-2", "1e3", "nan"]),
)
rows = st.lists(st.tuples(ids, numbers, st.one_of(st.none(), st.sampled_from(["x", " y ", ""]))),
                min_size=0, max_size=30)  # fmt: skip


def build(data: list[tuple[object, object, object]]) -> pa.Table:
    return pa.table(
        {
            "cust": pa.array([r[0] for r in data], pa.string()),
            "day": pa.array(["2024-03-01"] * len(data), pa.string()),
            "charges": pa.array([None if r[1] is None else str(r[1]) for r in data], pa.string()),
            "flag": pa.array([1] * len(data), pa.int64()),
            "plan": pa.array([r[2] for r in data], pa.string()),
        }
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows)
def test_valid_plus_rejected_is_input(data: list[tuple[object, object, object]]) -> None:
    batch = build(data)
    result = check_batch(batch, CONTRACT)
    assert result.valid.num_rows + result.rejected.num_rows == batch.num_rows
    assert all(result.rejected["reason"].to_pylist())
    valid_ids = result.valid["cust"].to_pylist()
    assert len(valid_ids) == len(set(valid_ids)), "a valid id appears once"
    assert all(v and v.strip() == v for v in valid_ids)
    assert not set(valid_ids) & set(result.rejected["customer_id"].drop_null().to_pylist())


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.floats(min_value=-MAX_MAGNITUDE, max_value=MAX_MAGNITUDE),
                          st.sampled_from(["x", "y", "z"])), max_size=30))  # fmt: skip
def test_valid_rows_pass_through_unchanged(values: list[tuple[float, str]]) -> None:
    batch = pa.table(
        {
            "cust": pa.array([f"id{i}" for i in range(len(values))], pa.string()),
            "day": pa.array([date(2024, 3, 1)] * len(values), pa.date32()),
            "charges": pa.array([v[0] for v in values], pa.float64()),
            "flag": pa.array([0.0] * len(values), pa.float64()),
            "plan": pa.array([v[1] for v in values], pa.string()),
        }
    )
    result = check_batch(batch, CONTRACT)
    assert result.rejected.num_rows == 0
    assert result.valid.cast(batch.schema).equals(batch)


def test_levels_that_differ_only_by_spaces_are_one_level() -> None:
    result = check_batch(table(plan=[" x", "x ", ""]), CONTRACT)
    plan = result.valid["plan"].combine_chunks()
    assert plan.to_pylist() == ["x", "x", None]
    assert plan.dictionary.to_pylist() == ["x"]
    encoded = pa.array(["b ", None, "a"]).dictionary_encode()
    assert check_batch(table(plan=encoded), CONTRACT).valid["plan"].to_pylist() == ["b", None, "a"]

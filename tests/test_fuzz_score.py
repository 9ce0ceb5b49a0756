"""Fuzz the whole score path on SQLite: whatever the snapshot, the job ends with a
documented exit code and publishes exactly the valid rows, or nothing.

Each example rewrites one date's rows of a real project (a subset of the day's real
customers, so that the model and the drift monitor see familiar data) with any mix of
hostile values per cell, then runs `job.score_date` in-process. An independent oracle,
computed from the values SQLite actually stored (not from the contract's code), says
which rows are valid and why the others are not:

- exit 0: the date's predictions are exactly the valid ids, each a probability in
  [0, 1]; the run quarantined every other row, with the reason the oracle expects;
- exit 3 (no rows) or 4 (too many invalid rows): the previous predictions are unchanged;
- anything else (exit 1 = any other exception, a warning, a crash) fails the test.

The drift gate is opened wide ([monitoring] thresholds that cannot trip): its exit 5 is
tested elsewhere, and here it would hide the publication this test is about.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from churn_batch.config import Config, load_config
from churn_batch.contract import BAD_ID, DUPLICATE_ID, ID_MAX_LENGTH, MISSING_ID, OUT_OF_RANGE
from churn_batch.errors import ChurnBatchError
from churn_batch.job import score_date

from .scoring_fixtures import LAST, predictions, sqlite_db

DAY = LAST.isoformat()
NUMERIC = ("senior_citizen", "tenure_months", "monthly_charges", "total_charges")
CATEGORICAL = ("gender", "contract", "payment_method", "internet_service")  # a few suffice
LIMIT = 2**53 - 1  # the contract's MAX_MAGNITUDE, restated: the oracle does not import it
NUMBER = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?$")
INFINITY = re.compile(r"^[+-]?(inf|infinity)$", re.IGNORECASE)
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Text from characters whose whitespace-ness every library agrees on (Python's strip and
# Arrow's trim differ on \x1c-\x1f): quotes, SQL metacharacters, Unicode, controls.
TEXT = st.text(st.sampled_from(list("aZ09 _-'\";%?:\\`.eé日🙂\u202e\t\n\x00")), max_size=10)
IDS = st.one_of(
    st.none(),
    TEXT,
    st.sampled_from(["", "   ", "x" * ID_MAX_LENGTH, "y" * (ID_MAX_LENGTH + 1), " C0000001",
                     "C0000002\n", "'; DROP TABLE churn_predictions; --", "%s", ":id", "?"]),
    st.sampled_from(["a\tb", "a\x00b", "del\x7f", "z" * 500]),
    st.integers(-(10**6), 10**6),  # the VARCHAR column keeps them as text
    st.sampled_from([1e20, 2.5, math.nan, math.inf]),
)  # fmt: skip
NUMBERS = st.one_of(
    st.none(),
    st.floats(),  # NaN (SQLite stores NULL), infinities, subnormals, 1e308
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([LIMIT, LIMIT + 1, -LIMIT - 1, 2.0**53, 1e308, -1e308, "abc", "", " ",
                     "1e999", "-inf", "Infinity", " 12 ", "1,5", "nan", "0x10"]),
    TEXT,
)  # fmt: skip
LEVELS = st.one_of(
    st.none(),
    TEXT,
    st.sampled_from(["", " ", "Male", " Female ", "'; DROP TABLE customer_snapshots; --"]),
    st.integers(-5, 5),
    st.floats(allow_nan=False, width=32),
)
CELLS = st.one_of(
    st.tuples(st.just("customer_id"), IDS),
    st.tuples(st.sampled_from(NUMERIC), NUMBERS),
    st.tuples(st.sampled_from(CATEGORICAL), LEVELS),
)
SNAPSHOTS = st.tuples(
    st.integers(0, 300),  # rows: the day's first n customers
    st.lists(st.tuples(st.integers(0, 299), CELLS), max_size=40),  # (row, (column, value))
    st.none() | CELLS,  # a value for one column in every row (an upstream bug)
    st.sampled_from([0.05, 1.0]),  # max_invalid_fraction
)


def db(config: Config) -> Path:
    return config.path.parent / "data" / "churn.db"


def prepare(config: Config) -> list[dict[str, Any]]:
    """Drop the snapshot table's NOT NULL and key (same declared types), open the drift
    gate; return the day's real rows."""
    with sqlite_db(db(config)) as conn:
        (ddl,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'customer_snapshots'"
        ).fetchone()
        ddl = re.sub(r",\s*PRIMARY KEY \([^)]*\)", "", ddl.replace(" NOT NULL", ""))
        conn.execute("ALTER TABLE customer_snapshots RENAME TO snapshots_keyed")
        conn.execute(ddl)
        conn.execute("INSERT INTO customer_snapshots SELECT * FROM snapshots_keyed")
        conn.execute("DROP TABLE snapshots_keyed")
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT * FROM customer_snapshots WHERE snapshot_date = ? ORDER BY customer_id",
            (DAY,),
        )
        return [dict(r) for r in rows]


def configure(config: Config, max_invalid_fraction: float) -> Config:
    limit = f"max_invalid_fraction = {max_invalid_fraction}"
    text = re.sub(r"max_invalid_fraction = [\d.]+", limit, config.path.read_text())
    if "[monitoring]" not in text:
        text += "\n[monitoring]\npsi_warn = 1e9\npsi_block = 1e9\nmissing_rate_block = 1.0\n"
    config.path.write_text(text)
    return load_config(config.path)


def write_day(config: Config, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace the day's rows; return them as SQLite stored them (affinity applied)."""
    with sqlite_db(db(config)) as conn:
        conn.execute("DELETE FROM customer_snapshots WHERE snapshot_date = ?", (DAY,))
        if rows:
            names = list(rows[0])
            conn.executemany(
                f"INSERT INTO customer_snapshots ({', '.join(names)}) "
                f"VALUES ({', '.join('?' for _ in names)})",
                [tuple(r[n] for n in names) for r in rows],
            )
        conn.row_factory = sqlite3.Row
        stored = conn.execute(
            "SELECT * FROM customer_snapshots WHERE snapshot_date = ? ORDER BY rowid", (DAY,)
        )
        return [dict(r) for r in stored]


# -- the oracle: the README's contract, restated over the stored values -------------------


def clean_id(value: object) -> str | None:
    if value is None:
        return None
    assert isinstance(value, str), f"a VARCHAR column holds text or NULL, not {value!r}"
    text = value.strip(" \t\n\r\x0b\x0c")
    return text or None


def out_of_range(value: object) -> bool:
    if isinstance(value, int):
        return abs(value) > LIMIT
    if isinstance(value, float):
        return math.isinf(value) or abs(value) > LIMIT
    if isinstance(value, str):
        text = value.strip(" \t\n\r\x0b\x0c")
        if INFINITY.match(text):
            return True
        return bool(NUMBER.match(text)) and abs(float(text)) > LIMIT
    return False


def reasons(stored: list[dict[str, Any]]) -> list[str | None]:
    """Per row: why the contract must reject it (first reason that applies), or None."""
    ids = [clean_id(r["customer_id"]) for r in stored]
    counts = Counter(i for i in ids if i is not None)
    out: list[str | None] = []
    for row, cid in zip(stored, ids, strict=True):
        broken = [n for n in NUMERIC if out_of_range(row[n])]
        if cid is None:
            out.append(MISSING_ID)
        elif len(cid) > ID_MAX_LENGTH or CONTROL.search(cid):
            out.append(BAD_ID)
        elif counts[cid] > 1:
            out.append(DUPLICATE_ID)
        elif broken:
            out.append(OUT_OF_RANGE + ", ".join(broken))
        else:
            out.append(None)
    return out


def published(config: Config) -> dict[str, tuple[float, str]]:
    with sqlite_db(db(config)) as conn:
        rows = conn.execute(
            "SELECT customer_id, churn_probability, risk_tier FROM churn_predictions "
            "WHERE snapshot_date = ?",
            (DAY,),
        )
        return {r[0]: (r[1], r[2]) for r in rows}


def run_record(config: Config) -> tuple[str, str, int, int]:
    with sqlite_db(db(config)) as conn:
        return conn.execute(
            "SELECT run_id, status, rows_read, rows_rejected FROM churn_scoring_runs "
            "ORDER BY started_at DESC LIMIT 1"
        ).fetchone()


def rejected_reasons(config: Config, run_id: str) -> Counter[str]:
    with sqlite_db(db(config)) as conn:
        rows = conn.execute("SELECT reason FROM churn_rejected_rows WHERE run_id = ?", (run_id,))
        return Counter(r[0] for r in rows)


def test_whatever_the_snapshot_the_job_publishes_exactly_the_valid_rows_or_nothing(
    project: Config,
) -> None:
    base = prepare(project)
    config = configure(project, 1.0)
    score_date(config, LAST)
    state = {"before": predictions(db(config), LAST)}
    outcomes: Counter[int] = Counter()
    seen: Counter[str] = Counter()  # reasons the examples produced

    @settings(max_examples=40, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(SNAPSHOTS)
    # Besides the generated ones, one example per outcome and per reason, whatever the
    # generator's luck: every reason in one published night, no rows, a broken column.
    @example(
        (
            300,
            [
                (0, ("customer_id", None)),
                (1, ("customer_id", "a\tb")),
                (2, ("customer_id", "C0000004")),
                (4, ("monthly_charges", 1e308)),
            ],
            None,
            1.0,
        )
    )
    @example((0, [], None, 0.05))
    @example((50, [], ("tenure_months", "1e999"), 0.05))
    def one_night(snapshot: tuple[int, list[tuple[int, tuple[str, Any]]], Any, float]) -> None:
        n, cells, everywhere, fraction = snapshot
        rows = [dict(r) for r in base[:n]]
        if everywhere is not None:
            for row in rows:
                row[everywhere[0]] = everywhere[1]
        for index, (column, value) in cells:
            if index < n:
                rows[index][column] = value
        stored = write_day(config, rows)
        expected = reasons(stored)
        valid = {clean_id(r["customer_id"]) for r, why in zip(stored, expected, strict=True)
                 if why is None}  # fmt: skip
        checked = configure(config, fraction)
        try:
            outcome = score_date(checked, LAST)
            code = 0
        except ChurnBatchError as exc:  # anything else is exit 1: a bug, and fails here
            code = exc.exit_code
        outcomes[code] += 1
        seen.update(w.split(" in ")[0] for w in expected if w)

        invalid = len(stored) - len(valid)
        if not stored:
            assert code == 3
        elif invalid / len(stored) > fraction:
            assert code == 4
        else:
            assert code == 0
        if code != 0:
            assert predictions(db(config), LAST) == state["before"], "a refused run changed them"
            return
        got = published(config)
        assert set(got) == valid
        assert all(0.0 <= p <= 1.0 and tier in ("high", "medium", "low")
                   for p, tier in got.values())  # fmt: skip
        run_id, status, rows_read, rows_rejected = run_record(config)
        assert (run_id, status) == (outcome.run_id, "succeeded")
        assert (rows_read, rows_rejected) == (len(stored), invalid)
        assert rejected_reasons(config, run_id) == Counter(w for w in expected if w)
        state["before"] = predictions(db(config), LAST)

    one_night()
    # The examples reached every documented outcome this setup allows.
    assert set(outcomes) == {0, 3, 4}, outcomes
    assert set(seen) == {MISSING_ID, BAD_ID, DUPLICATE_ID, OUT_OF_RANGE.split(" in ")[0]}, seen

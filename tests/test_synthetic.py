"""The synthetic base is the input of every demo and benchmark, so its contract is pinned here."""

from __future__ import annotations

import datetime
import itertools
import re
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from churn_batch.synthetic import (
    COLUMNS,
    HORIZON_DAYS,
    generate_snapshot,
    generate_snapshots,
    write_parquet,
    write_sql,
)

START = datetime.date(2024, 3, 1)
Snapshots = list[tuple[datetime.date, pa.Table]]

YES_NO = {"Yes", "No"}
ADDON = {"Yes", "No", "No internet service"}
LEVELS = {
    "gender": {"Female", "Male"},
    "partner": YES_NO,
    "dependents": YES_NO,
    "phone_service": YES_NO,
    "multiple_lines": {"Yes", "No", "No phone service"},
    "internet_service": {"DSL", "Fiber optic", "No"},
    "online_security": ADDON,
    "online_backup": ADDON,
    "device_protection": ADDON,
    "tech_support": ADDON,
    "streaming_tv": ADDON,
    "streaming_movies": ADDON,
    "contract": {"Month-to-month", "One year", "Two year"},
    "paperless_billing": YES_NO,
    "payment_method": {
        "Electronic check",
        "Mailed check",
        "Bank transfer (automatic)",
        "Credit card (automatic)",
    },
    "churned": YES_NO,
}
NUMERIC = ["senior_citizen", "tenure_months", "monthly_charges", "total_charges"]
CATEGORICAL = [c for c in LEVELS if c != "churned"]


@pytest.fixture(scope="module")
def five_days() -> Snapshots:
    return list(generate_snapshots(2_000, START, 5, seed=7))


@pytest.fixture(scope="module")
def big_day() -> pd.DataFrame:
    return generate_snapshot(20_000, START, seed=3).to_pandas()


def churn_rate(frame: pd.DataFrame) -> float:
    return float((frame["churned"] == "Yes").mean())


def test_same_seed_same_data_other_seed_other_data() -> None:
    first = list(generate_snapshots(500, START, 3, seed=1))
    again = list(generate_snapshots(500, START, 3, seed=1))
    other = list(generate_snapshots(500, START, 3, seed=2))
    assert [d for d, _ in first] == [START + datetime.timedelta(days=i) for i in range(3)]
    assert all(a.equals(b) for (_, a), (_, b) in zip(first, again, strict=True))
    assert not any(a.equals(b) for (_, a), (_, b) in zip(first, other, strict=True))
    assert generate_snapshot(500, START, seed=1).equals(first[0][1])
    assert not generate_snapshot(500, START, seed=2).equals(first[0][1])


def test_bad_arguments_fail_before_any_work() -> None:
    with pytest.raises(ValueError, match="n_customers"):
        generate_snapshots(0, START, 3)
    with pytest.raises(ValueError, match="days"):
        generate_snapshots(10, START, -1)
    with pytest.raises(ValueError, match="n_customers"):
        generate_snapshot(0, START)


def test_schema_is_the_data_contract(five_days: Snapshots) -> None:
    expected = pa.schema(
        [("customer_id", pa.string()), ("snapshot_date", pa.date32())]
        + [("senior_citizen", pa.int64()), ("tenure_months", pa.int64())]
        + [("monthly_charges", pa.float64()), ("total_charges", pa.float64())]
        + [(c, pa.string()) for c in LEVELS]
    )
    assert tuple(expected.names) == COLUMNS
    for _, table in five_days:
        assert table.schema.equals(expected)
    assert generate_snapshot(10, START).schema.equals(expected)


def test_values_stay_in_their_domains(five_days: Snapshots) -> None:
    for date, table in five_days:
        frame = table.to_pandas()
        assert frame["customer_id"].is_unique
        assert frame["customer_id"].map(lambda s: re.fullmatch(r"C\d{7,}", s) is not None).all()
        assert (frame["snapshot_date"] == date).all()
        for column, levels in LEVELS.items():
            assert set(frame[column].unique()) == levels, column
        assert set(frame["senior_citizen"].unique()) == {0, 1}
        assert frame["tenure_months"].between(0, 80).all()
        assert frame["monthly_charges"].between(18.0, 120.0).all()
        assert (frame.loc[frame["tenure_months"] == 0, "total_charges"] == 0).all()
        aged = frame[frame["tenure_months"] >= 3]
        ratio = aged["total_charges"] / (aged["tenure_months"] * aged["monthly_charges"])
        assert ratio.between(0.6, 1.4).all()
        # Services that need a line or an internet connection say so when there is none.
        no_net = frame["internet_service"] == "No"
        for addon in ("online_security", "tech_support", "streaming_movies"):
            assert ((frame[addon] == "No internet service") == no_net).all()
        no_phone = frame["phone_service"] == "No"
        assert ((frame["multiple_lines"] == "No phone service") == no_phone).all()


def test_marginals_look_like_telco(big_day: pd.DataFrame) -> None:
    share = {c: big_day[c].value_counts(normalize=True) for c in CATEGORICAL}
    assert 0.50 < share["contract"]["Month-to-month"] < 0.60
    assert 0.39 < share["internet_service"]["Fiber optic"] < 0.49
    assert 0.29 < share["payment_method"]["Electronic check"] < 0.39
    assert 0.20 <= churn_rate(big_day) <= 0.27
    assert 18 < big_day["tenure_months"].mean() < 36


def test_two_year_contracts_churn_less(big_day: pd.DataFrame) -> None:
    by_contract = big_day.groupby("contract")["churned"].apply(lambda s: (s == "Yes").mean())
    assert by_contract["Two year"] < by_contract["One year"] < by_contract["Month-to-month"]
    # Also within a slice of similar customers, not only through tenure and services.
    similar = big_day[
        (big_day["internet_service"] == "Fiber optic") & big_day["tenure_months"].between(12, 48)
    ]
    two_year = churn_rate(similar[similar["contract"] == "Two year"])
    assert two_year < churn_rate(similar[similar["contract"] == "Month-to-month"])


def test_base_evolves_and_keeps_its_size(five_days: Snapshots) -> None:
    frames = [
        t.select(["customer_id", "tenure_months", "churned"]).to_pandas() for _, t in five_days
    ]
    ids = [set(f["customer_id"]) for f in frames]
    assert ids[0] - ids[-1], "nobody left in 5 days"
    assert ids[-1] - ids[0], "nobody joined in 5 days"
    assert all(1_800 <= len(f) <= 2_200 for f in frames)
    for before, after in itertools.pairwise(frames):
        both = before.merge(after, on="customer_id", suffixes=("_before", "_after"))
        assert (both["tenure_months_after"] >= both["tenure_months_before"]).all()
        joined = after[~after["customer_id"].isin(before["customer_id"])]
        assert joined["tenure_months"].between(0, 1).all()
    seen = set().union(*ids[:-1])
    assert not (ids[-1] - ids[-2]) & seen, "an id was reused"
    # Labels are honest: within the horizon, whoever left was labelled as churning.
    assert len(frames) <= HORIZON_DAYS
    first = frames[0].set_index("customer_id")["churned"]
    assert (first[sorted(ids[0] - ids[-1])] == "Yes").all()


def test_label_is_learnable_but_not_trivial() -> None:
    frame = pd.concat(t.to_pandas() for _, t in generate_snapshots(5_000, START, 4, seed=11))
    assert len(frame) >= 19_000
    # Split by customer: the same customer on two days must not sit on both sides.
    test_ids = frame["customer_id"].drop_duplicates().sample(frac=0.3, random_state=0)
    is_test = frame["customer_id"].isin(test_ids)
    x, y = frame[NUMERIC + CATEGORICAL], frame["churned"] == "Yes"
    model = make_pipeline(
        ColumnTransformer(
            [
                ("cat", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL),
                ("num", StandardScaler(), NUMERIC),
            ]
        ),
        LogisticRegression(max_iter=1_000),
    )
    model.fit(x[~is_test], y[~is_test])
    auc = roc_auc_score(y[is_test], model.predict_proba(x[is_test])[:, 1])
    assert 0.78 <= auc <= 0.92


def test_parquet_is_hive_partitioned_and_round_trips(tmp_path: Path) -> None:
    snapshots = list(generate_snapshots(300, START, 2, seed=5))
    write_parquet(snapshots, tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "snapshot_date=2024-03-01",
        "snapshot_date=2024-03-01/part-0.parquet",
        "snapshot_date=2024-03-02",
        "snapshot_date=2024-03-02/part-0.parquet",
    ]
    stored = pq.read_schema(tmp_path / "snapshot_date=2024-03-01" / "part-0.parquet")
    assert "snapshot_date" not in stored.names
    hive = ds.partitioning(pa.schema([("snapshot_date", pa.date32())]), flavor="hive")
    for date, table in snapshots:
        read = ds.dataset(tmp_path, format="parquet", partitioning=hive).to_table(
            filter=ds.field("snapshot_date") == date
        )
        assert (
            read.select(list(COLUMNS)).sort_by("customer_id").equals(table.sort_by("customer_id"))
        )


def test_parquet_rewrite_replaces_a_date(tmp_path: Path) -> None:
    write_parquet(generate_snapshots(300, START, 2, seed=5), tmp_path)
    replacement = generate_snapshot(120, START, seed=6)
    write_parquet([(START, replacement)], tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.parquet"))
    assert files == [
        "snapshot_date=2024-03-01/part-0.parquet",
        "snapshot_date=2024-03-02/part-0.parquet",
    ]
    assert pq.read_table(tmp_path / files[0]).num_rows == 120
    assert pq.read_table(tmp_path / files[1]).num_rows == 300


@pytest.fixture
def syn_table(any_db_url: str) -> Iterator[tuple[sa.Engine, str]]:
    """A fresh table per test (servers are shared), dropped afterwards."""
    engine = sa.create_engine(any_db_url)
    name = f"syn_{uuid.uuid4().hex[:8]}"
    try:
        yield engine, name
    finally:
        with engine.begin() as conn:
            sa.Table(name, sa.MetaData()).drop(conn, checkfirst=True)
        engine.dispose()


def read_date(engine: sa.Engine, name: str, date: datetime.date) -> list[dict[str, object]]:
    table = sa.Table(name, sa.MetaData(), autoload_with=engine)
    query = sa.select(table).where(table.c.snapshot_date == date).order_by(table.c.customer_id)
    with engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(query)]
    # Reflected MariaDB DOUBLEs come back as Decimal; the stored values must still be exact.
    return [{k: float(v) if isinstance(v, Decimal) else v for k, v in r.items()} for r in rows]


def test_sql_round_trip_and_rewrite(syn_table: tuple[sa.Engine, str]) -> None:
    engine, name = syn_table
    snapshots = list(generate_snapshots(300, START, 2, seed=5))
    assert write_sql(snapshots, engine, name, chunk_rows=128) == sum(
        t.num_rows for _, t in snapshots
    )
    for date, table in snapshots:
        expected = table.sort_by("customer_id").to_pylist()
        assert read_date(engine, name, date) == expected
    # Rewriting a date replaces its rows (no duplicates) and leaves the other date alone.
    replacement = generate_snapshot(120, START, seed=6)
    assert write_sql([(START, replacement)], engine, name, chunk_rows=50) == 120
    assert read_date(engine, name, START) == replacement.sort_by("customer_id").to_pylist()
    second = snapshots[1][0]
    assert len(read_date(engine, name, second)) == snapshots[1][1].num_rows
    with engine.connect() as conn:
        t = sa.Table(name, sa.MetaData(), autoload_with=conn)
        per_date = dict(
            conn.execute(
                sa.select(t.c.snapshot_date, sa.func.count()).group_by(t.c.snapshot_date)
            ).all()
        )
    assert per_date == {START: 120, second: snapshots[1][1].num_rows}


def test_sql_rejects_empty_chunks(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    with pytest.raises(ValueError, match="chunk_rows"):
        write_sql([], engine, chunk_rows=0)
    engine.dispose()

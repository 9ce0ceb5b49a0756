"""A seeded, Telco-like customer base that evolves day by day.

The batch job needs realistic input without shipping customer data: marginals follow the
public IBM Telco churn dataset, and churn depends on the features non-linearly (contract x
fiber, a tenure step and curve, support add-ons that matter on fiber, a price cliff) plus
noise no feature shows, so linear and tree models both learn it and neither is perfect.

Labels are honest look-aheads, the way a real training set is built: `churned` is "Yes" at a
snapshot exactly when the customer is gone within `HORIZON_DAYS`. To keep that true while the
base evolves, every customer is reviewed once per horizon (at join, then every
`HORIZON_DAYS`); a review that says "leave" keeps the label "Yes" for a full horizon and the
customer disappears when it ends. Day-0 customers were reviewed "before" day 0, so their
leaving days are spread across the first horizon, and departures are spread over every day.
"""

from __future__ import annotations

import datetime
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa

# Telco's ~26% churn and ~9% new customers a month only fit together at about 3 months.
HORIZON_DAYS = 90
ROW_GROUP_ROWS = 100_000
_BILLING_DAYS = 30
_CHANGE_RATE = 0.002  # daily share of customers who change contract or one service

_YN = ("No", "Yes")
_ADDONS: tuple[str, ...] = ("online_security", "online_backup", "device_protection", "tech_support")
_ADDONS += ("streaming_tv", "streaming_movies")
_PAY = ("Electronic check", "Mailed check", "Bank transfer (automatic)", "Credit card (automatic)")
LEVELS: dict[str, tuple[str, ...]] = {"gender": ("Female", "Male")}
LEVELS |= dict.fromkeys(("partner", "dependents", "phone_service"), _YN)
LEVELS |= {"multiple_lines": ("No", "Yes", "No phone service")}
LEVELS |= {"internet_service": ("DSL", "Fiber optic", "No")}
LEVELS |= dict.fromkeys(_ADDONS, ("No", "Yes", "No internet service"))
LEVELS |= {"contract": ("Month-to-month", "One year", "Two year"), "paperless_billing": _YN}
LEVELS |= {"payment_method": _PAY}
_NUMERIC = dict.fromkeys(("senior_citizen", "tenure_months"), pa.int64())
_NUMERIC |= dict.fromkeys(("monthly_charges", "total_charges"), pa.float64())
SCHEMA = pa.schema(
    [("customer_id", pa.string()), ("snapshot_date", pa.date32())]
    + list(_NUMERIC.items())
    + [(name, pa.string()) for name in [*LEVELS, "churned"]]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)

# Telco-like conditional tables: payments by contract, add-on uptake, prices in $/month.
_CONTRACT_P = np.array([0.55, 0.21, 0.24])
_PAYMENT_P = np.array(
    [[0.48, 0.22, 0.15, 0.15], [0.18, 0.22, 0.31, 0.29], [0.10, 0.23, 0.34, 0.33]]
)
_INTERNET_P = np.array([0.267, 0.489, 0.244])  # for phone customers; the rest are DSL-only
_ADDON_P = {"online_security": 0.37, "online_backup": 0.44, "device_protection": 0.44}
_ADDON_P |= {"tech_support": 0.37, "streaming_tv": 0.49, "streaming_movies": 0.50}
_ADDON_PRICE = {a: (10.0 if a.startswith("streaming") else 5.0) for a in _ADDONS}
_INTERNET_PRICE = np.array([25.0, 50.0, 0.0])

# Log-odds of leaving within a horizon. _BASE puts churn at 22-26%, as in Telco (26.5%).
_BASE = -3.45
_W_CONTRACT = np.array([0.9, -0.45, -1.5])
_W_INTERNET = np.array([0.0, 0.55, -0.7])
_W_PAYMENT = np.array([0.1, 0.0, -0.2, -0.2])
_NOISE_SD = 1.5  # per-review circumstances no feature shows
_REFERENCE_TENURE = 24  # months; day-0 ages come from the risk at this tenure
_AGE_SCALE = 2.0

Pop = dict[str, npt.NDArray[Any]]


def _u(rng: np.random.Generator, n: int) -> npt.NDArray[np.float32]:
    """float32 uniforms: half the memory and time of float64, plenty for Bernoulli draws."""
    return rng.random(n, dtype=np.float32)


def _draw(rng: np.random.Generator, probs: npt.NDArray[np.float64], n: int) -> npt.NDArray[Any]:
    """Category codes from one probability row, cheaper than rng.choice for huge n."""
    u = _u(rng, n)
    codes = np.zeros(n, dtype=np.uint8)
    for cut in np.cumsum(probs)[:-1].astype(np.float32):
        codes += u >= cut
    return codes


def _price(pop: Pop) -> npt.NDArray[np.float64]:
    """Charges follow the services, so a service change moves the bill consistently."""
    price = np.where(pop["phone_service"] == 1, 20.0, 0.0) + 5.0 * (pop["multiple_lines"] == 1)
    price += _INTERNET_PRICE[pop["internet_service"]]
    for addon in _ADDONS:
        price += _ADDON_PRICE[addon] * (pop[addon] == 1)
    result: npt.NDArray[np.float64] = np.clip(price + pop["price_noise"], 18.25, 118.75)
    return np.round(result, 2)


def _churn_probability(pop: Pop, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """Non-linear on purpose: one-hot LR sees the main effects, trees also the rest.

    The noise is drawn per call, i.e. per review: circumstances that no feature shows. A
    persistent hidden trait would let survivorship make tenure ever more predictive.
    """
    contract, internet = pop["contract"], pop["internet_service"]
    fiber, m2m = internet == 1, contract == 0
    tenure = pop["tenure_months"].astype(np.float64)
    z = _BASE + _W_CONTRACT[contract] + _W_INTERNET[internet] + _W_PAYMENT[pop["payment_method"]]
    z += 1.0 * (m2m & fiber) + 0.5 * ((contract == 1) & fiber)
    z += 1.2 * (tenure < 4) + 1.6 * np.exp(-tenure / 10.0) - 0.01 * tenure
    support = (pop["online_security"] == 1).astype(np.float64) + (pop["tech_support"] == 1)
    z -= np.where(fiber, 1.0, 0.1) * support
    z += 2.0 / (1.0 + np.exp(-(pop["monthly_charges"] - 100.0) / 2.0))
    paperless = pop["paperless_billing"] == 1
    z += 0.35 * pop["senior_citizen"] + 0.2 * paperless
    z += 0.7 * ((pop["payment_method"] == 0) & paperless)
    z -= 0.25 * ((pop["partner"] == 1) & (pop["dependents"] == 1))
    z += _NOISE_SD * rng.standard_normal(len(z), dtype=np.float32)
    result: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-z))
    return result


def _sample(rng: np.random.Generator, n: int) -> Pop:
    """The day-0 base, drawn close to the steady state the daily evolution settles into.

    Without that, the first months would drift (churn, AUC and tenure PSI all moving) while
    survivorship sorted risky profiles into the young and safe ones into the old.
    """
    u8 = np.uint8
    pop: Pop = {"customer_id": np.arange(1, n + 1), "gender": (_u(rng, n) < 0.5).astype(u8)}
    pop["senior_citizen"] = (_u(rng, n) < 0.162).astype(np.int64)
    pop["partner"] = (_u(rng, n) < 0.48).astype(u8)
    pop["dependents"] = (_u(rng, n) < np.where(pop["partner"] == 1, 0.52, 0.12)).astype(u8)
    contract = pop["contract"] = _draw(rng, _CONTRACT_P, n)
    phone = _u(rng, n) < 0.90
    pop["phone_service"] = phone.astype(u8)
    pop["multiple_lines"] = np.where(phone, _u(rng, n) < 0.42, 2).astype(u8)
    pop["internet_service"] = np.where(phone, _draw(rng, _INTERNET_P, n), 0).astype(u8)
    offline = pop["internet_service"] == 2
    for addon, p in _ADDON_P.items():
        pop[addon] = (_u(rng, n) < p).view(u8)
        pop[addon][offline] = 2
    pop["paperless_billing"] = (_u(rng, n) < 0.59).astype(u8)
    pop["payment_method"] = np.empty(n, dtype=u8)
    for level, probs in enumerate(_PAYMENT_P):
        mask = contract == level
        pop["payment_method"][mask] = _draw(rng, probs, int(mask.sum()))
    pop["price_noise"] = rng.normal(0.0, 1.5, n)
    pop["monthly_charges"] = _price(pop)
    # A profile that churns with probability p per horizon keeps a customer ~1/p horizons;
    # the scale is below 3 months because the young churn faster than at reference tenure.
    pop["tenure_months"] = np.full(n, _REFERENCE_TENURE)
    mean_months = _AGE_SCALE / _churn_probability(pop, rng)
    cdf_72 = -np.expm1(-72.0 / mean_months)  # truncated at 72 months, Telco's oldest
    tenure = -mean_months * np.log1p(-_u(rng, n) * cdf_72)
    pop["tenure_months"] = tenure.astype(np.int64)
    billed = pop["tenure_months"] * pop["monthly_charges"] * rng.normal(1.0, 0.04, n)
    pop["total_charges"] = np.round(np.maximum(billed, 0.0), 2)
    pop["churned"] = _u(rng, n) < _churn_probability(pop, rng)
    # Reviewed "before" day 0: next reviews (or departures) spread over the first horizon.
    pop["next_review"] = rng.integers(1, HORIZON_DAYS + 1, n)
    pop["next_bill"] = rng.integers(1, _BILLING_DAYS + 1, n)
    return pop


def _to_table(pop: Pop, snapshot_date: datetime.date) -> pa.Table:
    """Arrow's `take` expands category codes to strings without a Python loop."""
    ids = pc.cast(pa.array(pop["customer_id"]), pa.string())
    cols: dict[str, pa.Array] = {
        "customer_id": pc.binary_join_element_wise("C", pc.utf8_lpad(ids, 7, "0"), ""),
        "snapshot_date": pa.array(np.full(len(ids), np.datetime64(snapshot_date, "D"))),
    }
    cols |= {name: pa.array(pop[name], type=t) for name, t in _NUMERIC.items()}
    cols |= {name: pa.array(lv).take(pa.array(pop[name])) for name, lv in LEVELS.items()}
    cols["churned"] = pa.array(_YN).take(pa.array(pop["churned"].astype(np.uint8)))
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def _check(n_customers: int, days: int = 1) -> None:
    if n_customers < 1 or days < 0:
        raise ValueError(f"need n_customers >= 1 and days >= 0, got {n_customers}, {days}")


def generate_snapshot(n_customers: int, snapshot_date: datetime.date, seed: int = 0) -> pa.Table:
    """A single date without evolution (fast path for benchmarks; 1M-5M rows).

    Identical to the first table of `generate_snapshots` with the same arguments, so a
    benchmark and a multi-day run agree on what "day 0" looks like.
    """
    _check(n_customers)
    rng = np.random.default_rng(seed)
    return _to_table(_sample(rng, n_customers), snapshot_date)


def _evolve(pop: Pop, rng: np.random.Generator, day: int, next_id: int) -> tuple[Pop, int]:
    """One day: leavers go, bills accrue, a few customers change plans, reviews, joiners.

    Each joiner takes over a leaver's services with a fresh id and tenure, so the feature
    mix stays Telco-like however long the run is instead of drifting to low-risk profiles.
    """
    gone = (pop["next_review"] == day) & pop["churned"]
    new = {k: v[gone] for k, v in pop.items()}
    pop = {k: v[~gone] for k, v in pop.items()}
    billed = pop["next_bill"] == day
    pop["tenure_months"] += billed
    pop["total_charges"] = np.round(pop["total_charges"] + billed * pop["monthly_charges"], 2)
    pop["next_bill"] += _BILLING_DAYS * billed
    changing = np.flatnonzero(_u(rng, len(billed)) < _CHANGE_RATE)
    what = rng.integers(0, len(_ADDONS) + 1, len(changing))
    pop["contract"][changing[what == 0]] = _draw(rng, _CONTRACT_P, int((what == 0).sum()))
    for i, addon in enumerate(_ADDONS, start=1):
        rows = changing[what == i]
        pop[addon][rows] = np.where(pop[addon][rows] == 2, 2, 1 - pop[addon][rows])
    pop["monthly_charges"] = _price(pop)
    due = np.flatnonzero(pop["next_review"] == day)
    review = {k: v[due] for k, v in pop.items()}
    pop["churned"][due] = _u(rng, len(due)) < _churn_probability(review, rng)
    pop["next_review"][due] += HORIZON_DAYS
    m = len(new["customer_id"])
    new["customer_id"] = np.arange(next_id, next_id + m)
    new["tenure_months"] = rng.integers(0, 2, m)
    new["total_charges"] = np.round(new["tenure_months"] * new["monthly_charges"], 2)
    new["churned"] = _u(rng, m) < _churn_probability(new, rng)
    new["next_review"] = np.full(m, day + HORIZON_DAYS)
    new["next_bill"] = np.full(m, day + _BILLING_DAYS)
    return {k: np.concatenate([v, new[k]]) for k, v in pop.items()}, next_id + m


def generate_snapshots(
    n_customers: int, start: datetime.date, days: int, seed: int = 0
) -> Iterator[tuple[datetime.date, pa.Table]]:
    """Yield one pyarrow Table per date, oldest first.

    Joiners replace leavers one for one, so the base stays at `n_customers`; everything
    is a pure function of the arguments, so reruns and other engineers see the same data.
    """
    _check(n_customers, days)
    return _snapshots(n_customers, start, days, seed)


def _snapshots(
    n_customers: int, start: datetime.date, days: int, seed: int
) -> Iterator[tuple[datetime.date, pa.Table]]:
    rng = np.random.default_rng(seed)
    pop = _sample(rng, n_customers)
    next_id = n_customers + 1
    for day in range(days):
        if day:
            pop, next_id = _evolve(pop, rng, day, next_id)
        date = start + datetime.timedelta(days=day)
        yield date, _to_table(pop, date)


def write_parquet(snapshots: Iterable[tuple[datetime.date, pa.Table]], root: Path) -> None:
    """Hive-partitioned: root/snapshot_date=YYYY-MM-DD/part-0.parquet.

    The date lives only in the path, as Hive readers expect. Each date is written to a
    hidden sibling first and swapped in, so a reader never sees a half-written date and a
    rerun replaces a date instead of adding a second file to it.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for date, table in snapshots:
        final = root / f"snapshot_date={date.isoformat()}"
        tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        data = table.drop_columns([c for c in ("snapshot_date",) if c in table.column_names])
        # Row groups are what a reader decodes at once: keep them a batch-like size.
        pq.write_table(data, tmp / "part-0.parquet", row_group_size=ROW_GROUP_ROWS)
        old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)


def _sql_table(name: str) -> sa.Table:
    kind: dict[pa.DataType, Any] = {pa.int64(): sa.Integer, pa.float64(): sa.Double}
    key = ("snapshot_date", sa.Date), ("customer_id", sa.String(32))
    cols = [sa.Column(f.name, kind.get(f.type, sa.String(64)), nullable=False) for f in SCHEMA]
    cols[:2] = [sa.Column(c, t, primary_key=True) for c, t in key]
    return sa.Table(name, sa.MetaData(), *cols)


def write_sql(
    snapshots: Iterable[tuple[datetime.date, pa.Table]],
    engine: sa.Engine,
    table: str = "customer_snapshots",
    *,
    chunk_rows: int = 50_000,
) -> int:
    """Write snapshots to a SQL table, replacing each date's rows; returns rows written.

    One transaction per date makes a rerun idempotent and never leaves a date half
    replaced. Core `insert()` with bound parameters keeps it portable across SQLite,
    PostgreSQL and MariaDB and lets each driver batch the executemany its own way.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    target = _sql_table(table)
    target.create(engine, checkfirst=True)
    names = [c for c in COLUMNS if c != "snapshot_date"]
    written = 0
    for date, snapshot in snapshots:
        with engine.begin() as conn:
            conn.execute(target.delete().where(target.c.snapshot_date == date))
            for batch in snapshot.select(names).to_batches(max_chunksize=chunk_rows):
                values = zip(*(col.to_pylist() for col in batch.columns), strict=True)
                rows = [{"snapshot_date": date, **dict(zip(names, v, strict=True))} for v in values]
                if rows:
                    conn.execute(target.insert(), rows)
                written += len(rows)
    return written

"""Throughput and peak memory of `churn-batch score` against the script users would write.

Run on demand, never by the unit suite (pytest ignores tests/benchmarks):

    .venv/bin/python tests/benchmarks/bench_scoring.py --rows 1000000
    .venv/bin/python tests/benchmarks/bench_scoring.py --rows 1M,5M --cases score-pg,floor-pg

One run generates N synthetic customers for one date, loads them into PostgreSQL (a
schema of its own), Parquet and SQLite, registers two champions (logistic regression and
gradient boosting, from `churn_batch.model`), then times every case in a FRESH
subprocess so that each peak RSS is its own (the child's VmHWM, see _memory_kib):

- floor-pg / floor-pg-copy: the I/O floor, no scoring. ADBC reads the snapshot and the
  same number of prediction rows is written by ADBC ingest (binary COPY) / psycopg COPY.
- naive-pg / naive-sqlite: `pd.read_sql` -> `pipeline.predict_proba` -> `df.to_sql`.
- score-pg / parquet-pg / score-sqlite: `job.score_date`, what `churn-batch score` runs.

"wall s" is measured in the child around the work: interpreter start-up and imports
(pandas, pyarrow, scikit-learn, SQLAlchemy, churn_batch) are excluded, loading the model
from the registry and connecting are included. "proc s" is the whole subprocess.
See README.md beside this file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT_DATE = date(2024, 6, 30)
TRAIN_DATE = date(2024, 3, 31)
SOURCE_TABLE = "bench_snapshots"
SINK_TABLE = "bench_predictions"
NAIVE_TABLE = "bench_naive_out"
FLOOR_TABLE = "bench_floor_out"
QUIET_BUSY_SHARE = 0.15  # a case starts once the machine is at most this busy
PG_URL_ENV = "CHURN_BENCH_PG_URL"  # the configs name it, so no URL (password) is on disk
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

CHAMPIONS = {"lr": "logistic_regression", "gb": "hist_gradient_boosting"}
FLOOR_CASES = ("floor-pg", "floor-pg-copy")
PG_SINK_CASES = ("naive-pg", "score-pg", "parquet-pg", *FLOOR_CASES)
SCORE_CASES = ("score-pg", "parquet-pg", "score-sqlite")
NAIVE_CASES = ("naive-pg", "naive-sqlite")
CASES: tuple[str, ...] = ("floor-pg", "floor-pg-copy", "naive-pg", "score-pg", "parquet-pg")
CASES += ("naive-sqlite", "score-sqlite")
# What unpickling a model and scoring import: loaded before the timer starts.
PREIMPORTS = ("numpy", "pandas", "pyarrow", "sqlalchemy", "sklearn.pipeline", "sklearn.compose",
              "sklearn.ensemble", "sklearn.impute", "sklearn.linear_model",
              "sklearn.preprocessing")  # fmt: skip
NAIVE_OF = {"score-pg": "naive-pg", "parquet-pg": "naive-pg", "score-sqlite": "naive-sqlite"}

# Targets from the "Performance" issue.
TARGET_PG_SPEEDUP_LR = 10.0
TARGET_PG_SPEEDUP_GB = 5.0
TARGET_SQLITE_SPEEDUP = 5.0
TARGET_FLOOR_RATIO = 1.5
TARGET_RSS_MB = 500.0
FLAT_RSS_GROWTH = 1.2  # "flat": peak RSS at the larger N at most 20% above the smaller N's

MB = 1024.0  # KiB per MiB (/proc and ru_maxrss count KiB)


# -- small helpers ---------------------------------------------------------------------------


def _memory_kib(field: str) -> int:
    """`VmHWM` (peak) or `VmRSS` (now) of this process image, in KiB, from /proc.

    Not `getrusage`: subprocess starts children with vfork, and Linux then carries the
    parent's peak into the child's `ru_maxrss` (RUSAGE_SELF, RUSAGE_CHILDREN and wait4
    alike), so a parent that once held 600 MB makes every child look at least that big.
    VmHWM belongs to the address space exec created: this program's own peak.
    """
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # not Linux: best effort


def _load1() -> float:
    return os.getloadavg()[0]


def _loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _parse_rows(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower().replace("_", "")
        scale = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        number = part[:-1] if scale > 1 else part
        try:
            value = round(float(number) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a row count: {part!r}") from None
        if value < 1000:
            raise argparse.ArgumentTypeError(f"need at least 1000 rows, got {value}")
        out.append(value)
    return out


def _parse_list(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}"
            )
        return names

    return parse


def _human(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}k"
    return f"{n:.0f}"


def _redacted(url: str) -> str:
    import sqlalchemy as sa

    return sa.engine.make_url(url).render_as_string(hide_password=True)


def _with_schema(url: str, schema: str) -> str:
    """The URL with libpq's `options` setting search_path, so every table lands in `schema`."""
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    return parsed.render_as_string(hide_password=False)


def _libpq_uri(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as the libpq URI ADBC takes (same query options)."""
    import sqlalchemy as sa

    return (
        sa.engine.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


# -- what the children do --------------------------------------------------------------------
# Each child gets a JSON spec and writes a JSON result; its stdout/stderr go to a log file.


class Phases:
    """Seconds spent per phase, accumulated by wrapped functions and iterators.

    Phases in `background` ran on one of the job's other threads (read, check),
    overlapping the others.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.background: set[str] = set()
        self.missing: list[str] = []
        self.marks: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            key = self.key(name)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start

        return timed

    def key(self, name: str) -> str:
        """A phase run on one of the job's other threads overlaps the main thread's."""
        thread = threading.current_thread()
        if thread is threading.main_thread():
            return name
        key = f"{name} ({thread.name} thread)"
        self.background.add(key)
        return key

    def iterate(self, name: str, items: Any) -> Iterator[Any]:
        iterator = iter(items)
        try:
            while True:
                start = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                finally:
                    self.seconds[self.key(name)] += time.perf_counter() - start
                yield item
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def patch(self, name: str, *targets: tuple[Any, str]) -> bool:
        """Time the first `(owner, attribute)` that exists as phase `name`; none is noted,
        not an error (others refactor the pipeline while this benchmark measures it)."""
        for owner, attribute in targets:
            fn = getattr(owner, attribute, None) if owner is not None else None
            if callable(fn):
                setattr(owner, attribute, self.wrap(name, fn))
                return True
        self.missing.append(
            " / ".join(f"{getattr(o, '__name__', o)}.{a}" for o, a in targets) + f" ({name})"
        )
        return False


def _instrument_job(phases: Phases) -> None:
    """Phase timers around what `job.score_date` calls (a few calls per batch: no overhead)."""
    import churn_batch.job as job
    import churn_batch.scoring as scoring
    import churn_batch.sinks as sinks

    monitor = getattr(job, "DriftMonitor", None)
    publication = getattr(sinks, "Publication", None)
    sink = getattr(sinks, "Sink", None)
    scorer = getattr(scoring, "BatchScorer", None)
    phases.patch("model load", (job, "load_model"))
    if scorer is not None:  # compiling a fast path happens once, when the scorer is built
        phases.patch("model compile", (scoring, "compile_scorer"))
    phases.patch("contract", (job, "check_batch"))
    phases.patch("scoring", (job, "score_batch"), (scorer, "score"))
    phases.patch("monitoring", (monitor, "observe"))
    phases.patch("monitoring", (monitor, "report"))
    phases.patch("write", (publication, "write_predictions"))
    phases.patch("write", (publication, "write_rejected"))
    phases.patch("sink setup", (sink, "prepare"))
    phases.patch("sink setup", (sink, "begin_run"))
    finish = getattr(publication, "finish_run", None)
    if callable(finish):

        def finish_run(*args: Any, **kwargs: Any) -> Any:
            result = finish(*args, **kwargs)
            phases.marks["finished"] = time.perf_counter()  # the commit follows
            return result

        setattr(publication, "finish_run", finish_run)  # noqa: B010
    if callable(getattr(job, "prefetch", None)):
        prefetch = getattr(job, "prefetch")  # noqa: B009 (job does not export it)

        def waiting(*args: Any, **kwargs: Any) -> Iterator[Any]:
            return phases.iterate("read wait", prefetch(*args, **kwargs))

        setattr(job, "prefetch", waiting)  # noqa: B010
    opener = getattr(job, "open_source", None)
    if not callable(opener):
        phases.missing.append("job.open_source (read)")
        return

    def open_source(*args: Any, **kwargs: Any) -> Any:
        source = opener(*args, **kwargs)
        read, summarize = source.read, source.summarize
        source.read = lambda *a, **k: phases.iterate("read", read(*a, **k))
        source.summarize = phases.wrap("count+dups", summarize)
        return source

    setattr(job, "open_source", open_source)  # noqa: B010 (job does not export it)


def _preimport() -> None:
    """Import what unpickling the model and the pipeline use, outside the timed region."""
    for module in PREIMPORTS:
        importlib.import_module(module)


def child_score(spec: dict[str, Any]) -> dict[str, Any]:
    """`churn-batch score --date D`, i.e. `job.score_date`, with phase timers."""
    import logging

    import churn_batch.job as job
    from churn_batch.config import load_config

    _preimport()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    config = load_config(spec["config"])
    phases = Phases()
    _instrument_job(phases)
    snapshot_date = date.fromisoformat(spec["date"])
    rss_start = _memory_kib("VmRSS")
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    outcome = job.score_date(config, snapshot_date)
    end = time.perf_counter()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    seconds = dict(phases.seconds)
    if "finished" in phases.marks:
        seconds["commit+close"] = end - phases.marks["finished"]
    return {
        "wall": end - start,
        "rss_start_kib": rss_start,
        "phases": seconds,
        "background": sorted(phases.background),
        "missing_timers": phases.missing,
        "info": {
            "status": outcome.status,
            "rows_read": outcome.rows_read,
            "rows_scored": outcome.rows_scored,
            "rows_rejected": outcome.rows_rejected,
            "warnings": outcome.warnings,
            "model_version": outcome.model_version,
            "gate": outcome.summary.get("gate", {}).get("level"),
        },
    }


def child_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """The twenty-line script: read_sql, predict_proba, to_sql (pandas' default method)."""
    import joblib
    import numpy as np
    import pandas as pd
    import sqlalchemy as sa

    _preimport()
    url = os.environ[PG_URL_ENV] if spec["db"] == "pg" else spec["sqlite_url"]
    # SQLite stores the DATE as ISO text; a user would pass the string there.
    day: Any = date.fromisoformat(spec["date"])
    if spec["db"] == "sqlite":
        day = day.isoformat()
    features = spec["features"]
    high, medium = spec["thresholds"]["high"], spec["thresholds"]["medium"]
    rss_start = _memory_kib("VmRSS")
    marks = [time.perf_counter()]

    engine = sa.create_engine(url)
    query = sa.text(f"SELECT * FROM {SOURCE_TABLE} WHERE snapshot_date = :day")
    df = pd.read_sql(query, engine, params={"day": day})
    marks.append(time.perf_counter())
    pipeline = joblib.load(spec["model_path"])
    marks.append(time.perf_counter())
    p = pipeline.predict_proba(df[features])[:, list(pipeline.classes_).index(1)]
    marks.append(time.perf_counter())
    out = pd.DataFrame(
        {
            "snapshot_date": df["snapshot_date"],
            "customer_id": df["customer_id"],
            "churn_probability": p,
            "risk_tier": np.where(p >= high, "high", np.where(p >= medium, "medium", "low")),
            "model_version": spec["model_version"],
            "scored_at": datetime.now(UTC),
        }
    )
    out.to_sql(NAIVE_TABLE, engine, if_exists="replace", index=False)
    engine.dispose()
    marks.append(time.perf_counter())

    names = ("read_sql", "model load", "predict_proba", "to_sql")
    return {
        "wall": marks[-1] - marks[0],
        "rss_start_kib": rss_start,
        "phases": {n: b - a for n, a, b in zip(names, marks, marks[1:], strict=False)},
        "info": {"rows_scored": len(out)},
    }


def _floor_batches(
    reader: Any, phases: Phases, run_id: str, now: datetime
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Prediction-shaped rows (random probabilities) for each batch read: no scoring."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = pa.schema(
        [
            ("snapshot_date", pa.date32()),
            ("customer_id", pa.string()),
            ("churn_probability", pa.float64()),
            ("risk_tier", pa.string()),
            ("model_version", pa.string()),
            ("run_id", pa.string()),
            ("scored_at", pa.timestamp("us", tz="UTC")),
        ]
    )
    rng = np.random.default_rng(0)
    constants = [
        pa.scalar(SNAPSHOT_DATE, pa.date32()),
        pa.scalar("v1", pa.string()),
        pa.scalar(run_id, pa.string()),
        pa.scalar(now, pa.timestamp("us", tz="UTC")),
    ]

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in phases.iterate("read", reader):
            n = batch.num_rows
            p = pa.array(rng.random(n))
            tier = pc.if_else(
                pc.greater_equal(p, 0.9),
                "high",
                pc.if_else(pc.greater_equal(p, 0.7), "medium", "low"),
            )
            day, version, run, stamp = (pa.repeat(c, n) for c in constants)
            ids = batch.column(batch.schema.get_field_index("customer_id"))
            yield pa.record_batch([day, ids, p, tier, version, run, stamp], schema=schema)

    return schema, batches()


def child_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """ADBC read, then ADBC ingest (floor-pg) or psycopg COPY of Arrow CSV (floor-pg-copy)."""
    import uuid

    import adbc_driver_postgresql.dbapi as adbc
    import psycopg
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import sqlalchemy as sa

    url = os.environ[PG_URL_ENV]
    phases = Phases()
    rss_start = _memory_kib("VmRSS")
    start = time.perf_counter()
    # A literal, not a bound parameter: ADBC only takes its COPY fast path for a query
    # without parameters; the value is a date's isoformat, never user text.
    query = f"SELECT * FROM {SOURCE_TABLE} WHERE snapshot_date = DATE '{SNAPSHOT_DATE.isoformat()}'"
    written = 0
    with adbc.connect(_libpq_uri(url)) as read_conn:
        cursor = read_conn.cursor()
        cursor.execute(query)
        schema, batches = _floor_batches(
            cursor.fetch_record_batch(), phases, str(uuid.uuid4()), datetime.now(UTC)
        )
        if spec["case"] == "floor-pg":
            with adbc.connect(_libpq_uri(url)) as write_conn:
                reader = pa.RecordBatchReader.from_batches(schema, batches)
                written = write_conn.cursor().adbc_ingest(FLOOR_TABLE, reader, mode="append")
                write_conn.commit()
        else:
            parsed = sa.engine.make_url(url)
            params = parsed.translate_connect_args(username="user", database="dbname")
            params |= dict(parsed.query)
            statement = f"COPY {FLOOR_TABLE} ({', '.join(schema.names)}) FROM STDIN (FORMAT csv)"
            options = pa_csv.WriteOptions(include_header=False)
            with (
                psycopg.connect(**params) as write_conn,
                write_conn.cursor() as write_cursor,
                write_cursor.copy(statement) as copy,
            ):
                for batch in batches:
                    buffer = io.BytesIO()
                    pa_csv.write_csv(batch, buffer, options)
                    copy.write(buffer.getbuffer())
                    written += batch.num_rows
        cursor.close()
    wall = time.perf_counter() - start
    seconds = dict(phases.seconds)
    seconds["write"] = wall - seconds.get("read", 0.0)
    return {
        "wall": wall,
        "rss_start_kib": rss_start,
        "phases": seconds,
        "info": {"rows_scored": written},
    }


def child_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    case = spec["case"]
    if case in SCORE_CASES:
        result = child_score(spec)
    elif case in NAIVE_CASES:
        result = child_naive(spec)
    else:
        result = child_floor(spec)
    import pyarrow as pa

    # How much of the peak was Arrow buffers (the rest: interpreter, numpy, pandas, drivers).
    result["arrow_peak_bytes"] = pa.default_memory_pool().max_memory() or 0
    result["peak_kib"] = _memory_kib("VmHWM")
    result["ru_maxrss_kib"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# -- set-up: data and champions --------------------------------------------------------------


@dataclass
class Champion:
    key: str  # lr / gb
    name: str  # registry model name
    family: str
    version: str
    model_path: str
    thresholds: dict[str, float]
    features: list[str]
    pipeline: Any = field(repr=False, default=None)


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    schema: str
    pg_url: str  # with search_path set to the bench schema
    registry: Path
    contract: dict[str, Any]
    monitoring: dict[str, Any]
    need_pg: bool
    need_sqlite: bool
    need_parquet: bool

    @property
    def sqlite_path(self) -> Path:
        return self.workdir / "bench.db"

    @property
    def sqlite_url(self) -> str:
        return f"sqlite:///{self.sqlite_path}"

    @property
    def parquet_root(self) -> Path:
        return self.workdir / "parquet"

    def pg_engine(self) -> sa.Engine:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        return sa.create_engine(self.pg_url, poolclass=NullPool)

    def sqlite_engine(self) -> sa.Engine:
        import sqlalchemy as sa
        from sqlalchemy.pool import NullPool

        return sa.create_engine(self.sqlite_url, poolclass=NullPool)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_document(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines += [f"{k} = {_toml(v)}" for k, v in values.items() if k not in nested]
        lines.append("")
        for key, sub in nested.items():  # [monitoring.features.x] tables
            for name, table in sub.items():
                lines.append(f"[{section}.{key}.{name}]")
                lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
                lines.append("")
    return "\n".join(lines)


def write_config(bench: Bench, case: str, champion: Champion) -> Path:
    """The TOML config `churn-batch score` would be given for this case."""
    pg = "${" + PG_URL_ENV + "}"
    batch = bench.args.batch_size
    if case == "score-pg":
        source = {"kind": "sql", "url": pg, "table": SOURCE_TABLE, "batch_size": batch}
        sink = {"url": pg, "table": SINK_TABLE}
    elif case == "parquet-pg":
        source = {"kind": "parquet", "path": str(bench.parquet_root), "batch_size": batch}
        sink = {"url": pg, "table": SINK_TABLE}
    else:
        url = bench.sqlite_url
        source = {"kind": "sql", "url": url, "table": SOURCE_TABLE, "batch_size": batch}
        sink = {"url": url, "table": SINK_TABLE}
    sections = {
        "source": source,
        "contract": bench.contract,
        "model": {"registry": str(bench.registry), "name": champion.name, "alias": "champion"},
        "sink": sink,
        "monitoring": bench.monitoring,
    }
    path = bench.workdir / "configs" / f"{case}-{champion.key}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_toml_document(sections))
    return path


def train_champions(bench: Bench, keys: Sequence[str]) -> dict[str, Champion]:
    """A champion per family, fitted on a labelled synthetic date other than the scored one.

    Reuses a champion already in the registry (`--registry`), so repeated runs score with
    the same model; otherwise fits the pipeline from `churn_batch.model` and registers it
    with the card `churn-batch train` would write (`training.model_card`).
    """
    from churn_batch.config import load_config
    from churn_batch.errors import ModelError
    from churn_batch.registry import MODEL_FILE, Registry

    champions = {}
    for key in keys:
        name = f"bench_{key}"
        registry = Registry(bench.registry, name)
        # Any case's config serves: only the contract, training and model sections are read.
        config = load_config(write_config(bench, "score-sqlite", _placeholder(key, name)))
        try:
            loaded = registry.load("champion", contract=config.contract)
            print(f"  {key}: reusing {name} {loaded.version} from {bench.registry}")
        except ModelError:
            started = time.perf_counter()
            version = _fit_and_register(config, registry, key, bench.args)
            loaded = registry.load(version, contract=config.contract)
            took = time.perf_counter() - started
            print(f"  {key}: trained and promoted {name} {version} in {took:.1f}s")
        champions[key] = Champion(
            key=key,
            name=name,
            family=str(loaded.card.get("winner")),
            version=loaded.version,
            model_path=str(registry.home / loaded.version / MODEL_FILE),
            thresholds=loaded.thresholds,
            features=loaded.features,
            pipeline=loaded.pipeline,
        )
    return champions


def _placeholder(key: str, name: str) -> Champion:
    return Champion(key, name, CHAMPIONS[key], "", "", {}, [])


def _fit_and_register(config: Any, registry: Any, key: str, args: argparse.Namespace) -> str:
    import numpy as np
    import pyarrow.compute as pc

    from churn_batch import model, synthetic, training
    from churn_batch.contract import LABEL, check_batch

    contract = config.contract
    snapshot = synthetic.generate_snapshot(args.train_rows, TRAIN_DATE, seed=args.seed + 1)
    checked = check_batch(snapshot, contract, label=True)
    table = checked.valid.sort_by([(contract.id_column, "ascending")])
    labels = table[LABEL].to_numpy().astype(np.int8)
    split = training.split_holdout(table[contract.date_column], labels, config.training)
    train_part, holdout = training.labelled_parts(table, labels, split, contract)
    numeric, categorical = list(contract.numeric), list(contract.categorical)
    if key == "lr":
        estimator = model.logistic_pipeline(numeric, categorical, c=1.0)
        params: dict[str, Any] = {"C": 1.0}
    else:
        params = {"max_iter": args.gb_trees, "learning_rate": 0.1, "max_leaf_nodes": 31}
        estimator = model.boosting_pipeline(
            numeric, categorical, seed=config.training.seed, **params
        )
    estimator.fit(train_part.features, train_part.label)
    scores = model.positive_scores(estimator, holdout.features)
    holdout_metrics = model.metrics(holdout.label, scores)
    family = CHAMPIONS[key]
    fitted = model.FittedModel(
        estimator=estimator,
        winner=family,
        candidates={family: model.Candidate(family, params, math.nan, holdout_metrics)},
        calibration=model.Calibration(
            "sigmoid", False, holdout_metrics["brier"], holdout_metrics["brier"]
        ),
        holdout_metrics=holdout_metrics,
        holdout_scores=scores,
        thresholds=model.tier_thresholds(
            scores, config.training.high_tier_share, config.training.medium_tier_share
        ),
        reference=model.reference_distributions(train_part.features, numeric, categorical, scores),
    )
    data = training.TrainingData(
        table=table,
        rows_read=snapshot.num_rows,
        rejected=checked.rejected.num_rows,
        reasons={},
        unlabelled=int(pc.sum(pc.is_null(table[LABEL])).as_py() or 0),
        label_values=("No", "Yes"),
    )
    fingerprint = training.data_fingerprint(table, contract)
    source = f"synthetic.generate_snapshot({args.train_rows}, {TRAIN_DATE}, seed={args.seed + 1})"
    card = training.model_card(config, source, data, split, fitted, fingerprint)
    version: str = registry.register(estimator, card)
    registry.promote(version, reason="benchmark champion", contract=contract)
    return version


def _snapshot_table(name: str) -> sa.Table:
    """The table `synthetic.write_sql` creates (its own definition when it has one)."""
    import sqlalchemy as sa

    from churn_batch import synthetic

    define = getattr(synthetic, "_sql_table", None)
    if callable(define):
        table: sa.Table = define(name)
        return table
    kinds: dict[str, Any] = {"int64": sa.Integer, "double": sa.Double}
    columns = [
        sa.Column(f.name, kinds.get(str(f.type), sa.String(64)), nullable=False)
        for f in synthetic.SCHEMA
    ]
    return sa.Table(name, sa.MetaData(), *columns)


def _quote(engine: sa.Engine, name: str) -> str:
    return str(engine.dialect.identifier_preparer.quote(name))


def load_postgres(bench: Bench, snapshot: pa.Table) -> None:
    """COPY (CSV written by Arrow) into a table shaped like `write_sql`'s, then VACUUM ANALYZE
    so that the first timed reader neither sets hint bits nor lacks statistics."""
    import pyarrow.csv as pa_csv

    engine = bench.pg_engine()
    target = _snapshot_table(SOURCE_TABLE)
    with engine.begin() as conn:
        target.drop(conn, checkfirst=True)
        target.create(conn)
    names = [c.name for c in target.columns]
    preparer = engine.dialect.identifier_preparer
    statement = "COPY {} ({}) FROM STDIN (FORMAT csv)".format(
        preparer.quote(SOURCE_TABLE), ", ".join(preparer.quote(n) for n in names)
    )
    options = pa_csv.WriteOptions(include_header=False)
    raw = engine.raw_connection()
    try:
        driver: Any = raw.driver_connection
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            for batch in snapshot.select(names).to_batches(max_chunksize=200_000):
                buffer = io.BytesIO()
                pa_csv.write_csv(batch, buffer, options)
                copy.write(buffer.getbuffer())
        driver.commit()
    finally:
        raw.close()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql(f"VACUUM (ANALYZE) {_quote(engine, SOURCE_TABLE)}")
    engine.dispose()


def load_sqlite(bench: Bench, snapshot: pa.Table) -> None:
    """executemany through the sqlite3 module (dates as ISO text, as SQLAlchemy stores them)."""
    engine = bench.sqlite_engine()
    target = _snapshot_table(SOURCE_TABLE)
    with engine.begin() as conn:
        target.drop(conn, checkfirst=True)
        target.create(conn)
    names = [c.name for c in target.columns]
    statement = "INSERT INTO {} ({}) VALUES ({})".format(
        _quote(engine, SOURCE_TABLE),
        ", ".join(_quote(engine, n) for n in names),
        ", ".join("?" for _ in names),
    )
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for batch in snapshot.select(names).to_batches(max_chunksize=100_000):
            columns = [
                [v.isoformat() for v in col.to_pylist()]
                if name == "snapshot_date"
                else col.to_pylist()
                for name, col in zip(names, batch.columns, strict=True)
            ]
            cursor.executemany(statement, list(zip(*columns, strict=True)))
        raw.commit()
        cursor.execute(f"ANALYZE {_quote(engine, SOURCE_TABLE)}")
        raw.commit()
    finally:
        raw.close()
    engine.dispose()


def load_data(bench: Bench, rows: int) -> pa.Table:
    """Generate one date of N customers, load every store a selected case reads; return
    an evenly spaced sample of rows for the correctness check."""
    import numpy as np

    from churn_batch import synthetic

    started = time.perf_counter()
    snapshot = synthetic.generate_snapshot(rows, SNAPSHOT_DATE, seed=bench.args.seed)
    print(f"  generated {rows:,} rows in {time.perf_counter() - started:.1f}s", flush=True)
    picks = np.unique(np.linspace(0, rows - 1, min(bench.args.verify_rows, rows)).astype(np.int64))
    sample = snapshot.take(picks)
    steps: list[tuple[str, Callable[[], None]]] = []
    if bench.need_pg:
        steps.append(("PostgreSQL (COPY)", lambda: load_postgres(bench, snapshot)))
    if bench.need_parquet:

        def parquet() -> None:
            shutil.rmtree(bench.parquet_root, ignore_errors=True)
            synthetic.write_parquet([(SNAPSHOT_DATE, snapshot)], bench.parquet_root)

        steps.append(("Parquet", parquet))
    if bench.need_sqlite:
        steps.append(("SQLite", lambda: load_sqlite(bench, snapshot)))
    for what, step in steps:
        started = time.perf_counter()
        step()
        print(f"  loaded {what} in {time.perf_counter() - started:.1f}s", flush=True)
    return sample


def expected_probabilities(champion: Champion, sample: pa.Table) -> dict[str, float]:
    """`pipeline.predict_proba` on the sampled rows, built as a user would build the frame."""
    import numpy as np
    import pandas as pd

    numeric = set(champion.features) - {f.name for f in sample.schema if str(f.type) == "string"}
    frame = pd.DataFrame(
        {
            name: (
                sample[name].to_numpy().astype(np.float64)
                if name in numeric
                else np.asarray(sample[name].to_pylist(), dtype=object)
            )
            for name in champion.features
        }
    )
    pipeline = champion.pipeline
    p = pipeline.predict_proba(frame)[:, list(pipeline.classes_).index(1)]
    return dict(zip(sample["customer_id"].to_pylist(), map(float, p), strict=True))


# -- running the cases -----------------------------------------------------------------------


@dataclass
class Result:
    case: str
    champion: str
    rows: int
    wall: float
    proc: float
    peak_rss_mb: float
    start_rss_mb: float
    load1: float
    phases: dict[str, float]
    info: dict[str, Any]
    steal: float = 0.0  # share of CPU time stolen by the hypervisor during the case
    check: str = ""
    max_diff: float | None = None
    missing_timers: list[str] = field(default_factory=list)
    background: list[str] = field(default_factory=list)
    wait4_maxrss_mb: float = math.nan  # inflated by the parent's peak: see _memory_kib
    arrow_peak_mb: float = math.nan
    code: str = ""  # hash of churn_batch's sources when the child started
    repeats: int = 1

    @property
    def throughput(self) -> float:
        return self.rows / self.wall if self.wall > 0 else math.nan


class CaseFailed(RuntimeError):
    pass


def run_child(bench: Bench, spec: dict[str, Any], label: str) -> Result:
    """One case in a fresh interpreter, which reports its wall time and peak RSS."""
    logs = bench.workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec_path = logs / f"{label}.json"
    result_path = logs / f"{label}.result.json"
    log_path = logs / f"{label}.log"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    env = {**os.environ, PG_URL_ENV: bench.pg_url}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
    load1 = _load1()
    code = code_hash()
    cpu_before = _cpu_times()
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if time.perf_counter() - started > bench.args.timeout:
                    process.kill()
                    pid, status, usage = os.wait4(process.pid, 0)
                    process.returncode = os.waitstatus_to_exitcode(status)
                    raise CaseFailed(f"{label}: killed after {bench.args.timeout:.0f}s")
                time.sleep(0.05)
        except BaseException:
            if process.returncode is None:
                process.kill()
                _, status, _ = os.wait4(process.pid, 0)
                process.returncode = os.waitstatus_to_exitcode(status)
            raise
    process.returncode = os.waitstatus_to_exitcode(status)
    proc = time.perf_counter() - started
    steal = _shares(cpu_before, _cpu_times())[1]
    if process.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise CaseFailed(
            f"{label}: exit code {process.returncode}; last lines of {log_path}:\n{tail}"
        )
    data = json.loads(result_path.read_text())
    return Result(
        case=spec["case"],
        champion=spec.get("champion", "-"),
        rows=spec["rows"],
        wall=float(data["wall"]),
        proc=proc,
        peak_rss_mb=data["peak_kib"] / MB,
        start_rss_mb=data["rss_start_kib"] / MB,
        load1=load1,
        steal=steal,
        phases=data.get("phases", {}),
        info=data.get("info", {}),
        missing_timers=data.get("missing_timers", []),
        background=data.get("background", []),
        wait4_maxrss_mb=usage.ru_maxrss / MB,
        arrow_peak_mb=data.get("arrow_peak_bytes", math.nan) / MB / MB,
        code=code,
    )


def reset_outputs(bench: Bench, case: str) -> None:
    """Before each run: empty the output table and checkpoint, so every run publishes a
    fresh date into the same state (untimed)."""
    import sqlalchemy as sa

    pg = case in PG_SINK_CASES
    engine = bench.pg_engine() if pg else bench.sqlite_engine()
    table = (
        NAIVE_TABLE if case in NAIVE_CASES else FLOOR_TABLE if case in FLOOR_CASES else SINK_TABLE
    )
    inspector_names = set(sa.inspect(engine).get_table_names())
    with engine.begin() as conn:
        if case in NAIVE_CASES:
            if table in inspector_names:
                conn.exec_driver_sql(f"DROP TABLE {_quote(engine, table)}")
        elif case in FLOOR_CASES:
            from churn_batch.sinks import define_tables

            if table not in inspector_names:
                define_tables(FLOOR_TABLE).predictions.create(conn)
            conn.exec_driver_sql(f"TRUNCATE {_quote(engine, table)}")
        elif table in inspector_names:
            verb = "TRUNCATE" if pg else "DELETE FROM"
            conn.exec_driver_sql(f"{verb} {_quote(engine, table)}")
    if pg:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("CHECKPOINT")
    engine.dispose()
    wait_until_quiet(bench)


def _cpu_times() -> list[int]:
    """The machine's CPU counters from /proc/stat: user nice system idle iowait irq
    softirq steal ... (all zeros where unreadable)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            return [int(v) for v in stat.readline().split()[1:9]]
    except OSError:
        return [0] * 8


def _shares(before: list[int], after: list[int]) -> tuple[float, float]:
    """(busy, stolen) shares of the CPU time between two `_cpu_times` samples. Steal is
    time the hypervisor gave this VM's CPUs to someone else: a case run under steal is
    slower for reasons outside it, so the table reports it."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = max(sum(delta), 1)
    busy = sum(delta[i] for i in (0, 1, 2, 5, 6))
    return busy / total, delta[7] / total


def _busy_share(seconds: float) -> float:
    before = _cpu_times()
    time.sleep(seconds)
    return _shares(before, _cpu_times())[0]


def wait_until_quiet(bench: Bench, limit: float = 90.0) -> None:
    """Untimed: let autovacuum finish with the previous case's million rows and the
    machine fall idle, so no case pays for another's leftovers (seen: +50% wall)."""
    deadline = time.monotonic() + limit
    engine = bench.pg_engine() if bench.need_pg else None
    try:
        while time.monotonic() < deadline:
            vacuuming = 0
            if engine is not None:
                with engine.connect() as conn:
                    vacuuming = conn.exec_driver_sql(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE backend_type = 'autovacuum worker'"
                    ).scalar_one()
            if not vacuuming and _busy_share(0.5) < QUIET_BUSY_SHARE:
                return
            time.sleep(0.5)
        print(f"  (machine still busy after {limit:.0f}s; running anyway)", flush=True)
    finally:
        if engine is not None:
            engine.dispose()


def verify(
    bench: Bench, result: Result, expected: dict[str, float] | None, thresholds: dict[str, float]
) -> None:
    """Row count for the date, and the sampled published probabilities and tiers against
    `pipeline.predict_proba` on the same rows."""
    import sqlalchemy as sa

    case = result.case
    engine = bench.pg_engine() if case in PG_SINK_CASES else bench.sqlite_engine()
    table = (
        NAIVE_TABLE if case in NAIVE_CASES else FLOOR_TABLE if case in FLOOR_CASES else SINK_TABLE
    )
    day: Any = SNAPSHOT_DATE if case in PG_SINK_CASES else SNAPSHOT_DATE.isoformat()
    problems = []
    with engine.connect() as conn:
        count = conn.execute(
            sa.text(f"SELECT count(*) FROM {_quote(engine, table)} WHERE snapshot_date = :day"),
            {"day": day},
        ).scalar_one()
        if count != result.rows:
            problems.append(f"{count} rows published, expected {result.rows}")
        if expected is not None:
            query = sa.text(
                f"SELECT customer_id, churn_probability, risk_tier FROM {_quote(engine, table)} "
                "WHERE snapshot_date = :day AND customer_id IN :ids"
            ).bindparams(sa.bindparam("ids", expanding=True))
            found = conn.execute(query, {"day": day, "ids": list(expected)}).all()
            if len(found) != len(expected):
                problems.append(f"{len(found)} of {len(expected)} sampled ids published")
            diffs = [abs(float(p) - expected[i]) for i, p, _ in found]
            result.max_diff = max(diffs) if diffs else None
            wrong_tier = sum(1 for i, _, tier in found if tier != _tier(expected[i], thresholds))
            if result.max_diff is not None and result.max_diff > bench.args.tolerance:
                problems.append(f"max |dp| {result.max_diff:.2e}")
            if wrong_tier:
                problems.append(f"{wrong_tier} sampled tiers differ")
    engine.dispose()
    status = result.info.get("status")
    if status not in (None, "succeeded"):
        problems.append(f"run {status}")
    if result.info.get("rows_rejected"):
        problems.append(f"{result.info['rows_rejected']} rows rejected")
    result.check = "ok" if not problems else "; ".join(problems)


def _tier(p: float, thresholds: dict[str, float]) -> str:
    return "high" if p >= thresholds["high"] else "medium" if p >= thresholds["medium"] else "low"


def run_case(
    bench: Bench,
    case: str,
    rows: int,
    champion: Champion | None,
    expected: dict[str, float] | None,
    *,
    profile: Path | None = None,
) -> Result:
    spec: dict[str, Any] = {"case": case, "rows": rows, "date": SNAPSHOT_DATE.isoformat()}
    label = f"{case}-{rows}"
    if champion is not None:
        label += f"-{champion.key}"
        spec |= {
            "champion": champion.key,
            "model_path": champion.model_path,
            "model_version": champion.version,
            "thresholds": champion.thresholds,
            "features": champion.features,
        }
    if case in SCORE_CASES:
        assert champion is not None
        spec["config"] = str(write_config(bench, case, champion))
    if case in NAIVE_CASES:
        spec |= {"db": "pg" if case == "naive-pg" else "sqlite", "sqlite_url": bench.sqlite_url}
    if profile is not None:
        spec["profile"] = str(profile)
        label += "-profile"
    repeats = 1 if profile is not None else bench.args.repeat
    runs = []
    for attempt in range(repeats):
        rerun = attempt > 0 and bench.args.rerun and case in SCORE_CASES
        if rerun:
            wait_until_quiet(bench)  # the date stays published: this run replaces it
        else:
            reset_outputs(bench, case)
        name = label if repeats == 1 else f"{label}-{'rerun' if rerun else 'run'}{attempt + 1}"
        runs.append(run_child(bench, spec, name))
    # The fastest run counts; peak RSS is the highest of all runs.
    best = min(runs, key=lambda r: r.wall)
    best.peak_rss_mb = max(r.peak_rss_mb for r in runs)
    best.repeats = repeats
    verify(bench, best, expected, champion.thresholds if champion else {})
    return best


# -- the report ------------------------------------------------------------------------------


def _find(results: Sequence[Result], case: str, champion: str, rows: int) -> Result | None:
    for r in results:
        if r.case == case and r.champion == champion and r.rows == rows:
            return r
    return None


def floor_of(results: Sequence[Result], rows: int) -> Result | None:
    floors = [r for r in results if r.case in FLOOR_CASES and r.rows == rows]
    return min(floors, key=lambda r: r.wall) if floors else None


def ratios(results: Sequence[Result], r: Result) -> tuple[float | None, float | None]:
    """(throughput vs the naive script on the same database, time vs the PG I/O floor)."""
    naive_case = r.case if r.case in NAIVE_CASES else NAIVE_OF.get(r.case)
    naive = _find(results, naive_case, r.champion, r.rows) if naive_case else None
    vs_naive = r.throughput / naive.throughput if naive else None
    floor = floor_of(results, r.rows)
    vs_floor = r.wall / floor.wall if floor and r.case in PG_SINK_CASES else None
    return vs_naive, vs_floor


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"


def print_table(results: Sequence[Result]) -> None:
    header = (
        f"{'case':<14}{'champion':<9}{'rows':>6}{'wall s':>8}{'rows/s':>8}{'peak MB':>8}"
        f"{'start MB':>9}{'arrow MB':>9}{'x naive':>8}{'x floor':>8}{'proc s':>7}{'load1':>6}"
        f"{'steal':>6}  check"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        vs_naive, vs_floor = ratios(results, r)
        diff = f" (max |dp| {r.max_diff:.1e})" if r.max_diff is not None else ""
        print(
            f"{r.case:<14}{r.champion:<9}{_human(r.rows):>6}{r.wall:>8.2f}"
            f"{_human(r.throughput):>8}{r.peak_rss_mb:>8.0f}{r.start_rss_mb:>9.0f}"
            f"{_fmt(r.arrow_peak_mb, '.0f'):>9}"
            f"{_fmt(vs_naive, '.1f', 'x'):>8}{_fmt(vs_floor, '.2f', 'x'):>8}"
            f"{r.proc:>7.1f}{r.load1:>6.2f}{r.steal:>6.0%}  {r.check}{diff}"
        )
    versions: dict[str, list[str]] = defaultdict(list)
    for r in results:
        versions[r.code].append(f"{r.case} {r.champion} {_human(r.rows)}")
    if len(versions) > 1:
        print("WARNING: churn_batch changed during this run; cases by source hash:")
        for code, cases in versions.items():
            print(f"  {code}: {', '.join(cases)}")


PHASE_ORDER: tuple[str, ...] = (
    "sink setup",
    "model load",
    "model compile",
    "count+dups",
    "read",
    "read wait",
)
PHASE_ORDER += ("contract", "scoring", "monitoring", "write", "commit+close")


def print_phases(results: Sequence[Result]) -> None:
    print(
        "\nwhere the time goes (seconds, share of wall; 'other' = wall - the phases on the "
        "main thread; [overlapped] ran on the read or check thread at the same time):"
    )
    for r in results:
        if not r.phases:
            continue
        order = {name: i for i, name in enumerate(PHASE_ORDER)}
        listed = sorted(r.phases.items(), key=lambda kv: order.get(kv[0], len(order)))
        main = [(k, v) for k, v in listed if k not in r.background]
        other = r.wall - sum(v for _, v in main)
        parts = [f"{k} {v:.2f} ({v / r.wall:.0%})" for k, v in main]
        parts.append(f"other {other:.2f} ({other / r.wall:.0%})")
        parts += [f"[overlapped: {k} {v:.2f}]" for k, v in listed if k in r.background]
        print(f"  {r.case:<13} {r.champion:<3} {_human(r.rows):>6}: " + ", ".join(parts))
        if r.missing_timers:
            print(f"      (no timer found for {'; '.join(r.missing_timers)})")


def print_targets(results: Sequence[Result], rows: Sequence[int]) -> bool:
    """The issue's targets, each PASS / FAIL / n/a; True when none failed."""
    lines: list[tuple[str, str, str]] = []
    at = 1_000_000 if 1_000_000 in rows else max(rows)
    note = "" if at == 1_000_000 else f" [at {_human(at)}: 1M not run]"

    def speedup(case: str, champion: str, target: float, title: str) -> None:
        r = _find(results, case, champion, at)
        naive = _find(results, NAIVE_OF[case], champion, at)
        if r is None or naive is None:
            lines.append(("n/a", title + note, f"needs {case} and {NAIVE_OF[case]} ({champion})"))
            return
        ratio = r.throughput / naive.throughput
        detail = f"{ratio:.1f}x ({r.wall:.1f}s vs naive {naive.wall:.1f}s)"
        lines.append(("PASS" if ratio >= target else "FAIL", title + note, detail))

    speedup("score-pg", "lr", TARGET_PG_SPEEDUP_LR, "LR PG->PG >= 10x naive throughput")
    naive_lr, floor = _find(results, "naive-pg", "lr", at), floor_of(results, at)
    if naive_lr is not None and floor is not None:
        # How far the target is from the I/O floor on this machine, in this run.
        lines.append((
            "info", "LR: the I/O floor against the naive script",
            f"the floor alone is {naive_lr.wall / floor.wall:.1f}x naive; 10x naive = "
            f"{naive_lr.wall / TARGET_PG_SPEEDUP_LR:.1f}s = "
            f"{naive_lr.wall / TARGET_PG_SPEEDUP_LR / floor.wall:.2f}x the floor",
        ))  # fmt: skip
    for champion in ("lr", "gb"):
        r, floor = _find(results, "score-pg", champion, at), floor_of(results, at)
        # The issue sets this target for logistic regression; for boosting it is shown.
        title = f"{champion.upper()} PG->PG end-to-end <= 1.5x I/O floor"
        if r is None or floor is None:
            lines.append(("n/a", title + note, "needs score-pg and a floor case"))
            continue
        ratio = r.wall / floor.wall
        detail = f"{ratio:.2f}x ({r.wall:.1f}s vs {floor.case} {floor.wall:.1f}s)"
        verdict = "PASS" if ratio <= TARGET_FLOOR_RATIO else "FAIL"
        lines.append((verdict if champion == "lr" else "info", title + note, detail))
    scored = [r for r in results if r.case in SCORE_CASES]
    if scored:
        worst = max(scored, key=lambda r: r.peak_rss_mb)
        detail = (
            f"max {worst.peak_rss_mb:.0f} MB ({worst.case} {worst.champion} {_human(worst.rows)})"
        )
        verdict = "PASS" if worst.peak_rss_mb < TARGET_RSS_MB else "FAIL"
        lines.append((verdict, "peak RSS < 500 MB (every churn-batch case, every N)", detail))
    else:
        lines.append(("n/a", "peak RSS < 500 MB", "no churn-batch case run"))
    small, large = min(rows), max(rows)
    if small < large and large >= 5 * small:
        growths = []
        for r in (r for r in scored if r.rows == large):
            base = _find(results, r.case, r.champion, small)
            if base is not None:
                growths.append((r.peak_rss_mb / base.peak_rss_mb, r, base))
        if growths:
            growth, r, base = max(growths, key=lambda g: g[0])
            detail = (
                f"worst {r.case} {r.champion}: {base.peak_rss_mb:.0f} -> {r.peak_rss_mb:.0f} MB "
                f"({growth:.2f}x; flat = at most {FLAT_RSS_GROWTH:.1f}x)"
            )
            verdict = "PASS" if growth <= FLAT_RSS_GROWTH else "FAIL"
            lines.append((verdict, f"RSS flat {_human(small)} -> {_human(large)}", detail))
    else:
        lines.append(("n/a", "RSS flat 1M -> 5M", "run with --rows 1000000,5000000"))
    speedup("score-pg", "gb", TARGET_PG_SPEEDUP_GB, "GB PG->PG >= 5x naive throughput")
    naive_gb, score_gb = _find(results, "naive-pg", "gb", at), _find(results, "score-pg", "gb", at)
    if naive_gb is not None and score_gb is not None:
        # What bounds the boosting cases: scikit-learn's tree predictor, in both.
        predict = naive_gb.phases.get("predict_proba", math.nan)
        scoring = score_gb.phases.get("scoring", math.nan)
        lines.append((
            "info", "GB: the tree predictor",
            f"naive predict_proba {predict:.1f}s of {naive_gb.wall:.1f}s; score-pg scoring "
            f"{scoring:.1f}s of {score_gb.wall:.1f}s (5x naive = "
            f"{naive_gb.wall / TARGET_PG_SPEEDUP_GB:.1f}s)",
        ))  # fmt: skip
    for champion in ("lr", "gb"):
        speedup(
            "score-sqlite", champion, TARGET_SQLITE_SPEEDUP,
            f"{champion.upper()} SQLite->SQLite >= 5x naive throughput",
        )  # fmt: skip
    checked = [r for r in results if r.check]
    bad = [r for r in checked if r.check != "ok"]
    diffs = [r.max_diff for r in checked if r.max_diff is not None]
    detail = (
        f"{len(checked)} cases, max |dp| {max(diffs):.1e}" if diffs else f"{len(checked)} cases"
    )
    if bad:
        detail += "; " + "; ".join(f"{r.case} {r.champion}: {r.check}" for r in bad)
    lines.append(
        ("PASS" if not bad else "FAIL", "correctness (row counts, sampled p, tiers)", detail)
    )
    print("\ntargets (issue 'Performance'):")
    for verdict, title, detail in lines:
        print(f"  [{verdict:<4}] {title}: {detail}")
    return not any(v == "FAIL" for v, _, _ in lines)


def print_profile(path: Path, top: int) -> None:
    """Own time per library, then the functions with the most own time."""
    import pstats

    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values())
    by_library: dict[str, float] = defaultdict(float)
    for (filename, _, _), entry in raw.items():
        by_library[_library(filename)] += entry[2]
    print(f"  own time by library (cProfile, total {total:.1f}s):")
    for name, seconds in sorted(by_library.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {name:<28}{seconds:>8.2f}s {seconds / total:>5.0%}")
    print(f"  top {top} functions by own time:")
    rows = sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]
    for (filename, line, function), (_, calls, own, cumulative, _) in rows:
        where = f"{_short(filename)}:{line}({function})"
        print(f"    {own:>7.2f}s own {cumulative:>7.2f}s cum {calls:>9} calls  {where}")


def _library(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins / C extensions"
    parts = Path(filename).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1]
    if "churn_batch" in parts:
        return "churn_batch/" + parts[-1]
    return "python stdlib" if "python3" in filename else _short(filename)


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("site-packages", "churn_batch"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + (anchor == "site-packages") :])
    return filename if filename.startswith("~") else "/".join(parts[-2:])


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        type=_parse_rows,
        default=[1_000_000],
        help="customers per snapshot, comma-separated (100k, 1M, 5M)",
    )
    parser.add_argument(
        "--cases",
        type=_parse_list(CASES),
        default=list(CASES),
        help=f"comma-separated subset of {','.join(CASES)}",
    )
    parser.add_argument(
        "--champions",
        type=_parse_list(list(CHAMPIONS)),
        default=["lr", "gb"],
        help="lr (logistic regression), gb (gradient boosting)",
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("CHURN_BATCH_TEST_POSTGRES_URL", DEFAULT_PG_URL),
        help="SQLAlchemy URL of PostgreSQL",
    )
    parser.add_argument("--schema", help="PostgreSQL schema to use (default bench_churn_<pid>)")
    parser.add_argument("--workdir", type=Path, help="for SQLite, Parquet, configs, logs")
    parser.add_argument(
        "--registry",
        type=Path,
        help="model registry; champions found there are reused, not retrained",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the schema, work directory and registry"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest counts")
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="score cases: runs after the first re-score the date the first one published",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=100_000,
        help="[source] batch_size of the churn-batch configs",
    )
    parser.add_argument(
        "--naive-max-rows",
        type=int,
        default=2_000_000,
        help="skip the naive script above this many rows (~3 GB per 1M)",
    )
    parser.add_argument("--train-rows", type=int, default=40_000)
    parser.add_argument("--gb-trees", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify-rows", type=int, default=1000)
    parser.add_argument(
        "--tolerance", type=float, default=1e-9, help="max |published - predict_proba| allowed"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run score-pg under cProfile per champion and summarise it",
    )
    parser.add_argument("--profile-top", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.rows = list(dict.fromkeys(args.rows))
    return args


def code_hash() -> str:
    """A hash of churn_batch's sources: which code a child imported (taken per case, since
    others change the pipeline while this benchmark runs)."""
    import hashlib

    digest = hashlib.sha256()
    package = ROOT / "churn_batch"
    sources = [*package.rglob("*.py"), *package.rglob("*.pyx")]  # .pyx: the compiled walk
    for path in sorted(sources):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def code_version() -> str:
    def git(*command: str) -> str:
        done = subprocess.run(
            ["git", "--no-optional-locks", *command], cwd=ROOT, capture_output=True, text=True
        )
        return done.stdout.strip() if done.returncode == 0 else "?"

    changed = git("status", "--porcelain", "--", "churn_batch").splitlines()
    return (
        f"git HEAD {git('rev-parse', '--short', 'HEAD')} + {len(changed)} uncommitted file(s) "
        f"in churn_batch/; churn_batch/*.py,*.pyx sha256 {code_hash()}"
    )


def check_postgres(url: str) -> str | None:
    """None if PostgreSQL answers, else why not."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # any driver or network failure: report it and stop
        orig = getattr(exc, "orig", exc)
        return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    finally:
        engine.dispose()
    return None


def _sections(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    return dict(raw["contract"]), dict(raw.get("monitoring", {}))


@contextlib.contextmanager
def postgres_schema(url: str, schema: str, keep: bool) -> Iterator[None]:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    engine = sa.create_engine(url, poolclass=NullPool)
    quoted = _quote(engine, schema)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
    try:
        yield
    finally:
        if keep:
            print(f"kept PostgreSQL schema {schema}")
        else:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {quoted} CASCADE")
        engine.dispose()


def run_all_cases(
    bench: Bench, rows: int, champions: dict[str, Champion], results: list[Result]
) -> bool:
    """Load N rows, run every selected case for every champion; False if a case failed."""
    args = bench.args
    print(f"\n== {rows:,} rows ==  (load average {_loadavg()})", flush=True)
    sample = load_data(bench, rows)
    expected = {k: expected_probabilities(c, sample) for k, c in champions.items()}
    ok = True
    for case in (c for c in CASES if c in args.cases):
        if case in NAIVE_CASES and rows > args.naive_max_rows:
            print(f"  {case}: skipped above --naive-max-rows {args.naive_max_rows:,}")
            continue
        targets: list[Champion | None] = [None] if case in FLOOR_CASES else [*champions.values()]
        for target in targets:
            try:
                result = run_case(
                    bench, case, rows, target, expected[target.key] if target else None
                )
            except CaseFailed as exc:
                ok = False
                print(f"  FAILED {exc}", flush=True)
                continue
            results.append(result)
            print(
                f"  {case:<13} {result.champion:<3} {result.wall:>7.2f}s "
                f"{result.peak_rss_mb:>6.0f} MB  load {result.load1:.2f}  "
                f"steal {result.steal:.0%}  {result.check}",
                flush=True,
            )
    if args.profile and "score-pg" in args.cases:
        for champion in champions.values():
            path = bench.workdir / f"profile-score-pg-{rows}-{champion.key}.prof"
            run_case(bench, "score-pg", rows, champion, expected[champion.key], profile=path)
            print(f"\ncProfile of score-pg {champion.key} {_human(rows)} ({path}):")
            print_profile(path, args.profile_top)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)

    started = time.perf_counter()
    need_pg = any(c in PG_SINK_CASES for c in args.cases)
    print(f"churn-batch scoring benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print(f"load average at start: {_loadavg()} ({os.cpu_count()} CPUs)")
    print(f"code: {code_version()}")
    if need_pg:
        problem = check_postgres(args.pg_url)
        if problem:
            print(
                f"error: PostgreSQL at {_redacted(args.pg_url)} is unreachable: {problem}\n"
                "Start it, pass --pg-url, or choose --cases without PostgreSQL "
                "(naive-sqlite,score-sqlite).",
                file=sys.stderr,
            )
            return 2
    import joblib
    import pandas as pd
    import pyarrow
    import sklearn
    import sqlalchemy

    print(
        f"python {sys.version.split()[0]}, pandas {pd.__version__}, pyarrow {pyarrow.__version__}, "
        f"scikit-learn {sklearn.__version__}, sqlalchemy {sqlalchemy.__version__}, "
        f"joblib {joblib.__version__}"
    )
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="churn-bench-")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    schema = args.schema or f"bench_churn_{os.getpid()}"
    contract, monitoring = _sections(ROOT / "configs" / "default.toml")
    bench = Bench(
        args=args,
        workdir=workdir.resolve(),
        schema=schema,
        pg_url=_with_schema(args.pg_url, schema),
        registry=(args.registry or workdir / "registry").resolve(),
        contract=contract,
        monitoring=monitoring,
        need_pg=need_pg,
        need_sqlite=any(c.endswith("sqlite") for c in args.cases),
        need_parquet="parquet-pg" in args.cases,
    )
    print(f"work directory {bench.workdir}; PostgreSQL {_redacted(bench.pg_url)}")
    print(
        f"date {SNAPSHOT_DATE}, [source] batch_size {args.batch_size}, cases {','.join(args.cases)}"
    )
    results: list[Result] = []
    ok = True
    schema_scope = (
        postgres_schema(args.pg_url, schema, args.keep) if need_pg else contextlib.nullcontext()
    )
    try:
        with schema_scope:
            print("champions:")
            champions = train_champions(bench, args.champions)
            for champion in champions.values():
                print(
                    f"  {champion.key}: {champion.family} {champion.version}, "
                    f"tiers high >= {champion.thresholds['high']:.3f}, "
                    f"medium >= {champion.thresholds['medium']:.3f}"
                )
            for rows in args.rows:
                ok = run_all_cases(bench, rows, champions, results) and ok
        print(f"\n== results ({_human(min(args.rows))}..{_human(max(args.rows))} rows) ==")
        print_table(results)
        print_phases(results)
        ok = print_targets(results, args.rows) and ok
        if args.json:
            args.json.write_text(
                json.dumps([asdict(r) | {"throughput": r.throughput} for r in results], indent=2)
            )
            print(f"results written to {args.json}")
    finally:
        print(
            f"\nload average at end: {_loadavg()}; "
            f"benchmark took {time.perf_counter() - started:.0f}s"
        )
        if own_workdir and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif own_workdir:
            print(f"kept work directory {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

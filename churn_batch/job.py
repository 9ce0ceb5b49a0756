"""One scoring run, as data flows: source → contract → model → sink, in one transaction.

This is the only module that wires the pieces together. It owns the run's life: lock
the date, record the run as `running`, stream the snapshot through the contract and
the model into the publication transaction while the drift monitor counts, then
either commit (`succeeded`) or roll back (`failed` / `blocked`) and say why.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import pyarrow as pa
from sqlalchemy.exc import SQLAlchemyError

from churn_batch import failpoints
from churn_batch.config import Config, ContractConfig
from churn_batch.contract import CheckedBatch, check_batch, enforce_invalid_fraction, reason_counts
from churn_batch.dates import check_date
from churn_batch.errors import ChurnBatchError, DriftBlocked, Interrupted
from churn_batch.monitoring import DriftMonitor, Level, gate
from churn_batch.prefetch import prefetch
from churn_batch.registry import LoadedModel, load_model
from churn_batch.scoring import BatchScorer
from churn_batch.sinks import Sink
from churn_batch.sources import SnapshotSource, SnapshotSummary, open_source
from churn_batch.sql_source import PortablePathNeeded, SqlSource

log = logging.getLogger(__name__)

# Rejected rows of a run that is rolled back are kept for diagnosis, up to this many.
REJECTED_SAMPLE = 10_000

Progress = Callable[[int, int], None]  # (rows done, rows total)

# The signals that ask a run to stop (Ctrl-C; cron's timeout, systemd, Kubernetes; a
# closed terminal). The CLI turns each into `Interrupted`; see `_StopSignals`.
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# The longest line of an unexpected error's message shown or recorded (the traceback,
# logged by the CLI, keeps the rest).
MESSAGE_MAX = 500


@dataclass
class RunOutcome:
    """What one run did; the CLI reports it and exits with `exit_code`."""

    run_id: str
    snapshot_date: date
    status: str = "running"
    exit_code: int = 0
    model_version: str | None = None
    rows_read: int = 0
    rows_scored: int = 0
    rows_rejected: int = 0
    seconds: float = 0.0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[tuple[str, str, float | None]] = field(default_factory=list)
    # A stop signal that arrived while this (published) run committed: the caller
    # should stop now, as it would have had the signal come a moment earlier.
    stop_signal: int | None = None


def score_date(
    config: Config,
    snapshot_date: date,
    *,
    model_ref: str | None = None,
    allow_drift: bool = False,
    progress: Progress | None = None,
) -> RunOutcome:
    """Score one snapshot date and publish it, or leave the previous predictions as they were.

    Raises the `ChurnBatchError` that ended the run (after recording it); returns the
    outcome of a published run. A stop signal (see `_StopSignals`) rolls the run back
    and records it as failed; its handler's exception (`Interrupted` under the CLI) then
    ends the call.
    """
    check_date(snapshot_date, what="snapshot date")
    _return_freed_memory()
    outcome = RunOutcome(run_id=str(uuid.uuid4()), snapshot_date=snapshot_date)
    started = time.monotonic()
    stops = _StopSignals()
    try:
        with Sink(config.sink) as sink:
            sink.prepare()
            _run_locked(config, sink, outcome, stops, model_ref, allow_drift, progress)
    except Exception:
        signum = stops.release()
        if signum is not None:
            _deliver(signum)  # the stop that waited for the failure to be recorded
        raise
    except BaseException:
        stops.release()  # already stopping: a second signal adds nothing
        raise
    outcome.stop_signal = stops.release()
    outcome.seconds = time.monotonic() - started
    return outcome


class _StopSignals:
    """Holds the stop signals while a run commits, rolls back or records its end.

    Python runs a signal handler in the main thread between any two bytecodes, and the
    CLI's raises `Interrupted`: while the body of a publication runs, that is what rolls
    it back. Raised later, it would do harm: after the commit, the run would be recorded
    as failed although published; during a rollback, the connection could be rolled back
    while the write-behind thread still used it; while recording a failure, the record
    would be lost. From `hold()` on, a stop signal is only noted; `release()` puts the
    previous handlers back and returns it, and the caller acts on it. Only the main
    thread can set handlers, so elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.pending: int | None = None
        self._saved: dict[int, Any] = {}

    def hold(self) -> None:
        if self._saved or threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is None or previous is signal.SIG_IGN:
                continue  # not set from Python, or ignored on purpose (nohup)
            self._saved[signum] = signal.signal(signum, self._note)

    def release(self) -> int | None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()
        pending, self.pending = self.pending, None
        return pending

    def release_and_deliver(self) -> None:
        signum = self.release()
        if signum is not None:
            _deliver(signum)

    def _note(self, signum: int, frame: object) -> None:
        if self.pending is None:
            self.pending = signum


def _deliver(signum: int) -> None:
    """Act on a held signal now, as its handler would have when it came."""
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


@contextmanager
def _held_from_exit(stops: _StopSignals) -> Iterator[None]:
    """Hold the stop signals from the moment the block ends, however it ends."""
    try:
        yield
    finally:
        stops.hold()


def _run_locked(
    config: Config,
    sink: Sink,
    outcome: RunOutcome,
    stops: _StopSignals,
    model_ref: str | None,
    allow_drift: bool,
    progress: Progress | None,
) -> None:
    snapshot_date = outcome.snapshot_date
    started = time.monotonic()
    with sink.lock(snapshot_date):
        rejected_sample: list[pa.Table] = []
        recorded = False
        try:
            # Held: a stop between the insert and `recorded` would leave the run
            # `running` (until the next run marks it abandoned) instead of `failed`.
            stops.hold()
            abandoned = sink.begin_run(outcome.run_id, snapshot_date, _now(), None)
            recorded = True
            stops.release_and_deliver()
            if abandoned:
                log.warning(
                    "marked %d earlier run(s) for %s as abandoned", abandoned, snapshot_date
                )
            failpoints.hit("run.started")
            _publish(
                config, outcome, sink, stops, model_ref, allow_drift, progress, rejected_sample
            )
        except BaseException as exc:
            stops.hold()
            outcome.seconds = time.monotonic() - started
            if recorded:
                _record_failure(config, sink, outcome, exc, rejected_sample)
            raise


class _IdsChangedByCleaning(Exception):
    """Repeats were judged among the ids as stored, and cleaning changed some ids."""


def _publish(
    config: Config,
    outcome: RunOutcome,
    sink: Sink,
    stops: _StopSignals,
    model_ref: str | None,
    allow_drift: bool,
    progress: Progress | None,
    rejected_sample: list[pa.Table],
) -> None:
    model = load_model(config.model, config.contract, model_ref)
    outcome.model_version = model.version
    source = open_source(config.source, config.contract)
    summary = source.summarize(outcome.snapshot_date)
    log.info(
        "scoring %s: %d rows from %s with model %s",
        outcome.snapshot_date, summary.rows, source.describe(), model.version,
    )  # fmt: skip
    # Each restart below changes what the next attempt does, so none comes twice. The
    # rollback before one held the stop signals: each lets them through again first (one
    # that came meanwhile stops the run there).
    while True:
        try:
            _publish_once(config, outcome, sink, stops, model, source, summary, allow_drift,
                          progress, rejected_sample)  # fmt: skip
            return
        except _IdsChangedByCleaning:
            stops.release_and_deliver()
            # Rolled back. Rare (ids padded with whitespace): judge repeats on cleaned ids.
            log.info(
                "ids of %s change when trimmed, so repeats found among the stored ids may "
                "miss some; looking for repeats among the trimmed ids and starting the "
                "publication over",
                outcome.snapshot_date,
            )
            summary = source.summarize(outcome.snapshot_date, cleaned_ids=True)
        except PortablePathNeeded as exc:
            # Rolled back. The fast reader met values it would read differently from the
            # row path (SQLite columns mixing storage classes).
            if not isinstance(source, SqlSource) or source.portable:
                raise
            stops.release_and_deliver()
            log.info("%s; starting the publication over, reading row by row", exc)
            source.use_portable_path()
        outcome.rows_read = outcome.rows_scored = outcome.rows_rejected = 0
        rejected_sample.clear()
        failpoints.hit("publish.restart")


def _publish_once(
    config: Config,
    outcome: RunOutcome,
    sink: Sink,
    stops: _StopSignals,
    model: LoadedModel,
    source: SnapshotSource,
    summary: SnapshotSummary,
    allow_drift: bool,
    progress: Progress | None,
    rejected_sample: list[pa.Table],
) -> None:
    contract = config.contract
    monitor = DriftMonitor(model.card.get("reference", {}))
    scorer = BatchScorer(model, contract)
    reasons: dict[str, int] = {}
    invalid_numbers: dict[str, int] = {}
    sampled = 0
    scored_at = _now()
    # Four threads: "read" reads ahead, "check" checks what was read against the
    # contract, this one scores and monitors, and the publication's writes behind.
    # Reading waits on the server most; the check beside it took a fifth of the wall.
    batches = prefetch(_read(source, outcome.snapshot_date), depth=1, name="read")
    stream = prefetch(
        _checked(batches, contract, summary, monitor.known_levels), depth=1, name="check"
    )
    publication = sink.publication(outcome.snapshot_date, outcome.run_id, model.version, scored_at)
    # Left last to first: the stop signals are held, the publication commits or rolls
    # back, then the check and read threads stop (each closing its source) instead of
    # reading on for as long as a traceback keeps their generators alive.
    with closing(stream) as checked_batches, publication as pub, _held_from_exit(stops):
        for checked in checked_batches:
            if summary.as_stored and checked.ids_rewritten:
                raise _IdsChangedByCleaning
            predictions = scorer.score(checked.valid)
            failpoints.hit("score.batch")
            monitor.observe(
                checked.valid,
                predictions["churn_probability"].to_numpy(),
                predictions["risk_tier"].combine_chunks(),
            )
            pub.write_predictions(predictions)
            failpoints.hit("publish.write")
            if checked.rejected.num_rows:
                pub.write_rejected(checked.rejected)
                if sampled < REJECTED_SAMPLE:
                    rejected_sample.append(checked.rejected.slice(0, REJECTED_SAMPLE - sampled))
                    sampled += rejected_sample[-1].num_rows
                for reason, n in reason_counts(checked.rejected).items():
                    reasons[reason] = reasons.get(reason, 0) + n
            for name, n in checked.invalid_numbers.items():
                invalid_numbers[name] = invalid_numbers.get(name, 0) + n
            outcome.rows_read += checked.rows_in
            outcome.rows_scored += predictions.num_rows
            outcome.rows_rejected += checked.rejected.num_rows
            if progress:
                progress(outcome.rows_read, summary.rows)

        outcome.summary = {
            "rejected_reasons": reasons,
            "invalid_numbers": {k: v for k, v in invalid_numbers.items() if v},
        }
        enforce_invalid_fraction(outcome.rows_rejected, outcome.rows_read, contract, reasons)
        report = monitor.report()
        outcome.summary.update(report.summary())
        outcome.metrics = report.metric_rows()
        decision = gate(report, config.monitoring)
        outcome.summary["gate"] = {"level": decision.level.value, "findings": decision.findings}
        if decision.level is Level.block and not allow_drift:
            raise DriftBlocked(
                f"drift gate blocked publication of {outcome.snapshot_date}: "
                f"{decision.message()} (rerun with --allow-drift to publish anyway)"
            )
        if decision.level is Level.block:
            outcome.summary["allow_drift"] = True
            outcome.warnings.append(
                f"published despite drift (--allow-drift): {decision.message()}"
            )
        elif decision.level is Level.warn:
            outcome.warnings.append(f"drift warning: {decision.message()}")
        for warning in outcome.warnings:
            log.warning("%s", warning)
        pub.write_metrics(outcome.metrics)
        outcome.status = "succeeded"
        pub.finish_run(
            outcome.run_id, "succeeded",
            rows_read=outcome.rows_read, rows_scored=outcome.rows_scored,
            rows_rejected=outcome.rows_rejected, error=None, summary=outcome.summary,
            model_version=model.version,
        )  # fmt: skip
        failpoints.hit("publish.before_commit")
    failpoints.hit("publish.committed")  # signals are held from here to the run's end
    log.info(
        "published %d predictions for %s (%d rejected)",
        outcome.rows_scored, outcome.snapshot_date, outcome.rows_rejected,
    )  # fmt: skip


def _read(source: SnapshotSource, snapshot_date: date) -> Iterator[pa.RecordBatch]:
    """The source's batches, on the "read" thread; closes the source's stream when done."""
    batches = source.read(snapshot_date)
    try:
        for batch in batches:
            failpoints.hit("read.batch")
            yield batch
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _checked(
    batches: Iterator[pa.RecordBatch],
    contract: ContractConfig,
    summary: SnapshotSummary,
    known_levels: Mapping[str, Collection[str]],
) -> Iterator[CheckedBatch]:
    """Each batch checked against the contract, on a thread of its own ("check").

    Checking is Arrow compute, which releases the GIL: on its own thread it overlaps
    both the reading of the next batch and the scoring of the one before. The batches'
    source is closed with this generator.
    """
    try:
        for batch in batches:
            failpoints.hit("check.batch")
            yield check_batch(
                batch, contract, duplicate_ids=summary.duplicate_ids, known_levels=known_levels
            )
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _record_failure(
    config: Config,
    sink: Sink,
    outcome: RunOutcome,
    exc: BaseException,
    rejected_sample: list[pa.Table],
) -> None:
    """After the rollback: mark the run failed or blocked, keep what explains it."""
    failpoints.hit("run.record_failure")
    blocked = isinstance(exc, DriftBlocked)
    outcome.status = "blocked" if blocked else "failed"
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C where no handler makes it Interrupted
        exc = Interrupted(signal.SIGINT)
    if isinstance(exc, Interrupted):
        outcome.exit_code = exc.exit_code
        message = f"{exc}; nothing was published, the previous predictions stay"
    else:
        outcome.exit_code = exc.exit_code if isinstance(exc, ChurnBatchError) else 1
        message = describe_failure(exc)
    outcome.error = config.redact(message)
    try:
        sink.finish_run(
            outcome.run_id, outcome.status,
            rows_read=outcome.rows_read, rows_scored=outcome.rows_scored if blocked else 0,
            rows_rejected=outcome.rows_rejected, error=outcome.error,
            summary=outcome.summary or None, model_version=outcome.model_version,
        )  # fmt: skip
        if outcome.metrics:  # a blocked run keeps the drift that blocked it
            sink.write_metrics(outcome.run_id, outcome.snapshot_date, outcome.metrics)
        if rejected_sample:
            sink.write_rejected(
                outcome.run_id, outcome.snapshot_date, pa.concat_tables(rejected_sample)
            )
    except (ChurnBatchError, LookupError, ValueError, SQLAlchemyError) as record_error:
        # The run already failed; failing to record it must not hide the first error.
        log.error(
            "could not record the failed run %s: %s", outcome.run_id, describe_failure(record_error)
        )


def describe_failure(exc: BaseException) -> str:
    """What ended a run, in one line for a terminal, a log line and the runs table.

    A churn-batch error's own message. Anything else is a bug: its type and the first
    line of its message. For a database error that line is SQLAlchemy's "(driver
    error class) driver message"; the lines after it hold the whole statement and its
    parameters (kilobytes, and customer data). The logged traceback keeps the detail.
    """
    if isinstance(exc, ChurnBatchError | Interrupted):
        return without_statement(str(exc))
    lines = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return line if len(line) <= MESSAGE_MAX else line[: MESSAGE_MAX - 1] + "…"


def without_statement(text: str) -> str:
    """`text` without the SQL statement and parameters SQLAlchemy appends to its errors."""
    return _STATEMENT.split(text, maxsplit=1)[0]


_STATEMENT = re.compile(r"\s*\n\[SQL: |\s*\n\[parameters: |\s*\(Background on this error at: ")


def _return_freed_memory() -> None:
    """Take Arrow buffers from jemalloc (else the system allocator) instead of mimalloc.

    A run's batches are made on the read and check threads and freed on the main one;
    mimalloc keeps such memory in per-thread heaps, which put ~80 MB on the peak of a
    1M-row Parquet run (539 MB against 460 MB with jemalloc, same wall time).
    """
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without jemalloc
        pa.set_memory_pool(pa.system_memory_pool())


def _now() -> datetime:
    return datetime.now(UTC)

"""`train`: read labelled snapshots, fit and select a model, register it, maybe promote it.

The wiring around the pure pieces: the source and the contract give typed rows, `model`
fits and evaluates, `registry` stores. The holdout is always the latest dates, so a
model is judged on data from after everything it learned from.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.model_selection import train_test_split

from churn_batch.config import Config, ContractConfig, TrainingConfig
from churn_batch.contract import (
    DUPLICATE_ID,
    LABEL,
    as_strings,
    check_batch,
    enforce_invalid_fraction,
    features_frame,
    reason_counts,
)
from churn_batch.errors import ConfigError, ModelError, NoSnapshotRows
from churn_batch.model import DEFAULT_SEARCH, FittedModel, Labelled, SearchSpace, fit_and_select
from churn_batch.model import metrics as score_metrics
from churn_batch.registry import CHALLENGER, LoadedModel, Registry, library_versions
from churn_batch.sources import SnapshotSource, open_source

log = logging.getLogger(__name__)

_NO_DUPLICATES = pa.array([], pa.string())
_LABEL_VALUES_SHOWN = 10


@dataclass(frozen=True)
class TrainingData:
    """Valid, labelled rows sorted by (date, id), and what was left out on the way."""

    table: pa.Table
    rows_read: int
    rejected: int
    reasons: dict[str, int]
    unlabelled: int
    label_values: tuple[str, ...]  # raw label values seen (a few), to explain label errors


@dataclass(frozen=True)
class Split:
    """Which rows are held out: the latest dates, or a random sample when there is one date."""

    holdout: npt.NDArray[np.bool_]
    kind: Literal["time", "random"]
    first: date  # first and last date of the holdout
    last: date

    def describe(self) -> str:
        dates = str(self.first) if self.first == self.last else f"{self.first}..{self.last}"
        return dates if self.kind == "time" else f"random {int(self.holdout.sum())} rows of {dates}"


@dataclass(frozen=True)
class TrainResult:
    version: str
    winner: str
    calibrated: bool
    metrics: dict[str, float]  # holdout metrics of the registered model
    candidates: dict[str, dict[str, float]]  # holdout metrics of each candidate
    promoted: bool
    reason: str
    champion: str | None  # after this run
    rows: int
    train_rows: int
    holdout_rows: int
    holdout: str  # the holdout dates, described
    unlabelled: int
    rejected: int
    fingerprint: str


def train(
    config: Config,
    start: date | None,
    end: date | None,
    *,
    promote: bool,
    now: datetime | None = None,
    search: SearchSpace = DEFAULT_SEARCH,
) -> TrainResult:
    """Train on labelled snapshots dated start..end (open ends allowed) and register the
    result; with `promote`, make it champion if it beats the champion on its holdout."""
    if start is not None and end is not None and start > end:
        raise ConfigError(f"--start {start} is after --end {end}")
    registry = Registry.from_config(config.model)
    # Before spending minutes on fitting: the champion must load to be compared with.
    champion = _champion_to_beat(registry, config.contract) if promote else None
    source = open_source(config.source, config.contract)
    data = read_labelled(source, config.contract, start, end)
    _check_label_classes(data, config.contract)
    labels = data.table[LABEL].to_numpy().astype(np.int8)
    split = split_holdout(data.table[config.contract.date_column], labels, config.training)
    train_part, holdout = labelled_parts(data.table, labels, split, config.contract)
    _require_both_classes(train_part, holdout, split)
    log.info(
        "training on %d rows, holdout %s (%d rows)",
        len(train_part.label),
        split.describe(),
        len(holdout.label),
    )
    fitted = fit_and_select(
        train_part,
        holdout,
        config.contract.numeric,
        config.contract.categorical,
        cv_folds=config.training.cv_folds,
        seed=config.training.seed,
        high_share=config.training.high_tier_share,
        medium_share=config.training.medium_tier_share,
        search=search,
    )
    fingerprint = data_fingerprint(data.table, config.contract)
    card = model_card(config, source.describe(), data, split, fitted, fingerprint, now=now)
    version = registry.register(fitted.estimator, card)
    log.info("registered %s/%s (%s)", config.model.name, version, fitted.winner)
    promoted, reason = _decide(
        registry, config.contract, version, fitted, holdout, champion, split, promote
    )
    return TrainResult(
        version=version,
        winner=fitted.winner,
        calibrated=fitted.calibration.applied,
        metrics=fitted.holdout_metrics,
        candidates={name: c.holdout for name, c in fitted.candidates.items()},
        promoted=promoted,
        reason=reason,
        champion=registry.champion(),
        rows=data.table.num_rows,
        train_rows=len(train_part.label),
        holdout_rows=len(holdout.label),
        holdout=split.describe(),
        unlabelled=data.unlabelled,
        rejected=data.rejected,
        fingerprint=fingerprint,
    )


# -- reading ----------------------------------------------------------------------------


def read_labelled(
    source: SnapshotSource, contract: ContractConfig, start: date | None, end: date | None
) -> TrainingData:
    """Every labelled, valid row in the date range, checked against the contract.

    Batches may mix dates and a date may span batches, so duplicate ids are found per
    (id, date) once everything is read: a customer appears once on every date.
    """
    if contract.label_column is None:
        raise ConfigError(
            "training needs labelled snapshots: set label_column", key="contract.label_column"
        )
    parts, reasons, values = [], Counter[str](), set[str | None]()
    rows_read = rejected = 0
    for batch in source.read_range(start, end, label=True):
        checked = check_batch(batch, contract, duplicate_ids=_NO_DUPLICATES, label=True)
        rows_read += batch.num_rows
        rejected += checked.rejected.num_rows
        reasons.update(reason_counts(checked.rejected))
        parts.append(checked.valid)
        if len(values) < _LABEL_VALUES_SHOWN:
            values.update(pc.unique(as_strings(batch[contract.label_column])).to_pylist())
    if not rows_read:
        raise NoSnapshotRows(_describe_range(start, end), source.describe())
    table, duplicates = _drop_duplicates(pa.concat_tables(parts), contract)
    rejected += duplicates
    if duplicates:
        reasons[DUPLICATE_ID] += duplicates
    enforce_invalid_fraction(rejected, rows_read, contract, reasons)
    labelled = pc.is_valid(table[LABEL])
    kept = table.filter(labelled)
    unlabelled = table.num_rows - kept.num_rows
    if unlabelled:
        _log_unlabelled(table, labelled, contract)
    ordered = kept.sort_by([(contract.date_column, "ascending"), (contract.id_column, "ascending")])
    shown = tuple(sorted(v if v is not None else "(missing)" for v in values))
    return TrainingData(ordered, rows_read, rejected, dict(reasons), unlabelled, shown)


def _log_unlabelled(table: pa.Table, labelled: pa.ChunkedArray, contract: ContractConfig) -> None:
    """Say how many rows and dates are left out for lacking a label, and which dates have
    none at all: the newest dates, whose outcome is not known yet (in a lake, their files
    often lack the label column), or a label that failed to arrive."""
    dates = table[contract.date_column]
    left_out = set(pc.unique(dates.filter(pc.invert(labelled))).to_pylist())
    whole = sorted(left_out - set(pc.unique(dates.filter(labelled)).to_pylist()))
    shown = ", ".join(map(str, whole[:_LABEL_VALUES_SHOWN]))
    log.info(
        "left out %d rows without a label (outcome not known yet) on %d date(s); "
        "%d date(s) without any label are not training data%s",
        len(labelled) - int(pc.sum(labelled).as_py() or 0),
        len(left_out),
        len(whole),
        f": {shown}{'...' if len(whole) > _LABEL_VALUES_SHOWN else ''}" if whole else "",
    )


def _drop_duplicates(table: pa.Table, contract: ContractConfig) -> tuple[pa.Table, int]:
    """Drop every copy of an (id, date) pair seen more than once: no copy can be trusted."""
    dates = table[contract.date_column].cast(pa.string())
    # The date has a fixed width, so id + separator + date never collides.
    keys = pc.binary_join_element_wise(table[contract.id_column], dates, "\x1f")
    counts = pc.value_counts(keys)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return table, 0
    duplicated = pc.is_in(keys, value_set=repeated)
    return table.filter(pc.invert(duplicated)), int(pc.sum(duplicated).as_py())


def _describe_range(start: date | None, end: date | None) -> str:
    return f"{start or 'the first date'}..{end or 'the last date'}"


# -- holdout ----------------------------------------------------------------------------


def split_holdout(
    dates: pa.ChunkedArray | pa.Array, labels: npt.NDArray[np.int8], training: TrainingConfig
) -> Split:
    """Hold out the latest whole dates, about `holdout_fraction` of the rows.

    Nothing from a holdout date is trained on, so the evaluation is of the future. With
    a single date, there is no future: a stratified random sample instead.
    """
    days = np.asarray(dates.to_numpy(zero_copy_only=False), dtype="datetime64[D]")
    unique, counts = np.unique(days, return_counts=True)
    if len(unique) == 1:
        return _random_split(days, labels, training)
    # counts of the k latest dates, k = 1..n-1 (at least one date stays for training)
    latest = np.cumsum(counts[::-1])[:-1]
    k = int(np.argmin(np.abs(latest - training.holdout_fraction * len(days)))) + 1
    first = unique[-k]
    return Split(days >= first, "time", _as_date(first), _as_date(unique[-1]))


def _random_split(
    days: npt.NDArray[np.datetime64], labels: npt.NDArray[np.int8], training: TrainingConfig
) -> Split:
    positions = np.arange(len(labels))
    try:
        _, held = train_test_split(
            positions,
            test_size=training.holdout_fraction,
            stratify=labels,
            random_state=training.seed,
        )
    except ValueError as exc:  # too few rows of a class to put some on each side
        raise ConfigError(f"cannot hold out a stratified sample: {exc}") from None
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return Split(mask, "random", _as_date(days[0]), _as_date(days[0]))


def _as_date(value: np.datetime64) -> date:
    result = value.astype("datetime64[D]").item()
    assert isinstance(result, date)
    return result


def labelled_parts(
    table: pa.Table, labels: npt.NDArray[np.int8], split: Split, contract: ContractConfig
) -> tuple[Labelled, Labelled]:
    """The training part and the holdout, as the model module takes them."""
    features = features_frame(table, contract)
    customers = table[contract.id_column].to_numpy()
    parts = []
    for mask in (~split.holdout, split.holdout):
        rows = np.flatnonzero(mask)
        parts.append(
            Labelled(features.iloc[rows].reset_index(drop=True), labels[rows], customers[rows])
        )
    return parts[0], parts[1]


def _require_both_classes(train_part: Labelled, holdout: Labelled, split: Split) -> None:
    for name, part in (("training part", train_part), (f"holdout ({split.describe()})", holdout)):
        positives = int(part.label.sum())
        if positives in (0, len(part.label)):
            raise ConfigError(
                f"the {name} has only one label class ({positives} churners in "
                f"{len(part.label)} rows); train on a wider date range"
            )


def _check_label_classes(data: TrainingData, contract: ContractConfig) -> None:
    labels = data.table[LABEL]
    total = len(labels)
    positives = int(pc.sum(labels).as_py() or 0)
    if 0 < positives < total:
        return
    where = f"label column {contract.label_column!r}"
    if total == 0:
        message = f"{where} has no value in any of the {data.rows_read} valid rows read"
    else:
        message = (
            f"{where} has one class only: positive_label {contract.positive_label!r} matches "
            f"{positives} of {total} labelled rows"
        )
    raise ConfigError(
        f"{message}; values seen: {', '.join(map(repr, data.label_values)) or 'none'}",
        key="contract.positive_label",
    )


# -- card and promotion -------------------------------------------------------------------


def data_fingerprint(table: pa.Table, contract: ContractConfig) -> str:
    """sha256 over the sorted (id, date, label) rows: which rows, with which outcomes."""
    text = pc.binary_join_element_wise(
        table[contract.id_column],
        table[contract.date_column].cast(pa.string()),
        table[LABEL].cast(pa.string()),
        "\t",
    )
    digest = hashlib.sha256("\n".join(text.to_pylist()).encode("utf-8")).hexdigest()
    return f"sha256:{digest}"


def model_card(
    config: Config,
    source: str,
    data: TrainingData,
    split: Split,
    fitted: FittedModel,
    fingerprint: str,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Everything the registry records beside the artifact (it adds version and sha256)."""
    contract, training = config.contract, config.training
    dates = data.table[contract.date_column]
    train_dates = dates.filter(pa.array(~split.holdout))
    return {
        "name": config.model.name,
        "created_at": (now or datetime.now(UTC)).isoformat(),
        "training_data": {
            "source": source,
            "first_date": pc.min(dates).as_py(),
            "last_date": pc.max(dates).as_py(),
            "rows": data.table.num_rows,
            "positive_rate": float(pc.mean(data.table[LABEL]).as_py()),
            "rows_read": data.rows_read,
            "rejected": data.rejected,
            "rejected_reasons": data.reasons,
            "unlabelled_dropped": data.unlabelled,
            "fingerprint": fingerprint,
            "split": {
                "kind": split.kind,
                "train_rows": len(train_dates),
                "train_last_date": pc.max(train_dates).as_py(),
                "holdout_rows": int(split.holdout.sum()),
                "holdout_first_date": split.first,
                "holdout_last_date": split.last,
            },
        },
        "contract": {
            "id_column": contract.id_column,
            "date_column": contract.date_column,
            "label_column": contract.label_column,
            "positive_label": contract.positive_label,
            "numeric": list(contract.numeric),
            "categorical": list(contract.categorical),
        },
        "training": {
            "holdout_fraction": training.holdout_fraction,
            "cv_folds": training.cv_folds,
            "seed": training.seed,
        },
        "winner": fitted.winner,
        "params": fitted.candidates[fitted.winner].params,
        "candidates": {
            name: {"params": c.params, "cv_roc_auc": c.cv_roc_auc, "holdout": c.holdout}
            for name, c in fitted.candidates.items()
        },
        "calibration": fitted.calibration.as_dict(),
        "metrics": fitted.holdout_metrics,
        "thresholds": fitted.thresholds,
        "tier_shares": {"high": training.high_tier_share, "medium": training.medium_tier_share},
        "reference": fitted.reference,
        "libraries": library_versions(),
    }


def _champion_to_beat(registry: Registry, contract: ContractConfig) -> LoadedModel | None:
    if registry.champion_alias not in registry.aliases():
        return None
    try:
        return registry.load(registry.champion_alias, contract)
    except ModelError as exc:
        raise ModelError(
            f"cannot compare with the current {registry.champion_alias}: {exc}. Train without "
            "--promote, or fix the champion (churn-batch models rollback / models promote V)"
        ) from None


def _decide(
    registry: Registry,
    contract: ContractConfig,
    version: str,
    fitted: FittedModel,
    holdout: Labelled,
    champion: LoadedModel | None,
    split: Split,
    promote: bool,
) -> tuple[bool, str]:
    """Promote only a version that beats the champion on the new version's own holdout."""
    if not promote:
        reason = f"trained without --promote; {version} is the {CHALLENGER}"
        registry.set_alias(CHALLENGER, version, reason=reason)
        return False, reason
    if champion is None:
        reason = f"{version} is the first {registry.champion_alias}"
        registry.promote(version, reason=reason, contract=contract)
        return True, reason
    new_auc = fitted.holdout_metrics["roc_auc"]
    old_auc = score_metrics(holdout.label, champion.predict_proba(holdout.features))["roc_auc"]
    comparison = (
        f"holdout ROC AUC {new_auc:.4f} vs {champion.version} {old_auc:.4f} "
        f"on the same holdout ({split.describe()}){_overlap_note(champion, split)}"
    )
    if new_auc > old_auc:
        reason = f"{version} beats {registry.champion_alias} {champion.version}: {comparison}"
        registry.promote(version, reason=reason, contract=contract)
        return True, reason
    reason = (
        f"{version} does not beat {registry.champion_alias} "
        f"{champion.version}: {comparison}; {version} is the {CHALLENGER}"
    )
    registry.set_alias(CHALLENGER, version, reason=reason)
    return False, reason


def _overlap_note(champion: LoadedModel, split: Split) -> str:
    """Say so when the champion was trained on part of this holdout (its score is flattered)."""
    trained_until = champion.card.get("training_data", {}).get("split", {}).get("train_last_date")
    overlaps = (
        split.kind == "time"
        and isinstance(trained_until, str)
        and date.fromisoformat(trained_until) >= split.first
    )
    return (
        f"; note: {champion.version} was trained on data up to {trained_until}" if overlaps else ""
    )

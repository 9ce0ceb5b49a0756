"""Drift at scoring time, computed incrementally while the snapshot streams past.

The model card holds reference distributions (numeric decile bins, categorical level
frequencies, the score histogram). `DriftMonitor.observe` adds one batch's counts;
`DriftMonitor.report` turns the totals into PSI, missing-rate changes and score
statistics; `gate` compares them with the `[monitoring]` thresholds. No second pass
over the data, and memory is a few counters per feature.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from churn_batch.config import MonitoringConfig
from churn_batch.contract import level_counts

# PSI is undefined for an empty bin; a small floor keeps one empty bin from
# dominating while still flagging a level that appears or vanishes.
PSI_FLOOR = 1e-4
UNSEEN = "__unseen__"
TIERS = ("high", "medium", "low")


def psi(
    expected: Sequence[float] | np.ndarray[Any, Any], actual: Sequence[float] | np.ndarray[Any, Any]
) -> float:
    """Population stability index: sum((a - e) * ln(a / e)) over bins, floored."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def bin_counts(values: np.ndarray[Any, Any], edges: Sequence[float]) -> np.ndarray[Any, Any]:
    """Counts per bin; value v falls in bin searchsorted(edges, v, side='right')."""
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    return np.bincount(index, minlength=len(edges) + 1)


class Level(StrEnum):
    ok = "ok"
    warn = "warn"
    block = "block"


@dataclass
class _Numeric:
    edges: list[float]
    expected: list[float]
    expected_missing: float
    counts: np.ndarray[Any, Any]
    missing: int = 0


@dataclass
class _Categorical:
    expected: dict[str, float]
    expected_missing: float
    counts: Counter[str] = field(default_factory=Counter)
    missing: int = 0


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    psi: float
    missing_rate: float
    reference_missing_rate: float
    unseen: int = 0

    @property
    def missing_change(self) -> float:
        return self.missing_rate - self.reference_missing_rate


@dataclass(frozen=True)
class DriftReport:
    rows: int
    features: tuple[FeatureDrift, ...]
    score_psi: float
    score_mean: float
    tier_shares: Mapping[str, float]
    score_histogram: Sequence[int]
    score_edges: Sequence[float]

    def metric_rows(self) -> list[tuple[str, str, float | None]]:
        """(feature, metric, value) rows for the monitoring table."""
        out: list[tuple[str, str, float | None]] = []
        for f in self.features:
            out += [
                (f.feature, "psi", f.psi),
                (f.feature, "missing_rate", f.missing_rate),
                (f.feature, "missing_rate_change", f.missing_change),
            ]
            if f.unseen:
                out.append((f.feature, "unseen_levels", float(f.unseen)))
        out += [("__score__", "psi", self.score_psi), ("__score__", "mean", self.score_mean)]
        out += [("__score__", f"share_{tier}", share) for tier, share in self.tier_shares.items()]
        return out

    def summary(self) -> dict[str, Any]:
        """What the run record keeps (JSON)."""
        return {
            "drift": {
                f.feature: {
                    "psi": _round(f.psi),
                    "missing_rate": _round(f.missing_rate),
                    "missing_rate_change": _round(f.missing_change),
                    **({"unseen": f.unseen} if f.unseen else {}),
                }
                for f in self.features
            },
            "scores": {
                "psi": _round(self.score_psi),
                "mean": _round(self.score_mean),
                "tier_shares": {k: _round(v) for k, v in self.tier_shares.items()},
                "histogram": list(self.score_histogram),
                "edges": list(self.score_edges),
            },
        }


@dataclass(frozen=True)
class GateDecision:
    level: Level
    findings: tuple[str, ...]

    def message(self) -> str:
        return "; ".join(self.findings)


class DriftMonitor:
    """Accumulates per-feature and score counts batch by batch."""

    def __init__(self, reference: Mapping[str, Any]) -> None:
        self.rows = 0
        self.numeric: dict[str, _Numeric] = {}
        self.categorical: dict[str, _Categorical] = {}
        for name, ref in reference.get("numeric", {}).items():
            edges = [float(e) for e in ref["edges"]]
            self.numeric[name] = _Numeric(
                edges, list(ref["fractions"]), float(ref["missing_rate"]),
                np.zeros(len(edges) + 1, dtype=np.int64),
            )  # fmt: skip
        for name, ref in reference.get("categorical", {}).items():
            self.categorical[name] = _Categorical(
                {str(k): float(v) for k, v in ref["levels"].items()}, float(ref["missing_rate"])
            )
        score = reference.get("score", {"edges": [], "fractions": [1.0]})
        self.score_edges = [float(e) for e in score["edges"]]
        self.score_expected = list(score["fractions"])
        self.score_counts = np.zeros(len(self.score_edges) + 1, dtype=np.int64)
        self.score_sum = 0.0
        self.tiers: Counter[str] = Counter()

    @property
    def known_levels(self) -> dict[str, set[str]]:
        return {name: set(c.expected) for name, c in self.categorical.items()}

    def observe(
        self, valid: pa.Table, probabilities: np.ndarray[Any, Any], tiers: pa.Array
    ) -> None:
        self.rows += valid.num_rows
        for name, acc in self.numeric.items():
            column = valid[name]
            acc.missing += column.null_count
            values = pc.drop_null(column).to_numpy()
            acc.counts += bin_counts(values, acc.edges)
        for name, cat in self.categorical.items():
            column = valid[name]
            cat.missing += column.null_count
            cat.counts.update(level_counts(column))
        self.score_counts += bin_counts(probabilities, self.score_edges)
        self.score_sum += float(np.sum(probabilities))
        for item in pc.value_counts(tiers).to_pylist():
            self.tiers[item["values"]] += item["counts"]

    def report(self) -> DriftReport:
        rows = max(self.rows, 1)
        features: list[FeatureDrift] = []
        for name, acc in self.numeric.items():
            drift = psi(acc.expected, _shares(acc.counts))
            features.append(FeatureDrift(name, drift, acc.missing / rows, acc.expected_missing))
        for name, cat in self.categorical.items():
            levels = list(cat.expected)
            unseen = sum(n for level, n in cat.counts.items() if level not in cat.expected)
            counts = np.array([cat.counts.get(level, 0) for level in levels] + [unseen])
            expected = [cat.expected[level] for level in levels] + [0.0]
            drift = psi(expected, _shares(counts))
            features.append(
                FeatureDrift(name, drift, cat.missing / rows, cat.expected_missing, unseen)
            )
        scored = int(self.score_counts.sum())
        score_actual = _shares(self.score_counts)
        return DriftReport(
            rows=self.rows,
            features=tuple(features),
            score_psi=psi(self.score_expected, score_actual),
            score_mean=self.score_sum / scored if scored else math.nan,
            tier_shares={t: self.tiers.get(t, 0) / scored if scored else 0.0 for t in TIERS},
            score_histogram=[int(c) for c in self.score_counts],
            score_edges=self.score_edges,
        )


def gate(report: DriftReport, config: MonitoringConfig) -> GateDecision:
    """Warn or block on feature PSI and on a rise in a feature's missing rate."""
    blocks: list[str] = []
    warns: list[str] = []
    for f in report.features:
        limits = config.for_feature(f.feature)
        if f.psi >= limits.psi_block:
            blocks.append(f"{f.feature} PSI {f.psi:.3f} >= {limits.psi_block}")
        elif f.psi >= limits.psi_warn:
            warns.append(f"{f.feature} PSI {f.psi:.3f} >= {limits.psi_warn}")
        if f.missing_change > limits.missing_rate_block:
            blocks.append(
                f"{f.feature} missing rate {f.missing_rate:.1%} "
                f"(reference {f.reference_missing_rate:.1%}, +{f.missing_change:.1%} "
                f"> {limits.missing_rate_block:.0%})"
            )
    # The score distribution moves when the features do; it warns, the features block.
    if report.score_psi >= config.default.psi_warn:
        warns.append(f"score PSI {report.score_psi:.3f} >= {config.default.psi_warn}")
    if blocks:
        return GateDecision(Level.block, tuple(blocks + warns))
    if warns:
        return GateDecision(Level.warn, tuple(warns))
    return GateDecision(Level.ok, ())


def _shares(counts: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    total = counts.sum()
    return counts / total if total else np.zeros(len(counts), dtype=np.float64)


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)

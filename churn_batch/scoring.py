"""The scoring core: checked rows in, predictions out, no I/O.

A distributed engine could map `BatchScorer.score` over partitions. Probabilities are
the fitted pipeline's `predict_proba`: through the compiled path when the model's
structure allows it (checked against the pipeline on the first batch), else through
the pipeline itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from churn_batch.compiled import ArrowScorer, compile_scorer
from churn_batch.config import ContractConfig
from churn_batch.contract import features_frame
from churn_batch.errors import ModelError
from churn_batch.model import TIER_NAMES, tier_codes

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("churn_probability", pa.float64()),
        ("risk_tier", pa.dictionary(pa.int8(), pa.string())),
    ]
)
# How many rows of the first batch are scored both ways to prove the compiled path.
VERIFY_ROWS = 2_000
TOLERANCE = 1e-12


class Model(Protocol):
    """What scoring needs of a loaded model (see `registry.LoadedModel`)."""

    @property
    def thresholds(self) -> Mapping[str, float]: ...

    @property
    def card(self) -> Mapping[str, Any]: ...

    @property
    def pipeline(self) -> Any: ...

    def predict_proba(self, frame: Any) -> np.ndarray[Any, Any]: ...


class BatchScorer:
    """Scores checked batches with one model; compiles its fast path once."""

    def __init__(self, model: Model, contract: ContractConfig) -> None:
        self.model = model
        self.contract = contract
        trained = model.card["contract"]  # the training column order, which the pipeline keeps
        self.compiled: ArrowScorer | None = compile_scorer(
            model.pipeline, trained["numeric"], trained["categorical"]
        )
        self.verified = self.compiled is None
        if self.compiled is None:
            log.info("no compiled scoring path for this model; using the pipeline")

    @property
    def path(self) -> str:
        return "compiled" if self.compiled is not None else "pipeline"

    def probabilities(self, valid: pa.Table) -> np.ndarray[Any, Any]:
        if self.compiled is None:
            return self._pipeline(valid)
        fast = self.compiled(valid)
        if not self.verified:
            sample = valid.slice(0, VERIFY_ROWS)
            gap = float(np.max(np.abs(fast[: sample.num_rows] - self._pipeline(sample)), initial=0))
            if gap > TOLERANCE:
                log.warning("compiled scoring differs from the pipeline by %g; not using it", gap)
                self.compiled = None
                return self._pipeline(valid)
            self.verified = True
        return fast

    def _check(self, probabilities: np.ndarray[Any, Any], valid: pa.Table) -> None:
        """Refuse to publish what is not a probability (exit 6, nothing published).

        The contract keeps every number finite and within 2**53, so a working model
        cannot give NaN; one that does is broken, and NaN would land in the table's
        FLOAT column unnoticed (every risk tier comparison with it is False: "low").
        """
        bad = ~((probabilities >= 0.0) & (probabilities <= 1.0))  # NaN fails both
        if probabilities.shape != (valid.num_rows,) or bad.any():
            where = int(np.argmax(bad)) if bad.any() else 0
            customer = valid[self.contract.id_column][where].as_py() if valid.num_rows else None
            raise ModelError(
                f"model {self.model.card.get('version', '?')} gave {int(bad.sum())} of "
                f"{valid.num_rows} values that are not probabilities (shape "
                f"{probabilities.shape}; first for customer {customer!r}: "
                f"{probabilities.ravel()[where] if probabilities.size else None}); "
                "nothing was published"
            )

    def _pipeline(self, valid: pa.Table) -> np.ndarray[Any, Any]:
        frame = features_frame(valid, self.contract)
        return np.asarray(self.model.predict_proba(frame), np.float64)

    def score(self, valid: pa.Table) -> pa.Table:
        """Predictions for the valid rows of one batch, in the same order."""
        if valid.num_rows == 0:
            return PREDICTION_SCHEMA.empty_table()
        probabilities = self.probabilities(valid)
        self._check(probabilities, valid)
        # Three names, coded once: no string per row until the sink writes them.
        codes = pa.array(tier_codes(probabilities, self.model.thresholds), pa.int8())
        tiers = pa.DictionaryArray.from_arrays(codes, pa.array(TIER_NAMES, pa.string()))
        return pa.table(
            {
                "customer_id": valid[self.contract.id_column],
                "churn_probability": probabilities,
                "risk_tier": tiers,
            },
            schema=PREDICTION_SCHEMA,
        )

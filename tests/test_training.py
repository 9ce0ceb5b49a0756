"""`train`: reading labelled snapshots, the time-based holdout, the card, promotion."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from churn_batch import synthetic
from churn_batch.config import PROJECT_ROOT, Config, ContractConfig, TrainingConfig, load_config
from churn_batch.contract import DUPLICATE_ID, LABEL, features_frame
from churn_batch.errors import ConfigError, NoSnapshotRows, TooManyInvalidRows
from churn_batch.model import BOOSTING, SearchSpace, metrics, risk_tiers
from churn_batch.registry import MODEL_FILE, Registry, library_versions
from churn_batch.sources import open_source
from churn_batch.training import TrainResult, data_fingerprint, read_labelled, split_holdout, train

FIRST = date(2024, 1, 1)
DAYS = 4
LAST = date(2024, 1, DAYS)
NOW = datetime(2024, 2, 1, 6, 0, tzinfo=UTC)

FAST = SearchSpace(logistic_c=(1.0,), boosting={"max_leaf_nodes": (7,)}, boosting_max_iter=60)
# One tree with one split: a model that is certainly worse than FAST's.
STUMP = SearchSpace(
    candidates=(BOOSTING,),
    boosting={"max_leaf_nodes": (2,), "learning_rate": (0.01,)},
    boosting_max_iter=1,
)


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("snapshots")
    synthetic.write_parquet(synthetic.generate_snapshots(1500, FIRST, DAYS, seed=4), root)
    return root


def make_config(tmp_path: Path, snapshots: Path, positive_label: str = "Yes") -> Config:
    """The default config, reading Parquet snapshots and keeping models under tmp_path."""
    text = (PROJECT_ROOT / "configs" / "default.toml").read_text()
    rest = text.split("[contract]", 1)[1]
    rest = rest.replace('registry = "../models"', f'registry = "{tmp_path / "models"}"')
    rest = rest.replace("sqlite:///../data/churn.db", f"sqlite:///{tmp_path / 'out.db'}")
    rest = rest.replace('positive_label = "Yes"', f'positive_label = "{positive_label}"')
    path = tmp_path / "config.toml"
    path.write_text(f'[source]\nkind = "parquet"\npath = "{snapshots}"\n\n[contract]{rest}')
    return load_config(path)


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, snapshots: Path
) -> tuple[Config, TrainResult]:
    config = make_config(tmp_path_factory.mktemp("trained"), snapshots)
    return config, train(config, None, None, promote=True, now=NOW, search=FAST)


# -- a whole run ------------------------------------------------------------------------------


def test_train_registers_a_champion_with_a_complete_card(
    trained: tuple[Config, TrainResult],
) -> None:
    config, result = trained
    assert result.version == "v1"
    assert result.promoted
    assert result.reason == "v1 is the first champion"
    assert result.champion == "v1"
    assert result.metrics["roc_auc"] > 0.8
    assert result.holdout == str(LAST)
    assert result.train_rows + result.holdout_rows == result.rows

    registry = Registry.from_config(config.model)
    card = registry.card("champion")
    assert card["version"] == "v1"
    assert card["created_at"] == NOW.isoformat()
    data = card["training_data"]
    assert data["source"] == f"parquet {config.source.path}"
    assert (data["first_date"], data["last_date"]) == (str(FIRST), str(LAST))
    assert data["rows"] == result.rows
    assert data["fingerprint"] == result.fingerprint
    assert data["fingerprint"].startswith("sha256:") and len(data["fingerprint"]) == 71
    split = data["split"]
    assert split["kind"] == "time"
    assert split["holdout_first_date"] == split["holdout_last_date"] == str(LAST)
    assert split["train_last_date"] == str(date(2024, 1, DAYS - 1))
    assert card["contract"]["numeric"] == list(config.contract.numeric)
    assert card["contract"]["categorical"] == list(config.contract.categorical)
    assert card["contract"]["positive_label"] == "Yes"
    assert set(card["candidates"]) == {"logistic_regression", "hist_gradient_boosting"}
    for candidate in card["candidates"].values():
        assert {"roc_auc", "pr_auc", "log_loss", "brier", "precision_top_10", "lift_top_10"} <= set(
            candidate["holdout"]
        )
    assert card["metrics"]["roc_auc"] == pytest.approx(result.metrics["roc_auc"])
    assert card["winner"] == result.winner
    assert set(card["calibration"]) == {
        "method",
        "applied",
        "brier_uncalibrated",
        "brier_calibrated",
    }
    assert card["thresholds"]["high"] >= card["thresholds"]["medium"]
    assert set(card["reference"]) == {"numeric", "categorical", "score"}
    assert set(card["reference"]["numeric"]) == set(config.contract.numeric)
    assert card["libraries"] == library_versions()
    artifact = registry.home / "v1" / MODEL_FILE
    assert card["model_sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()


def test_the_registered_model_loads_and_reproduces_its_holdout_auc(
    trained: tuple[Config, TrainResult],
) -> None:
    config, result = trained
    model = Registry.from_config(config.model).load("v1", config.contract)
    holdout = read_labelled(
        open_source(config.source, config.contract), config.contract, LAST, LAST
    ).table
    scores = model.predict_proba(features_frame(holdout, config.contract))
    labels = holdout[LABEL].to_numpy()
    assert metrics(labels, scores)["roc_auc"] == pytest.approx(result.metrics["roc_auc"])
    # The tier thresholds cut the holdout scores at about 10% high and 20% medium.
    tiers = risk_tiers(scores, model.thresholds)
    assert np.mean(tiers == "high") == pytest.approx(0.1, abs=0.02)
    assert np.mean(tiers == "medium") == pytest.approx(0.2, abs=0.02)


def test_promotion_needs_a_better_model_on_the_same_holdout(
    tmp_path: Path, snapshots: Path
) -> None:
    config = make_config(tmp_path, snapshots)
    first = train(config, None, None, promote=True, search=STUMP)
    assert (first.version, first.promoted, first.champion) == ("v1", True, "v1")

    better = train(config, None, None, promote=True, search=FAST)
    assert better.promoted, better.reason
    assert better.champion == "v2"
    assert better.reason.startswith("v2 beats champion v1: holdout ROC AUC")
    assert f"on the same holdout ({LAST})" in better.reason

    worse = train(config, None, None, promote=True, search=STUMP)
    assert not worse.promoted
    assert worse.champion == "v2"
    assert worse.reason.startswith("v3 does not beat champion v2: holdout ROC AUC")
    assert worse.reason.endswith("v3 is the challenger")
    registry = Registry.from_config(config.model)
    assert registry.aliases() == {"champion": "v2", "challenger": "v3"}

    assert registry.rollback(contract=config.contract).version == "v1"
    assert registry.champion() == "v1"


def test_without_promote_the_new_version_is_the_challenger(tmp_path: Path, snapshots: Path) -> None:
    config = make_config(tmp_path, snapshots)
    result = train(config, date(2024, 1, 2), LAST, promote=False, search=STUMP)
    assert not result.promoted
    assert result.reason == "trained without --promote; v1 is the challenger"
    assert Registry.from_config(config.model).aliases() == {"challenger": "v1"}


# -- failures -------------------------------------------------------------------------------


def test_a_positive_label_never_seen_names_the_label_and_the_values(
    tmp_path: Path, snapshots: Path
) -> None:
    config = make_config(tmp_path, snapshots, positive_label="yes")
    with pytest.raises(ConfigError) as info:
        train(config, None, None, promote=False, search=STUMP)
    assert str(info.value) == (
        "contract.positive_label: label column 'churned' has one class only: positive_label "
        "'yes' matches 0 of 6000 labelled rows; values seen: 'No', 'Yes'"
    )


def test_no_rows_in_the_range_is_no_snapshot_rows(tmp_path: Path, snapshots: Path) -> None:
    config = make_config(tmp_path, snapshots)
    with pytest.raises(NoSnapshotRows, match=r"2025-01-01\.\.2025-02-01"):
        train(config, date(2025, 1, 1), date(2025, 2, 1), promote=False, search=STUMP)
    with pytest.raises(ConfigError, match="--start 2024-01-03 is after --end 2024-01-02"):
        train(config, date(2024, 1, 3), date(2024, 1, 2), promote=False, search=STUMP)


def test_a_holdout_with_one_class_is_refused(tmp_path: Path) -> None:
    day = synthetic.generate_snapshot(200, FIRST, seed=1)
    last = synthetic.generate_snapshot(200, date(2024, 1, 2), seed=2)
    last = last.set_column(
        last.schema.get_field_index("churned"), "churned", pa.array(["No"] * last.num_rows)
    )
    root = tmp_path / "snapshots"
    synthetic.write_parquet([(FIRST, day), (date(2024, 1, 2), last)], root)
    config = make_config(tmp_path, root)
    with pytest.raises(ConfigError, match=r"the holdout \(2024-01-02\) has only one label class"):
        train(config, None, None, promote=False, search=STUMP)


# -- reading and splitting --------------------------------------------------------------------


class FakeSource:
    def __init__(self, batches: list[pa.Table]) -> None:
        self.batches = batches

    def describe(self) -> str:
        return "fake"

    def read_range(
        self, start: date | None, end: date | None, *, label: bool = True
    ) -> Iterator[pa.RecordBatch]:
        for table in self.batches:
            yield from table.to_batches()


@pytest.fixture(scope="module")
def contract() -> ContractConfig:
    return load_config(PROJECT_ROOT / "configs" / "default.toml").contract


def two_days() -> pa.Table:
    """The same 50 customers on two dates, in one batch."""
    first = synthetic.generate_snapshot(50, FIRST, seed=1)
    second = synthetic.generate_snapshot(50, date(2024, 1, 2), seed=1)
    return pa.concat_tables([second, first])


def test_duplicates_are_judged_per_customer_and_date(contract: ContractConfig) -> None:
    both = two_days()
    copy = both.slice(0, 1)  # customer 1 on 2024-01-02, again, in a later batch
    data = read_labelled(FakeSource([both, copy]), contract, None, None)
    assert data.rows_read == 101
    assert data.rejected == 2  # both copies: neither can be trusted
    assert data.reasons == {DUPLICATE_ID: 2}
    assert data.table.num_rows == 99  # the same customer on two dates is not a duplicate
    dates = data.table[contract.date_column].to_pylist()
    assert dates == sorted(dates)


def test_too_many_duplicates_is_a_contract_violation(contract: ContractConfig) -> None:
    both = two_days()
    with pytest.raises(TooManyInvalidRows):
        read_labelled(FakeSource([both, both.slice(0, 10)]), contract, None, None)


def test_rows_without_a_label_are_dropped_and_counted(contract: ContractConfig) -> None:
    both = two_days()
    labels = both["churned"].to_pylist()
    labels[:7] = [None] * 7
    unlabelled = both.set_column(
        both.schema.get_field_index("churned"), "churned", pa.array(labels)
    )
    data = read_labelled(FakeSource([unlabelled]), contract, None, None)
    assert (data.unlabelled, data.rejected, data.table.num_rows) == (7, 0, 93)
    assert "(missing)" in data.label_values


def test_the_fingerprint_ignores_row_order_but_not_labels(contract: ContractConfig) -> None:
    both = two_days()
    shuffled = both.take(np.random.default_rng(0).permutation(both.num_rows))
    one = read_labelled(FakeSource([both]), contract, None, None)
    two = read_labelled(
        FakeSource([shuffled.slice(0, 30), shuffled.slice(30)]), contract, None, None
    )
    assert data_fingerprint(one.table, contract) == data_fingerprint(two.table, contract)
    flipped = both.set_column(
        both.schema.get_field_index("churned"),
        "churned",
        pa.array(["Yes", *both["churned"].to_pylist()[1:]]),
    )
    three = read_labelled(FakeSource([flipped]), contract, None, None)
    if both["churned"][0].as_py() != "Yes":
        assert data_fingerprint(three.table, contract) != data_fingerprint(one.table, contract)


def days(*counts: int) -> pa.Array:
    values = [date(2024, 1, 1 + i) for i, n in enumerate(counts) for _ in range(n)]
    return pa.array(values, pa.date32())


def test_the_holdout_is_the_latest_whole_dates() -> None:
    labels = np.tile(np.array([0, 1], dtype=np.int8), 300)
    split = split_holdout(days(100, 100, 100, 100, 100, 100), labels, TrainingConfig())
    assert (split.kind, split.first, split.last) == ("time", date(2024, 1, 6), date(2024, 1, 6))
    assert split.holdout.tolist() == [False] * 500 + [True] * 100
    wide = split_holdout(
        days(100, 100, 100, 100, 100, 100), labels, TrainingConfig(holdout_fraction=0.35)
    )
    assert (wide.first, wide.last, int(wide.holdout.sum())) == (
        date(2024, 1, 5),
        date(2024, 1, 6),
        200,
    )
    # At least one date is always left to train on.
    two = split_holdout(days(10, 10), labels[:20], TrainingConfig(holdout_fraction=0.9))
    assert int(two.holdout.sum()) == 10


def test_one_date_gets_a_stratified_random_holdout() -> None:
    labels = np.array([1] * 100 + [0] * 300, dtype=np.int8)
    split = split_holdout(days(400), labels, TrainingConfig(holdout_fraction=0.25, seed=3))
    assert split.kind == "random"
    assert int(split.holdout.sum()) == 100
    assert int(labels[split.holdout].sum()) == 25  # the same churn rate as the whole
    again = split_holdout(days(400), labels, TrainingConfig(holdout_fraction=0.25, seed=3))
    assert np.array_equal(split.holdout, again.holdout)


def test_card_json_is_plain(trained: tuple[Config, TrainResult]) -> None:
    config, _ = trained
    path = Registry.from_config(config.model).home / "v1" / "card.json"
    json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-JSON {name}"))

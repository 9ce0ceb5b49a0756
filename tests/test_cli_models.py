"""`churn-batch train` and `churn-batch models ...`: output, and exit codes on failure."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
import sklearn
import sqlalchemy as sa
from typer.testing import CliRunner, Result

import churn_batch.cli.models  # noqa: F401  (registers the commands)
from churn_batch import synthetic, training
from churn_batch.cli.app import app
from churn_batch.config import PROJECT_ROOT
from churn_batch.model import BOOSTING, SearchSpace
from churn_batch.registry import CARD_FILE, MODEL_FILE

FAST = SearchSpace(logistic_c=(1.0,), boosting={"max_leaf_nodes": (7,)}, boosting_max_iter=60)
STUMP = SearchSpace(
    candidates=(BOOSTING,),
    boosting={"max_leaf_nodes": (2,), "learning_rate": (0.01,)},
    boosting_max_iter=1,
)
runner = CliRunner()


def write_config(directory: Path, database: Path) -> Path:
    """The default config with the snapshots in `database` and models under `directory`."""
    text = (PROJECT_ROOT / "configs" / "default.toml").read_text()
    text = text.replace("sqlite:///../data/churn.db", f"sqlite:///{database}", 1)
    text = text.replace("sqlite:///../data/churn.db", f"sqlite:///{directory / 'out.db'}", 1)
    text = text.replace('registry = "../models"', f'registry = "{directory / "models"}"')
    path = directory / "config.toml"
    path.write_text(text)
    return path


def invoke(config: Path, *args: str) -> Result:
    return runner.invoke(app, ["--config", str(config), *args])


ORIGINAL_TRAIN = training.train


@pytest.fixture
def fast_training(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny grids: these tests are about the command, not about tuning."""
    with monkeypatch.context() as patch:
        patch.setattr(training, "train", functools.partial(ORIGINAL_TRAIN, search=FAST))
        yield


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    """A SQLite snapshot table and a registry holding v1, the champion."""
    root = tmp_path_factory.mktemp("cli")
    database = root / "snapshots.db"
    engine = sa.create_engine(f"sqlite:///{database}")
    synthetic.write_sql(synthetic.generate_snapshots(1200, date(2024, 1, 1), 4, seed=5), engine)
    engine.dispose()
    config = write_config(root, database)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "train", functools.partial(ORIGINAL_TRAIN, search=FAST))
        result = invoke(config, "train", "--promote")
    return root, result


@pytest.fixture
def config(first_run: tuple[Path, Result], tmp_path: Path) -> Path:
    """A private copy of the registry, so each test may change it."""
    root, _ = first_run
    shutil.copytree(root / "models", tmp_path / "models")
    return write_config(tmp_path, root / "snapshots.db")


def models_home(config: Path) -> Path:
    return config.parent / "models" / "churn"


def error_line(result: Result) -> str:
    return result.stderr.strip().splitlines()[-1]


# -- train -----------------------------------------------------------------------------------


def test_train_reports_candidates_and_promotion(first_run: tuple[Path, Result]) -> None:
    _, result = first_run
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Registered churn v1: ")
    assert "holdout 2024-01-04 (1,200 rows)" in lines[0]
    assert lines[1].split() == [
        "model", "ROC", "AUC", "PR", "AUC", "log", "loss", "Brier",
        "prec@10%", "lift@10%", "lift@20%",
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[2:5]] == [
        "logistic_regression",
        "hist_gradient_boosting",
        "registered",
    ]
    assert lines[5] == "Promoted: v1 is the first champion"


def test_train_without_promote_registers_a_challenger(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training, "train", functools.partial(ORIGINAL_TRAIN, search=STUMP))
    result = invoke(config, "train", "--start", "2024-01-02", "--end", "2024-01-04")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == (
        "Not promoted: trained without --promote; v2 is the challenger"
    )


def test_train_with_a_bad_date_is_a_usage_error(config: Path) -> None:
    result = invoke(config, "train", "--start", "2024-13-01")
    assert result.exit_code == 2
    assert error_line(result) == (
        "Error: invalid date '2024-13-01': use YYYY-MM-DD, 'today' or 'yesterday'"
    )


def test_train_on_dates_without_rows_exits_3(config: Path) -> None:
    result = invoke(config, "train", "--start", "2030-01-01", "--end", "2030-01-31")
    assert result.exit_code == 3
    assert error_line(result).startswith("Error: no snapshot rows for 2030-01-01..2030-01-31 in ")


# -- models list / show ------------------------------------------------------------------------


def test_models_list(config: Path) -> None:
    result = invoke(config, "models", "list")
    assert result.exit_code == 0, result.output
    header, row = result.stdout.splitlines()
    assert header.split() == ["version", "created", "(UTC)", "winner", "ROC", "AUC", "aliases"]
    assert row.split()[0] == "v1"
    assert row.split()[-1] == "champion"


def test_models_list_on_an_empty_registry(tmp_path: Path, first_run: tuple[Path, Result]) -> None:
    root, _ = first_run
    result = invoke(write_config(tmp_path, root / "snapshots.db"), "models", "list")
    assert result.exit_code == 0
    assert result.stdout == f"No model versions in {tmp_path / 'models' / 'churn'}\n"


def test_models_show_summary_and_json(config: Path) -> None:
    result = invoke(config, "models", "show", "champion")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "churn v1 (champion)"
    labels = [line.split()[0] for line in lines[1:10]]
    assert labels == [
        "created", "trained", "fingerprint", "holdout", "winner",
        "calibration", "risk", "libraries", "artifact",
    ]  # fmt: skip
    as_json = invoke(config, "models", "show", "v1", "--json")
    card = json.loads(as_json.stdout)
    assert card["version"] == "v1"
    assert card == json.loads((models_home(config) / "v1" / CARD_FILE).read_text())


def test_models_show_unknown_or_unsafe_versions_exit_6(config: Path) -> None:
    missing = invoke(config, "models", "show", "v9")
    assert missing.exit_code == 6
    assert error_line(missing) == (
        f"Error: model version v9 not found in {models_home(config)} (versions: v1)"
    )
    unsafe = invoke(config, "models", "show", "../../etc")
    assert unsafe.exit_code == 6
    assert error_line(unsafe).startswith("Error: invalid model reference '../../etc'")


# -- promote / rollback -------------------------------------------------------------------------


def test_promote_and_rollback(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "train", functools.partial(ORIGINAL_TRAIN, search=STUMP))
    assert invoke(config, "train").exit_code == 0  # v2, the challenger

    promoted = invoke(config, "models", "promote", "challenger", "--reason", "A/B test won")
    assert (promoted.exit_code, promoted.stdout) == (0, "champion: v1 -> v2\n")
    again = invoke(config, "models", "promote", "v2")
    assert again.stdout == "v2 is already champion\n"
    state = json.loads((models_home(config) / "registry.json").read_text())
    assert state["aliases"] == {"champion": "v2"}
    assert state["history"][-1]["reason"] == "A/B test won"

    back = invoke(config, "models", "rollback")
    assert (back.exit_code, back.stdout) == (0, "champion: v2 -> v1 (rolled back)\n")
    nothing = invoke(config, "models", "rollback")
    assert nothing.exit_code == 6
    assert error_line(nothing) == (
        f"Error: no previous champion to roll back to in {models_home(config) / 'registry.json'}"
    )


def test_a_tampered_artifact_exits_6(config: Path, fast_training: None) -> None:
    path = models_home(config) / "v1" / MODEL_FILE
    path.write_bytes(path.read_bytes() + b"tampered")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    recorded = json.loads((path.parent / CARD_FILE).read_text())["model_sha256"]
    message = (
        f"{path} was modified after registration: its sha256 is {actual}, the card records "
        f"{recorded}; refusing to load it: restore v1 from a backup or retrain (churn-batch train)"
    )
    promote = invoke(config, "models", "promote", "v1")
    assert promote.exit_code == 6
    assert error_line(promote) == f"Error: {message}"
    # Training to replace it refuses before fitting anything: there is nothing to compare with.
    train = invoke(config, "train", "--promote")
    assert train.exit_code == 6
    assert error_line(train) == (
        f"Error: cannot compare with the current champion: {message}. Train without "
        "--promote, or fix the champion (churn-batch models rollback / models promote V)"
    )
    assert sorted(p.name for p in models_home(config).glob("v*")) == ["v1"]


def test_another_scikit_learn_version_exits_6_naming_both(config: Path) -> None:
    card_path = models_home(config) / "v1" / CARD_FILE
    card = json.loads(card_path.read_text())
    card["libraries"]["sklearn"] = "1.0.2"
    card_path.write_text(json.dumps(card))
    # Signed as if that environment had registered it: this check comes after the signature.
    assert invoke(config, "models", "sign", "v1", "--yes").exit_code == 0
    result = invoke(config, "models", "promote", "v1")
    assert result.exit_code == 6
    assert error_line(result) == (
        f"Error: model v1 was trained with scikit-learn 1.0.2 but this environment has "
        f"scikit-learn {sklearn.__version__}; a pickled model is only safe with the version "
        "that wrote it: retrain (churn-batch train) or install scikit-learn==1.0.2"
    )


# -- help ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "summary"),
    [
        (["train"], "Fit candidate models on labelled snapshots and register the best"),
        (["models"], "Inspect the model registry"),
        (["models", "list"], "List the registered versions"),
        (["models", "show"], "Show a version's model card"),
        (["models", "promote"], "Make a version the champion"),
        (["models", "rollback"], "Return the champion to the version"),
        (["models", "sign"], "Sign a version with this machine's registry key"),
    ],
)
def test_every_command_has_help(command: list[str], summary: str) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert f"Usage: churn-batch {' '.join(command)}" in text
    assert summary in text

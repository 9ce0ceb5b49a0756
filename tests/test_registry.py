"""The registry: immutable versions, atomic writes, verified loads, champion moves."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import sklearn

from churn_batch import registry as registry_module
from churn_batch import synthetic
from churn_batch.config import PROJECT_ROOT, ContractConfig, load_config
from churn_batch.contract import LABEL, check_batch, features_frame
from churn_batch.errors import ModelError
from churn_batch.model import logistic_pipeline
from churn_batch.registry import (
    CARD_FILE,
    MODEL_FILE,
    SIGNATURE_FILE,
    STATE_FILE,
    Registry,
    library_versions,
)


@pytest.fixture(scope="module")
def contract() -> ContractConfig:
    return load_config(PROJECT_ROOT / "configs" / "default.toml").contract


@pytest.fixture(scope="module")
def fitted(contract: ContractConfig) -> tuple[Any, Any]:
    """A small fitted pipeline and the frame it was fitted on."""
    valid = check_batch(synthetic.generate_snapshot(400, date(2024, 1, 1)), contract, label=True)
    frame = features_frame(valid.valid, contract)
    pipeline = logistic_pipeline(contract.numeric, contract.categorical)
    pipeline.fit(frame, valid.valid[LABEL].to_numpy())
    return pipeline, frame


def card_for(contract: ContractConfig, **extra: Any) -> dict[str, Any]:
    return {
        "created_at": "2024-01-02T00:00:00+00:00",
        "winner": "logistic_regression",
        "contract": {"numeric": list(contract.numeric), "categorical": list(contract.categorical)},
        "metrics": {"roc_auc": 0.8},
        "thresholds": {"high": 0.6, "medium": 0.3},
        "libraries": library_versions(),
        **extra,
    }


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models", "churn")


@pytest.fixture
def three(registry: Registry, fitted: tuple[Any, Any], contract: ContractConfig) -> Registry:
    for _ in range(3):
        registry.register(fitted[0], card_for(contract))
    return registry


def resign(registry: Registry, version: str) -> None:
    """Sign a version's current files, as `churn-batch models sign` does."""
    files = registry.files(version)
    registry.sign(
        version, model_sha256=files.model_sha256, card_sha256=files.card_sha256, reason="test"
    )


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# -- writing -------------------------------------------------------------------------------


def test_versions_are_numbered_and_complete(
    registry: Registry, fitted: tuple[Any, Any], contract: ContractConfig
) -> None:
    assert registry.register(fitted[0], card_for(contract)) == "v1"
    assert registry.register(fitted[0], card_for(contract)) == "v2"
    assert registry.versions() == ["v1", "v2"]
    assert entries(registry.home / "v2") == [CARD_FILE, MODEL_FILE, SIGNATURE_FILE]
    card = json.loads((registry.home / "v2" / CARD_FILE).read_text())
    assert card["version"] == "v2"
    digest = hashlib.sha256((registry.home / "v2" / MODEL_FILE).read_bytes()).hexdigest()
    assert card["model_sha256"] == digest
    # Nothing besides versions and the lock file: no leftovers from staging.
    assert entries(registry.home) == [".lock", "v1", "v2"]


def test_a_crash_while_pickling_leaves_no_version(
    registry: Registry,
    fitted: tuple[Any, Any],
    contract: ContractConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry.register(fitted[0], card_for(contract))
    registry.promote("v1", reason="first")
    state_before = registry.state_path.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(registry_module.joblib, "dump", crash)
    with pytest.raises(OSError, match="disk full"):
        registry.register(fitted[0], card_for(contract))
    assert entries(registry.home) == [".lock", STATE_FILE, "v1"]
    assert registry.state_path.read_bytes() == state_before


def test_a_crash_at_the_final_rename_leaves_no_version(
    registry: Registry,
    fitted: tuple[Any, Any],
    contract: ContractConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_replace = os.replace

    def crash_on_directories(src: Any, dst: Any) -> None:
        if Path(src).is_dir():
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(registry_module.os, "replace", crash_on_directories)
    with pytest.raises(OSError, match="power cut"):
        registry.register(fitted[0], card_for(contract))
    assert registry.versions() == []
    assert entries(registry.home) == [".lock"]


def test_a_crash_while_moving_an_alias_keeps_the_old_aliases(
    three: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    three.promote("v1", reason="first")
    before = three.state_path.read_bytes()

    def crash(src: Any, dst: Any) -> None:
        raise OSError("killed")

    monkeypatch.setattr(registry_module.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        three.promote("v2", reason="second")
    assert three.state_path.read_bytes() == before
    assert three.aliases() == {"champion": "v1"}
    assert not [name for name in entries(three.home) if name.startswith(".registry")]


def test_a_version_is_never_overwritten(
    registry: Registry, fitted: tuple[Any, Any], contract: ContractConfig
) -> None:
    (registry.home / "v1").mkdir(parents=True)
    (registry.home / "v1" / CARD_FILE).write_text("{}")
    (registry.home / "v1" / "notes.txt").write_text("hand-made")
    assert registry.register(fitted[0], card_for(contract)) == "v2"
    assert (registry.home / "v1" / "notes.txt").read_text() == "hand-made"


# -- loading -------------------------------------------------------------------------------


def test_load_round_trips_by_version_and_alias(
    three: Registry, fitted: tuple[Any, Any], contract: ContractConfig
) -> None:
    three.promote("v2", reason="test")
    loaded = three.load("champion", contract)
    assert loaded.version == "v2"
    assert loaded.thresholds == {"high": 0.6, "medium": 0.3}
    pipeline, frame = fitted
    expected = pipeline.predict_proba(frame)[:, 1]
    np.testing.assert_array_equal(loaded.predict_proba(frame), expected)
    # Extra or reordered columns do not matter: the model selects its own features.
    shuffled = frame[list(reversed(frame.columns))].assign(customer_id="x")
    np.testing.assert_array_equal(loaded.predict_proba(shuffled), expected)


def test_a_tampered_artifact_is_refused_before_unpickling(
    three: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = three.home / "v1" / MODEL_FILE
    path.write_bytes(path.read_bytes() + b"\0")

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickled a tampered file")

    monkeypatch.setattr(registry_module.joblib, "load", never)
    with pytest.raises(ModelError, match="was modified after registration") as info:
        three.load("v1")
    assert str(path) in str(info.value)


def test_another_scikit_learn_version_is_refused_naming_both(three: Registry) -> None:
    card_path = three.home / "v1" / CARD_FILE
    card = json.loads(card_path.read_text())
    card["libraries"]["sklearn"] = "0.24.2"
    card_path.write_text(json.dumps(card))
    resign(three, "v1")  # as if that environment had registered it: the check after the signature
    with pytest.raises(ModelError) as info:
        three.load("v1")
    assert "scikit-learn 0.24.2" in str(info.value)
    assert f"scikit-learn {sklearn.__version__}" in str(info.value)


def test_a_contract_with_other_features_is_refused(
    three: Registry, contract: ContractConfig
) -> None:
    changed = replace(
        contract,
        numeric=(*contract.numeric[:-1], "data_usage_gb"),
        categorical=(*contract.categorical, "senior_citizen_flag"),
    )
    with pytest.raises(ModelError) as info:
        three.load("v1", changed)
    message = str(info.value)
    assert "the config lacks feature(s) total_charges" in message
    assert "not trained on feature(s) data_usage_gb, senior_citizen_flag" in message
    moved = replace(
        contract,
        numeric=contract.numeric[1:],
        categorical=(contract.numeric[0], *contract.categorical),
    )
    with pytest.raises(ModelError, match="senior_citizen is numeric in the model but categorical"):
        three.load("v1", moved)


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("v9", "model version v9 not found"),
        ("staging", "no model version or alias 'staging'"),
        ("../v1", "invalid model reference"),
        ("v1/../../etc", "invalid model reference"),
        ("/etc/passwd", "invalid model reference"),
        ("..", "invalid model reference"),
    ],
)
def test_unknown_and_unsafe_references_are_model_errors(
    three: Registry, ref: str, message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        three.load(ref)


def test_an_alias_pointing_nowhere_names_the_registry_file(three: Registry) -> None:
    three.state_path.write_text(json.dumps({"aliases": {"champion": "v7"}, "history": []}))
    with pytest.raises(ModelError, match="points to v7, which does not exist") as info:
        three.load("champion")
    assert str(three.state_path) in str(info.value)
    three.state_path.write_text(json.dumps({"aliases": {"champion": "../x"}, "history": []}))
    with pytest.raises(ModelError, match=re.escape("invalid version '../x'")):
        three.load("champion")


def test_a_version_directory_leading_outside_the_registry_is_refused(
    three: Registry, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere"
    (three.home / "v3").rename(outside)
    (three.home / "v3").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ModelError, match=r"^refused: .*/v3 is a symlink out of the registry"):
        three.load("v3")


# -- aliases -------------------------------------------------------------------------------


def test_promote_and_rollback_walk_back_through_champions(three: Registry) -> None:
    for version in ("v1", "v2", "v3"):
        move = three.promote(version, reason=f"promote {version}")
    assert (move.previous, move.version) == ("v2", "v3")
    three.promote("v3", reason="again")  # already champion: no new history entry
    assert len(three.history()) == 3
    assert three.rollback().version == "v2"
    assert three.rollback().version == "v1"
    with pytest.raises(ModelError, match="no previous champion to roll back to"):
        three.rollback()
    assert three.champion() == "v1"
    actions = [(e["action"], e["version"], e["previous"]) for e in three.history()]
    assert actions[-2:] == [("rollback", "v2", "v3"), ("rollback", "v1", "v2")]


def test_the_challenger_alias_is_dropped_when_promoted(three: Registry) -> None:
    three.set_alias("challenger", "v2", reason="trained")
    three.promote("v2", reason="better")
    assert three.aliases() == {"champion": "v2"}
    with pytest.raises(ModelError, match="with promote or rollback"):
        three.set_alias("champion", "v1", reason="sneaky")


def test_promote_checks_the_model_loads(three: Registry) -> None:
    path = three.home / "v2" / MODEL_FILE
    path.write_bytes(b"not a pickle")
    with pytest.raises(ModelError, match="modified after registration"):
        three.promote("v2", reason="x")
    assert three.aliases() == {}


def test_summaries_list_versions_with_aliases(three: Registry) -> None:
    three.promote("v2", reason="x")
    three.set_alias("challenger", "v3", reason="y")
    rows = three.summaries()
    assert [(r.version, r.aliases, r.roc_auc, r.winner) for r in rows] == [
        ("v1", (), 0.8, "logistic_regression"),
        ("v2", ("champion",), 0.8, "logistic_regression"),
        ("v3", ("challenger",), 0.8, "logistic_regression"),
    ]


def test_cards_are_strict_json(
    registry: Registry, fitted: tuple[Any, Any], contract: ContractConfig
) -> None:
    card = card_for(contract, metrics={"roc_auc": float("nan")}, when=date(2024, 1, 1))
    registry.register(fitted[0], card)
    text = (registry.home / "v1" / CARD_FILE).read_text()
    stored = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON {name}"))
    assert stored["metrics"] == {"roc_auc": None}
    assert stored["when"] == "2024-01-01"
    assert joblib.load(registry.home / "v1" / MODEL_FILE) is not None

"""What the registry trusts: a signature made with a key outside it, checked before unpickling.

Every attack here is made by someone who can write the registry's files (and so can
recompute any sha256 kept there) but cannot read the key. Through the installed CLI, each
one must end in exit 6 with the real problem named, the published predictions exactly
as they were, the run recorded as failed, and nothing unpickled that the key did not sign.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
from datetime import date
from pathlib import Path
from typing import Any

import joblib
import pytest
from typer.testing import CliRunner, Result

from churn_batch import signing, synthetic
from churn_batch.cli import app
from churn_batch.config import Config
from churn_batch.contract import LABEL, check_batch, features_frame
from churn_batch.errors import ConfigError, ModelError
from churn_batch.model import logistic_pipeline
from churn_batch.registry import CARD_FILE, MODEL_FILE, SIGNATURE_FILE, STATE_FILE, Registry
from churn_batch.sinks import Sink

from .scoring_fixtures import LAST, copy_project, predictions, run_cli

runner = CliRunner()


@pytest.fixture(scope="module")
def published(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The template project with LAST's predictions published by its signed champion."""
    config = copy_project(template, tmp_path_factory.mktemp("published"))
    result = score(config)
    assert result.returncode == 0, result.stderr
    return config.path


@pytest.fixture
def project(published: Path, tmp_path: Path) -> Config:  # shadows conftest's: published
    return copy_project(published, tmp_path / "project")


def score(config: Config, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run_cli("--config", str(config.path), "score", "--date", LAST.isoformat(), **kwargs)


def cli(config: Config, *args: str) -> Result:
    """Commands whose exit code is not the point, in-process (a subprocess costs seconds)."""
    return runner.invoke(app, ["--config", str(config.path), *args])


def db(config: Config) -> Path:
    return config.path.parent / "data" / "churn.db"


def version_dir(config: Config, version: str = "v1") -> Path:
    return config.model.registry / "churn" / version


def last_run(config: Config) -> dict[str, Any]:
    with Sink(config.sink) as sink:
        return sink.runs(limit=1)[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def replace_model(config: Config, data: bytes) -> Path:
    """Put `data` in v1's model.joblib and, as an attacker would, its sha256 in the card."""
    directory = version_dir(config)
    (directory / MODEL_FILE).write_bytes(data)
    card = json.loads((directory / CARD_FILE).read_text())
    card["model_sha256"] = sha256(data)
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return directory / MODEL_FILE


def assert_refused(config: Config, before: list[Any], error: str, **kwargs: Any) -> None:
    """Exit 6 with `error` as the whole message; nothing published; the run failed."""
    result = score(config, **kwargs)
    assert result.returncode == 6, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"Error: {error}"
    assert predictions(db(config)) == before
    run = last_run(config)
    assert (run["status"], run["error"]) == ("failed", error)


class WritesAFile:
    """Unpickling this creates `path`: the proof that a pickle's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def fewer_features_model(config: Config) -> bytes:
    """A real fitted pipeline, but on 2 numeric and 3 categorical features only."""
    contract = config.contract
    batch = synthetic.generate_snapshot(300, date(2024, 1, 1))
    valid = check_batch(batch, contract, label=True).valid
    numeric, categorical = contract.numeric[:2], contract.categorical[:3]
    frame = features_frame(valid, contract)[[*numeric, *categorical]]
    pipeline = logistic_pipeline(numeric, categorical).fit(frame, valid[LABEL].to_numpy())
    path = config.path.parent / "other.joblib"
    joblib.dump(pipeline, path)
    return path.read_bytes()


def sign(config: Config, version: str = "v1") -> None:
    """What a person who wrongly trusted the files would do."""
    result = cli(config, "models", "sign", version, "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"Signed {version}"


# -- files changed beside the model ------------------------------------------------------------


def test_a_modified_model_file_is_refused(project: Config) -> None:
    before = predictions(db(project))
    path = version_dir(project) / MODEL_FILE
    recorded = sha256(path.read_bytes())
    path.write_bytes(path.read_bytes() + b"\0")
    assert_refused(
        project,
        before,
        f"{path} was modified after registration: its sha256 is {sha256(path.read_bytes())}, "
        f"the card records {recorded}; refusing to load it: restore v1 from a backup or "
        "retrain (churn-batch train)",
    )


def test_a_malicious_pickle_with_its_hash_in_the_card_is_never_unpickled(
    project: Config, tmp_path: Path
) -> None:
    # The payload works: loading it the way the registry would creates its file.
    proof = tmp_path / "proof"
    joblib.load(_dumped(WritesAFile(proof), tmp_path / "probe.joblib")).close()
    assert proof.exists()

    before = predictions(db(project))
    marker = tmp_path / "pwned"
    replace_model(project, pickle.dumps(WritesAFile(marker)))
    assert_refused(
        project,
        before,
        "model v1's signature does not match its files (model.joblib and card.json were "
        "changed after signing); refusing to load it: restore the version from a backup or "
        "retrain (churn-batch train)",
    )
    assert not marker.exists()
    for command in (("models", "promote", "v1"), ("train", "--promote")):
        result = cli(project, *command)
        assert result.exit_code == 6, result.output
        assert not marker.exists()
    show = cli(project, "models", "show", "v1")  # reads the card, never the pickle
    assert show.exit_code == 0, show.output
    assert "signature     model v1's signature does not match its files" in show.stdout
    assert not marker.exists()


def _dumped(value: object, path: Path) -> Path:
    path.write_bytes(pickle.dumps(value))
    return path


def test_an_edited_card_is_refused(project: Config) -> None:
    """The card decides tiers and the features scored: it is signed as much as the model."""
    path = version_dir(project) / CARD_FILE
    card = json.loads(path.read_text())
    card["thresholds"]["high"] = 0.0  # everyone "high risk"
    path.write_text(json.dumps(card, indent=2) + "\n")
    with pytest.raises(ModelError) as info:
        Registry.from_config(project.model).load("champion", project.contract)
    assert str(info.value) == (
        "model v1's signature does not match its files (card.json was changed after "
        "signing); refusing to load it: restore the version from a backup or retrain "
        "(churn-batch train)"
    )


def test_a_model_on_fewer_features_is_refused_signed_or_not(project: Config) -> None:
    before = predictions(db(project))
    path = replace_model(project, fewer_features_model(project))
    with pytest.raises(ModelError, match=r"^model v1's signature does not match its files"):
        Registry.from_config(project.model).load("champion")
    # Even signed by mistake, the model's own features are checked before any row is scored.
    sign(project)
    assert_refused(
        project,
        before,
        "model v1 cannot score for its card: it was fitted on 5 feature(s) where the card "
        "lists 19 (it was not fitted on monthly_charges, total_charges, phone_service, "
        "multiple_lines, internet_service, online_security, online_backup, "
        "device_protection, tech_support, streaming_tv, streaming_movies, contract, "
        f"paperless_billing, payment_method) ({path}); retrain (churn-batch train) or "
        "promote another version",
    )


def test_a_pickled_dict_is_refused_signed_or_not(project: Config) -> None:
    before = predictions(db(project))
    path = replace_model(project, pickle.dumps({"coef": [1.0, 2.0]}))
    with pytest.raises(ModelError, match=r"^model v1's signature does not match its files"):
        Registry.from_config(project.model).load("champion")
    sign(project)
    assert_refused(
        project,
        before,
        "model v1 cannot score for its card: it is a builtins.dict, not a scikit-learn "
        f"classifier ({path}); retrain (churn-batch train) or promote another version",
    )


def test_an_unsigned_version_is_refused_until_a_person_signs_it(project: Config) -> None:
    before = predictions(db(project))
    (version_dir(project) / SIGNATURE_FILE).unlink()
    assert_refused(
        project,
        before,
        "model v1 is not signed (registered before signing existed, or not by this "
        "registry); refusing to load it: if you have checked that these files are the ones "
        "the registry wrote, `churn-batch models sign v1` signs them with this key; "
        "otherwise retrain (churn-batch train)",
    )
    unconfirmed = cli(project, "models", "sign", "v1")  # stdin is not a terminal here
    assert unconfirmed.exit_code == 2
    assert unconfirmed.stderr.strip() == "Error: not signed: confirm in a terminal, or pass --yes"
    sign(project)
    again = cli(project, "models", "sign", "v1")
    assert again.stdout == "v1 is already signed with this machine's registry key\n"
    assert score(project).returncode == 0
    history = json.loads((project.model.registry / "churn" / STATE_FILE).read_text())["history"]
    assert (history[-1]["action"], history[-1]["version"]) == ("sign", "v1")


# -- the registry's own structure -----------------------------------------------------------------


def test_an_alias_to_a_missing_version_is_refused(project: Config) -> None:
    before = predictions(db(project))
    state = project.model.registry / "churn" / STATE_FILE
    data = json.loads(state.read_text())
    data["aliases"]["champion"] = "v7"
    state.write_text(json.dumps(data))
    assert_refused(
        project,
        before,
        f"{state}: alias 'champion' points to v7, which does not exist (versions: v1); "
        "point it at a version with `churn-batch models promote V` or `models rollback`",
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"aliases": {"champion": "v1"', "cannot be read: Expecting"),
        ('["v1"]', "is not a registry file (aliases, history)"),
    ],
)
def test_a_broken_registry_file_is_refused(project: Config, text: str, problem: str) -> None:
    before = predictions(db(project))
    state = project.model.registry / "churn" / STATE_FILE
    state.write_text(text)
    result = score(project)
    assert result.returncode == 6, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: {state} {problem}")
    assert predictions(db(project)) == before
    assert last_run(project)["status"] == "failed"


def test_a_version_directory_linked_out_of_the_registry_is_refused(
    project: Config, tmp_path: Path
) -> None:
    before = predictions(db(project))
    inside = version_dir(project)
    outside = tmp_path / "elsewhere" / "v1"
    outside.parent.mkdir()
    inside.rename(outside)
    inside.symlink_to(outside, target_is_directory=True)
    assert_refused(
        project,
        before,
        f"refused: {inside} is a symlink out of the registry (to {outside}); the registry "
        "reads only the files it wrote: replace the link by the version's own files, or retrain",
    )


def link_out(config: Config, name: str, tmp_path: Path) -> tuple[Path, Path]:
    inside = version_dir(config) / name
    outside = tmp_path / name
    shutil.copyfile(inside, outside)  # the same bytes: only the link is wrong
    inside.unlink()
    inside.symlink_to(outside)
    return inside, outside


def test_a_model_file_linked_out_of_the_registry_is_refused(
    project: Config, tmp_path: Path
) -> None:
    before = predictions(db(project))
    inside, outside = link_out(project, MODEL_FILE, tmp_path)
    assert_refused(
        project,
        before,
        f"refused: {inside} is a symlink out of the registry (to {outside}); the registry "
        "reads only the files it wrote: replace the link by the version's own files, or retrain",
    )


@pytest.mark.parametrize("name", [CARD_FILE, SIGNATURE_FILE, STATE_FILE])
def test_other_files_linked_out_of_the_registry_are_refused(
    project: Config, tmp_path: Path, name: str
) -> None:
    if name == STATE_FILE:
        inside = project.model.registry / "churn" / STATE_FILE
        outside = tmp_path / STATE_FILE
        shutil.copyfile(inside, outside)
        inside.unlink()
        inside.symlink_to(outside)
    else:
        inside, outside = link_out(project, name, tmp_path)
    with pytest.raises(ModelError) as info:
        Registry.from_config(project.model).load("champion", project.contract)
    assert str(info.value) == (
        f"refused: {inside} is a symlink out of the registry (to {outside}); the registry "
        "reads only the files it wrote: replace the link by the version's own files, or retrain"
    )


# -- the key ------------------------------------------------------------------------------------


def test_another_key_refuses_the_model_and_no_key_is_ever_shown(
    project: Config, registry_key: str
) -> None:
    before = predictions(db(project))
    other = "a-different-registry-key-0123456789abcdef"
    env = {**os.environ, signing.KEY_ENV: other}
    ours = signing.RegistryKey(registry_key.encode(), "test").key_id
    theirs = signing.RegistryKey(other.encode(), "test").key_id
    assert_refused(
        project,
        before,
        f"model v1 was signed with another registry key (key id {ours}; this environment's "
        f"key from {signing.KEY_ENV} has id {theirs}); refusing to load it: use the key that "
        "registered it, or if you have checked that these files are the ones the registry "
        "wrote, `churn-batch models sign v1` signs them with this key; otherwise retrain "
        "(churn-batch train)",
        env=env,
    )
    shown = runner.invoke(app, ["--config", str(project.path), "models", "show", "v1"], env=env)
    ok = score(project)  # the right key, from the environment
    assert ok.returncode == 0, ok.stderr
    assert "signature     model v1 was signed with another registry key" in shown.stdout
    outputs = [shown.output, ok.stdout, ok.stderr, json.dumps(last_run(project), default=str)]
    for text in outputs:
        assert registry_key not in text and other not in text


def test_a_short_key_in_the_environment_is_a_config_error(project: Config) -> None:
    result = score(project, env={**os.environ, signing.KEY_ENV: "hunter2hunter2"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {signing.KEY_ENV} is set but holds 14 characters; a registry key needs at "
        "least 32 (e.g. the output of `openssl rand -hex 32`)"
    )
    assert "hunter2" not in result.stderr


@pytest.fixture
def parts(project: Config) -> tuple[Any, dict[str, Any]]:
    """A fitted estimator and a card to register, loaded with the session key."""
    registry = Registry.from_config(project.model)
    card = registry.card("v1")
    return registry.load("v1").pipeline, {
        k: v for k, v in card.items() if k not in ("version", "model_sha256")
    }


@pytest.fixture
def key_file_only(
    parts: tuple[Any, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """No key in the environment: the key file under a private XDG_CONFIG_HOME."""
    monkeypatch.delenv(signing.KEY_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config" / "churn-batch" / "registry.key"


def test_without_a_key_nothing_loads_and_no_key_is_made(
    key_file_only: Path, parts: tuple[Any, dict[str, Any]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    registry = Registry(tmp_path / "models", "churn")
    monkeypatch.setenv(signing.KEY_ENV, "k" * 40)  # registered on a machine with a key
    registry.register(*parts)
    monkeypatch.delenv(signing.KEY_ENV)
    with pytest.raises(ModelError) as info:
        registry.load("v1")
    assert str(info.value) == (
        f"model v1 cannot be verified: there is no registry key ({signing.KEY_ENV} is not set "
        f"and {key_file_only} does not exist); use the key that registered it (set "
        f"{signing.KEY_ENV} or restore that file), or if you have checked that these files "
        "are the ones the registry wrote, `churn-batch models sign v1` signs them with this "
        "key; otherwise retrain (churn-batch train)"
    )
    assert not key_file_only.exists()  # a load never makes a key


def test_the_key_file_is_made_on_first_registration(
    key_file_only: Path, parts: tuple[Any, dict[str, Any]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    registry = Registry(tmp_path / "models", "churn")
    version = registry.register(*parts)
    assert stat.S_IMODE(key_file_only.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file_only.parent.stat().st_mode) == 0o700
    text = key_file_only.read_text()
    assert len(text.strip()) == 64 and int(text, 16) > 0
    assert registry.load(version).version == version
    assert registry.register(*parts) == "v2"  # the same key again, not a new one
    assert key_file_only.read_text() == text
    # The file and the variable hold the same kind of key: exporting it moves the key.
    monkeypatch.setenv(signing.KEY_ENV, text.strip())
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "nowhere"))
    assert registry.load(version).version == version
    monkeypatch.delenv(signing.KEY_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))

    key_file_only.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        registry.load(version)
    assert str(info.value) == (
        f"the registry key {key_file_only} is open to other users (mode 0644); run "
        f"`chmod 600 {key_file_only}`, and retrain if someone else may have read it"
    )


def test_a_key_file_inside_the_registry_is_refused(
    key_file_only: Path, parts: tuple[Any, dict[str, Any]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "models"))
    registry = Registry(tmp_path / "models", "churn")
    with pytest.raises(ConfigError, match="is inside the model registry"):
        registry.register(*parts)
    assert not (tmp_path / "models" / "churn-batch").exists()


def test_signing_refuses_files_that_changed_or_a_card_that_does_not_match(
    project: Config,
) -> None:
    registry = Registry.from_config(project.model)
    files = registry.files("v1")
    with pytest.raises(ModelError, match="changed while you were checking it; not signed"):
        registry.sign("v1", model_sha256="0" * 64, card_sha256=files.card_sha256, reason="x")
    (version_dir(project) / MODEL_FILE).write_bytes(b"something else")
    files = registry.files("v1")
    with pytest.raises(ModelError, match=r"does not describe this version's model\.joblib"):
        registry.sign(
            "v1", model_sha256=files.model_sha256, card_sha256=files.card_sha256, reason="x"
        )

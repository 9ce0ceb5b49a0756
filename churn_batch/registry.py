"""The model registry: immutable versions on disk and aliases that move atomically.

Layout under `<registry>/<name>/`:

- `v1/`, `v2/`, ...: `model.joblib` (the fitted estimator), `card.json` (what it is,
  how it was trained and evaluated, the sha256 of `model.joblib`) and `signature.json`
  (an HMAC of both files with a key kept outside the registry, see `signing`). A version
  directory is written under a hidden temporary name and renamed into place, so it is
  either complete or absent; afterwards only `models sign` replaces its signature.
- `registry.json`: `{"aliases": {"champion": "v3", ...}, "history": [...]}`, replaced
  atomically; the history lets `rollback` return the champion to its predecessor.

joblib is pickle, and unpickling runs code: `load` verifies the signature, then the
scikit-learn version, before unpickling; then checks that what it unpickled is a fitted
classifier of the card's features. It reads no link and nothing outside the registry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow
import sklearn

from churn_batch import signing
from churn_batch.config import ContractConfig, ModelConfig
from churn_batch.errors import ModelError
from churn_batch.model import estimator_problems, positive_scores

MODEL_FILE = signing.MODEL_FILE
CARD_FILE = signing.CARD_FILE
SIGNATURE_FILE = signing.SIGNATURE_FILE
STATE_FILE = "registry.json"
CHALLENGER = "challenger"

_VERSION = re.compile(r"^v([1-9][0-9]{0,8})$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


def library_versions() -> dict[str, str]:
    """The versions a pickled pipeline depends on, recorded in every card."""
    return {
        "python": platform.python_version(),
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pyarrow": pyarrow.__version__,
        "joblib": joblib.__version__,
    }


@dataclass(frozen=True)
class LoadedModel:
    """A verified, unpickled model version with its card."""

    version: str
    card: Mapping[str, Any]
    pipeline: Any

    @property
    def thresholds(self) -> dict[str, float]:
        """Risk-tier cut-offs: `high` and `medium` minimum scores."""
        raw = self.card["thresholds"]
        return {"high": float(raw["high"]), "medium": float(raw["medium"])}

    @property
    def features(self) -> list[str]:
        contract = self.card["contract"]
        return [*contract["numeric"], *contract["categorical"]]

    def predict_proba(self, frame: pd.DataFrame) -> npt.NDArray[np.float64]:
        """P(churn) per row of a `contract.features_frame` (extra columns are ignored)."""
        # Select in the training order: scikit-learn refuses reordered feature names.
        return positive_scores(self.pipeline, frame[self.features])


@dataclass(frozen=True)
class VersionSummary:
    version: str
    created_at: str
    winner: str
    roc_auc: float | None
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class AliasMove:
    alias: str
    version: str
    previous: str | None


class Registry:
    """One model name's versions and aliases under a registry directory."""

    def __init__(self, root: Path, name: str, *, champion: str = "champion") -> None:
        if not _ALIAS.match(name):
            raise ModelError(f"invalid model name {name!r}: use letters, digits, _ and -")
        _check_alias_name(champion)
        self.root = Path(root)
        self.name = name
        self.champion_alias = champion

    @classmethod
    def from_config(cls, config: ModelConfig) -> Registry:
        return cls(config.registry, config.name, champion=config.alias)

    @property
    def home(self) -> Path:
        return self.root / self.name

    @property
    def state_path(self) -> Path:
        return self.home / STATE_FILE

    # -- reading ------------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Complete versions, oldest first (temporary directories are not versions)."""
        if not self.home.is_dir():
            return []
        found = [p.name for p in self.home.iterdir() if _VERSION.match(p.name) and p.is_dir()]
        return sorted(found, key=_version_number)

    def aliases(self) -> dict[str, str]:
        return dict(self._state()["aliases"])

    def history(self) -> list[dict[str, Any]]:
        return list(self._state()["history"])

    def champion(self) -> str | None:
        """The champion's version, or None before the first promotion."""
        alias = self.champion_alias
        return self.resolve(alias) if alias in self.aliases() else None

    def resolve(self, ref: str) -> str:
        """The version a reference names: a version (`v3`) or an alias (`champion`)."""
        if _VERSION.match(ref):
            self._version_dir(ref)
            return ref
        _check_alias_name(ref)
        aliases = self.aliases()
        if ref not in aliases:
            known = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
            hint = "; train one with `churn-batch train --promote`" if ref == "champion" else ""
            raise ModelError(
                f"no model version or alias {ref!r} in {self.home} "
                f"(versions: {', '.join(self.versions()) or 'none'}; aliases: {known}){hint}"
            )
        target = aliases[ref]
        if not isinstance(target, str) or not _VERSION.match(target):
            raise ModelError(
                f"{self.state_path}: alias {ref!r} holds an invalid version {target!r}"
            )
        if not os.path.lexists(self.home / target):
            raise ModelError(
                f"{self.state_path}: alias {ref!r} points to {target}, which does not exist "
                f"(versions: {', '.join(self.versions()) or 'none'}); point it at a version "
                "with `churn-batch models promote V` or `models rollback`"
            )
        self._version_dir(target)  # exists, but may be refused (a link, incomplete)
        return target

    def card(self, ref: str) -> dict[str, Any]:
        """The version's card, unverified: for display only, never to decide a load."""
        version = self.resolve(ref)
        directory = self._version_dir(version)
        data = signing.read_inside(directory, CARD_FILE)
        if data is None:
            raise ModelError(f"{directory / CARD_FILE} is missing: version {version} is incomplete")
        return signing.parse_card(directory / CARD_FILE, data)

    def summaries(self) -> list[VersionSummary]:
        """One line per version for `models list`, oldest first."""
        by_version: dict[str, list[str]] = {}
        for alias, version in sorted(self.aliases().items()):
            by_version.setdefault(version, []).append(alias)
        rows = []
        for version in self.versions():
            card = self.card(version)
            auc = card.get("metrics", {}).get("roc_auc")
            rows.append(
                VersionSummary(
                    version=version,
                    created_at=str(card.get("created_at", "")),
                    winner=str(card.get("winner", "")),
                    roc_auc=float(auc) if isinstance(auc, int | float) else None,
                    aliases=tuple(by_version.get(version, [])),
                )
            )
        return rows

    def files(self, ref: str) -> signing.VersionFiles:
        """Read a version's card, model and signature once, refusing links."""
        version = self.resolve(ref)
        return signing.read_version(self._version_dir(version), version)

    def signature_problem(self, files: signing.VersionFiles) -> str | None:
        """Why the signature does not vouch for these files (None: it does)."""
        return signing.verify(files, self.name, self.root)

    def load(self, ref: str, contract: ContractConfig | None = None) -> LoadedModel:
        """Verify and unpickle a version; `contract`, when given, must match its features.

        Before unpickling: the signature over the model and card bytes (with the key
        from outside the registry), the scikit-learn version, the card's features against
        `contract`. After: the object is a fitted classifier of exactly those features.
        """
        files = self.files(ref)
        version, path = files.version, files.directory / MODEL_FILE
        card = signing.parse_card(files.directory / CARD_FILE, files.card_bytes)
        problem = self.signature_problem(files)
        if problem is not None:
            raise ModelError(problem)
        _check_sklearn(card, version)
        if contract is not None:
            _check_contract(card, contract, version)
        try:
            # From the bytes we verified, not the file again: it cannot change in between.
            pipeline = joblib.load(io.BytesIO(files.model_bytes))
        except Exception as exc:  # any unpickling failure means an unusable artifact
            raise ModelError(f"{path} cannot be loaded: {type(exc).__name__}: {exc}") from None
        loaded = LoadedModel(version=version, card=card, pipeline=pipeline)
        problems = estimator_problems(pipeline, loaded.features)
        if problems:
            raise ModelError(
                f"model {version} cannot score for its card: {'; '.join(problems)} "
                f"({path}); retrain (churn-batch train) or promote another version"
            )
        return loaded

    def sign(self, ref: str, *, model_sha256: str, card_sha256: str, reason: str) -> str:
        """Sign a version whose files a person checked, with this machine's key.

        The digests are what that person saw: if the files changed since, nothing is
        signed. Nothing is unpickled. Returns the version.
        """
        files = self.files(ref)
        if (files.model_sha256, files.card_sha256) != (model_sha256, card_sha256):
            raise ModelError(f"{files.directory} changed while you were checking it; not signed")
        card = signing.parse_card(files.directory / CARD_FILE, files.card_bytes)
        if card.get("model_sha256") != files.model_sha256 or card.get("version") != files.version:
            raise ModelError(
                f"{files.directory / CARD_FILE} does not describe this version's model.joblib "
                f"(sha256 {files.model_sha256}, version {files.version}); refusing to sign it"
            )
        key = signing.load_key(self.root, create=True)
        assert key is not None  # create=True makes one
        record = signing.signature_record(
            key, self.name, files.version, files.model_sha256, files.card_sha256
        )
        with self._locked():
            _write_json(files.directory / SIGNATURE_FILE, record)
            state = self._state()
            state["history"].append(
                {"at": datetime.now(UTC).isoformat(), "action": "sign", "alias": None,
                 "version": files.version, "previous": None, "reason": reason}
            )  # fmt: skip
            _write_json(self.state_path, state)
        return files.version

    # -- writing ------------------------------------------------------------------------

    def register(self, estimator: Any, card: Mapping[str, Any]) -> str:
        """Store a new version (the next `vN`) and return it; the card gains `version`
        and `model_sha256`, and the version a signature (a key is made if none exists)."""
        key = signing.load_key(self.root, create=True)
        assert key is not None  # create=True makes one
        self.home.mkdir(parents=True, exist_ok=True)
        with self._locked():
            staging = self.home / f".tmp-{uuid.uuid4().hex}"
            staging.mkdir()
            try:
                version = self._write_version(staging, estimator, card, key)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return version

    def _write_version(
        self, staging: Path, estimator: Any, card: Mapping[str, Any], key: signing.RegistryKey
    ) -> str:
        model_path = staging / MODEL_FILE
        with model_path.open("wb") as out:
            joblib.dump(estimator, out)
            out.flush()
            os.fsync(out.fileno())
        digest = _sha256_file(model_path)
        existing = self.versions()
        version = f"v{_version_number(existing[-1]) + 1 if existing else 1}"
        _write_json(staging / CARD_FILE, {"version": version, **card, "model_sha256": digest})
        card_digest = _sha256_file(staging / CARD_FILE)  # the exact bytes a load will read
        record = signing.signature_record(key, self.name, version, digest, card_digest)
        _write_json(staging / SIGNATURE_FILE, record)
        _fsync_dir(staging)
        final = self.home / version
        if final.exists():  # only a hand-made directory could be here: never replace it
            raise ModelError(f"{final} already exists; refusing to overwrite a model version")
        os.replace(staging, final)
        _fsync_dir(self.home)
        return version

    def promote(
        self,
        ref: str,
        *,
        reason: str,
        contract: ContractConfig | None = None,
        now: datetime | None = None,
    ) -> AliasMove:
        """Make `ref` the champion, after checking it loads (and fits `contract`)."""
        version = self.load(ref, contract).version
        return self._move(self.champion_alias, version, "promote", reason, now)

    def set_alias(
        self, alias: str, ref: str, *, reason: str, now: datetime | None = None
    ) -> AliasMove:
        """Point any alias other than the champion at a version."""
        _check_alias_name(alias)
        if alias == self.champion_alias:
            raise ModelError(f"move {alias!r} with promote or rollback, which check the model")
        return self._move(alias, self.resolve(ref), "alias", reason, now)

    def rollback(
        self,
        *,
        reason: str = "rollback",
        contract: ContractConfig | None = None,
        now: datetime | None = None,
    ) -> AliasMove:
        """Return the champion to the version that was champion before it."""
        stack = _champion_stack(self.history(), self.champion_alias)
        if len(stack) < 2:
            raise ModelError(
                f"no previous {self.champion_alias} to roll back to in {self.state_path}"
            )
        target = self.load(stack[-2], contract).version
        return self._move(self.champion_alias, target, "rollback", reason, now)

    def _move(
        self, alias: str, version: str, action: str, reason: str, now: datetime | None
    ) -> AliasMove:
        with self._locked():
            state = self._state()
            previous = state["aliases"].get(alias)
            if previous == version and action != "rollback":
                return AliasMove(alias, version, previous)
            state["aliases"][alias] = version
            if action != "alias" and state["aliases"].get(CHALLENGER) == version:
                del state["aliases"][CHALLENGER]  # a champion is no longer a challenger
            when = (now or datetime.now(UTC)).isoformat()
            state["history"].append(
                {
                    "at": when,
                    "action": action,
                    "alias": alias,
                    "version": version,
                    "previous": previous,
                    "reason": reason,
                }
            )
            _write_json(self.state_path, state)
        return AliasMove(alias, version, previous)

    # -- internals ------------------------------------------------------------------------

    def _version_dir(self, version: str) -> Path:
        """The directory of an existing version: a real directory inside the registry."""
        if not _VERSION.match(version):
            raise ModelError(f"invalid model version {version!r}: versions look like v3")
        if not self.home.resolve().is_relative_to(self.root.resolve()):
            raise ModelError(signing.refusal(self.home, self.root))
        path = self.home / version
        if path.is_symlink():
            raise ModelError(signing.refusal(path, self.home))
        if not path.is_dir():
            raise ModelError(
                f"model version {version} not found in {self.home} "
                f"(versions: {', '.join(self.versions()) or 'none'})"
            )
        return path

    def _state(self) -> dict[str, Any]:
        if self.state_path.is_symlink():
            raise ModelError(signing.refusal(self.state_path, self.home))
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"aliases": {}, "history": []}
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"{self.state_path} cannot be read: {exc}; restore it from a backup (it "
                "holds only the aliases and their history)"
            ) from None
        if not (
            isinstance(state, dict)
            and isinstance(state.get("aliases"), dict)
            and isinstance(state.get("history"), list)
        ):
            raise ModelError(f"{self.state_path} is not a registry file (aliases, history)")
        return state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise writers (two `train` runs must not both take v4); the OS releases
        the lock if the process dies."""
        self.home.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a planted link must not make us create or touch a file elsewhere.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.home / ".lock", flags, 0o644)
        except OSError as exc:
            raise ModelError(f"{self.home / '.lock'} cannot be opened: {exc.strerror}") from None
        with os.fdopen(fd, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_model(
    config: ModelConfig, contract: ContractConfig, ref: str | None = None
) -> LoadedModel:
    """The configured alias (default `champion`), or `ref`, checked against `contract`."""
    return Registry.from_config(config).load(ref or config.alias, contract)


# -- checks -----------------------------------------------------------------------------


def _check_alias_name(alias: str) -> None:
    if not _ALIAS.match(alias) or _VERSION.match(alias):
        raise ModelError(
            f"invalid model reference {alias!r}: use a version like v3 or an alias name "
            "(letters, digits, _ and -)"
        )


def _check_sklearn(card: Mapping[str, Any], version: str) -> None:
    trained = card.get("libraries", {}).get("sklearn")
    if trained != sklearn.__version__:
        raise ModelError(
            f"model {version} was trained with scikit-learn {trained} but this environment "
            f"has scikit-learn {sklearn.__version__}; a pickled model is only safe with the "
            f"version that wrote it: retrain (churn-batch train) or install "
            f"scikit-learn=={trained}"
        )


def _check_contract(card: Mapping[str, Any], contract: ContractConfig, version: str) -> None:
    trained = card.get("contract", {})
    model_kind = dict.fromkeys(trained.get("numeric", []), "numeric")
    model_kind |= dict.fromkeys(trained.get("categorical", []), "categorical")
    config_kind = dict.fromkeys(contract.numeric, "numeric")
    config_kind |= dict.fromkeys(contract.categorical, "categorical")
    problems = []
    lacking = [c for c in model_kind if c not in config_kind]
    unknown = [c for c in config_kind if c not in model_kind]
    moved = [
        f"{c} is {model_kind[c]} in the model but {config_kind[c]} in the config"
        for c in model_kind
        if c in config_kind and model_kind[c] != config_kind[c]
    ]
    if lacking:
        problems.append("the config lacks feature(s) " + ", ".join(lacking))
    if unknown:
        problems.append("the model was not trained on feature(s) " + ", ".join(unknown))
    problems.extend(moved)
    if problems:
        raise ModelError(
            f"model {version} does not match the config's contract: {'; '.join(problems)} "
            "(retrain with this config, or use a config with the model's features)"
        )


def _champion_stack(history: Sequence[Mapping[str, Any]], alias: str) -> list[str]:
    """Successive champions, replayed: a promotion pushes, a rollback pops."""
    stack: list[str] = []
    for event in history:
        if event.get("alias") != alias:
            continue
        if event.get("action") == "promote":
            stack.append(str(event["version"]))
        elif event.get("action") == "rollback" and stack:
            stack.pop()
    return stack


# -- files --------------------------------------------------------------------------------


def _version_number(version: str) -> int:
    match = _VERSION.match(version)
    assert match is not None
    return int(match.group(1))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    """Write beside the target, fsync, then swap it in: readers see old or new, never half."""
    text = json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with staging.open("w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def jsonable(value: Any) -> Any:
    """Plain JSON values: NaN and infinities become null, numpy scalars Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, date | datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value

"""The registry's trust anchor: an HMAC-SHA256 key that lives outside the registry.

A sha256 kept beside the file it describes protects against accidents, not against
anyone who can write the registry: they rewrite both. So every version carries a
signature, an HMAC over the model name, the version, the sha256 of `model.joblib` and
the sha256 of `card.json` (its exact bytes), made with a key the registry's files do not
hold. `registry.load` checks it before anything is unpickled.

The key is, in this order:
- the environment variable CHURN_BATCH_REGISTRY_KEY (at least 32 characters), or
- the file `$XDG_CONFIG_HOME/churn-batch/registry.key` (default `~/.config/...`),
  created with mode 0600 on the first registration (64 hex characters: 32 random bytes).
The file format is the variable's format, so `export CHURN_BATCH_REGISTRY_KEY=$(cat FILE)`
carries one key to another machine. The key is never logged nor put in an error: only
its key id (an HMAC of a constant, which reveals nothing about the key) is shown.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import hmac
import json
import os
import secrets
import stat
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from churn_batch.errors import ConfigError, ModelError

MODEL_FILE = "model.joblib"
CARD_FILE = "card.json"
SIGNATURE_FILE = "signature.json"
KEY_ENV = "CHURN_BATCH_REGISTRY_KEY"
KEY_FILE = Path("churn-batch") / "registry.key"
ALGORITHM = "HMAC-SHA256"
MIN_KEY_CHARS = 32
_DOMAIN = b"churn-batch registry signature v1\0"


@dataclass(frozen=True)
class RegistryKey:
    """A signing key and where it came from (never the key itself in repr or messages)."""

    secret: bytes = field(repr=False)
    source: str

    @property
    def key_id(self) -> str:
        """A public name for the key: equal ids mean equal keys, and it reveals nothing."""
        return hmac.new(self.secret, b"churn-batch key id", hashlib.sha256).hexdigest()[:12]

    def sign(self, name: str, version: str, model_sha256: str, card_sha256: str) -> str:
        message = _DOMAIN + "\0".join((name, version, model_sha256, card_sha256)).encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()


def key_path(env: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/churn-batch/registry.key`, `~/.config/...` when unset or relative."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / KEY_FILE


def load_key(registry_root: Path, *, create: bool) -> RegistryKey | None:
    """The registry key; with `create`, a new key file if there is none.

    Returns None when there is no key and `create` is false (nothing can be verified).
    """
    value = os.environ.get(KEY_ENV)
    if value is not None:
        secret = value.strip()
        if len(secret) < MIN_KEY_CHARS:
            raise ConfigError(
                f"{KEY_ENV} is set but holds {len(secret)} characters; a registry key needs "
                f"at least {MIN_KEY_CHARS} (e.g. the output of `openssl rand -hex 32`)"
            )
        return RegistryKey(secret.encode(), KEY_ENV)
    path = key_path()
    _refuse_inside(path, registry_root)
    if not path.exists() and not path.is_symlink():
        if not create:
            return None
        try:
            _create_key_file(path)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the registry key {path}: {exc.strerror}; set {KEY_ENV}, or "
                "XDG_CONFIG_HOME to a private directory you can write"
            ) from None
    return RegistryKey(_read_key_file(path), str(path))


def _refuse_inside(path: Path, registry_root: Path) -> None:
    """A key among the files it protects protects nothing."""
    if path.resolve().is_relative_to(Path(registry_root).resolve()):
        raise ConfigError(
            f"the registry key file {path} is inside the model registry {registry_root}: "
            "whoever can write the models could read it and sign anything; point "
            f"XDG_CONFIG_HOME elsewhere or set {KEY_ENV}"
        )


def _read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            text = handle.read(4096)
    except OSError as exc:
        raise ModelError(f"the registry key {path} cannot be read: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"the registry key {path} is open to other users (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {path}`, and retrain if someone else may have read it"
        )
    secret = text.strip()
    if len(secret) < MIN_KEY_CHARS:
        raise ConfigError(
            f"the registry key {path} holds {len(secret)} characters, fewer than "
            f"{MIN_KEY_CHARS}; delete it to have a new one made (then retrain) or restore it"
        )
    return secret


def _create_key_file(path: Path) -> None:
    """32 random bytes as hex, mode 0600, published with link(): complete or absent, and
    if two processes race, both end up using the one that was linked first."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secrets.token_hex(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another process made one: use it
            os.link(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def signature_record(
    key: RegistryKey, name: str, version: str, model_sha256: str, card_sha256: str
) -> dict[str, Any]:
    """What `signature.json` holds. Only `signature` is trusted (it needs the key); the
    hashes beside it let an error say which file changed."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key.key_id,
        "model_sha256": model_sha256,
        "card_sha256": card_sha256,
        "signature": key.sign(name, version, model_sha256, card_sha256),
    }


def signature_problem(
    key: RegistryKey | None,
    record: Mapping[str, Any] | None,
    name: str,
    version: str,
    model_sha256: str,
    card_sha256: str,
) -> str | None:
    """None if `record` signs these bytes with `key`; else why not, for a person to act on."""
    signed_hint = (
        f"if you have checked that these files are the ones the registry wrote, "
        f"`churn-batch models sign {version}` signs them with this key; otherwise retrain "
        "(churn-batch train)"
    )
    if key is None:
        return (
            f"model {version} cannot be verified: there is no registry key ({KEY_ENV} is not "
            f"set and {key_path()} does not exist); use the key that registered it "
            f"(set {KEY_ENV} or restore that file), or {signed_hint}"
        )
    if record is None:
        return (
            f"model {version} is not signed (registered before signing existed, or not by "
            f"this registry); refusing to load it: {signed_hint}"
        )
    expected = key.sign(name, version, model_sha256, card_sha256)
    given = record.get("signature")
    if isinstance(given, str) and hmac.compare_digest(given, expected):
        return None
    if record.get("key_id") != key.key_id:
        return (
            f"model {version} was signed with another registry key (key id "
            f"{record.get('key_id')!s:.12}; this environment's key from {key.source} has id "
            f"{key.key_id}); refusing to load it: use the key that registered it, or "
            f"{signed_hint}"
        )
    changed = [
        file
        for file, digest in (("model.joblib", model_sha256), ("card.json", card_sha256))
        if record.get(f"{file.split('.')[0]}_sha256") != digest
    ]
    what = " and ".join(changed) + (" was" if len(changed) == 1 else " were") if changed else ""
    return (
        f"model {version}'s signature does not match its files"
        + (f" ({what} changed after signing)" if what else "")
        + "; refusing to load it: restore the version from a backup or retrain "
        "(churn-batch train)"
    )


# -- reading a version for verification ---------------------------------------------------------


@dataclass(frozen=True)
class VersionFiles:
    """A version's bytes as read once (never through a link), and their digests.

    The signature record is as found; only its `signature` is trusted (it needs the key).
    """

    version: str
    directory: Path
    card_bytes: bytes
    model_bytes: bytes
    signature: dict[str, Any] | None

    @functools.cached_property  # computed once: a model can be large
    def model_sha256(self) -> str:
        return hashlib.sha256(self.model_bytes).hexdigest()

    @functools.cached_property
    def card_sha256(self) -> str:
        return hashlib.sha256(self.card_bytes).hexdigest()


def read_version(directory: Path, version: str) -> VersionFiles:
    """Read a version's card, model and signature once each; a link is refused."""
    found = {name: read_inside(directory, name) for name in (CARD_FILE, MODEL_FILE)}
    for name, data in found.items():
        if data is None:
            raise ModelError(f"{directory / name} is missing: version {version} is incomplete")
    raw = read_inside(directory, SIGNATURE_FILE)
    try:
        record = json.loads(raw) if raw is not None else None
    except ValueError:
        record = {}  # unreadable: a signature that vouches for nothing
    return VersionFiles(
        version, directory, found[CARD_FILE] or b"", found[MODEL_FILE] or b"",
        record if isinstance(record, dict) or record is None else {},
    )  # fmt: skip


def verify(files: VersionFiles, name: str, registry_root: Path) -> str | None:
    """None if the version's signature vouches for its bytes, else what is wrong."""
    problem = signature_problem(
        load_key(registry_root, create=False), files.signature, name, files.version,
        files.model_sha256, files.card_sha256,
    )  # fmt: skip
    if problem is None:
        return None
    with contextlib.suppress(ModelError):
        recorded = parse_card(files.directory / CARD_FILE, files.card_bytes).get("model_sha256")
        if recorded != files.model_sha256:  # the most specific account of what happened
            path = files.directory / MODEL_FILE
            return (
                f"{path} was modified after registration: its sha256 is "
                f"{files.model_sha256}, the card records {recorded}; refusing to load it: "
                f"restore {files.version} from a backup or retrain (churn-batch train)"
            )
    return problem


def refusal(path: Path, inside: Path) -> str:
    target = Path(os.path.realpath(path))
    where = "" if target.is_relative_to(inside.resolve()) else " out of the registry"
    return (
        f"refused: {path} is a symlink{where} (to {target}); the registry reads only the "
        "files it wrote: replace the link by the version's own files, or retrain"
    )


def read_inside(directory: Path, name: str) -> bytes | None:
    """`directory/name`'s bytes, None if absent; a link or a non-file is refused, so
    nothing outside the registry is ever read (O_NOFOLLOW: no check-then-open race)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        dir_fd = os.open(directory, flags | os.O_DIRECTORY)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ModelError(refusal(directory, directory.parent)) from None
        raise ModelError(f"{directory} cannot be read: {exc.strerror}") from None
    try:
        try:
            fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ModelError(refusal(directory / name, directory)) from None
            raise ModelError(f"{directory / name} cannot be read: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ModelError(f"refused: {directory / name} is not a regular file")
            return handle.read()
    finally:
        os.close(dir_fd)


def parse_card(path: Path, data: bytes) -> dict[str, Any]:
    try:
        card = json.loads(data)
    except ValueError as exc:
        raise ModelError(f"{path} cannot be read: {exc}") from None
    if not isinstance(card, dict):
        raise ModelError(f"{path} is not a model card (expected a JSON object)")
    return card

"""Load and validate the TOML config.

Every error names the file, the key and what is wrong. `${VAR}` expands from the
environment; relative paths (and relative SQLite URLs) resolve against the config
file's directory, so cron starting in `$HOME` sees the same files as a developer
starting in the project.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from churn_batch.errors import ConfigError

ENV_VAR = "CHURN_BATCH_CONFIG"
REPORTS_ENV_VAR = "CHURN_BATCH_REPORTS_DIR"  # where `report` writes, if not reports/
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = Path("configs") / "default.toml"

# Every name the job puts into SQL or a path is checked here, once, at load (exit 2),
# so nothing later has to wonder whether a name is safe. fullmatch, not `^...$`: `$`
# also matches before a trailing newline.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# PostgreSQL's limit (it silently truncates longer names; MariaDB's is 64).
MAX_IDENTIFIER_LENGTH = 63
# The sink also creates the view `<sink.table>_latest`, which must fit the limit too.
LATEST_VIEW_SUFFIX = "_latest"
# An alias is a name in registry.json, never a path: no `/`, no `.`; not a version name.
_ALIAS = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_VERSION = re.compile(r"v[0-9]+")
_ENV_REF = re.compile(r"\$\{([^}]*)\}")


@dataclass(frozen=True)
class SourceConfig:
    kind: Literal["sql", "parquet"]
    url: str | None = None
    table: str | None = None
    query: str | None = None
    path: Path | None = None
    batch_size: int = 50_000

    def describe(self) -> str:
        """Where rows come from, safe to log (no password)."""
        if self.kind == "parquet":
            return f"parquet {self.path}"
        assert self.url is not None
        target = f"table {self.table}" if self.table else "query"
        return f"{target} at {redact_url(self.url)}"


@dataclass(frozen=True)
class ContractConfig:
    id_column: str
    date_column: str
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    label_column: str | None = None
    positive_label: str | int | float | bool = "Yes"
    max_invalid_fraction: float = 0.05

    @property
    def features(self) -> tuple[str, ...]:
        return self.numeric + self.categorical

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (self.id_column, self.date_column, *self.features)


@dataclass(frozen=True)
class ModelConfig:
    registry: Path
    name: str = "churn"
    alias: str = "champion"


@dataclass(frozen=True)
class SinkConfig:
    url: str
    table: str = "churn_predictions"


@dataclass(frozen=True)
class DriftThresholds:
    psi_warn: float = 0.1
    psi_block: float = 0.25
    missing_rate_block: float = 0.2


@dataclass(frozen=True)
class MonitoringConfig:
    default: DriftThresholds = field(default_factory=DriftThresholds)
    features: Mapping[str, DriftThresholds] = field(default_factory=dict)

    def for_feature(self, name: str) -> DriftThresholds:
        return self.features.get(name, self.default)


@dataclass(frozen=True)
class TrainingConfig:
    holdout_fraction: float = 0.2
    high_tier_share: float = 0.10
    medium_tier_share: float = 0.20
    seed: int = 0
    cv_folds: int = 3


@dataclass(frozen=True)
class Config:
    path: Path
    source: SourceConfig
    contract: ContractConfig
    model: ModelConfig
    sink: SinkConfig
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    # Values that came from the environment: scrubbed from every message we emit.
    secrets: tuple[str, ...] = ()

    def redact(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) >= 3:
                text = text.replace(secret, "***")
        return redact_urls_in(text)


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***`, in the user part or the query."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return redact_urls_in(url)
    # libpq and the MySQL drivers also take `?password=...`, which SQLAlchemy shows.
    hidden = {key: "***" for key in parsed.query if key.lower() in _SECRET_PARAMETERS}
    if hidden:
        parsed = parsed.update_query_dict(hidden)
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


_URL_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]+:)[^@\s]+@")
_SECRET_PARAMETERS = ("password", "passwd", "pwd", "sslpassword")
# `password=...` in a URL's query or a libpq conninfo string ("host=h password='x y'").
_PARAMETER_SECRET = re.compile(
    r"\b(" + "|".join(_SECRET_PARAMETERS) + r")=('[^']*'|[^&\s'\"]+)", re.IGNORECASE
)


def redact_urls_in(text: str) -> str:
    """Mask `user:password@` and `password=...` inside free text (driver error messages
    echo the URL or connection string they failed with)."""
    return _PARAMETER_SECRET.sub(r"\1=***", _URL_PASSWORD.sub(r"\1***@", text))


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    """`$CHURN_BATCH_CONFIG`, else `configs/default.toml` here, else the project's own."""
    env = os.environ if env is None else env
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR])
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    return PROJECT_ROOT / DEFAULT_CONFIG


def load_config(path: Path | str, env: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a config file."""
    path = Path(path)
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("config file not found", path=path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset {exc.start} "
            "(save the file as UTF-8)",
            path=path,
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from None
    return _Parser(path.resolve(), env).parse(raw)


class _Parser:
    def __init__(self, path: Path, env: Mapping[str, str]) -> None:
        self.path = path
        self.base = path.parent
        self.env = env
        self.secrets: list[str] = []

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, path=self.path, key=key)

    def parse(self, raw: dict[str, Any]) -> Config:
        self.known(raw, "", {"source", "contract", "model", "sink", "monitoring", "training"})
        for section in ("source", "contract", "model", "sink"):
            if section not in raw:
                raise self.fail(section, "missing section")
        source = self.source(self.table(raw, "source"))
        contract = self.contract(self.table(raw, "contract"))
        return Config(
            path=self.path,
            source=source,
            contract=contract,
            model=self.model(self.table(raw, "model")),
            sink=self.sink(self.table(raw, "sink")),
            monitoring=self.monitoring(
                self.table(raw, "monitoring", optional=True), contract.features
            ),
            training=self.training(self.table(raw, "training", optional=True)),
            secrets=tuple(self.secrets),
        )

    # -- sections -------------------------------------------------------------------

    def source(self, raw: dict[str, Any]) -> SourceConfig:
        kind = self.string(raw, "source", "kind")
        batch = self.integer(raw, "source", "batch_size", default=50_000, minimum=1)
        if kind == "sql":
            self.known(raw, "source", {"kind", "url", "table", "query", "batch_size"})
            url = self.url(raw, "source", "url")
            table = self.optional_string(raw, "source", "table")
            query = self.optional_string(raw, "source", "query")
            if (table is None) == (query is None):
                raise self.fail("source", "give exactly one of 'table' or 'query'")
            if table is not None:
                self.identifier("source.table", table, dotted=True)
            if query is not None and ":snapshot_date" not in query:
                raise self.fail("source.query", "must use the bound parameter :snapshot_date")
            return SourceConfig(kind="sql", url=url, table=table, query=query, batch_size=batch)
        if kind == "parquet":
            self.known(raw, "source", {"kind", "path", "batch_size"})
            return SourceConfig(
                kind="parquet", path=self.a_path(raw, "source", "path"), batch_size=batch
            )
        raise self.fail(
            "source.kind", f"unknown source kind {kind!r} (expected 'sql' or 'parquet')"
        )

    def contract(self, raw: dict[str, Any]) -> ContractConfig:
        allowed = {
            "id_column", "date_column", "label_column", "positive_label",
            "numeric", "categorical", "max_invalid_fraction",
        }  # fmt: skip
        self.known(raw, "contract", allowed)
        id_column = self.column(raw, "id_column")
        date_column = self.column(raw, "date_column")
        label = self.optional_string(raw, "contract", "label_column")
        if label is not None:
            self.identifier("contract.label_column", label)
        numeric = self.columns(raw, "numeric")
        categorical = self.columns(raw, "categorical")
        if not numeric and not categorical:
            raise self.fail("contract", "name at least one feature in 'numeric' or 'categorical'")
        seen: dict[str, str] = {}
        for key, names in (
            ("id_column", [id_column]),
            ("date_column", [date_column]),
            ("label_column", [label] if label else []),
            ("numeric", numeric),
            ("categorical", categorical),
        ):
            for name in names:
                if name in seen:
                    raise self.fail(
                        f"contract.{key}", f"column {name!r} is also listed in {seen[name]}"
                    )
                seen[name] = key
        positive = raw.get("positive_label", "Yes")
        if not isinstance(positive, str | int | float | bool):
            raise self.fail("contract.positive_label", "must be a string, number or boolean")
        fraction = self.number(raw, "contract", "max_invalid_fraction", default=0.05)
        if not 0.0 <= fraction <= 1.0:
            raise self.fail("contract.max_invalid_fraction", "must be between 0 and 1")
        return ContractConfig(
            id_column=id_column,
            date_column=date_column,
            numeric=tuple(numeric),
            categorical=tuple(categorical),
            label_column=label,
            positive_label=positive,
            max_invalid_fraction=fraction,
        )

    def model(self, raw: dict[str, Any]) -> ModelConfig:
        self.known(raw, "model", {"registry", "name", "alias"})
        # The name is a directory under the registry: a plain name, never a path.
        name = self.name_string(raw, "model", "name", default="churn")
        if not _IDENTIFIER.fullmatch(name) or len(name) > MAX_IDENTIFIER_LENGTH:
            raise self.fail(
                "model.name",
                f"{name!r} must be letters, digits and _ (at most {MAX_IDENTIFIER_LENGTH})",
            )
        alias = self.name_string(raw, "model", "alias", default="champion")
        if not _ALIAS.fullmatch(alias) or _VERSION.fullmatch(alias):
            raise self.fail(
                "model.alias",
                f"{alias!r} is not an alias name (letters, digits, _ and -, at most 64, "
                "not starting with a digit or -; not a version like v3: pin a version "
                "with `score --model v3`)",
            )
        return ModelConfig(registry=self.a_path(raw, "model", "registry"), name=name, alias=alias)

    def sink(self, raw: dict[str, Any]) -> SinkConfig:
        self.known(raw, "sink", {"url", "table"})
        table = self.name_string(raw, "sink", "table", default="churn_predictions")
        self.identifier("sink.table", table)
        longest = MAX_IDENTIFIER_LENGTH - len(LATEST_VIEW_SUFFIX)
        if len(table) > longest:
            raise self.fail(
                "sink.table",
                f"{table!r} is {len(table)} characters; at most {longest}, so that the view "
                f"{table}{LATEST_VIEW_SUFFIX} fits the {MAX_IDENTIFIER_LENGTH}-character limit",
            )
        return SinkConfig(url=self.url(raw, "sink", "url"), table=table)

    def monitoring(self, raw: dict[str, Any], features_known: Collection[str]) -> MonitoringConfig:
        self.known(raw, "monitoring", {"psi_warn", "psi_block", "missing_rate_block", "features"})
        default = self.thresholds(raw, "monitoring", DriftThresholds())
        features_raw = self.table(raw, "features", optional=True, where="monitoring.features")
        features = {}
        for name, section in features_raw.items():
            key = f"monitoring.features.{name}"
            if name not in features_known:
                # A misspelt feature would otherwise silently keep the default thresholds.
                raise self.fail(
                    key,
                    "not a feature of the contract (features: "
                    f"{', '.join(sorted(features_known))})",
                )
            if not isinstance(section, dict):
                raise self.fail(key, "must be a table of thresholds")
            self.known(section, key, {"psi_warn", "psi_block", "missing_rate_block"})
            features[name] = self.thresholds(section, key, default)
        return MonitoringConfig(default=default, features=features)

    def thresholds(self, raw: dict[str, Any], where: str, base: DriftThresholds) -> DriftThresholds:
        warn = self.number(raw, where, "psi_warn", default=base.psi_warn)
        block = self.number(raw, where, "psi_block", default=base.psi_block)
        missing = self.number(raw, where, "missing_rate_block", default=base.missing_rate_block)
        if not 0 <= warn <= block:
            raise self.fail(where, f"need 0 <= psi_warn ({warn}) <= psi_block ({block})")
        if not 0 <= missing <= 1:
            raise self.fail(f"{where}.missing_rate_block", "must be between 0 and 1")
        return DriftThresholds(psi_warn=warn, psi_block=block, missing_rate_block=missing)

    def training(self, raw: dict[str, Any]) -> TrainingConfig:
        fields = {"holdout_fraction", "high_tier_share", "medium_tier_share", "seed", "cv_folds"}
        self.known(raw, "training", fields)
        d = TrainingConfig()
        config = TrainingConfig(
            holdout_fraction=self.number(raw, "training", "holdout_fraction", d.holdout_fraction),
            high_tier_share=self.number(raw, "training", "high_tier_share", d.high_tier_share),
            medium_tier_share=self.number(
                raw, "training", "medium_tier_share", d.medium_tier_share
            ),
            seed=self.integer(raw, "training", "seed", default=d.seed, minimum=0),
            cv_folds=self.integer(raw, "training", "cv_folds", default=d.cv_folds, minimum=2),
        )
        if not 0 < config.holdout_fraction < 1:
            raise self.fail("training.holdout_fraction", "must be between 0 and 1")
        if not 0 < config.high_tier_share + config.medium_tier_share <= 1:
            raise self.fail("training", "high_tier_share + medium_tier_share must be in (0, 1]")
        return config

    # -- typed getters --------------------------------------------------------------

    def known(self, raw: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        for key in raw:
            if key not in allowed:
                place = f"{where}.{key}" if where else key
                raise self.fail(place, f"unknown key (allowed here: {', '.join(sorted(allowed))})")

    def table(
        self, raw: dict[str, Any], name: str, *, optional: bool = False, where: str | None = None
    ) -> dict[str, Any]:
        value = raw.get(name)
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where or name, "must be a table")
        return value

    def _get(self, raw: Mapping[str, Any], where: str, key: str) -> Any:
        if key not in raw:
            raise self.fail(f"{where}.{key}", "missing required key")
        return raw[key]

    def string(self, raw: Mapping[str, Any], where: str, key: str, *, secret: bool = False) -> str:
        value = self._get(raw, where, key)
        if not isinstance(value, str):
            raise self.fail(f"{where}.{key}", f"must be a string, not {_type_name(value)}")
        return self.expand(value, f"{where}.{key}", secret=secret)

    def optional_string(self, raw: Mapping[str, Any], where: str, key: str) -> str | None:
        return self.string(raw, where, key) if key in raw else None

    def name_string(self, raw: Mapping[str, Any], where: str, key: str, default: str) -> str:
        """A name with a default: absent gives the default, but an empty one is an error
        (not silently the default: `table = ""` is a mistake, not a request for it)."""
        value = self.optional_string(raw, where, key)
        if value is None:
            return default
        if not value:
            raise self.fail(f"{where}.{key}", "must not be empty")
        return value

    def number(self, raw: Mapping[str, Any], where: str, key: str, default: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"{where}.{key}", f"must be a number, not {_type_name(value)}")
        if math.isnan(value):  # TOML has `nan`; every comparison with it is False
            raise self.fail(f"{where}.{key}", "must be a number, not nan")
        return float(value)

    def integer(
        self, raw: Mapping[str, Any], where: str, key: str, default: int, minimum: int
    ) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{where}.{key}", f"must be an integer, not {_type_name(value)}")
        if value < minimum:
            raise self.fail(f"{where}.{key}", f"must be at least {minimum}")
        return value

    def column(self, raw: Mapping[str, Any], key: str) -> str:
        name = self.string(raw, "contract", key)
        self.identifier(f"contract.{key}", name)
        return name

    def columns(self, raw: Mapping[str, Any], key: str) -> list[str]:
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"contract.{key}", "must be a list of column names")
        for name in value:
            self.identifier(f"contract.{key}", name)
        if len(set(value)) != len(value):
            raise self.fail(f"contract.{key}", "lists a column twice")
        return list(value)

    def identifier(self, key: str, name: str, *, dotted: bool = False) -> None:
        parts = name.split(".") if dotted else [name]
        if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
            schema = " or schema.table" if dotted else ""
            raise self.fail(
                key,
                f"{name!r} is not a plain SQL name{schema} "
                "(letters, digits and _, not starting with a digit)",
            )
        for part in parts:
            if len(part) > MAX_IDENTIFIER_LENGTH:
                raise self.fail(
                    key,
                    f"{part!r} is {len(part)} characters; SQL names are at most "
                    f"{MAX_IDENTIFIER_LENGTH} (PostgreSQL would silently cut it)",
                )

    def url(self, raw: Mapping[str, Any], where: str, key: str) -> str:
        value = self.string(raw, where, key, secret=True)
        try:
            url = make_url(value)
        except ArgumentError:
            raise self.fail(
                f"{where}.{key}", f"not a SQLAlchemy URL: {redact_url(value)!r}"
            ) from None
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            db = Path(url.database)
            if not db.is_absolute():
                return url.set(database=str((self.base / db).resolve())).render_as_string(
                    hide_password=False
                )
        return value

    def a_path(self, raw: Mapping[str, Any], where: str, key: str) -> Path:
        path = Path(self.string(raw, where, key)).expanduser()
        return path if path.is_absolute() else (self.base / path).resolve()

    def expand(self, value: str, key: str, *, secret: bool = False) -> str:
        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise self.fail(key, f"${{{name}}} is not a valid environment variable name")
            if name not in self.env:
                raise self.fail(key, f"environment variable {name} is not set")
            # Whatever a URL takes from the environment may be a password: scrub it
            # from every message, wherever a driver echoes it.
            if secret:
                self.secrets.append(self.env[name])
                self.secrets.extend(_url_secrets(self.env[name]))
            return self.env[name]

        return _ENV_REF.sub(substitute, value)


def _url_secrets(text: str) -> list[str]:
    """The password(s) inside a URL from the environment, as written and as decoded:
    a message may quote either (`p%40ss` in a URL, `p@ss` from a driver)."""
    found = [m.group(0)[len(m.group(1)) : -1] for m in _URL_PASSWORD.finditer(text)]
    found += [m.group(2).strip("'") for m in _PARAMETER_SECRET.finditer(text)]
    try:
        url = make_url(text)
    except ArgumentError:
        return found
    if url.password:
        found.append(str(url.password))
    found += [str(v) for k, v in url.query.items() if k.lower() in _SECRET_PARAMETERS]
    return found


def _type_name(value: object) -> str:
    names: dict[type, str] = {bool: "a boolean", int: "an integer", float: "a number",
                              str: "a string", list: "a list", dict: "a table"}  # fmt: skip
    return names.get(type(value), type(value).__name__)

from __future__ import annotations

import json
from pathlib import Path

import pytest

from churn_batch.config import load_config
from churn_batch.errors import ConfigError

PROJECT = Path(__file__).resolve().parent.parent

GOOD = """
[source]
kind = "sql"
url = "sqlite:///data/x.db"
table = "customer_snapshots"

[contract]
id_column = "customer_id"
date_column = "snapshot_date"
label_column = "churned"
numeric = ["tenure"]
categorical = ["contract"]

[model]
registry = "models"

[sink]
url = "sqlite:///data/x.db"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    assert info.value.exit_code == 2
    return str(info.value)


def test_shipped_configs_load() -> None:
    config = load_config(PROJECT / "configs" / "default.toml", env={})
    assert config.source.kind == "sql"
    assert config.contract.label_column == "churned"
    assert len(config.contract.features) == 19
    env = {"CHURN_BATCH_DATABASE_URL": "postgresql+psycopg://u:pw123@db/x"}
    example = load_config(PROJECT / "configs" / "postgres.example.toml", env=env)
    assert example.source.query is not None
    assert example.monitoring.for_feature("total_charges").psi_block == 0.4
    assert example.monitoring.for_feature("tenure_months").psi_block == 0.25


def test_relative_paths_resolve_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.chdir("/")
    config = load_config(path, env={})
    assert config.model.registry == tmp_path / "models"
    assert config.source.url == f"sqlite:///{tmp_path}/data/x.db"
    assert config.sink.table == "churn_predictions"
    assert config.model.alias == "champion"


def test_unknown_key_names_file_key_and_allowed(tmp_path: Path) -> None:
    message = error_of(tmp_path, GOOD.replace('table = "customer_snapshots"', 'tabel = "x"'))
    assert message == (
        f"{tmp_path / 'c.toml'}: source.tabel: unknown key "
        "(allowed here: batch_size, kind, query, table, url)"
    )


def test_missing_section(tmp_path: Path) -> None:
    text = GOOD[: GOOD.index("[sink]")]
    assert error_of(tmp_path, text) == f"{tmp_path / 'c.toml'}: sink: missing section"


def test_wrong_type(tmp_path: Path) -> None:
    text = GOOD.replace("[contract]", '[contract]\nmax_invalid_fraction = "lots"')
    assert error_of(tmp_path, text).endswith(
        "contract.max_invalid_fraction: must be a number, not a string"
    )


def test_unknown_source_kind(tmp_path: Path) -> None:
    text = GOOD.replace('kind = "sql"', 'kind = "csv"')
    assert error_of(tmp_path, text).endswith(
        "source.kind: unknown source kind 'csv' (expected 'sql' or 'parquet')"
    )


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('table = "customer_snapshots"', 'table = "snap; drop table x"', "source.table"),
        ('id_column = "customer_id"', 'id_column = "customer id"', "contract.id_column"),
        ('numeric = ["tenure"]', 'numeric = ["1tenure"]', "contract.numeric"),
        (
            'url = "sqlite:///data/x.db"\n\n[contract]',
            'url = "sqlite:///data/x.db"\ntable = "a-b"\n\n[contract]',
            "sink.table",
        ),
    ],
)
def test_identifier_must_be_plain_sql_name(tmp_path: Path, old: str, new: str, key: str) -> None:
    text = GOOD.replace(old, new)
    if key == "sink.table":
        text = GOOD + 'table = "a-b"\n'
    message = error_of(tmp_path, text)
    assert f": {key}: " in message
    assert "is not a plain SQL name" in message


def test_env_expansion_and_unset_variable(tmp_path: Path) -> None:
    text = GOOD.replace('url = "sqlite:///data/x.db"\ntable', 'url = "${SRC_URL}"\ntable')
    config = load_config(write(tmp_path, text), env={"SRC_URL": "postgresql://u:s3cret@h/db"})
    assert config.source.url == "postgresql://u:s3cret@h/db"
    assert "s3cret" not in config.redact("failed: postgresql://u:s3cret@h/db said s3cret")
    assert "s3cret" not in config.source.describe()
    message = error_of(tmp_path, text)
    assert message.endswith("source.url: environment variable SRC_URL is not set")


def test_table_and_query_are_exclusive(tmp_path: Path) -> None:
    text = GOOD.replace('table = "customer_snapshots"', 'table = "a"\nquery = "select 1"')
    assert error_of(tmp_path, text).endswith("source: give exactly one of 'table' or 'query'")
    text = GOOD.replace('table = "customer_snapshots"', 'query = "select * from t"')
    assert error_of(tmp_path, text).endswith(
        "source.query: must use the bound parameter :snapshot_date"
    )


def test_column_listed_twice_across_roles(tmp_path: Path) -> None:
    text = GOOD.replace('categorical = ["contract"]', 'categorical = ["tenure"]')
    assert error_of(tmp_path, text).endswith(
        "contract.categorical: column 'tenure' is also listed in numeric"
    )


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    assert "not valid TOML" in error_of(tmp_path, "[source\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_thresholds_per_feature(tmp_path: Path) -> None:
    text = GOOD + "\n[monitoring]\npsi_warn = 0.2\n[monitoring.features.tenure]\npsi_block = 0.9\n"
    config = load_config(write(tmp_path, text), env={})
    assert config.monitoring.for_feature("tenure").psi_block == 0.9
    assert config.monitoring.for_feature("tenure").psi_warn == 0.2
    bad = GOOD + "\n[monitoring]\npsi_warn = 0.5\npsi_block = 0.2\n"
    assert "need 0 <= psi_warn (0.5) <= psi_block (0.2)" in error_of(tmp_path, bad)


# -- every configured identifier, refused at load (exit 2) naming the key -------------------

HOSTILE_NAMES = [
    'x"; DROP TABLE y; --', "has space", "quo'te", "back`tick", "a.b.c", "", "name\n",
    "tab\t", "ünï", "1abc", "../x", "/etc/passwd", "a-b", "${HOME}", "x" * 64,
]  # fmt: skip
WHERE = {
    "source.table": ('table = "customer_snapshots"', "table = {}"),
    "sink.table": ("", "table = {}\n"),  # appended: [sink] is the last section
    "model.name": ('registry = "models"', 'registry = "models"\nname = {}'),
    "model.alias": ('registry = "models"', 'registry = "models"\nalias = {}'),
    "contract.id_column": ('id_column = "customer_id"', "id_column = {}"),
    "contract.date_column": ('date_column = "snapshot_date"', "date_column = {}"),
    "contract.label_column": ('label_column = "churned"', "label_column = {}"),
    "contract.numeric": ('numeric = ["tenure"]', "numeric = [{}]"),
    "contract.categorical": ('categorical = ["contract"]', "categorical = [{}]"),
}
# What each key accepts that another may not: a schema-qualified source table, a - in an alias.
ALLOWED = {("source.table", "a.b"), ("model.alias", "a-b")}


@pytest.mark.parametrize("key", list(WHERE))
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_every_identifier_refuses_what_is_not_a_plain_name(
    tmp_path: Path, key: str, name: str
) -> None:
    old, new = WHERE[key]
    value = new.format(json.dumps(name))
    text = GOOD.replace(old, value, 1) if old else GOOD + value
    if (key, name) in ALLOWED or (key == "model.alias" and name == "x" * 64):
        assert load_config(write(tmp_path, text), env={"HOME": "/root"})
        return
    message = error_of(tmp_path, text, env={"HOME": "/root"})
    assert message.startswith(f"{tmp_path / 'c.toml'}: {key}: "), message


def test_identifier_messages_say_what_is_wrong(tmp_path: Path) -> None:
    def error(old: str, new: str) -> str:
        return error_of(tmp_path, GOOD.replace(old, new, 1)).split(": ", 1)[1]

    assert error('table = "customer_snapshots"', 'table = "a\\n"') == (
        "source.table: 'a\\n' is not a plain SQL name or schema.table "
        "(letters, digits and _, not starting with a digit)"
    )  # `$` matched before a trailing newline: it passed
    long = "x" * 64
    assert error('id_column = "customer_id"', f'id_column = "{long}"') == (
        f"contract.id_column: '{long}' is 64 characters; SQL names are at most 63 "
        "(PostgreSQL would silently cut it)"
    )
    sink = "p" * 57
    text = GOOD + f'table = "{sink}"\n'
    assert error_of(tmp_path, text).endswith(
        f"sink.table: '{sink}' is 57 characters; at most 56, so that the view "
        f"{sink}_latest fits the 63-character limit"
    )
    for key, old in (("sink.table", None), ("model.name", "name"), ("model.alias", "alias")):
        if old is None:
            text = GOOD + 'table = ""\n'
        else:
            text = GOOD.replace('registry = "models"', f'registry = "models"\n{old} = ""')
        assert error_of(tmp_path, text).endswith(f"{key}: must not be empty")
    assert error('registry = "models"', 'registry = "models"\nalias = "../x"') == (
        "model.alias: '../x' is not an alias name (letters, digits, _ and -, at most 64, not "
        "starting with a digit or -; not a version like v3: pin a version with "
        "`score --model v3`)"
    )
    assert "model.alias: 'v3' is not an alias name" in error(
        'registry = "models"', 'registry = "models"\nalias = "v3"'
    )


def test_monitoring_names_only_contract_features_and_sane_numbers(tmp_path: Path) -> None:
    typo = GOOD + "\n[monitoring.features.tenur]\npsi_block = 0.9\n"
    assert error_of(tmp_path, typo).endswith(
        "monitoring.features.tenur: not a feature of the contract (features: contract, tenure)"
    )
    for value, message in (("nan", "must be a number, not nan"), ("1.5", "must be between 0 and 1"),
                           ("-0.1", "must be between 0 and 1")):  # fmt: skip
        text = GOOD + f"\n[monitoring]\nmissing_rate_block = {value}\n"
        assert error_of(tmp_path, text).endswith(f"monitoring.missing_rate_block: {message}")
    text = GOOD.replace("[contract]", "[contract]\nmax_invalid_fraction = nan")
    assert error_of(tmp_path, text).endswith(
        "contract.max_invalid_fraction: must be a number, not nan"
    )


def test_a_config_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(GOOD.encode() + b"# \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    offset = len(GOOD.encode()) + 2
    assert str(info.value) == (
        f"{path}: not UTF-8 text: byte 0xff at offset {offset} (save the file as UTF-8)"
    )

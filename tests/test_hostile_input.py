"""Hostile and broken snapshots and configs, through the installed CLI on SQLite.

Each case rewrites the rows of one snapshot date with sqlite3 and asserts the exact
outcome: the exit code, the whole message, the rows quarantined with their reasons, and
(for a refused date) that the predictions published before stay byte for byte. Nothing
may print a Python warning or a traceback: cron mails stderr.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from churn_batch import training
from churn_batch.config import Config
from churn_batch.contract import (
    BAD_ID,
    DUPLICATE_ID,
    MISSING_ID,
    OUT_OF_RANGE,
)
from churn_batch.job import score_date
from churn_batch.model import LOGISTIC

from .scoring_fixtures import CUSTOMERS, LAST, SMALL_SEARCH, predictions, run_cli, sqlite_db

DAY = LAST.isoformat()
# What stderr may hold: log lines, and the CLI's own "Error:" / "Warning:" lines.
LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} (INFO|WARNING|ERROR) churn_batch[.\w]*: "
    r"|Error: |Warning: )"
)
PUBLISHED = re.compile(
    r"^Published (?P<scored>[\d,]+) predictions for (?P<day>[\d-]+) to churn_predictions "
    r"\(model (?P<model>v\d+), (?P<rejected>[\d,]+) rows rejected, [\d.]+s, run "
    r"(?P<run>[0-9a-f-]{36})\)$"
)
SINK_OBJECTS = {
    "churn_predictions", "churn_scoring_runs", "churn_rejected_rows", "churn_drift_metrics",
    "churn_predictions_latest",
}  # fmt: skip


def db(config: Config) -> Path:
    return config.path.parent / "data" / "churn.db"


def unkeyed(config: Config) -> None:
    """customer_snapshots without NOT NULL, its key and a declared type for the id, same
    rows: a quick export's table, which holds whatever a broken upstream writes (an
    untyped id column keeps numbers as numbers: SQLite's VARCHAR would make them text)."""
    with sqlite_db(db(config)) as conn:
        (ddl,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'customer_snapshots'"
        ).fetchone()
        ddl = re.sub(r",\s*PRIMARY KEY \([^)]*\)", "", ddl.replace(" NOT NULL", ""))
        ddl = re.sub(r"customer_id VARCHAR\(\d+\)", "customer_id", ddl)
        conn.execute("ALTER TABLE customer_snapshots RENAME TO snapshots_keyed")
        conn.execute(ddl)
        conn.execute("INSERT INTO customer_snapshots SELECT * FROM snapshots_keyed")
        conn.execute("DROP TABLE snapshots_keyed")


def sql(config: Config, statement: str, params: tuple[Any, ...] = ()) -> None:
    with sqlite_db(db(config)) as conn:
        conn.execute(statement, params)


def ids_of(config: Config, day: str = DAY) -> list[str]:
    with sqlite_db(db(config)) as conn:
        rows = conn.execute(
            "SELECT customer_id FROM customer_snapshots WHERE snapshot_date = ? "
            "ORDER BY customer_id",
            (day,),
        )
        return [r[0] for r in rows]


def set_cell(config: Config, customer: str, column: str, value: object) -> None:
    sql(config, f"UPDATE customer_snapshots SET {column} = ? "
        "WHERE snapshot_date = ? AND customer_id = ?", (value, DAY, customer))  # fmt: skip


def score(config: Config, *args: str, day: str = DAY) -> subprocess.CompletedProcess[str]:
    result = run_cli("--config", str(config.path), "score", "--date", day, *args)
    stray = [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]
    assert not stray, f"stderr holds more than log lines (cron would mail it): {stray}"
    return result


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def rejected(config: Config, run_id: str | None = None) -> list[tuple[Any, ...]]:
    query = "SELECT customer_id, reason, raw FROM churn_rejected_rows"
    with sqlite_db(db(config)) as conn:
        if run_id is None:
            return sorted(conn.execute(query), key=repr)
        return sorted(conn.execute(query + " WHERE run_id = ?", (run_id,)), key=repr)


def last_run(config: Config) -> dict[str, Any]:
    with sqlite_db(db(config)) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute(
            "SELECT * FROM churn_scoring_runs ORDER BY started_at DESC LIMIT 1"
        ).fetchone()
        return dict(row)


def schema_objects(config: Config) -> set[str]:
    with sqlite_db(db(config)) as conn:
        names = conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
        return {r[0] for r in names}


def published_ids(config: Config, day: str = DAY) -> dict[str, tuple[float, str]]:
    with sqlite_db(db(config)) as conn:
        rows = conn.execute(
            "SELECT customer_id, churn_probability, risk_tier FROM churn_predictions "
            "WHERE snapshot_date = ?",
            (day,),
        )
        return {r[0]: (r[1], r[2]) for r in rows}


def baseline(config: Config) -> list[tuple[Any, ...]]:
    """Publish the untouched date (in-process: quicker than the CLI) and return it."""
    score_date(config, LAST)
    before = predictions(db(config), LAST)
    assert len(before) == CUSTOMERS
    return before


# -- columns: missing, all null, wrong types -----------------------------------------------

FOUND = (
    "snapshot_date, customer_id, senior_citizen, tenure_months, monthly_charges, "
    "total_charges, gender, partner, dependents, phone_service, multiple_lines, "
    "internet_service, online_security, online_backup, device_protection, tech_support, "
    "streaming_tv, streaming_movies, contract, paperless_billing, payment_method, churned"
)


def _without(column: str) -> str:
    return ", ".join(c for c in FOUND.split(", ") if c != column)


GATE = r" \(rerun with --allow-drift to publish anyway\)$"
BROKEN_COLUMNS = {
    "feature column missing": (
        ["ALTER TABLE customer_snapshots DROP COLUMN tenure_months"], 4,
        re.escape("Error: snapshot is missing required column(s): tenure_months (found: "
                  f"{_without('tenure_months')})") + "$",
    ),
    "id column missing": (
        ["ALTER TABLE customer_snapshots DROP COLUMN customer_id"], 4,
        re.escape("Error: snapshot is missing required column(s): customer_id (found: "
                  f"{_without('customer_id')})") + "$",
    ),
    "numeric column all null": (
        [f"UPDATE customer_snapshots SET tenure_months = NULL WHERE snapshot_date = '{DAY}'"], 5,
        rf"^Error: drift gate blocked publication of {DAY}: tenure_months PSI \d+\.\d{{3}} >= "
        r"0\.25; tenure_months missing rate 100\.0% \(reference 0\.0%, \+100\.0% > 20%\)"
        r"(; score PSI \d+\.\d{3} >= 0\.1)?" + GATE,
    ),
    "categorical column all null": (
        [f"UPDATE customer_snapshots SET contract = NULL WHERE snapshot_date = '{DAY}'"], 5,
        rf"^Error: drift gate blocked publication of {DAY}: contract PSI \d+\.\d{{3}} >= "
        r"0\.25; contract missing rate 100\.0% \(reference 0\.0%, \+100\.0% > 20%\)"
        r"(; score PSI \d+\.\d{3} >= 0\.1)?" + GATE,
    ),
    "text in a numeric column": (
        [f"UPDATE customer_snapshots SET monthly_charges = 'n/a' WHERE snapshot_date = '{DAY}'"],
        5,
        rf"^Error: drift gate blocked publication of {DAY}: monthly_charges PSI \d+\.\d{{3}} >= "
        r"0\.25; monthly_charges missing rate 100\.0% \(reference 0\.0%, \+100\.0% > 20%\)"
        r"(; score PSI \d+\.\d{3} >= 0\.1)?" + GATE,
    ),
    "numbers in a categorical column": (
        [f"UPDATE customer_snapshots SET contract = 42.5 WHERE snapshot_date = '{DAY}'"], 5,
        rf"^Error: drift gate blocked publication of {DAY}: contract PSI \d+\.\d{{3}} >= 0\.25"
        r"(; score PSI \d+\.\d{3} >= 0\.1)?" + GATE,
    ),
    "every row out of range": (
        [f"UPDATE customer_snapshots SET monthly_charges = 1e308 WHERE snapshot_date = '{DAY}'"],
        4,
        re.escape(f"Error: {CUSTOMERS} of {CUSTOMERS} rows rejected (100.0%), more than "
                  f"max_invalid_fraction 5.0% ({OUT_OF_RANGE}monthly_charges: {CUSTOMERS})")
        + "$",
    ),
    "zero rows for the date": (
        [f"DELETE FROM customer_snapshots WHERE snapshot_date = '{DAY}'"], 3,
        r"^Error: no snapshot rows for 2024-06-04 in table customer_snapshots at "
        r"sqlite:///\S+/data/churn\.db$",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN_COLUMNS))
def test_a_broken_snapshot_is_refused_with_its_code_and_loses_nothing(
    project: Config, case: str
) -> None:
    statements, code, message = BROKEN_COLUMNS[case]
    before = baseline(project)
    objects = schema_objects(project)
    unkeyed(project)
    for statement in statements:
        sql(project, statement)
    result = score(project)
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert re.match(message, error_line(result)), error_line(result)
    assert predictions(db(project), LAST) == before
    assert schema_objects(project) == objects
    run = last_run(project)
    assert run["status"] == ("blocked" if code == 5 else "failed")
    assert run["error"] == error_line(result).removeprefix("Error: ")
    # A run refused as a whole quarantines at most a sample of its rows, with reasons.
    assert all(reason for _, reason, _ in rejected(project))


# -- numbers: NaN, infinities, extremes, wrong types ------------------------------------------


def test_infinite_and_huge_numbers_are_quarantined_without_warnings(
    project: Config,
) -> None:
    """With logistic regression, +-1e308 printed numpy RuntimeWarnings (sums overflowing
    in scikit-learn's input check) and scored 1.0; an int64 sentinel was exit 1."""
    trained = training.train(
        project, None, None, promote=False,
        search=replace(SMALL_SEARCH, candidates=(LOGISTIC,)),
    )  # fmt: skip
    unkeyed(project)
    c = ids_of(project)
    broken = {
        c[0]: ("monthly_charges", 1e308, "total_charges", -1e308),
        c[1]: ("tenure_months", 9223372036854775807),
        c[2]: ("monthly_charges", float("inf")),
        c[3]: ("total_charges", float("-inf")),
        c[4]: ("senior_citizen", "1e999"),  # text that reads as an infinity
        c[5]: ("tenure_months", -(2**53) - 1),
    }
    odd_but_valid = {
        c[6]: ("monthly_charges", None),  # missing: imputed, as in training
        c[7]: ("tenure_months", "abc"),  # unreadable text: as good as missing, counted
        c[8]: ("total_charges", " "),  # Telco's blank total: missing, counted
        c[9]: ("monthly_charges", 2.0**53 - 1),  # the limit itself is a number
        c[10]: ("tenure_months", -(2**53 - 1)),
        c[11]: ("monthly_charges", float("nan")),  # SQLite stores NaN as NULL
    }
    for customer, cells in {**broken, **odd_but_valid}.items():
        for column, value in zip(cells[::2], cells[1::2], strict=True):
            set_cell(project, customer, column, value)

    result = score(project, "--model", trained.version)
    assert result.returncode == 0, result.stderr
    match = PUBLISHED.match(result.stdout.strip())
    assert match, result.stdout
    assert (match["scored"], match["rejected"]) == (str(CUSTOMERS - 6), "6")
    quarantined = {(customer, reason) for customer, reason, _ in rejected(project, match["run"])}
    assert quarantined == {
        (c[0], OUT_OF_RANGE + "monthly_charges, total_charges"),
        (c[1], OUT_OF_RANGE + "tenure_months"),
        (c[2], OUT_OF_RANGE + "monthly_charges"),
        (c[3], OUT_OF_RANGE + "total_charges"),
        (c[4], OUT_OF_RANGE + "senior_citizen"),
        (c[5], OUT_OF_RANGE + "tenure_months"),
    }
    raws = {row[0]: json.loads(row[2]) for row in rejected(project)}  # strict JSON
    assert raws[c[2]]["monthly_charges"] == "inf"
    # The row path reads a column mixing storage classes as text: the value, as stored.
    assert str(raws[c[1]]["tenure_months"]) == "9223372036854775807"
    published = published_ids(project)
    assert set(published) == set(c) - set(broken)
    assert all(0.0 <= p <= 1.0 for p, _ in published.values())
    run = last_run(project)
    assert (run["status"], run["rows_read"], run["rows_rejected"]) == ("succeeded", 600, 6)
    summary = json.loads(run["summary"])
    assert summary["invalid_numbers"] == {"tenure_months": 1, "total_charges": 1}
    assert summary["rejected_reasons"] == {reason: 1 for _, reason in quarantined} | {
        OUT_OF_RANGE + "tenure_months": 2
    }


# -- ids and values: blank, NULL, long, control characters, quotes, SQL, Unicode ---------------

SQL_METACHARACTERS = [
    "O'Brien \"q\"", "'; DROP TABLE churn_predictions; --", "%s", "%(x)s", ":param", "?",
    "back\\slash", "`tick`", "Ünïcödé 日本 🙂", "\u202eRTL", "e\u0301", "\ufeffbom",
    "x" * 128,
]  # fmt: skip
VALUE = '\'; DROP TABLE customer_snapshots; -- %s :p ? \\ \x00 日本 "q"'


def test_hostile_ids_and_values_round_trip_or_are_quarantined_with_reasons(
    project: Config,
) -> None:
    unkeyed(project)
    c = ids_of(project)
    objects = schema_objects(project)
    kept = dict(zip(c, SQL_METACHARACTERS, strict=False))  # published exactly as stored
    quarantined = {
        c[20]: ("y" * 129, BAD_ID, "y" * 129),
        c[21]: ("tab\tid", BAD_ID, "tab\tid"),
        c[22]: ("a\x00b", BAD_ID, "a\ufffdb"),  # the table keeps U+FFFD, the raw row NUL
        c[23]: ("line\nbreak", BAD_ID, "line\nbreak"),
        c[24]: ("", MISSING_ID, None),
        c[25]: ("   ", MISSING_ID, None),
        c[26]: (None, MISSING_ID, None),
        c[27]: ("dup'id", DUPLICATE_ID, "dup'id"),
        c[28]: ("dup'id", DUPLICATE_ID, "dup'id"),
        c[29]: (f"{c[30]}\n", DUPLICATE_ID, c[30]),  # trimmed, it is c[30] again
        c[30]: (c[30], DUPLICATE_ID, c[30]),
    }
    renamed = {c[40]: ("  padded  ", "padded"), c[41]: (123, "123")}
    # Hostile categorical values: scored as unseen levels, or kept exactly in a raw row.
    set_cell(project, c[0], "contract", VALUE)
    set_cell(project, c[1], "gender", "Male\x00")
    set_cell(project, c[24], "payment_method", VALUE)
    for old, new in kept.items():
        set_cell(project, old, "customer_id", new)
    for old, (new, _, _) in quarantined.items():
        set_cell(project, old, "customer_id", new)
    for old, (new, _) in renamed.items():
        set_cell(project, old, "customer_id", new)

    result = score(project)
    assert result.returncode == 0, result.stderr
    match = PUBLISHED.match(result.stdout.strip())
    assert match, result.stdout
    assert match["rejected"] == str(len(quarantined))
    published = published_ids(project)
    untouched = set(c) - set(kept) - set(quarantined) - set(renamed)
    assert set(published) == untouched | set(kept.values()) | {v for _, v in renamed.values()}
    with sqlite_db(db(project)) as conn:  # byte for byte: the stored bytes, not a decoding
        stored = {
            r[0]
            for r in conn.execute(
                "SELECT hex(customer_id) FROM churn_predictions WHERE snapshot_date = ?", (DAY,)
            )
        }
    assert {v.encode().hex().upper() for v in kept.values()} <= stored

    rows = rejected(project, match["run"])
    got = sorted(((cid, reason) for cid, reason, _ in rows), key=repr)
    assert got == sorted(((cid, r) for _, r, cid in quarantined.values()), key=repr)
    raw_ids = sorted((json.loads(raw)["customer_id"] for _, _, raw in rows), key=repr)
    assert raw_ids == sorted((new for new, _, _ in quarantined.values()), key=repr)
    raw_values = [json.loads(raw)["payment_method"] for _, _, raw in rows]
    assert raw_values.count(VALUE) == 1  # NUL and quotes intact in the raw row

    assert schema_objects(project) == objects | SINK_OBJECTS
    with sqlite_db(db(project)) as conn:
        assert conn.execute("SELECT count(*) FROM customer_snapshots").fetchone() == (2400,)
    run = last_run(project)
    summary = json.loads(run["summary"])
    assert summary["drift"]["contract"]["unseen"] == 1
    assert summary["drift"]["gender"]["unseen"] == 1
    assert summary["rejected_reasons"] == {BAD_ID: 4, MISSING_ID: 3, DUPLICATE_ID: 4}


# -- dates far in the past and the future ----------------------------------------------------


@pytest.mark.parametrize("day", ["0001-01-01", "9999-12-30"])
def test_snapshot_dates_at_the_ends_of_the_calendar_publish(project: Config, day: str) -> None:
    sql(project, "UPDATE customer_snapshots SET snapshot_date = ? WHERE snapshot_date = ?",
        (day, DAY))  # fmt: skip
    result = score(project, day=day)
    assert result.returncode == 0, result.stderr
    match = PUBLISHED.match(result.stdout.strip())
    assert match and (match["day"], match["rejected"]) == (day, "0"), result.stdout
    assert len(published_ids(project, day)) == CUSTOMERS
    runs = run_cli("--config", str(project.path), "runs", "--json")
    assert runs.returncode == 0, runs.stderr
    (record,) = [json.loads(line) for line in runs.stdout.splitlines()]
    assert (record["snapshot_date"], record["status"]) == (day, "succeeded")
    assert date.fromisoformat(day)  # the date the table holds is the one asked for


# -- configs: broken files and hostile identifiers, refused at load ----------------------------

INJECTION = 'x"; DROP TABLE churn_predictions; --'
HOSTILE_CONFIGS = {
    "source.table": (
        ('table = "customer_snapshots"', f"table = {json.dumps(INJECTION)}"),
        f"source.table: {INJECTION!r} is not a plain SQL name or schema.table "
        "(letters, digits and _, not starting with a digit)",
    ),
    "sink.table": (
        ("[sink]\n", '[sink]\ntable = "churn_predictions`; --"\n'),
        "sink.table: 'churn_predictions`; --' is not a plain SQL name "
        "(letters, digits and _, not starting with a digit)",
    ),
    "contract.id_column": (
        ('id_column = "customer_id"', 'id_column = "customer id"'),
        "contract.id_column: 'customer id' is not a plain SQL name "
        "(letters, digits and _, not starting with a digit)",
    ),
    "model.name": (
        ('registry = "models"', 'registry = "models"\nname = "../../etc"'),
        "model.name: '../../etc' must be letters, digits and _ (at most 63)",
    ),
    "model.alias": (
        ('registry = "models"', 'registry = "models"\nalias = "/etc/passwd"'),
        "model.alias: '/etc/passwd' is not an alias name (letters, digits, _ and -, at most "
        "64, not starting with a digit or -; not a version like v3: pin a version with "
        "`score --model v3`)",
    ),
}


@pytest.mark.parametrize("key", list(HOSTILE_CONFIGS))
def test_hostile_identifiers_are_refused_at_load_naming_the_key(project: Config, key: str) -> None:
    (old, new), message = HOSTILE_CONFIGS[key]
    text = project.path.read_text()
    assert old in text
    project.path.write_text(text.replace(old, new, 1))
    objects = schema_objects(project)
    result = score(project)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"Error: {project.path}: {message}"
    assert schema_objects(project) == objects  # nothing created, nothing dropped


def test_a_config_that_is_not_utf8_is_refused_naming_the_file(project: Config) -> None:
    project.path.write_bytes(b'[source]\nkind = "sql"\n# caf\xe9\n')
    result = score(project)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"Error: {project.path}: not UTF-8 text: byte 0xe9 at offset 27 (save the file as UTF-8)"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[source\n", "not valid TOML: Expected ']' at the end of a table declaration "
                      "(at line 1, column 8)"),
        ('[source]\nkind = "sql"\n', "contract: missing section"),
        ("[sourc]\n", "sourc: unknown key (allowed here: contract, model, monitoring, "
                      "sink, source, training)"),
    ],
)  # fmt: skip
def test_a_broken_config_file_is_exit_2_naming_the_problem(
    project: Config, text: str, message: str
) -> None:
    project.path.write_text(text)
    result = score(project)
    assert result.returncode == 2
    assert result.stderr.strip() == f"Error: {project.path}: {message}"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("batch_size = 250", 'batch_size = "250"',
         "source.batch_size: must be an integer, not a string"),
        ('numeric = ["senior_citizen"', 'numeric = [1, "senior_citizen"',
         "contract.numeric: must be a list of column names"),
        ("[model]", "[model]\nregistry_path = 'x'",
         "model.registry_path: unknown key (allowed here: alias, name, registry)"),
    ],
)  # fmt: skip
def test_a_config_with_a_wrong_type_or_unknown_key_is_exit_2_naming_the_key(
    project: Config, old: str, new: str, message: str
) -> None:
    text = project.path.read_text()
    assert old in text
    project.path.write_text(text.replace(old, new, 1))
    result = score(project)
    assert result.returncode == 2
    assert result.stderr.strip() == f"Error: {project.path}: {message}"

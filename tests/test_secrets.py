"""A database password taken from the environment (`${VAR}` in the config) appears
nowhere: no log line (text or JSON), no error message, no run record, no rejected or
drift-metrics row, no report, no cron log or metrics file; on success and on failure.

PostgreSQL: a role created for the test, with a password full of URL metacharacters,
in a schema of its own (both dropped afterwards). The test server trusts local logins,
so a wrong password is not refused there; the failures driven are a login refused
(unknown role), a host that refuses connections (retried, exit 7) and a failing query.
MariaDB checks passwords: there a wrong one is driven for real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from churn_batch import synthetic
from churn_batch.config import load_config, redact_url, redact_urls_in

from .scoring_fixtures import CUSTOMERS, FIRST, LAST, run_cli, write_config

PROJECT = Path(__file__).resolve().parent.parent
URL_VAR = "CHURN_BATCH_TEST_SECRET_URL"


@dataclass(frozen=True)
class Account:
    url: str  # with the password
    user: str
    password: str
    namespace: str  # PostgreSQL schema or MariaDB database

    def forms(self) -> set[str]:
        """Every way the password may be written: as is and URL-encoded."""
        rendered = sa.make_url(self.url).render_as_string(hide_password=False)
        encoded = rendered.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        return {self.password, quote_plus(self.password), quote(self.password, safe=""), encoded}


def password() -> str:
    # URL metacharacters, so a redaction that only knows the decoded form misses one.
    return f"Pw-{uuid.uuid4().hex[:12]}!p@ss/w:rd%+#"


@pytest.fixture
def pg_account(postgres_url: str) -> Iterator[Account]:
    name = f"cbs_{uuid.uuid4().hex[:8]}"
    secret = password()
    admin = sa.create_engine(postgres_url, poolclass=NullPool)
    base = sa.make_url(postgres_url)
    url = base.set(username=name, password=secret).update_query_dict(
        {"options": f"-csearch_path={name}"}
    )
    try:  # the cleanup also undoes a setup that failed half way
        with admin.begin() as conn:
            # Utility statements take no bound parameters; the literal is the test's own
            # (%% because the driver reads % as a placeholder even without parameters).
            literal = secret.replace("%", "%%")
            conn.exec_driver_sql(f"CREATE ROLE {name} LOGIN PASSWORD '{literal}'")
            conn.exec_driver_sql(f"CREATE SCHEMA {name} AUTHORIZATION {name}")
        yield Account(url.render_as_string(hide_password=False), name, secret, name)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {name} CASCADE")
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {name}")
        admin.dispose()


@pytest.fixture
def mariadb_account(mariadb_url: str) -> Iterator[Account]:
    name = f"cbs_{uuid.uuid4().hex[:8]}"
    secret = password()
    admin = sa.create_engine(mariadb_url, poolclass=NullPool)
    url = sa.make_url(mariadb_url).set(username=name, password=secret, database=name)
    try:  # the cleanup also undoes a setup that failed half way
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
            conn.exec_driver_sql("CREATE USER %s@'%%' IDENTIFIED BY %s", (name, secret))
            conn.exec_driver_sql(f"GRANT ALL ON {name}.* TO '{name}'@'%%'", ())
        yield Account(url.render_as_string(hide_password=False), name, secret, name)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP USER IF EXISTS '{name}'@'%%'", ())
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()


class Seen:
    """Everything the job showed anyone, checked for the password as it is collected."""

    def __init__(self, account: Account) -> None:
        self.forms = account.forms()
        self.texts = 0

    def check(self, text: str, where: str) -> str:
        for form in self.forms:
            assert form not in text, f"the password ({form!r}) is in {where}:\n{text}"
        self.texts += 1
        return text

    def run(
        self, config: Path, env: dict[str, str], *args: str
    ) -> subprocess.CompletedProcess[str]:
        result = run_cli("--config", str(config), *args, env=env)
        self.check(result.stdout, f"stdout of {args}")
        self.check(result.stderr, f"stderr of {args}")
        return result

    def files(self, root: Path) -> None:
        found = [p for p in root.rglob("*") if p.is_file()]
        assert found, f"nothing written under {root}"
        for path in found:
            self.check(path.read_bytes().decode("utf-8", "replace"), str(path))

    def tables(self, account: Account) -> None:
        """Every row of every table the job wrote, as text."""
        engine = sa.create_engine(account.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                for table in ("churn_predictions", "churn_scoring_runs", "churn_rejected_rows",
                              "churn_drift_metrics"):  # fmt: skip
                    rows = conn.execute(sa.text(f"SELECT * FROM {table}")).all()
                    assert rows, f"{table} is empty: nothing was checked"
                    self.check("\n".join(map(repr, rows)), f"table {table}")
        finally:
            engine.dispose()


def project(template: Path, root: Path, account: Account) -> tuple[Path, dict[str, str]]:
    """A project whose source and sink URL is `${URL_VAR}`, with snapshots in `account`."""
    root.mkdir(parents=True)
    shutil.copytree(template.parent / "models", root / "models")
    config = write_config(root, source_url="${" + URL_VAR + "}")
    engine = sa.create_engine(account.url, poolclass=NullPool)
    synthetic.write_sql(synthetic.generate_snapshots(CUSTOMERS, FIRST, 4, seed=3), engine)
    with engine.begin() as conn:  # one row to quarantine: its raw row is stored too
        first = conn.execute(sa.text(
            "SELECT min(customer_id) FROM customer_snapshots WHERE snapshot_date = :d"),
            {"d": LAST}).scalar_one()  # fmt: skip
        conn.execute(sa.text("UPDATE customer_snapshots SET customer_id = 'bad\tid' "
                             "WHERE customer_id = :c AND snapshot_date = :d"),
                     {"c": first, "d": LAST})  # fmt: skip
    engine.dispose()
    return config, dict(os.environ, **{URL_VAR: account.url})


def with_url(env: dict[str, str], url: sa.URL) -> dict[str, str]:
    return dict(env, **{URL_VAR: url.render_as_string(hide_password=False)})


@pytest.mark.postgres
def test_postgres_password_is_in_no_output_record_or_file(
    template: Path, pg_account: Account, tmp_path: Path
) -> None:
    seen = Seen(pg_account)
    config, env = project(template, tmp_path / "p", pg_account)
    masked = f"{pg_account.user}:***@"
    day = LAST.isoformat()

    # Success: text and JSON logs, the runs table, a report, the cron wrapper's files.
    result = seen.run(config, env, "score", "--date", day)
    assert result.returncode == 0, result.stderr
    assert "1 rows rejected" in result.stdout
    assert masked in result.stderr  # the URL is logged, and masked
    result = seen.run(config, env, "--log-format", "json", "score", "--date", day)
    assert result.returncode == 0, result.stderr
    assert masked in result.stderr
    # libpq also takes the password in the query; the logged URL showed it (reordered,
    # so the whole environment value no longer matched to be scrubbed).
    url = sa.make_url(pg_account.url)
    in_query = url.set(password=None).update_query_dict({"password": pg_account.password})
    result = seen.run(config, with_url(env, in_query), "score", "--date", day)
    assert result.returncode == 0, result.stderr
    assert "password=***" in result.stderr
    for args in (("runs",), ("runs", "--json"), ("models", "list")):
        assert seen.run(config, env, *args).returncode == 0
    reports = tmp_path / "reports"
    result = seen.run(config, env, "report", "--date", day, "--output-dir", str(reports))
    assert result.returncode == 0, result.stderr
    seen.files(reports)
    logs = tmp_path / "logs"
    job_env = dict(env, CHURN_BATCH_CONFIG=str(config), CHURN_BATCH_LOG_DIR=str(logs),
                   CHURN_BATCH_VENV=str(Path(sys.executable).parent.parent),
                   CHURN_BATCH_RETRIES="0")  # fmt: skip
    job = subprocess.run([str(PROJECT / "jobs" / "score.sh"), "2024-06-03"], env=job_env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert job.returncode == 0, (job.stdout, job.stderr, (logs / "score.log").read_text())
    seen.check(job.stdout + job.stderr, "jobs/score.sh output")
    seen.files(logs)  # score.log and metrics/churn_batch_score.prom

    # Failures: a failing query (recorded in the runs table), a refused login, a host
    # that refuses connections (retried, then exit 7).
    text = config.read_text()
    broken = config.with_name("broken.toml")
    broken.write_text(text.replace('table = "customer_snapshots"',
                                   'query = "SELECT * FROM no_such_table '
                                   'WHERE snapshot_date = :snapshot_date"'))  # fmt: skip
    result = seen.run(broken, env, "score", "--date", day)
    assert result.returncode == 2, result.stderr
    assert 'relation "no_such_table" does not exist' in result.stderr
    assert masked in result.stderr
    result = seen.run(config, with_url(env, url.set(username=f"{pg_account.user}_nobody")),
                      "score", "--date", day)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f'role "{pg_account.user}_nobody" does not exist' in result.stderr
    result = seen.run(config, with_url(env, url.set(port=1)), "--log-format", "json",
                      "score", "--date", day)  # fmt: skip
    assert result.returncode == 7, result.stderr
    assert "Connection refused" in result.stderr and masked in result.stderr

    seen.tables(pg_account)
    assert seen.texts >= 20


@pytest.mark.mariadb
def test_mariadb_wrong_password_is_exit_2_and_masked(
    template: Path, mariadb_account: Account, tmp_path: Path
) -> None:
    seen = Seen(mariadb_account)
    config, env = project(template, tmp_path / "p", mariadb_account)
    day = LAST.isoformat()
    result = seen.run(config, env, "score", "--date", day)
    assert result.returncode == 0, result.stderr
    assert f"{mariadb_account.user}:***@" in result.stderr

    wrong = password()
    url = sa.make_url(mariadb_account.url).set(password=wrong)
    wrong_seen = Seen(Account(url.render_as_string(hide_password=False),
                              mariadb_account.user, wrong, mariadb_account.namespace))  # fmt: skip
    for args in (("score", "--date", day), ("runs",), ("--log-format", "json", "runs")):
        result = seen.run(config, with_url(env, url), *args)
        wrong_seen.check(result.stdout + result.stderr, f"output of {args}")
        assert result.returncode == 2, result.stderr
        assert "access denied: wrong user or password" in result.stderr
    seen.tables(mariadb_account)


def test_redaction_covers_the_user_part_the_query_and_conninfo_text(tmp_path: Path) -> None:
    secret = "s3cr3t!@:/x"
    url = f"postgresql+psycopg://u:{quote_plus(secret)}@h/db?sslpassword=k3y&options=-c%20a"
    assert redact_url(url) == "postgresql+psycopg://u:***@h/db?options=-c+a&sslpassword=***"
    in_query = f"postgresql+psycopg://u@h/db?password={quote_plus(secret)}"
    assert redact_url(in_query) == "postgresql+psycopg://u@h/db?password=***"
    text = f"failed: host=h password='{secret}' user=u; {in_query}; pwd=abc&x=1"
    assert redact_urls_in(text) == (
        # (a value runs to the next space, &, or quote: the ";" after it goes too)
        "failed: host=h password=*** user=u; postgresql+psycopg://u@h/db?password=*** pwd=***&x=1"
    )
    path = tmp_path / "c.toml"
    path.write_text(
        '[source]\nkind = "sql"\nurl = "${DB}"\ntable = "t"\n[contract]\nid_column = "i"\n'
        'date_column = "d"\nnumeric = ["n"]\n[model]\nregistry = "m"\n[sink]\nurl = "${DB}"\n'
    )
    config = load_config(path, env={"DB": in_query})
    assert config.source.describe() == "table t at postgresql+psycopg://u@h/db?password=***"
    message = f"driver said: password={quote_plus(secret)} / {secret} / {quote(secret, safe='')}"
    assert secret not in config.redact(message)
    assert quote_plus(secret) not in config.redact(message)

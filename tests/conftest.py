"""Shared fixtures: database URLs from the environment, temporary configs.

Server tests read their URLs from CHURN_BATCH_TEST_POSTGRES_URL and
CHURN_BATCH_TEST_MARIADB_URL and skip, saying why, when those are unset (a laptop);
.ci/run sets both, so in CI they must run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from churn_batch.config import Config

POSTGRES_ENV = "CHURN_BATCH_TEST_POSTGRES_URL"
MARIADB_ENV = "CHURN_BATCH_TEST_MARIADB_URL"
PROJECT = Path(__file__).resolve().parent.parent


def server_url(env: str) -> str:
    url = os.environ.get(env)
    if not url:
        if os.environ.get("CHURN_BATCH_REQUIRE_SERVERS"):
            pytest.fail(f"{env} is not set but CHURN_BATCH_REQUIRE_SERVERS is (CI)")
        pytest.skip(f"{env} is not set: no server to test against")
    return url


@pytest.fixture(scope="session", autouse=True)
def registry_key() -> Iterator[str]:
    """A registry signing key for this test session, in the environment (child processes
    inherit it), so no test reads or creates ~/.config/churn-batch/registry.key.

    Session-wide, not per test: the session's `template` champion is signed with it.
    A test about the key itself overrides it with `monkeypatch`.
    """
    import secrets

    with pytest.MonkeyPatch.context() as patch:
        key = secrets.token_hex(32)
        patch.setenv("CHURN_BATCH_REGISTRY_KEY", key)
        yield key


@pytest.fixture
def postgres_url() -> str:
    return server_url(POSTGRES_ENV)


@pytest.fixture
def mariadb_url() -> str:
    return server_url(MARIADB_ENV)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("mariadb", marks=pytest.mark.mariadb)])  # fmt: skip
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test runs once per database: SQLite always, the servers when configured."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return server_url(POSTGRES_ENV if request.param == "postgres" else MARIADB_ENV)


@pytest.fixture
def table_name(any_db_url: str) -> Iterator[str]:
    """A table name no other test uses; dropped afterwards on the servers."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    yield name
    engine = sa.create_engine(any_db_url)
    with engine.begin() as conn:
        sa.Table(name, sa.MetaData()).drop(conn, checkfirst=True)
    engine.dispose()


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite project with snapshots and a trained champion, built once per session."""
    from .scoring_fixtures import build_project

    return build_project(tmp_path_factory.mktemp("template"))


@pytest.fixture
def project(template: Path, tmp_path: Path) -> Config:
    """A private copy of the template project."""
    from .scoring_fixtures import copy_project

    return copy_project(template, tmp_path / "project")


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("mariadb", marks=pytest.mark.mariadb)])  # fmt: skip
def namespace_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL into a fresh PostgreSQL schema or MariaDB database, dropped afterwards.

    PostgreSQL sessions carry an application_name of the test's own, so the test can
    find (and terminate) exactly the job's sessions in pg_stat_activity.
    """
    base = server_url(POSTGRES_ENV if request.param == "postgres" else MARIADB_ENV)
    name = f"cbt_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(base, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    url = sa.make_url(base)
    if request.param == "postgres":
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {name}"))
        scoped = url.update_query_dict({"options": f"-csearch_path={name}",
                                        "application_name": name})  # fmt: skip
    else:
        with admin.connect() as conn:
            conn.execute(sa.text(f"CREATE DATABASE {name} CHARACTER SET utf8mb4"))
        scoped = url.set(database=name)
    try:
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if request.param == "postgres":
                conn.execute(sa.text("SET lock_timeout = '20s'"))
                conn.execute(sa.text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()

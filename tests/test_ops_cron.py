"""The crontab and the scripts it calls, run as cron runs them: `env -i`, bare PATH, $HOME.

The wrapper behaviour (retries, locking, logs, metrics) is tested against a stand-in
`churn-batch` (CHURN_BATCH_BIN); the crontab's own lines are then executed for real
against a temporary copy of the project, publishing predictions with the real CLI.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
CRONTAB = PROJECT / "crontab"
VENV = Path(sys.executable).parent.parent  # the environment running the tests
BARE_PATH = "/usr/bin:/bin"

# -- the crontab --------------------------------------------------------------------------

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
FIELDS = (  # name, lowest, highest, names allowed
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, MONTHS),
    ("day of week", 0, 7, WEEKDAYS),
)
ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")


def check_field(text: str, low: int, high: int, names: tuple[str, ...]) -> None:
    """One crontab time field: lists of `*`, `N`, `N-M`, each with an optional `/step`."""
    for item in text.split(","):
        base, _, step = item.partition("/")
        if step:
            assert step.isdigit() and int(step) >= 1, f"bad step in {text!r}"
        if base == "*":
            continue
        for bound in base.split("-", 1):
            if bound.lower() in names:
                continue
            assert bound.isdigit(), f"{bound!r} in {text!r} is not a number"
            assert low <= int(bound) <= high, f"{bound} in {text!r} is outside {low}-{high}"
        if "-" in base:
            first, last = base.split("-", 1)
            if first.isdigit() and last.isdigit():
                assert int(first) <= int(last), f"empty range {base!r}"


def parse_crontab(text: str) -> tuple[dict[str, str], list[tuple[list[str], str]]]:
    """(variables, [(five time fields, command)]); fails on any line cron would refuse."""
    variables: dict[str, str] = {}
    entries: list[tuple[list[str], str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if ENV_LINE.match(line) and not line[0].isdigit() and not line.startswith("*"):
            name, value = ENV_LINE.match(line).groups()  # type: ignore[union-attr]
            variables[name] = value.strip().strip("'\"")
            continue
        parts = line.split(None, 5)
        assert len(parts) == 6, f"line {number}: five time fields and a command: {raw!r}"
        for field, (name, low, high, names) in zip(parts[:5], FIELDS, strict=True):
            try:
                check_field(field, low, high, names)
            except AssertionError as exc:
                raise AssertionError(f"line {number}, {name}: {exc}") from None
        command = parts[5]
        # cron turns an unescaped % into a newline (stdin); the CLI needs no `date` tricks.
        assert "%" not in command.replace("\\%", ""), f"line {number}: unescaped % in command"
        entries.append((parts[:5], command))
    return variables, entries


def test_every_crontab_line_is_a_valid_schedule() -> None:
    text = CRONTAB.read_text(encoding="utf-8")
    assert text.endswith("\n")  # cron refuses a last line without a newline
    variables, entries = parse_crontab(text)
    assert variables["CRON_TZ"] == "UTC"
    assert "CHURN_BATCH_HOME" in variables
    assert re.search(r"^#\s*MAILTO=", text, re.MULTILINE)
    commands = [command for _, command in entries]
    assert len(entries) == 2
    nightly, weekly = entries
    assert nightly[0][2:] == ["*", "*", "*"] and nightly[0][:2] != ["*", "*"]
    assert "jobs/score.sh" in nightly[1] and "yesterday" in nightly[1]
    # The report runs right after the scoring, in the same cron entry.
    assert nightly[1].index("jobs/score.sh") < nightly[1].index("jobs/report.sh")
    assert weekly[0][4] not in ("*",) and "jobs/retrain.sh" in weekly[1]
    for command in commands:
        assert "$CHURN_BATCH_HOME/jobs/" in command


def test_the_parser_refuses_broken_lines() -> None:
    for bad in ("60 2 * * * x", "0 24 * * * x", "0 2 * * 8 x", "0 2 * * x", "5-1 2 * * * x",
                "0 2 * * * date +%F"):  # fmt: skip
        with pytest.raises(AssertionError):
            parse_crontab(bad)


# -- the job scripts against a stand-in churn-batch ---------------------------------------------

FAKE = r"""#!/bin/bash
# Stand-in churn-batch: exits with the next code of $FAKE_CODES, records each call.
echo "$*" >> "$FAKE_DIR/calls"
if [ "$1" = runs ]; then
    echo "log line on stderr" >&2
    echo '{"run_id": "r1", "status": "succeeded", "rows_read": 100, "rows_scored": 97,'\
         ' "rows_rejected": 3}'
    exit 0
fi
n=$(wc -l < "$FAKE_DIR/calls")
set -- $FAKE_CODES
code=${!n:-0}
echo "attempt $n: exiting $code"
echo "some stderr" >&2
exit "$code"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The jobs/ scripts in a fresh project directory (logs and metrics land inside it)."""
    root = tmp_path / "project"
    shutil.copytree(PROJECT / "jobs", root / "jobs")
    return root


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    path = tmp_path / "fake" / "churn-batch"
    path.parent.mkdir()
    path.write_text(FAKE, encoding="utf-8")
    path.chmod(0o755)
    return path


def run_job(
    script: Path, *args: str, home: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a job script the way cron does: empty environment, bare PATH, cwd $HOME."""
    home.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [str(script), *args],
        env={"HOME": str(home), "PATH": BARE_PATH, **(env or {})},
        cwd=home,
        capture_output=True,
        text=True,
        timeout=600,
    )


def fake_env(fake: Path, codes: str) -> dict[str, str]:
    return {
        "CHURN_BATCH_BIN": str(fake),
        "CHURN_BATCH_VENV": str(VENV),
        "CHURN_BATCH_RETRY_DELAY": "0",
        "FAKE_DIR": str(fake.parent),
        "FAKE_CODES": codes,
    }


def calls(fake: Path) -> list[str]:
    return (fake.parent / "calls").read_text(encoding="utf-8").splitlines()


def metrics(path: Path) -> dict[str, float]:
    samples = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_retries_exit_7_then_succeeds(project: Path, fake: Path, tmp_path: Path) -> None:
    env = {**fake_env(fake, "7 8 0"), "CHURN_BATCH_RETRIES": "3"}
    result = run_job(project / "jobs/score.sh", "2026-05-01", home=tmp_path / "home", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""  # cron mails nothing on success
    assert calls(fake) == ["score --date 2026-05-01"] * 3 + [
        "runs --json --limit 1 --date 2026-05-01"
    ]
    log = (project / "logs/score.log").read_text(encoding="utf-8")
    lines = log.splitlines()
    assert all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in lines), log
    assert "exit 7 (storage unavailable, retry later): retrying in 0s" in log
    assert "exit 8 (locked by another run, retry later): retrying in 0s" in log
    assert "attempt 3: exiting 0" in log and "some stderr" in log and "log line on stderr" in log
    assert "finished: exit 0 (published) after" in lines[-1]
    samples = metrics(project / "logs/metrics/churn_batch_score.prom")
    assert samples['churn_batch_last_exit_code{job="score"}'] == 0
    assert samples['churn_batch_last_attempts{job="score"}'] == 3
    assert samples['churn_batch_rows_scored{job="score"}'] == 97
    assert samples['churn_batch_rows_rejected{job="score"}'] == 3
    assert samples['churn_batch_rows_read{job="score"}'] == 100
    last_success = samples['churn_batch_last_success_timestamp_seconds{job="score"}']
    assert abs(last_success - time.time()) < 60
    assert samples['churn_batch_last_duration_seconds{job="score"}'] >= 0
    text = (project / "logs/metrics/churn_batch_score.prom").read_text(encoding="utf-8")
    assert "# TYPE churn_batch_last_success_timestamp_seconds gauge" in text
    assert "# HELP churn_batch_rows_scored " in text
    assert [p.name for p in (project / "logs/metrics").iterdir()] == ["churn_batch_score.prom"]


def test_contract_failure_is_not_retried(project: Path, fake: Path, tmp_path: Path) -> None:
    result = run_job(project / "jobs/score.sh", "2026-05-01", home=tmp_path / "home",
                     env=fake_env(fake, "4 0"))  # fmt: skip
    assert result.returncode == 4
    assert calls(fake)[0] == "score --date 2026-05-01" and calls(fake).count(calls(fake)[0]) == 1
    assert "churn-batch score failed: exit 4 (input rejected by the contract)" in result.stderr


def test_gives_up_after_the_retries_and_keeps_the_last_success(
    project: Path, fake: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    assert run_job(project / "jobs/report.sh", "2026-05-01", home=home,
                   env=fake_env(fake, "0")).returncode == 0  # fmt: skip
    prom = project / "logs/metrics/churn_batch_report.prom"
    key = 'churn_batch_last_success_timestamp_seconds{job="report"}'
    assert abs(metrics(prom)[key] - time.time()) < 60
    # Backdate that success, as if it were a day old: a failed run that wrongly refreshed
    # the timestamp would now differ from it, without waiting for the clock to tick.
    succeeded = int(time.time()) - 86_400
    prom.write_text(
        re.sub(rf"^{re.escape(key)} \d+$", f"{key} {succeeded}", prom.read_text(encoding="utf-8"),
               flags=re.MULTILINE),
        encoding="utf-8",
    )  # fmt: skip
    assert metrics(prom)[key] == succeeded
    (fake.parent / "calls").unlink()

    env = {**fake_env(fake, "7 7 7 7 7"), "CHURN_BATCH_RETRIES": "2"}
    result = run_job(project / "jobs/report.sh", "2026-05-01", home=home, env=env)
    assert result.returncode == 7
    assert calls(fake) == ["report --date 2026-05-01"] * 3
    samples = metrics(prom)
    assert samples['churn_batch_last_exit_code{job="report"}'] == 7
    assert samples['churn_batch_last_attempts{job="report"}'] == 3
    assert samples[key] == succeeded
    assert samples['churn_batch_last_run_timestamp_seconds{job="report"}'] > succeeded
    assert "rows_scored" not in prom.read_text(encoding="utf-8")  # only the score job has rows


def test_backoff_doubles_from_the_configured_delay(project: Path) -> None:
    script = f"source {shlex.quote(str(project / 'jobs/lib.sh'))}; " + "; ".join(
        f"backoff_delay {n}" for n in (1, 2, 3, 4, 20)
    )
    result = subprocess.run(
        ["bash", "-c", script],
        env={"PATH": BARE_PATH, "CHURN_BATCH_RETRY_DELAY": "30"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.split() == ["30", "60", "120", "240", "3600"]


def test_a_running_job_blocks_the_next_one(project: Path, fake: Path, tmp_path: Path) -> None:
    lock = project / "logs/retrain.lock"
    lock.parent.mkdir(parents=True)
    home = tmp_path / "home"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        blocked = run_job(project / "jobs/retrain.sh", home=home, env=fake_env(fake, "0"))
        # Each job has its own lock: a long retrain does not hold up the nightly scoring.
        other = run_job(project / "jobs/score.sh", "2026-05-01", home=home, env=fake_env(fake, "0"))
    assert blocked.returncode == 8
    assert "another run still holds" in blocked.stderr
    assert other.returncode == 0, other.stderr
    assert calls(fake) == ["score --date 2026-05-01", "runs --json --limit 1 --date 2026-05-01"]
    assert run_job(project / "jobs/retrain.sh", home=home, env=fake_env(fake, "0")).returncode == 0
    assert calls(fake)[-1] == "train --promote"
    assert not (project / "logs/metrics/churn_batch_retrain.prom").read_text().count("rows_")


def test_yesterday_is_fixed_once_in_utc(project: Path, fake: Path, tmp_path: Path) -> None:
    result = run_job(project / "jobs/score.sh", home=tmp_path / "home", env=fake_env(fake, "0"))
    assert result.returncode == 0, result.stderr
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    assert calls(fake) == [
        f"score --date {yesterday}",
        f"runs --json --limit 1 --date {yesterday}",
    ]


def test_a_missing_virtualenv_says_so(project: Path, tmp_path: Path) -> None:
    result = run_job(project / "jobs/score.sh", "2026-05-01", home=tmp_path / "home")
    assert result.returncode == 2
    assert "not found or not executable" in result.stderr
    assert "set CHURN_BATCH_VENV" in (project / "logs/score.log").read_text(encoding="utf-8")


# -- the crontab's own lines, for real ------------------------------------------------------------


SHIPPED = ("pyproject.toml", "README.md", "crontab", "churn_batch", "configs", "jobs", "notebooks")


def project_files() -> list[str]:
    """The repository's files (tracked, plus new ones not ignored), as a fresh clone has."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=PROJECT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: what cron needs
        found = [p for name in SHIPPED for p in [PROJECT / name, *(PROJECT / name).rglob("*")]]
        return [
            str(p.relative_to(PROJECT))
            for p in found
            if p.is_file() and "__pycache__" not in p.parts
        ]
    return [name for name in listed.split("\0") if name and (PROJECT / name).is_file()]


@pytest.fixture
def project_copy(tmp_path: Path) -> Iterator[Path]:
    """A copy of the project whose .venv is this test run's environment."""
    root = tmp_path / "churn-batch"
    for name in project_files():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / name, target)
    (root / ".venv").symlink_to(VENV, target_is_directory=True)
    yield root


def cron_command(command: str, variables: Mapping[str, str], home: Path) -> int:
    """Run one crontab command as cron would: its variables, /bin/sh, cwd $HOME."""
    env = {"HOME": str(home), "PATH": BARE_PATH, "LOGNAME": "churn", **variables}
    shell = variables.get("SHELL", "/bin/sh")
    return subprocess.run([shell, "-c", command], env=env, cwd=home, timeout=600).returncode


def quick_training(config: Path) -> None:
    """Two cross-validation folds instead of three: the same code path, a faster test."""
    text = config.read_text(encoding="utf-8")
    if "[training]" not in text:
        config.write_text(text + "\n[training]\ncv_folds = 2\n", encoding="utf-8")


@pytest.mark.slow
def test_crontab_commands_publish_and_report(project_copy: Path, tmp_path: Path) -> None:
    from churn_batch import demo
    from churn_batch.config import load_config

    home = tmp_path / "home"
    home.mkdir()
    config_path = project_copy / "configs/default.toml"
    quick_training(config_path)
    yesterday = datetime.now(UTC).date() - timedelta(days=1)
    # Snapshots only: the weekly retrain line trains the first champion itself.
    demo.seed(load_config(config_path), customers=300, days=5, last=yesterday)

    variables, entries = parse_crontab((project_copy / "crontab").read_text(encoding="utf-8"))
    variables["CHURN_BATCH_HOME"] = str(project_copy)  # the one line an installer edits
    nightly, weekly = (command for _, command in entries)
    assert cron_command(weekly, variables, home) == 0
    assert cron_command(nightly, variables, home) == 0

    # closing(): `with sqlite3.connect()` only commits and leaves the connection open.
    with closing(sqlite3.connect(project_copy / "data/churn.db")) as db:
        published = db.execute(
            "SELECT count(*) FROM churn_predictions WHERE snapshot_date = ?",
            (yesterday.isoformat(),),
        ).fetchone()[0]
    assert published > 0
    logs = project_copy / "logs"
    for job in ("score", "report", "retrain"):
        log = (logs / f"{job}.log").read_text(encoding="utf-8")
        assert "finished: exit 0" in log, log
        samples = metrics(logs / "metrics" / f"churn_batch_{job}.prom")
        assert samples[f'churn_batch_last_exit_code{{job="{job}"}}'] == 0
    assert "Promoted" in (logs / "retrain.log").read_text(encoding="utf-8")
    score = metrics(logs / "metrics/churn_batch_score.prom")
    assert score['churn_batch_rows_scored{job="score"}'] == published
    report = project_copy / "reports" / yesterday.isoformat()
    assert (report / "churn_report.html").is_file() and (report / "churn_report.ipynb").is_file()
    # Nothing lands in cron's working directory ($HOME) but dot-directories.
    assert all(name.startswith(".") for name in os.listdir(home))

"""The README stays true to the code: commands, exit codes, config keys, tables."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer.main

from churn_batch import errors
from churn_batch.cli import app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def commands() -> list[tuple[str, Any]]:
    # typer vendors its own click, so groups and options are recognised by shape.
    root: Any = typer.main.get_command(app)
    out: list[tuple[str, Any]] = []
    for name, command in root.commands.items():
        if hasattr(command, "commands"):
            out += [(f"{name} {sub}", c) for sub, c in command.commands.items()]
        else:
            out.append((name, command))
    return out


def test_every_command_is_documented_with_help() -> None:
    names = [name for name, _ in commands()]
    assert {"score", "backfill", "train", "runs", "report", "demo", "evaluate"} <= set(names)
    assert {"models list", "models show", "models promote", "models rollback"} <= set(names)
    for name, command in commands():
        assert f"churn-batch {name}" in README, f"`churn-batch {name}` missing from README"
        assert command.help and command.help.strip(), f"{name} has no help text"
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, f"{name} {param.opts} has no help text"


def test_every_long_option_in_the_readme_exists() -> None:
    known = {opt for _, c in commands() for p in c.params for opt in getattr(p, "opts", [])}
    root: Any = typer.main.get_command(app)
    known |= {opt for p in root.params for opt in getattr(p, "opts", [])} | {"--help"}
    for option in set(re.findall(r"churn-batch [^\n`]*?(--[a-z-]+)", README)):
        assert option in known, f"README mentions {option}, which no command has"


def test_exit_code_table_matches_the_exceptions() -> None:
    rows = dict(re.findall(r"^\| (\d) \| ([^|]+)\|", README, flags=re.MULTILINE))
    assert sorted(int(code) for code in rows) == list(range(9))
    by_code = {
        cls.exit_code: cls
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ChurnBatchError)
    }
    for code, cls in by_code.items():
        assert str(code) in rows, f"{cls.__name__} (exit {code}) is not documented"


def test_config_keys_and_tables_are_documented() -> None:
    for key in ("id_column", "date_column", "label_column", "positive_label", "numeric",
                "categorical", "max_invalid_fraction", "registry", "alias", "batch_size",
                "psi_warn", "psi_block", "missing_rate_block", "holdout_fraction"):  # fmt: skip
        assert f"`{key}`" in README
    for table in ("churn_predictions", "churn_predictions_latest", "churn_scoring_runs",
                  "churn_rejected_rows", "churn_drift_metrics", "churn_evaluations"):  # fmt: skip
        assert f"`{table}`" in README

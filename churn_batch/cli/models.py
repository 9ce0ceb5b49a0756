"""`train` and `models list / show / promote / rollback`: fit, inspect and choose models."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import typer

from churn_batch.cli.app import app
from churn_batch.cli.common import fail, parse_date, reports_errors, state

if TYPE_CHECKING:
    from churn_batch.config import ModelConfig
    from churn_batch.registry import Registry

models_app = typer.Typer(
    name="models",
    help="Inspect the model registry, move the champion alias, sign checked versions.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

RefArg = Annotated[str, typer.Argument(help="Model version (v3) or alias (champion, challenger).")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why, for the registry history.")]

_METRICS = (
    ("roc_auc", "ROC AUC"),
    ("pr_auc", "PR AUC"),
    ("log_loss", "log loss"),
    ("brier", "Brier"),
    ("precision_top_10", "prec@10%"),
    ("lift_top_10", "lift@10%"),
    ("lift_top_20", "lift@20%"),
)


@app.command()
@reports_errors
def train(
    ctx: typer.Context,
    start: Annotated[
        str | None, typer.Option("--start", help="First snapshot date to train on (default: all).")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--end", help="Last snapshot date to train on, inclusive.")
    ] = None,
    promote: Annotated[
        bool,
        typer.Option(
            "--promote", help="Make it champion if it beats the champion on the same holdout."
        ),
    ] = False,
) -> None:
    """Fit candidate models on labelled snapshots and register the best as a new version.

    The candidates are evaluated on the latest dates (the holdout); with --promote the
    new version becomes champion only if it beats the champion on that same holdout.
    """
    config = state(ctx).config
    from churn_batch import training

    result = training.train(
        config,
        parse_date(start) if start else None,
        parse_date(end) if end else None,
        promote=promote,
    )
    typer.echo(
        f"Registered {config.model.name} {result.version}: {result.winner}"
        f"{' (calibrated)' if result.calibrated else ''}, trained on {result.train_rows:,} rows, "
        f"holdout {result.holdout} ({result.holdout_rows:,} rows)"
    )
    if result.unlabelled or result.rejected:
        typer.echo(
            f"Left out {result.unlabelled:,} rows without a label "
            f"and {result.rejected:,} rows rejected by the contract"
        )
    rows = [(name, metrics) for name, metrics in result.candidates.items()]
    rows.append((f"registered {result.version}", result.metrics))
    for line in _metrics_table(rows):
        typer.echo(line)
    typer.echo(f"{'Promoted' if result.promoted else 'Not promoted'}: {result.reason}")


@models_app.command("list")
@reports_errors
def list_models(ctx: typer.Context) -> None:
    """List the registered versions, newest last, with their holdout ROC AUC and aliases."""
    registry = _registry(state(ctx).config.model)
    summaries = registry.summaries()
    if not summaries:
        typer.echo(f"No model versions in {registry.home}")
        return
    typer.echo(f"{'version':<9}{'created (UTC)':<21}{'winner':<24}{'ROC AUC':>8}  aliases")
    for row in summaries:
        typer.echo(
            f"{row.version:<9}{row.created_at[:19].replace('T', ' '):<21}{row.winner:<24}"
            f"{_number(row.roc_auc):>8}  {', '.join(row.aliases)}"
        )


@models_app.command("show")
@reports_errors
def show(
    ctx: typer.Context,
    ref: RefArg,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the whole model card as JSON.")
    ] = False,
) -> None:
    """Show a version's model card: training data, metrics, calibration, tiers, libraries."""
    registry = _registry(state(ctx).config.model)
    version = registry.resolve(ref)
    card = registry.card(version)
    if as_json:
        from churn_batch.registry import jsonable

        typer.echo(json.dumps(jsonable(card), indent=2))
        return
    aliases = [alias for alias, v in sorted(registry.aliases().items()) if v == version]
    lines = _card_lines(card, version, aliases)
    problem = registry.signature_problem(registry.files(version))
    signature = "valid (signed with this machine's registry key)" if problem is None else problem
    lines.insert(lines.index(""), f"signature     {signature}")
    for line in lines:
        typer.echo(line)


@models_app.command("promote")
@reports_errors
def promote(ctx: typer.Context, ref: RefArg, reason: ReasonOpt = None) -> None:
    """Make a version the champion, after checking it loads and fits the config's contract."""
    config = state(ctx).config
    registry = _registry(config.model)
    move = registry.promote(
        ref, reason=reason or "promoted with `models promote`", contract=config.contract
    )
    if move.previous == move.version:
        typer.echo(f"{move.version} is already {move.alias}")
    else:
        typer.echo(f"{move.alias}: {move.previous or '(none)'} -> {move.version}")


@models_app.command("sign")
@reports_errors
def sign(
    ctx: typer.Context,
    ref: RefArg,
    yes: Annotated[
        bool, typer.Option("--yes", help="Do not ask: you have checked the sha256 shown.")
    ] = False,
    reason: ReasonOpt = None,
) -> None:
    """Sign a version with this machine's registry key, after a person checked its files.

    For a version registered before signing existed or with another key. Loading a
    model unpickles model.joblib, which runs any code in it: sign only files you know
    this registry wrote (compare the sha256 shown with your records or a backup). Never
    run it to silence a "was modified" or "does not match" error: restore or retrain.
    The key is CHURN_BATCH_REGISTRY_KEY, else ~/.config/churn-batch/registry.key
    ($XDG_CONFIG_HOME), made on first use.
    """
    registry = _registry(state(ctx).config.model)
    files = registry.files(ref)
    if registry.signature_problem(files) is None:
        typer.echo(f"{files.version} is already signed with this machine's registry key")
        return
    typer.echo(f"{files.directory}:")
    typer.echo(f"  model.joblib sha256 {files.model_sha256}")
    typer.echo(f"  card.json    sha256 {files.card_sha256}")
    if not yes:
        if not sys.stdin.isatty():
            raise fail("not signed: confirm in a terminal, or pass --yes", 2)
        if not typer.confirm(f"Sign {files.version}? Loading it will run model.joblib's code"):
            raise fail("not signed", 2)
    registry.sign(
        files.version,
        model_sha256=files.model_sha256,
        card_sha256=files.card_sha256,
        reason=reason or "signed with `models sign`",
    )
    typer.echo(f"Signed {files.version}")


@models_app.command("rollback")
@reports_errors
def rollback(ctx: typer.Context, reason: ReasonOpt = None) -> None:
    """Return the champion to the version that was champion before it."""
    config = state(ctx).config
    registry = _registry(config.model)
    move = registry.rollback(
        reason=reason or "rolled back with `models rollback`", contract=config.contract
    )
    typer.echo(f"{move.alias}: {move.previous} -> {move.version} (rolled back)")


# -- formatting ---------------------------------------------------------------------------


def _number(value: object, digits: int = 4) -> str:
    if isinstance(value, int | float) and not math.isnan(value):
        return f"{value:.{digits}f}"
    return "-"


def _metrics_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
    header = f"{'model':<26}" + "".join(f"{label:>10}" for _, label in _METRICS)
    lines = [header]
    for name, metrics in rows:
        cells = "".join(f"{_number(metrics.get(key)):>10}" for key, _ in _METRICS)
        lines.append(f"{name:<26}{cells}")
    return lines


def _card_lines(card: Mapping[str, Any], version: str, aliases: list[str]) -> list[str]:
    data = card.get("training_data", {})
    split = data.get("split", {})
    calibration = card.get("calibration", {})
    thresholds = card.get("thresholds", {})
    libraries = card.get("libraries", {})
    title = f"{card.get('name', '')} {version}" + (f" ({', '.join(aliases)})" if aliases else "")
    calibrated = "applied" if calibration.get("applied") else "not applied"
    lines = [
        title,
        f"created       {card.get('created_at', '-')}",
        f"trained on    {data.get('source', '-')}, "
        f"{data.get('first_date')}..{data.get('last_date')}, "
        f"{data.get('rows', 0):,} rows ({split.get('train_rows', 0):,} for training)",
        f"fingerprint   {data.get('fingerprint', '-')}",
        f"holdout       {split.get('kind', '-')}, {split.get('holdout_first_date')}.."
        f"{split.get('holdout_last_date')}, {split.get('holdout_rows', 0):,} rows",
        f"winner        {card.get('winner', '-')} {json.dumps(card.get('params', {}))}",
        f"calibration   {calibration.get('method', '-')} {calibrated} (holdout Brier "
        f"{_number(calibration.get('brier_uncalibrated'), 5)} -> "
        f"{_number(calibration.get('brier_calibrated'), 5)})",
        f"risk tiers    high >= {_number(thresholds.get('high'))}, "
        f"medium >= {_number(thresholds.get('medium'))}",
        "libraries     " + ", ".join(f"{k} {v}" for k, v in libraries.items()),
        f"artifact      model.joblib sha256 {card.get('model_sha256', '-')}",
        "",
    ]
    candidates = [(name, c.get("holdout", {})) for name, c in card.get("candidates", {}).items()]
    return lines + _metrics_table([*candidates, (f"registered {version}", card.get("metrics", {}))])


def _registry(config: ModelConfig) -> Registry:
    from churn_batch.registry import Registry

    return Registry.from_config(config)

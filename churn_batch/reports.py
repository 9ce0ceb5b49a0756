"""The run report: papermill executes `notebooks/churn_report.ipynb`, nbconvert renders HTML.

Two halves. `build_report` is the I/O edge the `report` command calls: it runs the
notebook in a kernel of THIS interpreter (so cron's bare environment cannot pick another
Python or fail with "No such kernel"), keeps the executed `.ipynb` and renders a
standalone HTML page without code cells. The rest are the report's tables and plots as
functions of a run record and prediction frames, so the notebook stays a thin page of
calls and its numbers are tested like any other code.

The library never prints: failures are `ReportError`s, outputs are returned paths.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from churn_batch import errors
from churn_batch.config import (
    PROJECT_ROOT,
    REPORTS_ENV_VAR,
    Config,
    ModelConfig,
    MonitoringConfig,
)
from churn_batch.dates import parse_date
from churn_batch.errors import ChurnBatchError, ModelError, ReportError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from pandas.io.formats.style import Styler

    from churn_batch.job import RunOutcome

REPORT_NOTEBOOK = PROJECT_ROOT / "notebooks" / "churn_report.ipynb"

REPORT_STEM = "churn_report"
# The notebook's parameters cell must declare exactly what `build_report` injects.
REPORT_PARAMETERS = ("run_date", "config_path")
TIERS = ("high", "medium", "low")
CELL_TIMEOUT_SECONDS = 600
KERNEL_START_TIMEOUT_SECONDS = 120

# Standalone means no network: drop the CDN scripts (require.js, MathJax) the lab
# template loads; the report has no widgets or maths and must open offline. Plots carry
# their own alternative text (`display(Image(..., metadata={"alt": ...}))`).
_TEMPLATE_NAME = "churn_report.html.j2"
_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{% block data_png scoped %}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
 alt="{{ ((output | get_metadata('alt', 'image/png')) or 'plot') | escape_html }}">
</div>
{% endblock data_png %}
"""


@dataclass(frozen=True)
class ReportFiles:
    notebook: Path
    html: Path


# -- the I/O edge -------------------------------------------------------------------------


def reports_dir_for(config: Config, env: Mapping[str, str] | None = None) -> Path:
    """`$CHURN_BATCH_REPORTS_DIR`, else `reports/` in the project the config belongs to.

    A config in a `configs/` directory belongs to the directory above it (as
    `configs/default.toml`, whose data lives in `../data`); any other config keeps its
    reports beside itself.
    """
    env = os.environ if env is None else env
    if env.get(REPORTS_ENV_VAR):
        return Path(env[REPORTS_ENV_VAR]).resolve()
    config_dir = config.path.parent
    project = config_dir.parent if config_dir.name == "configs" else config_dir
    return project / "reports"


def build_report(
    config: Config,
    snapshot_date: date,
    *,
    reports_dir: Path | None = None,
    notebook: Path = REPORT_NOTEBOOK,
) -> ReportFiles:
    """Execute the report notebook for `snapshot_date`; `reports/<date>/` gets .ipynb + .html.

    Refuses a date with no recorded run before starting a kernel. A failed cell raises
    `ReportError` naming the cell's error; its executed notebook is kept for diagnosis
    and any older HTML of that date is removed, so no stale page stands in for it.
    """
    latest_run(config, snapshot_date)
    target = (reports_dir or reports_dir_for(config)) / snapshot_date.isoformat()
    target.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(target / f"{REPORT_STEM}.ipynb", target / f"{REPORT_STEM}.html")
    parameters = {"run_date": snapshot_date.isoformat(), "config_path": str(config.path)}
    try:
        execute_notebook(notebook, files.notebook, parameters, cwd=target)
    except ReportError:
        files.html.unlink(missing_ok=True)
        raise
    render_html(files.notebook, files.html, title=f"Churn scoring report {snapshot_date}")
    return files


def execute_notebook(
    notebook: Path,
    output: Path,
    parameters: Mapping[str, Any],
    *,
    cwd: Path | None = None,
    cell_timeout: int = CELL_TIMEOUT_SECONDS,
) -> None:
    """Run `notebook` with papermill in a kernel of this interpreter; write it to `output`."""
    if not notebook.is_file():
        raise ReportError(f"report notebook not found: {notebook}")
    with tempfile.TemporaryDirectory(prefix="churn-batch-kernel-") as scratch:
        kernel_log = Path(scratch) / "kernel.log"
        with kernel_log.open("wb") as log_file:
            manager = this_interpreter_kernel_manager(Path(scratch), log_file.fileno())
            try:
                _run_papermill(notebook, output, parameters, cwd, cell_timeout, manager)
            except ReportError as exc:
                if exc.kernel_failed:
                    exc.add_detail(_tail(kernel_log))
                raise


def _run_papermill(
    notebook: Path,
    output: Path,
    parameters: Mapping[str, Any],
    cwd: Path | None,
    cell_timeout: int,
    kernel_manager: type[Any],
) -> None:
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            str(notebook),
            str(output),
            parameters=dict(parameters),
            kernel_name="python3",
            language="python",
            cwd=str(cwd) if cwd else None,
            progress_bar=False,
            log_output=False,
            start_timeout=KERNEL_START_TIMEOUT_SECONDS,
            execution_timeout=cell_timeout,
            kernel_manager_class=kernel_manager,
        )
    except PapermillExecutionError as exc:
        raise ReportError(
            f"report notebook {notebook.name} failed at cell In [{exc.exec_count}]: "
            f"{exc.ename}: {exc.evalue} (executed notebook kept at {output})",
            exit_code=_exit_code_of(exc.ename),
        ) from None
    except (CellTimeoutError, DeadKernelError, RuntimeError, TimeoutError) as exc:
        # Kernel failed to start, died, or a cell ran past the timeout.
        raise ReportError(
            f"report notebook {notebook.name} did not finish: {type(exc).__name__}: {exc} "
            f"(partial notebook at {output})",
            kernel_failed=True,
        ) from None


def this_interpreter_kernel_manager(scratch: Path, log_fd: int) -> type[Any]:
    """A kernel manager whose kernel is `sys.executable -m ipykernel_launcher`, always.

    papermill resolves a kernel *name* through kernelspec directories ($JUPYTER_PATH,
    ~/.local/share/jupyter, the environment's, the system's), which differ between a
    shell and cron and may point at another Python. Fixing the spec to this interpreter
    makes the kernel the same Python, with the same packages, as the process asking.
    The kernel talks over Unix sockets in the private directory `scratch`, not over
    unencrypted localhost TCP ports that any local user could reach, and its own
    stdout/stderr go to `log_fd`: the shutdown chatter ("KeyboardInterrupt caught in
    kernel") stays out of the job's log, and a kernel that dies can still say why.
    """
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    class ThisInterpreterKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", str(scratch / "kernel"))
            super().__init__(**kwargs)

        @property
        def kernel_spec(self) -> KernelSpec:
            if self._kernel_spec is None:
                self._kernel_spec = KernelSpec(
                    argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                    display_name=f"Python {sys.version_info.major}.{sys.version_info.minor}",
                    language="python",
                    name=self.kernel_name,
                )
            return self._kernel_spec

        # AsyncKernelManager's start_kernel is a coroutine; its base class types it as sync.
        async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
            kw.setdefault("stdout", log_fd)
            kw.setdefault("stderr", log_fd)
            await super().start_kernel(**kw)

    return ThisInterpreterKernelManager


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def render_html(notebook: Path, html: Path, *, title: str) -> None:
    """Standalone HTML of an executed notebook: outputs only, images inline, no CDN."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(  # type: ignore[no-untyped-call]
        extra_loaders=[jinja2.DictLoader({_TEMPLATE_NAME: _TEMPLATE})],
        template_file=_TEMPLATE_NAME,
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    node = nbformat.read(notebook, as_version=4)  # type: ignore[no-untyped-call]
    node.metadata["title"] = title
    body, _ = exporter.from_notebook_node(node)
    # Replace, never truncate in place: a reader never sees half a page.
    partial = html.with_name(f".{html.name}.{os.getpid()}.tmp")
    partial.write_text(body, encoding="utf-8")
    partial.replace(html)


def _exit_code_of(ename: str) -> int:
    """A cell that raised one of our errors (say StorageUnavailable) keeps its exit code."""
    cls = getattr(errors, ename, None)
    if isinstance(cls, type) and issubclass(cls, ChurnBatchError):
        return cls.exit_code
    return ReportError.exit_code


# -- what the notebook reads ------------------------------------------------------------------


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows about one snapshot date."""

    snapshot_date: date
    run: dict[str, Any]
    predictions: pd.DataFrame
    previous_date: date | None
    previous: pd.DataFrame | None
    card: dict[str, Any] | None
    monitoring: MonitoringConfig

    @property
    def summary(self) -> dict[str, Any]:
        return run_summary(self.run)


def latest_run(config: Config, snapshot_date: date) -> dict[str, Any]:
    """The newest run recorded for `snapshot_date`; `ReportError` if it was never scored."""
    from churn_batch.sinks import Sink

    with Sink(config.sink) as sink:
        sink.prepare()
        found = sink.runs(limit=1, snapshot_date=snapshot_date)
    if not found:
        raise ReportError(
            f"no scoring run recorded for {snapshot_date}: "
            f"run `churn-batch score --date {snapshot_date}` first"
        )
    return found[0]


def load_report_data(config: Config, snapshot_date: date) -> ReportData:
    """Read the run, this date's and the previous published date's predictions, the card."""
    from churn_batch.sinks import Sink

    run = latest_run(config, snapshot_date)
    with Sink(config.sink) as sink:
        published = sink.published_dates()
        predictions = (
            sink.predictions(snapshot_date).to_pandas()
            if snapshot_date in published
            else pd.DataFrame(columns=["customer_id", "churn_probability", "risk_tier"])
        )
        previous_date = previous_published_date(published, snapshot_date)
        previous = sink.predictions(previous_date).to_pandas() if previous_date else None
    version = run.get("model_version")
    card = load_card(config.model, version) if version else None
    return ReportData(
        snapshot_date, run, predictions, previous_date, previous, card, config.monitoring
    )


def load_card(config: ModelConfig, version: str) -> dict[str, Any] | None:
    """The version's model card (JSON only: a report never unpickles a model); None if gone."""
    from churn_batch.registry import Registry

    try:
        return Registry.from_config(config).card(version)
    except ModelError:
        return None


def run_date(text: str, *, today: date | None = None) -> date:
    """A notebook's `run_date` parameter: the same words as the CLI's `--date`."""
    return parse_date(text, today=today, what="run_date")


# -- pure tables ------------------------------------------------------------------------------


def run_summary(run: Mapping[str, Any]) -> dict[str, Any]:
    """The run's JSON summary as a dict (the runs table keeps it as text)."""
    summary = run.get("summary")
    if isinstance(summary, str):
        summary = json.loads(summary) if summary.strip() else None
    return dict(summary) if isinstance(summary, Mapping) else {}


def previous_published_date(published: Sequence[date], snapshot_date: date) -> date | None:
    earlier = [d for d in published if d < snapshot_date]
    return max(earlier) if earlier else None


def run_overview(run: Mapping[str, Any]) -> pd.DataFrame:
    """Two columns, item and value: what ran, when, with which model, on how many rows.

    (The error, if any, is long: the report shows it on its own line.)
    """
    started, finished = run.get("started_at"), run.get("finished_at")
    seconds = (finished - started).total_seconds() if started and finished else None
    gate = run_summary(run).get("gate") or {}
    rows: list[tuple[str, Any]] = [
        ("status", run.get("status")),
        ("snapshot date", str(run.get("snapshot_date"))),
        ("model version", run.get("model_version") or "-"),
        ("rows read", _count(run.get("rows_read"))),
        ("rows scored", _count(run.get("rows_scored"))),
        ("rows rejected", _count(run.get("rows_rejected"))),
        ("drift gate", gate.get("level", "-")),
        ("started (UTC)", _stamp(started)),
        ("finished (UTC)", _stamp(finished)),
        ("duration", f"{seconds:.1f} s" if seconds is not None else "-"),
        ("run id", run.get("run_id")),
    ]
    return pd.DataFrame(rows, columns=["item", "value"])


def status_line(run: Mapping[str, Any], *, published: bool, predictions: pd.DataFrame) -> str:
    """One Markdown sentence: how the latest run ended and what is published for its date."""
    status = str(run.get("status"))
    if status == "succeeded":
        return (
            f"**Status: succeeded.** Published {len(predictions):,} predictions "
            f"with model `{run.get('model_version')}`."
        )
    if not published:
        return f"**Status: {status}.** Nothing is published for {run.get('snapshot_date')}."
    runs = sorted(set(predictions["run_id"])) if "run_id" in predictions else []
    source = f" from run `{runs[0]}`" if len(runs) == 1 else ""
    return (
        f"**Status: {status}.** The predictions published earlier were left as they were: "
        f"{len(predictions):,} rows{source}. The sections below show those predictions "
        "and what the failed run measured."
    )


def outcome_table(outcome: RunOutcome) -> pd.DataFrame:
    """Two columns, item and value, for a run that `job.score_date` just published."""
    scores = outcome.summary.get("scores") or {}
    shares = scores.get("tier_shares") or {}
    gate = outcome.summary.get("gate") or {}
    rows: list[tuple[str, str]] = [
        ("status", outcome.status),
        ("snapshot date", outcome.snapshot_date.isoformat()),
        ("model version", outcome.model_version or "-"),
        ("rows read", _count(outcome.rows_read)),
        ("rows scored", _count(outcome.rows_scored)),
        ("rows rejected", _count(outcome.rows_rejected)),
        ("drift gate", str(gate.get("level", "-"))),
        ("score PSI", _fixed(scores.get("psi"))),
        ("mean churn probability", _fixed(scores.get("mean"))),
        *((f"{tier} tier share", _percent(shares.get(tier))) for tier in TIERS),
        ("duration", f"{outcome.seconds:.1f} s"),
        ("run id", outcome.run_id),
    ]
    return pd.DataFrame(rows, columns=["item", "value"])


def level_style(level: object) -> str:
    """CSS for a drift level cell: the gate's colours, as in the drift plot."""
    return {
        "warn": "color: #b35c00; font-weight: bold",
        "block": "color: #c0392b; font-weight: bold",
    }.get(str(level), "")


def score_distribution(
    scores: Mapping[str, Any], reference: Mapping[str, Any] | None
) -> pd.DataFrame:
    """Per score bin: its bounds, this run's share and the training reference's share.

    The bins are the reference's (training-score deciles); the first and last are
    open-ended, closed here at 0 and 1 since scores are probabilities.
    """
    edges = [float(e) for e in scores.get("edges", [])]
    counts = [float(c) for c in scores.get("histogram", [])]
    if len(counts) != len(edges) + 1:
        return pd.DataFrame(columns=["lower", "upper", "run_share", "reference_share"])
    bounds = [0.0, *edges, 1.0]
    total = sum(counts)
    ref = [float(f) for f in (reference or {}).get("fractions", [])]
    if len(ref) != len(counts):
        ref = [math.nan] * len(counts)
    return pd.DataFrame(
        {
            "lower": bounds[:-1],
            "upper": bounds[1:],
            "run_share": [c / total if total else 0.0 for c in counts],
            "reference_share": ref,
        }
    )


def tier_counts(predictions: pd.DataFrame, previous: pd.DataFrame | None) -> pd.DataFrame:
    """Customers per risk tier, their share, and the change since the previous date."""
    now = _tier_series(predictions)
    frame = pd.DataFrame({"tier": list(TIERS), "customers": now.to_numpy()})
    total = int(now.sum())
    frame["share"] = frame["customers"] / total if total else 0.0
    if previous is None:
        frame["previous"] = math.nan
        frame["change"] = math.nan
    else:
        before = _tier_series(previous)
        frame["previous"] = before.to_numpy()
        frame["change"] = frame["customers"] - frame["previous"]
    return frame


def drift_table(summary: Mapping[str, Any], monitoring: MonitoringConfig) -> pd.DataFrame:
    """Per feature: PSI, missing rate and its change, and the gate level it reaches."""
    rows = []
    for feature, values in (summary.get("drift") or {}).items():
        limits = monitoring.for_feature(feature)
        psi = _number(values.get("psi"))
        change = _number(values.get("missing_rate_change"))
        if psi >= limits.psi_block or change > limits.missing_rate_block:
            level = "block"
        elif psi >= limits.psi_warn:
            level = "warn"
        else:
            level = "ok"
        rows.append(
            {
                "feature": feature,
                "psi": psi,
                "missing_rate": _number(values.get("missing_rate")),
                # Rounded to what the report shows, so a tiny fall is not "-0.0%".
                "missing_rate_change": round(change, 4) + 0.0,
                "level": level,
            }
        )
    columns = ["feature", "psi", "missing_rate", "missing_rate_change", "level"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values(["psi", "feature"], ascending=[False, True], ignore_index=True)


def rejected_reasons(summary: Mapping[str, Any]) -> pd.DataFrame:
    """Rejected rows per reason, most frequent first, with their share of the rejections."""
    reasons = {str(k): int(v) for k, v in (summary.get("rejected_reasons") or {}).items()}
    frame = pd.DataFrame(sorted(reasons.items()), columns=["reason", "rows"])
    total = int(frame["rows"].sum())
    frame["share"] = frame["rows"] / total if total else 0.0
    return frame.sort_values(["rows", "reason"], ascending=[False, True], ignore_index=True)


def top_at_risk(predictions: pd.DataFrame, n: int = 20) -> pd.DataFrame:
    """The `n` customers most likely to churn (ties by customer id), ranked from 1."""
    columns = ["customer_id", "churn_probability", "risk_tier"]
    top = predictions.sort_values(
        ["churn_probability", "customer_id"], ascending=[False, True]
    ).head(n)
    top = top[columns].reset_index(drop=True)
    top.insert(0, "rank", range(1, len(top) + 1))
    return top


def tier_thresholds(card: Mapping[str, Any] | None) -> dict[str, float]:
    """The card's tier thresholds ({"high": p, "medium": p}); empty when unknown."""
    found = (card or {}).get("thresholds") or (card or {}).get("tier_thresholds") or {}
    return {t: float(v) for t, v in found.items() if t in TIERS and _is_number(v)}


def score_reference(card: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The training score distribution the card keeps for drift, if any."""
    reference = (card or {}).get("reference") or {}
    score = reference.get("score")
    return dict(score) if isinstance(score, Mapping) else None


def table(
    frame: pd.DataFrame,
    formats: Mapping[str, str] | None = None,
    *,
    labels: Mapping[str, str] | None = None,
    header: bool = True,
) -> Styler:
    """A frame as the report shows it: no index, readable headers, text left-aligned.

    `formats` and `labels` are keyed by the frame's column names.
    """
    names = {c: (labels or {}).get(str(c), str(c).replace("_", " ")) for c in frame.columns}
    text: list[Hashable] = [
        names[c] for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])
    ]
    styler = (
        frame.rename(columns=names)
        .style.format({names[c]: spec for c, spec in (formats or {}).items()}, na_rep="-")
        .hide(axis="index")
    )
    if text:
        styler = styler.set_properties(subset=text, **{"text-align": "left"})
        styler = styler.set_table_styles(
            {name: [{"selector": "th", "props": "text-align: left"}] for name in text}
        )
    return styler.hide(axis="columns") if not header else styler


# -- plots --------------------------------------------------------------------------------------


def bin_labels(bins: pd.DataFrame) -> list[str]:
    """`[lower, upper)` for each score bin, the last closed at 1; short but distinct."""
    last = len(bins) - 1
    return [
        f"[{lo:.3g}, {hi:.3g}{']' if i == last else ')'}"
        for i, (lo, hi) in enumerate(zip(bins["lower"], bins["upper"], strict=True))
    ]


def plot_score_distribution(
    bins: pd.DataFrame, thresholds: Mapping[str, float] | None = None
) -> Figure:
    """Share of customers per score bin, this run next to the training reference.

    The bins are deciles of the training scores, so the reference holds about a tenth
    in each and a shift shows as bars that differ; deciles can be very narrow (scores
    cluster), so the bins sit side by side rather than on a probability axis.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(bins)))
    ax.bar([i - 0.2 for i in x], bins["run_share"], width=0.4, color="#4c78a8", label="this run")
    if bins["reference_share"].notna().all():
        ax.bar(
            [i + 0.2 for i in x], bins["reference_share"], width=0.4,
            color="#e45756", alpha=0.8, label="training reference",
        )  # fmt: skip
    ax.set_xticks(x, bin_labels(bins), rotation=30, ha="right", fontsize=8)
    ax.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    ax.set_xlabel("churn probability bin (deciles of the training scores)")
    ax.set_ylabel("share of customers")
    if thresholds:
        cuts = ", ".join(
            f"{t} ≥ {v:.2f}" for t, v in sorted(thresholds.items(), key=lambda i: -i[1])
        )
        ax.set_title(f"risk tiers: {cuts}", fontsize=9, loc="left", color="#333333")
    ax.legend(loc="upper right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def plot_drift(drift: pd.DataFrame, monitoring: MonitoringConfig) -> Figure:
    """PSI per feature as horizontal bars, coloured by gate level, with the thresholds."""
    from matplotlib.figure import Figure

    colours = {"ok": "#54a24b", "warn": "#f58518", "block": "#e45756"}
    ordered = drift.iloc[::-1]
    fig = Figure(figsize=(9, 0.3 * max(len(drift), 4) + 1.2), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(
        ordered["feature"], ordered["psi"],
        color=[colours.get(level, "#999999") for level in ordered["level"]],
    )  # fmt: skip
    limits = monitoring.default
    ax.axvline(limits.psi_warn, color=colours["warn"], ls="--", lw=1, label="warn")
    ax.axvline(limits.psi_block, color=colours["block"], ls="--", lw=1, label="block")
    top = float(drift["psi"].max()) if len(drift) else 0.0
    ax.set_xlim(0, max(top, limits.psi_block) * 1.15)
    ax.set_xlabel("population stability index (PSI)")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(loc="lower right", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def performance_trend(config: Config) -> pd.DataFrame:
    """Realized performance per evaluated date (`churn-batch evaluate`), oldest first."""
    from churn_batch.evaluation import history

    columns = ["snapshot_date", "model_version", "rows_matched", "roc_auc", "pr_auc",
               "lift_top_10", "brier"]  # fmt: skip
    rows = history(config)
    return pd.DataFrame([{k: row[k] for k in columns} for row in rows], columns=columns)


def plot_performance(trend: pd.DataFrame) -> Figure:
    """ROC AUC and lift in the top decile over the evaluated dates."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2), layout="constrained")
    auc, lift = fig.subplots(1, 2)
    dates = [str(d) for d in trend["snapshot_date"]]
    auc.plot(dates, trend["roc_auc"], marker="o", color="#4c78a8")
    auc.set_title("ROC AUC")
    lift.plot(dates, trend["lift_top_10"], marker="o", color="#f58518")
    lift.set_title("lift in the top 10%")
    for ax in (auc, lift):
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    return fig


def png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (no pyplot state, no display backend needed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# -- small helpers ------------------------------------------------------------------------------


def _tier_series(predictions: pd.DataFrame) -> pd.Series[int]:
    counts = predictions["risk_tier"].value_counts() if len(predictions) else pd.Series()
    return pd.Series([int(counts.get(t, 0)) for t in TIERS], index=list(TIERS))


def _number(value: Any) -> float:
    return float(value) if _is_number(value) else math.nan


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _count(value: Any) -> str:
    return f"{int(value):,}" if _is_number(value) else "-"


def _fixed(value: Any) -> str:
    return f"{float(value):.3f}" if _is_number(value) else "-"


def _percent(value: Any) -> str:
    return f"{float(value):.1%}" if _is_number(value) else "-"


def _stamp(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"

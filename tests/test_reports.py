"""The run report: its tables, its plots, the papermill/nbconvert plumbing and the notebooks."""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from churn_batch import reports
from churn_batch.config import DriftThresholds, MonitoringConfig
from churn_batch.reports import ReportError

PROJECT = Path(__file__).resolve().parent.parent
NOTEBOOKS = PROJECT / "notebooks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def predictions(*rows: tuple[str, float, str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["customer_id", "churn_probability", "risk_tier"])


# -- pure tables ---------------------------------------------------------------------------


def test_score_distribution_closes_the_open_bins_at_0_and_1() -> None:
    scores = {"edges": [0.2, 0.5], "histogram": [1, 2, 1], "psi": 0.01, "mean": 0.4}
    bins = reports.score_distribution(scores, {"edges": [0.2, 0.5], "fractions": [0.5, 0.3, 0.2]})
    assert bins.to_dict("list") == {
        "lower": [0.0, 0.2, 0.5],
        "upper": [0.2, 0.5, 1.0],
        "run_share": [0.25, 0.5, 0.25],
        "reference_share": [0.5, 0.3, 0.2],
    }


def test_bin_labels() -> None:
    bins = reports.score_distribution({"edges": [0.0463, 0.5], "histogram": [1, 2, 1]}, None)
    assert reports.bin_labels(bins) == ["[0, 0.0463)", "[0.0463, 0.5)", "[0.5, 1]"]


def test_score_distribution_without_a_reference_or_with_a_broken_histogram() -> None:
    bins = reports.score_distribution({"edges": [0.5], "histogram": [3, 1]}, None)
    assert bins["run_share"].tolist() == [0.75, 0.25]
    assert bins["reference_share"].isna().all()
    assert reports.score_distribution({"edges": [0.5], "histogram": [3]}, None).empty


def test_tier_counts_and_their_change() -> None:
    now = predictions(("a", 0.9, "high"), ("b", 0.5, "medium"), ("c", 0.4, "medium"))
    before = predictions(("a", 0.8, "high"), ("b", 0.1, "low"), ("c", 0.2, "low"))
    tiers = reports.tier_counts(now, before)
    assert tiers["tier"].tolist() == ["high", "medium", "low"]
    assert tiers["customers"].tolist() == [1, 2, 0]
    assert tiers["previous"].tolist() == [1, 0, 2]
    assert tiers["change"].tolist() == [0, 2, -2]
    assert tiers["share"].round(3).tolist() == [0.333, 0.667, 0.0]
    first = reports.tier_counts(now, None)
    assert first["previous"].isna().all() and first["change"].isna().all()


def test_drift_table_levels_follow_the_monitoring_thresholds() -> None:
    summary = {
        "drift": {
            "tenure": {"psi": 0.02, "missing_rate": 0.0, "missing_rate_change": 0.0},
            "contract": {"psi": 0.3, "missing_rate": 0.0, "missing_rate_change": 0.0},
            "charges": {"psi": 0.12, "missing_rate": 0.01, "missing_rate_change": 0.01},
            "gender": {"psi": 0.01, "missing_rate": 0.4, "missing_rate_change": 0.35},
            "partner": {"psi": 0.12, "missing_rate": 0.0, "missing_rate_change": 0.0},
        }
    }
    strict = MonitoringConfig(features={"partner": DriftThresholds(psi_warn=0.05, psi_block=0.1)})
    table = reports.drift_table(summary, strict)
    assert table["feature"].tolist() == ["contract", "charges", "partner", "tenure", "gender"]
    assert table["level"].tolist() == ["block", "warn", "block", "ok", "block"]
    assert reports.drift_table({}, MonitoringConfig()).empty


def test_rejected_reasons_most_frequent_first() -> None:
    table = reports.rejected_reasons({"rejected_reasons": {"null id": 1, "bad tenure": 3}})
    assert table.to_dict("list") == {
        "reason": ["bad tenure", "null id"],
        "rows": [3, 1],
        "share": [0.75, 0.25],
    }
    assert reports.rejected_reasons({"rejected_reasons": {}}).empty


def test_top_at_risk_ranks_by_probability_then_id() -> None:
    frame = predictions(
        ("b", 0.7, "high"), ("a", 0.7, "high"), ("c", 0.9, "high"), ("d", 0.1, "low")
    )
    top = reports.top_at_risk(frame, 3)
    assert top["customer_id"].tolist() == ["c", "a", "b"]
    assert top["rank"].tolist() == [1, 2, 3]
    assert list(top.columns) == ["rank", "customer_id", "churn_probability", "risk_tier"]


def test_run_summary_from_text_dict_or_nothing() -> None:
    assert reports.run_summary({"summary": '{"gate": {"level": "ok"}}'}) == {
        "gate": {"level": "ok"}
    }
    assert reports.run_summary({"summary": {"a": 1}}) == {"a": 1}
    assert reports.run_summary({"summary": None}) == {}
    assert reports.run_summary({}) == {}


def test_previous_published_date() -> None:
    dates = [date(2026, 5, 1), date(2026, 5, 3), date(2026, 5, 4)]
    assert reports.previous_published_date(dates, date(2026, 5, 4)) == date(2026, 5, 3)
    assert reports.previous_published_date(dates, date(2026, 5, 2)) == date(2026, 5, 1)
    assert reports.previous_published_date(dates, date(2026, 5, 1)) is None


def test_card_fields_are_read_defensively() -> None:
    card = {"thresholds": {"high": 0.6, "medium": 0.3}, "reference": {"score": {"fractions": [1]}}}
    assert reports.tier_thresholds(card) == {"high": 0.6, "medium": 0.3}
    assert reports.score_reference(card) == {"fractions": [1]}
    assert reports.tier_thresholds(None) == {} and reports.score_reference({}) is None


def test_run_overview_and_status_line() -> None:
    started = datetime(2026, 5, 2, 2, 30, tzinfo=UTC)
    run = {
        "run_id": "r2", "snapshot_date": date(2026, 5, 1), "status": "blocked",
        "started_at": started, "finished_at": started.replace(second=12),
        "model_version": "v3", "rows_read": 1000, "rows_scored": 990, "rows_rejected": 10,
        "error": "drift gate blocked publication", "summary": {"gate": {"level": "block"}},
    }  # fmt: skip
    overview = dict(reports.run_overview(run).itertuples(index=False))
    assert overview["status"] == "blocked" and overview["rows read"] == "1,000"
    assert overview["duration"] == "12.0 s" and overview["drift gate"] == "block"
    assert "error" not in overview
    earlier = predictions(("a", 0.2, "low")).assign(run_id="r1")
    line = reports.status_line(run, published=True, predictions=earlier)
    assert "blocked" in line and "left as they were" in line and "`r1`" in line
    assert "Nothing is published" in reports.status_line(
        run, published=False, predictions=predictions()
    )
    ok = reports.status_line({**run, "status": "succeeded"}, published=True, predictions=earlier)
    assert ok.startswith("**Status: succeeded.** Published 1 predictions")


def test_plots_are_png() -> None:
    bins = reports.score_distribution(
        {"edges": [0.2, 0.5], "histogram": [5, 3, 2]}, {"fractions": [0.4, 0.4, 0.2]}
    )
    figure = reports.plot_score_distribution(bins, {"high": 0.5, "medium": 0.2})
    assert reports.png(figure).startswith(PNG_MAGIC)
    drift = reports.drift_table(
        {"drift": {"x": {"psi": 0.3, "missing_rate": 0, "missing_rate_change": 0}}},
        MonitoringConfig(),
    )
    assert reports.png(reports.plot_drift(drift, MonitoringConfig())).startswith(PNG_MAGIC)


def test_reports_dir_belongs_to_the_configs_project(tmp_path: Path) -> None:
    class Cfg:
        def __init__(self, path: Path) -> None:
            self.path = path

    in_configs = Cfg(tmp_path / "proj" / "configs" / "prod.toml")
    elsewhere = Cfg(tmp_path / "etc" / "churn.toml")
    assert reports.reports_dir_for(in_configs, env={}) == tmp_path / "proj" / "reports"  # type: ignore[arg-type]
    assert reports.reports_dir_for(elsewhere, env={}) == tmp_path / "etc" / "reports"  # type: ignore[arg-type]
    env = {reports.REPORTS_ENV_VAR: str(tmp_path / "r")}
    assert reports.reports_dir_for(elsewhere, env=env) == tmp_path / "r"  # type: ignore[arg-type]


# -- the notebooks declare what the jobs inject ----------------------------------------------------


@pytest.mark.parametrize("name", ["churn_report.ipynb", "nightly_scoring.ipynb"])
def test_notebook_parameters_cell(name: str) -> None:
    declared = papermill.inspect_notebook(str(NOTEBOOKS / name))
    assert {k: v["default"] for k, v in declared.items()} == {
        "run_date": '"yesterday"',
        "config_path": '""',
    }
    assert set(declared) == set(reports.REPORT_PARAMETERS)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")


# -- papermill and nbconvert plumbing on a trivial notebook ------------------------------------


def trivial_notebook(path: Path, body: str) -> Path:
    params = new_code_cell('value = "default"')
    params.metadata["tags"] = ["parameters"]
    notebook = new_notebook(
        cells=[new_markdown_cell("## A heading"), params, new_code_cell(body)],
        # A kernel name that exists nowhere: the report must not depend on kernelspecs.
        metadata={
            "kernelspec": {"name": "no-such-kernel", "display_name": "x", "language": "python"}
        },
    )
    nbformat.write(notebook, path)
    return path


PLOT_CELL = """
import sys
from IPython.display import Image, display
from matplotlib.figure import Figure
from churn_batch import reports
figure = Figure()
figure.add_subplot().plot([1, 3, 2])
display(Image(reports.png(figure), metadata={"alt": "A <line> plot"}))
print("kernel python:", sys.executable, "value:", value)
"""


@pytest.mark.slow
def test_execute_and_render(tmp_path: Path) -> None:
    """No kernelspec lookup: the kernel is this interpreter whatever the notebook names.

    (The crontab test runs the real report under cron's empty environment.)
    """
    source = trivial_notebook(tmp_path / "t.ipynb", PLOT_CELL)
    executed, html_file = tmp_path / "out.ipynb", tmp_path / "out.html"
    reports.execute_notebook(source, executed, {"value": "injected"}, cwd=tmp_path)
    reports.render_html(executed, html_file, title="Trivial")
    text = executed.read_text(encoding="utf-8")
    assert f"kernel python: {sys.executable} value: injected" in text
    html = html_file.read_text(encoding="utf-8")
    assert_report_html(html, images=1)
    assert "<title>Trivial</title>" in html and "A heading" in html
    assert 'alt="A &lt;line&gt; plot"' in html
    # No kernel sockets, connection files or temporary HTML left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.html", "out.ipynb", "t.ipynb"]


def assert_report_html(html: str, *, images: int) -> None:
    """Standalone, outputs only: no code cells, plots inline, nothing fetched from a CDN."""
    body = html.split("<body", 1)[1]
    code_cells = re.findall(r'<div class="(jp-Cell jp-CodeCell[^"]*)"', body)
    assert code_cells and all("jp-mod-noInput" in classes for classes in code_cells)
    # (Markdown cells render inside a jp-InputArea too; code would be in an editor.)
    assert not re.search(r'class="[^"]*\b(jp-InputArea-editor|input_area|highlight)\b', body)
    assert "reports.png(" not in body and "import " not in body
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', body)) >= images
    assert not re.search(r'<script[^>]+src="https?://', html), "external script in the HTML"


@pytest.mark.slow
def test_a_failing_cell_names_its_error(tmp_path: Path) -> None:
    source = trivial_notebook(tmp_path / "t.ipynb", "raise ValueError('no tiers in the card')")
    output = tmp_path / "out.ipynb"
    with pytest.raises(ReportError) as caught:
        reports.execute_notebook(source, output, {"value": "x"}, cwd=tmp_path)
    assert str(caught.value) == (
        "report notebook t.ipynb failed at cell In [3]: ValueError: no tiers in the card "
        f"(executed notebook kept at {output})"
    )
    assert caught.value.exit_code == 1
    cells = json.loads(output.read_text(encoding="utf-8"))["cells"]
    errors = [o for c in cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert [e["ename"] for e in errors] == ["ValueError"]


def test_a_cell_raising_our_error_keeps_its_exit_code() -> None:
    assert reports._exit_code_of("StorageUnavailable") == 7
    assert reports._exit_code_of("RunLocked") == 8
    assert reports._exit_code_of("ValueError") == 1
    assert reports._exit_code_of("Path") == 1


def test_a_missing_notebook(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="report notebook not found"):
        reports.execute_notebook(tmp_path / "nope.ipynb", tmp_path / "out.ipynb", {})


# -- end to end: the notebooks against a real published run -------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, date]:
    """A project in a temporary directory: demo snapshots, a champion, a date scored by CLI."""
    from typer.testing import CliRunner

    from churn_batch.cli import app

    root = tmp_path_factory.mktemp("project")
    (root / "configs").mkdir()
    config = root / "configs" / "default.toml"
    text = (PROJECT / "configs" / "default.toml").read_text(encoding="utf-8")
    if "[training]" not in text:  # two folds instead of three: a faster test
        text += "\n[training]\ncv_folds = 2\n"
    config.write_text(text, encoding="utf-8")
    runner = CliRunner()
    snapshot_date = datetime.now(UTC).date() - timedelta(days=1)
    for args in (
        ["demo", "--customers", "300", "--days", "5", "--train-days", "4"],
        ["score", "--date", snapshot_date.isoformat()],
    ):
        result = runner.invoke(app, ["--config", str(config), *args])
        assert result.exit_code == 0, result.output
    return config, snapshot_date


def published(config: Path, snapshot_date: date) -> pd.DataFrame:
    from churn_batch.config import load_config
    from churn_batch.sinks import Sink

    with Sink(load_config(config).sink) as sink:
        return sink.predictions(snapshot_date).to_pandas()


@pytest.mark.slow
def test_nightly_notebook_publishes_what_the_cli_publishes(
    scored: tuple[Path, date], tmp_path: Path
) -> None:
    config, snapshot_date = scored
    by_cli = published(config, snapshot_date)
    output = tmp_path / "nightly.ipynb"
    reports.execute_notebook(
        NOTEBOOKS / "nightly_scoring.ipynb",
        output,
        {"run_date": snapshot_date.isoformat(), "config_path": str(config)},
        cwd=tmp_path,
    )
    by_notebook = published(config, snapshot_date)
    columns = ["customer_id", "churn_probability", "risk_tier", "model_version"]
    pd.testing.assert_frame_equal(by_notebook[columns], by_cli[columns])
    assert set(by_notebook["run_id"]) != set(by_cli["run_id"])  # a second run replaced the date
    assert f"Published **{len(by_cli):,}** predictions" in output.read_text(encoding="utf-8")


@pytest.mark.slow
def test_report_command_writes_html_and_notebook(scored: tuple[Path, date]) -> None:
    from typer.testing import CliRunner

    from churn_batch.cli import app

    config, snapshot_date = scored
    runner = CliRunner()
    args = ["--config", str(config)]
    evaluated = runner.invoke(app, [*args, "evaluate", "--date", snapshot_date.isoformat()])
    assert evaluated.exit_code == 0, evaluated.output
    result = runner.invoke(app, [*args, "report", "--date", snapshot_date.isoformat()])
    assert result.exit_code == 0, result.output
    folder = config.parent.parent / "reports" / snapshot_date.isoformat()
    assert result.output == (
        f"Report for {snapshot_date}: {folder / 'churn_report.html'}\n"
        f"Executed notebook: {folder / 'churn_report.ipynb'}\n"
    )
    html = (folder / "churn_report.html").read_text(encoding="utf-8")
    assert_report_html(html, images=3)  # score distribution, drift, realized performance
    sections = ["Risk tiers", "Feature drift", "Realized performance", "Rejected rows",
                "Top at-risk customers"]  # fmt: skip
    for text in [f"Churn scoring report: {snapshot_date}", "Status: succeeded", *sections]:
        assert text in html
    top = published(config, snapshot_date).sort_values("churn_probability").iloc[-1]
    assert str(top["customer_id"]) in html
    executed = nbformat.read(folder / "churn_report.ipynb", as_version=4)
    assert not [o for c in executed.cells for o in c.get("outputs", []) if o.output_type == "error"]


@pytest.mark.slow
def test_report_of_a_failed_run_and_of_a_date_never_scored(scored: tuple[Path, date]) -> None:
    from typer.testing import CliRunner

    from churn_batch.cli import app

    config = scored[0]
    runner = CliRunner()
    never = date(2001, 1, 1)
    result = runner.invoke(app, ["--config", str(config), "report", "--date", str(never)])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: no scoring run recorded for {never}: "
        f"run `churn-batch score --date {never}` first\n"
    )
    assert (
        runner.invoke(app, ["--config", str(config), "score", "--date", str(never)]).exit_code == 3
    )
    result = runner.invoke(app, ["--config", str(config), "report", "--date", str(never)])
    assert result.exit_code == 0, result.output
    html = (config.parent.parent / "reports" / str(never) / "churn_report.html").read_text()
    assert "Status: failed" in html and "Nothing is published for 2001-01-01" in html
    assert_report_html(html, images=0)


@pytest.mark.slow
def test_a_dying_kernel_says_why(tmp_path: Path) -> None:
    cell = "import os\nos.write(2, b'dying: out of memory\\n')\nos._exit(3)"
    source = trivial_notebook(tmp_path / "t.ipynb", cell)
    with pytest.raises(ReportError) as caught:
        reports.execute_notebook(source, tmp_path / "out.ipynb", {"value": "x"}, cwd=tmp_path)
    message = str(caught.value)
    assert message.startswith("report notebook t.ipynb did not finish: DeadKernelError")
    assert message.endswith("the kernel said: dying: out of memory")
    assert caught.value.exit_code == 1

"""Broken and mixed Parquet sources through the installed CLI: every file is read or the
run stops naming it (exit 4), and the date's previous predictions stay as they were.

Each test publishes a date first, breaks the source, runs again and compares.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from churn_batch import synthetic

from .scoring_fixtures import CONFIG, CUSTOMERS, DAYS, FIRST, LAST, predictions, run_cli, sqlite_db

MAGIC_MISSING = (
    "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a "
    "parquet file."
)


@dataclass
class Lake:
    root: Path  # the project: churn.toml, models/, out.db
    data: Path  # the Parquet source

    @property
    def db(self) -> Path:
        return self.root / "out.db"

    def cli(self, *args: str, **kwargs: Any) -> tuple[int, list[str]]:
        result = run_cli("--config", str(self.root / "churn.toml"), *args, **kwargs)
        return result.returncode, result.stderr.splitlines()

    def score(self, day: date = LAST, **kwargs: Any) -> tuple[int, list[str]]:
        return self.cli("score", "--date", day.isoformat(), **kwargs)

    def last_run(self) -> tuple[str, str | None]:
        with sqlite_db(self.db) as conn:
            row = conn.execute(
                "SELECT status, error FROM churn_scoring_runs ORDER BY started_at DESC LIMIT 1"
            ).fetchone()
        return row[0], row[1]


def snapshots() -> dict[date, pa.Table]:
    """The template's own snapshots, so its champion scores them without drift."""
    return dict(synthetic.generate_snapshots(CUSTOMERS, FIRST, DAYS, seed=3))


def make_lake(template: Path | None, root: Path, data: Path | None = None) -> Lake:
    """A project reading Parquet under `root`, with the template's champion if given."""
    root.mkdir(parents=True, exist_ok=True)
    if template is not None:
        shutil.copytree(template.parent / "models", root / "models")
    data = data or root / "lake"
    source = f'[source]\nkind = "parquet"\npath = "{data}"\nbatch_size = 97\n\n[contract]'
    rest = CONFIG.split("[contract]", 1)[1].format(sink_url=f"sqlite:///{root / 'out.db'}")
    (root / "churn.toml").write_text(source + rest)
    return Lake(root, data)


def write_split(tables: dict[date, pa.Table], folder: Path) -> dict[date, list[Path]]:
    """Each date in two files holding the date column (a flat directory, no partitions)."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[date, list[Path]] = {}
    for day, table in tables.items():
        half = table.num_rows // 2
        files[day] = [folder / f"{day}-{i}.parquet" for i in (0, 1)]
        pq.write_table(table.slice(0, half), files[day][0], row_group_size=200)
        pq.write_table(table.slice(half), files[day][1], row_group_size=200)
    return files


Flat = tuple[Lake, dict[date, list[Path]]]


@pytest.fixture(scope="module")
def published(template: Path, tmp_path_factory: pytest.TempPathFactory) -> Flat:
    """A flat lake with LAST published from it, once for the module's tests."""
    lake = make_lake(template, tmp_path_factory.mktemp("flat"))
    files = write_split(snapshots(), lake.data)
    code, err = lake.score()
    assert code == 0, err
    assert len(predictions(lake.db, LAST)) == CUSTOMERS
    return lake, files


@pytest.fixture
def flat(published: Flat) -> Iterator[Flat]:
    """The published lake, its files as they were again after the test (which breaks
    some): a failing run must leave the predictions as the test found them."""
    lake, _ = published
    saved = {path: path.read_bytes() for path in lake.data.iterdir()}
    yield published
    for path in lake.data.iterdir():
        if path in saved:
            path.chmod(0o644)
            path.write_bytes(saved[path])
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@pytest.fixture
def hive(template: Path, tmp_path: Path) -> Lake:
    lake = make_lake(template, tmp_path / "p")
    synthetic.write_parquet(snapshots().items(), lake.data)
    code, err = lake.score()
    assert code == 0, err
    return lake


def part(lake: Lake, day: date) -> Path:
    return lake.data / f"snapshot_date={day}" / "part-0.parquet"


def assert_refused(lake: Lake, before: list[Any], code: int, err: list[str], line: str) -> None:
    """Exit 4 with exactly `line`, the run recorded failed, the predictions unchanged."""
    assert (code, err[-1]) == (4, line), "\n".join(err)
    assert predictions(lake.db, LAST) == before
    status, error = lake.last_run()
    assert status == "failed"
    assert error is not None and line.removeprefix("Error: ") in error


# -- damaged files ------------------------------------------------------------------------


def _footer_length(blob: bytes) -> int:
    return int(struct.unpack("<I", blob[-8:-4])[0])


def _corrupt_footer(blob: bytes) -> bytes:
    """Magic and length intact, the thrift metadata scrambled."""
    start = len(blob) - 8 - _footer_length(blob)
    return blob[:start] + bytes(b ^ 0x5A for b in blob[start:-8]) + blob[-8:]


DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated": (lambda b: b[: len(b) // 2], MAGIC_MISSING),
    "not parquet": (lambda b: b"customer_id,snapshot_date\nC0000001,2024-06-04\n", MAGIC_MISSING),
    "zero bytes": (lambda b: b"", "Parquet file size is 0 bytes"),
    "wrong magic": (lambda b: b[:-4] + b"PAR0", MAGIC_MISSING),
    "footer length": (
        lambda b: b[:-8] + struct.pack("<I", 10**8) + b"PAR1",
        "Parquet file size is {size} bytes, smaller than the size reported by footer's "
        "(100000000bytes)",
    ),
    "corrupt footer": (_corrupt_footer, "Couldn't deserialize thrift: "),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_file_among_several_stops_the_run_naming_it(flat: Flat, damage: str) -> None:
    """It was skipped (exclude_invalid_files): half the date published, exit 0."""
    lake, files = flat
    before = predictions(lake.db, LAST)
    broken = files[LAST][1]
    change, reason = DAMAGE[damage]
    broken.write_bytes(change(broken.read_bytes()))
    code, err = lake.score()
    reason = reason.format(size=broken.stat().st_size)
    if damage == "corrupt footer":  # thrift names whatever byte it tripped on
        assert err[-1].startswith(f"Error: Parquet file {broken} cannot be read: {reason}")
        assert_refused(lake, before, code, err, err[-1])
    else:
        assert_refused(
            lake, before, code, err, f"Error: Parquet file {broken} cannot be read: {reason}"
        )


def _without_dac_override() -> None:
    """In the child, before exec: root without the capabilities that ignore file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_file_without_read_permission_stops_the_run_naming_it(flat: Flat) -> None:
    lake, files = flat
    before = predictions(lake.db, LAST)
    broken = files[LAST][1]
    broken.chmod(0)  # the fixture gives it back its mode
    # Root reads any file: its child drops the override, as a service user has none.
    drop = _without_dac_override if os.geteuid() == 0 else None
    code, err = lake.score(preexec_fn=drop)
    assert_refused(lake, before, code, err, (
        f"Error: Parquet file {broken} cannot be read: [Errno 13] Failed to open local file "
        f"'{broken}'. Detail: [errno 13] Permission denied"
    ))  # fmt: skip


def test_a_page_that_fails_to_decode_midway_publishes_nothing(flat: Flat) -> None:
    """The footer reads, the ids read (the first pass), a feature's page does not: the
    failure comes while the date is being written, and is rolled back."""
    lake, files = flat
    before = predictions(lake.db, LAST)
    broken = files[LAST][1]
    meta = pq.read_metadata(broken)
    group = meta.row_group(meta.num_row_groups - 1)
    chunk = group.column(meta.schema.names.index("payment_method"))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    blob = bytearray(broken.read_bytes())
    blob[start : start + 16] = bytes(b ^ 0xFF for b in blob[start : start + 16])
    broken.write_bytes(bytes(blob))
    code, err = lake.score()
    # The first pass (ids only) went through: the page failed in the stream, mid-write.
    assert any(f"scoring {LAST}: {CUSTOMERS} rows from parquet" in line for line in err)
    assert err[-1].startswith(f"Error: Parquet file {broken} cannot be read: "), "\n".join(err)
    assert_refused(lake, before, code, err, err[-1])


@pytest.mark.parametrize("layout", ["the only file", "the hive partition's only file"])
def test_a_damaged_only_file_is_named_not_a_missing_column_or_no_rows(
    template: Path, tmp_path: Path, layout: str
) -> None:
    """It said "missing required column(s): snapshot_date (found: )" (exit 4) or "no
    snapshot rows" (exit 3): the wrong problem."""
    if layout == "the only file":
        lake = make_lake(template, tmp_path / "p", tmp_path / "p" / "lake" / "snap.parquet")
        lake.data.parent.mkdir(parents=True)
        pq.write_table(snapshots()[LAST], lake.data)
        broken = lake.data
    else:
        lake = make_lake(template, tmp_path / "p")
        synthetic.write_parquet(snapshots().items(), lake.data)
        broken = part(lake, LAST)
    code, err = lake.score()
    assert code == 0, err
    before = predictions(lake.db, LAST)
    broken.write_bytes(broken.read_bytes()[:-100])
    code, err = lake.score()
    assert_refused(
        lake, before, code, err, f"Error: Parquet file {broken} cannot be read: {MAGIC_MISSING}"
    )


def test_a_broken_file_of_another_hive_date_fails_that_date_only(hive: Lake) -> None:
    """Pruning never opens another date's partition: this date scores. The broken date,
    and training over it, name the file."""
    before = predictions(hive.db, LAST)
    other = LAST - timedelta(days=1)
    broken = part(hive, other)
    broken.write_bytes(b"PAR1 not really")
    code, err = hive.score()
    assert code == 0, "\n".join(err)
    assert len(predictions(hive.db, LAST)) == len(before)
    line = f"Error: Parquet file {broken} cannot be read: {MAGIC_MISSING}"
    code, err = hive.score(other)
    assert (code, err[-1]) == (4, line)
    assert predictions(hive.db, other) == []
    code, err = hive.cli("train")
    assert (code, err[-1]) == (4, line)


def test_a_dangling_link_among_the_files_is_refused(flat: Flat) -> None:
    """Arrow's listing leaves out a link to nothing without a word: the rows it stood for
    would be missing."""
    lake, _ = flat
    before = predictions(lake.db, LAST)
    link = lake.data / "moved.parquet"
    link.symlink_to(lake.root / "elsewhere.parquet")
    code, err = lake.score()
    assert_refused(lake, before, code, err, (
        f"Error: Parquet file {link} cannot be read: not a regular file (a dangling link?)"
    ))  # fmt: skip


# -- what is not data -----------------------------------------------------------------------


def test_files_writers_leave_beside_the_data_are_not_data(flat: Flat) -> None:
    """Spark's _SUCCESS, Hadoop's .crc, _metadata, a half-written hidden folder."""
    lake, files = flat
    before = predictions(lake.db, LAST)
    (lake.data / "_SUCCESS").write_bytes(b"")
    (lake.data / f".{files[LAST][1].name}.crc").write_bytes(b"crc\x00\x01")
    (lake.data / "_metadata").write_bytes(b"not parquet")
    (lake.data / ".tmp-write").mkdir()
    (lake.data / ".tmp-write" / "half.parquet").write_bytes(b"PAR1")
    code, err = lake.score()
    assert code == 0, "\n".join(err)
    after = predictions(lake.db, LAST)
    assert [r[:4] for r in after] == [r[:4] for r in before]  # same customers, scores, tiers


@pytest.mark.parametrize("contents", ["nothing", "only _SUCCESS and .crc"])
def test_a_directory_without_data_files_is_no_rows(
    template: Path, tmp_path: Path, contents: str
) -> None:
    """Exit 3, like a date with no rows: nothing has arrived (yet), and cron's retry
    later is the answer. A path that does not exist is a config error (exit 2)."""
    lake = make_lake(template, tmp_path / "p")
    lake.data.mkdir()
    if contents != "nothing":
        (lake.data / "_SUCCESS").write_bytes(b"")
        (lake.data / ".part-0.parquet.crc").write_bytes(b"crc")
    code, err = lake.score()
    assert (code, err[-1]) == (
        3, f"Error: no snapshot rows for {LAST} in parquet {lake.data}, which holds no data file"
    )  # fmt: skip
    assert not lake.db.exists() or predictions(lake.db) == []


# -- mixed schemas --------------------------------------------------------------------------


def rewrite(path: Path, change: Callable[[pa.Table], pa.Table]) -> pa.Table:
    table = change(pq.read_table(path))
    pq.write_table(table, path, row_group_size=200)
    return table


def test_a_file_missing_a_feature_column_is_named(flat: Flat) -> None:
    """It was exit 1: KeyError from the second file's batch."""
    lake, files = flat
    before = predictions(lake.db, LAST)
    broken = files[LAST][1]
    table = rewrite(broken, lambda t: t.drop_columns(["tenure_months"]))
    code, err = lake.score()
    assert_refused(lake, before, code, err, (
        f"Error: Parquet file {broken} is missing required column(s): tenure_months "
        f"(found: {', '.join(table.column_names)})"
    ))  # fmt: skip


def test_a_file_whose_column_does_not_cast_is_named(flat: Flat) -> None:
    lake, files = flat
    before = predictions(lake.db, LAST)
    broken = files[LAST][1]
    index = synthetic.SCHEMA.get_field_index("monthly_charges")
    rewrite(broken, lambda t: t.set_column(index, "monthly_charges", pa.array(["n/a"] * len(t))))
    code, err = lake.score()
    assert err[-1].startswith(
        f"Error: Parquet file {broken}: column monthly_charges is string and does not read "
        "as double, its type in the source's other files ("
    ), "\n".join(err)
    assert_refused(lake, before, code, err, err[-1])


@pytest.mark.parametrize("change", ["an extra column", "no label column"])
def test_a_file_with_an_extra_column_or_without_the_label_scores(flat: Flat, change: str) -> None:
    lake, files = flat
    before = predictions(lake.db, LAST)
    if change == "an extra column":
        rewrite(files[LAST][1], lambda t: t.append_column("note", pa.array(["x"] * len(t))))
    else:
        rewrite(files[LAST][1], lambda t: t.drop_columns(["churned"]))
    code, err = lake.score()
    assert code == 0, "\n".join(err)
    after = predictions(lake.db, LAST)
    assert [r[:4] for r in after] == [r[:4] for r in before]
    assert {r[5] for r in after}.isdisjoint({r[5] for r in before})  # a new run published


def test_train_on_labelled_dates_of_a_lake_whose_newest_date_has_no_label(
    tmp_path: Path,
) -> None:
    """Labels exist for the past only: the newest partition has no label column. It was
    exit 1: KeyError 'Field "churned" does not exist in schema'."""
    lake = make_lake(None, tmp_path / "p")
    tables = snapshots()
    tables[LAST] = tables[LAST].drop_columns(["churned"])
    synthetic.write_parquet(tables.items(), lake.data)
    code, err = lake.cli("train", "--promote")
    assert code == 0, "\n".join(err)
    assert any(
        line.endswith(
            f"left out {CUSTOMERS} rows without a label (outcome not known yet) on 1 date(s); "
            f"1 date(s) without any label are not training data: {LAST}"
        )
        for line in err
    ), "\n".join(err)
    registry = lake.root / "models" / "churn"
    champion = json.loads((registry / "registry.json").read_text())["aliases"]["champion"]
    card = json.loads((registry / champion / "card.json").read_text())["training_data"]
    assert (card["first_date"], card["last_date"]) == (str(FIRST), str(LAST - timedelta(1)))
    assert card["unlabelled_dropped"] == CUSTOMERS
    assert card["rows"] == sum(t.num_rows for d, t in tables.items() if d != LAST)
    code, err = lake.score()
    assert code == 0, "\n".join(err)
    assert len(predictions(lake.db, LAST)) == CUSTOMERS
    assert {r[4] for r in predictions(lake.db, LAST)} == {champion}

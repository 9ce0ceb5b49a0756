"""Read SQLite into Arrow in a child process, so that this process has one SQLite library.

ADBC's SQLite driver (7x faster than rows through Python's `sqlite3`) bundles its own
copy of SQLite, and two copies in one process on one database file corrupt it. POSIX
locks belong to the process, not to a connection: when one copy closes a descriptor of
the file, the kernel drops every lock the process held on it, the other copy's included,
and a copy that finds no other lock holder believes it is the file's last user, so it
checkpoints and truncates the WAL and its index that the other copy still has mapped.
That killed a re-run of a published 1M-row date with SIGBUS and corrupted the file when
several dates were scored at once (sqlite.org, "How To Corrupt An SQLite Database File",
2.2). Here the job's process only ever uses `sqlite3`; ADBC runs in a child of its own,
which streams Arrow IPC batches back through a pipe (no per-value work on either side).

The child is `python -m churn_batch.sqlite_reader`: the request comes as JSON on its
standard input, batches leave on its standard output, and a failure leaves as one JSON
line on its standard error with exit code `PORTABLE_EXIT` (read these rows with the row
path instead) or 1.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any

import pyarrow as pa

PORTABLE_EXIT = 3
# How long a finished or abandoned child may take to exit before it is killed.
EXIT_TIMEOUT_SECONDS = 30.0


class PortablePathNeeded(Exception):
    """The fast (Arrow) read cannot give these rows as the portable row path would.

    Raised after some batches were already handed out: the caller calls
    `SqlSource.use_portable_path` and starts over.
    """


class ReaderFailed(Exception):
    """The child reader failed for another reason; the message is the driver's."""


@dataclass(frozen=True)
class ReadRequest:
    """What the child reads: a compiled SELECT with positional (qmark) parameters."""

    database: str
    sql: str
    params: list[Any]
    batch_rows: int
    # Columns that must arrive as numbers: where the driver types one as text, it would
    # turn later numbers into text that the row path reads as numbers.
    numeric_columns: list[str]


def read(request: ReadRequest) -> Iterator[pa.RecordBatch]:
    """The rows of `request`, read by a child process, as Arrow record batches.

    Raises `PortablePathNeeded` where the child found values the row path would read
    differently, `ReaderFailed` for any other failure of the child. The child is killed
    and reaped however the iteration ends.
    """
    with tempfile.TemporaryFile() as errors:
        child = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        try:
            assert child.stdin is not None and child.stdout is not None
            # A child that died before reading its request is reported by its exit code.
            with contextlib.suppress(BrokenPipeError), child.stdin:
                child.stdin.write(json.dumps(asdict(request)).encode())
            try:
                yield from pa.ipc.open_stream(child.stdout)
            except (pa.ArrowInvalid, OSError):
                # The stream broke off: the child's exit code and message say why.
                if child.wait(EXIT_TIMEOUT_SECONDS) == 0:
                    raise
            code = child.wait(EXIT_TIMEOUT_SECONDS)
            if code != 0:
                raise _failure(code, errors)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()


def _failure(code: int, errors: IO[bytes]) -> Exception:
    errors.seek(0)
    text = errors.read().decode("utf-8", "replace").strip()
    last = text.splitlines()[-1] if text else ""
    try:
        message = str(json.loads(last)["message"])
    except (ValueError, KeyError, TypeError):
        message = text or f"exit code {code}"
    if code == PORTABLE_EXIT:
        return PortablePathNeeded(message)
    return ReaderFailed(f"the SQLite reader process failed ({message})")


# -- the child -----------------------------------------------------------------------


def _serve(request: ReadRequest, out: IO[bytes]) -> None:
    import adbc_driver_manager
    import adbc_driver_sqlite.dbapi as adbc

    with contextlib.closing(adbc.connect(request.database)) as conn:
        cursor = conn.cursor()
        cursor.adbc_statement.set_options(
            **{"adbc.sqlite.query.batch_rows": str(request.batch_rows)}
        )
        cursor.execute(request.sql, request.params)
        reader = cursor.fetch_record_batch()
        # The driver types each column from the first batch's values.
        for field in reader.schema:
            if field.name in request.numeric_columns and not _number_or_null(field.type):
                raise PortablePathNeeded(
                    f"column {field.name} holds text where its declared type keeps numbers"
                )
        with pa.ipc.new_stream(out, reader.schema) as stream:
            try:
                for batch in reader:
                    stream.write_batch(batch)
            except (adbc_driver_manager.Error, OSError) as exc:
                if "type mismatch" not in str(exc).lower():
                    raise
                # A later value of another storage class: the driver stops, not converts.
                raise PortablePathNeeded(f"a column mixes storage classes ({exc})") from None
        cursor.close()


def _number_or_null(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind))


def main() -> int:
    faulthandler.enable()
    request = ReadRequest(**json.loads(sys.stdin.buffer.read()))
    out = sys.stdout.buffer
    try:
        _serve(request, out)
        out.flush()
    except PortablePathNeeded as exc:
        sys.stderr.write(json.dumps({"message": str(exc)}) + "\n")
        return PORTABLE_EXIT
    except BrokenPipeError:
        return 1  # the parent stopped reading: nobody to tell
    except Exception as exc:  # reported to the parent, which raises it as ReaderFailed
        sys.stderr.write(json.dumps({"message": f"{type(exc).__name__}: {exc}"}) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

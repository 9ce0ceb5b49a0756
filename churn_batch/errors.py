"""The failures a user can act on, one class each, mapped 1:1 to the CLI's exit codes.

The library raises these; only the CLI turns them into a message and an exit code.
Anything else that escapes is a bug and exits 1.
"""

from __future__ import annotations

from collections.abc import Sequence


class ChurnBatchError(Exception):
    """Base class of every expected failure; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(ChurnBatchError):
    """The config file, an option or an argument is wrong (exit 2)."""

    exit_code = 2

    def __init__(self, message: str, *, path: object = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        prefix = "".join(f"{part}: " for part in (path, key) if part)
        super().__init__(f"{prefix}{message}")


class NoSnapshotRows(ChurnBatchError):
    """The source has no rows for the requested snapshot date (exit 3)."""

    exit_code = 3

    def __init__(self, snapshot_date: object, source: str) -> None:
        self.snapshot_date = snapshot_date
        self.source = source
        super().__init__(f"no snapshot rows for {snapshot_date} in {source}")


class ContractViolation(ChurnBatchError):
    """The snapshot breaks the data contract: missing columns or too many invalid rows (exit 4)."""

    exit_code = 4


class MissingColumns(ContractViolation):
    """Required columns are absent from the snapshot."""

    def __init__(self, missing: Sequence[str], available: Sequence[str]) -> None:
        self.missing = list(missing)
        self.available = list(available)
        super().__init__(
            "snapshot is missing required column(s): "
            + ", ".join(self.missing)
            + " (found: "
            + ", ".join(self.available)
            + ")"
        )


class TooManyInvalidRows(ContractViolation):
    """The share of rejected rows exceeds `max_invalid_fraction`."""

    def __init__(self, rejected: int, total: int, limit: float, reasons: dict[str, int]) -> None:
        self.rejected = rejected
        self.total = total
        self.limit = limit
        self.reasons = dict(reasons)
        share = rejected / total if total else 1.0
        top = ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items()))
        super().__init__(
            f"{rejected} of {total} rows rejected ({share:.1%}), more than "
            f"max_invalid_fraction {limit:.1%} ({top})"
        )


class DriftBlocked(ChurnBatchError):
    """Drift beyond the block threshold; nothing was published (exit 5)."""

    exit_code = 5


class ModelError(ChurnBatchError):
    """The model is missing, tampered with or incompatible with this environment (exit 6)."""

    exit_code = 6


class StorageUnavailable(ChurnBatchError):
    """A database or storage location could not be reached after retries (exit 7)."""

    exit_code = 7


class RunLocked(ChurnBatchError):
    """Another run holds the lock for this snapshot date (exit 8)."""

    exit_code = 8


class ReportError(ChurnBatchError):
    """The run report could not be made; says which cell failed and where its notebook is.

    Exit 1, or the code of a churn-batch error raised inside the notebook (a report
    that failed because the database was down is still "retry later", exit 7).
    """

    exit_code = 1

    def __init__(
        self, message: str, *, exit_code: int | None = None, kernel_failed: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kernel_failed = kernel_failed
        if exit_code is not None:
            self.exit_code = exit_code

    def add_detail(self, detail: str) -> None:
        """Append what explains the failure (the dead kernel's last log lines)."""
        if detail:
            self.message = f"{self.message}\nthe kernel said: {detail}"
            self.args = (self.message,)


class Interrupted(BaseException):
    """The process was asked to stop (SIGINT, SIGTERM): the run rolls back; exit 128 + signal.

    A BaseException, like KeyboardInterrupt, so that `except Exception` clean-up code does
    not swallow it; not a KeyboardInterrupt, so that click does not turn it into its own
    "Aborted!" or a bare exit 130 before the CLI has said what was interrupted.
    """

    def __init__(self, signum: int) -> None:
        import signal  # here: the rest of this module needs nothing from the OS

        self.signum = signum
        self.exit_code = 128 + signum
        try:
            self.signal_name = signal.Signals(signum).name
        except ValueError:
            self.signal_name = f"signal {signum}"
        super().__init__(signum)  # args hold what __init__ takes: the exception pickles

    def __str__(self) -> str:
        return f"interrupted by {self.signal_name}"

"""churn-batch: nightly churn scoring, published atomically to SQL."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # Looked up on demand: importlib.metadata costs ~60 ms, which every process that
    # imports the package (the CLI, the SQLite reader child) would pay at start-up.
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("churn-batch")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"

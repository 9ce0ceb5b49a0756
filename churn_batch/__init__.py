"""churn-batch: nightly churn scoring, published atomically to SQL."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("churn-batch")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

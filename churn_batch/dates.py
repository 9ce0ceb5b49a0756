"""Snapshot dates as people and crontabs write them."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from churn_batch.errors import ConfigError


def parse_date(text: str, *, today: date | None = None, what: str = "date") -> date:
    """ISO `YYYY-MM-DD`, `today` or `yesterday` (UTC), so a crontab line needs no `date`."""
    today = today or datetime.now(UTC).date()
    word = text.strip().lower()
    if word == "today":
        return today
    if word == "yesterday":
        return today - timedelta(days=1)
    try:
        return date.fromisoformat(word)
    except ValueError:
        raise ConfigError(
            f"invalid {what} {text!r}: use YYYY-MM-DD, 'today' or 'yesterday'"
        ) from None

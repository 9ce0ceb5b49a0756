"""Snapshot dates as people and crontabs write them."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from churn_batch.errors import ConfigError

# A run reads the half-open range [date, next day): the last calendar day Python can
# hold has no next day, so the latest snapshot date is the one before it.
LATEST = date.max - timedelta(days=1)

_ISO = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)


def parse_date(text: str, *, today: date | None = None, what: str = "date") -> date:
    """ISO `YYYY-MM-DD`, `today` or `yesterday` (UTC), so a crontab line needs no `date`.

    Only the documented form: `date.fromisoformat` also takes `20240601` and week dates,
    which a typo can turn into a valid, wrong day.
    """
    today = today or datetime.now(UTC).date()
    word = text.strip().lower()
    if word == "today":
        return check_date(today, what=what)
    if word == "yesterday":
        return check_date(today - timedelta(days=1), what=what)
    try:
        if not _ISO.fullmatch(word):
            raise ValueError(word)
        day = date.fromisoformat(word)
    except ValueError:
        raise ConfigError(
            f"invalid {what} {text!r}: use YYYY-MM-DD, 'today' or 'yesterday'"
        ) from None
    return check_date(day, what=what)


def check_date(day: date, *, what: str = "date") -> date:
    """`day`, if a run can score it (every day from 0001-01-01 to 9999-12-30)."""
    if day > LATEST:
        raise ConfigError(
            f"{what} {day.isoformat()} is out of range: the latest snapshot date is "
            f"{LATEST.isoformat()}"
        )
    return day

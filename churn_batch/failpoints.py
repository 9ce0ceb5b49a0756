"""Named points in a run where a fault-injection test can stop or fail the process.

A run passes `hit("publish.before_commit")` and the like at the moments that matter for
its promises (reading, checking, scoring, mid-write, just before the commit, while it
records a failure). Normally `hit` does nothing: the setting is read once, and an unset
variable costs one dictionary look-up per call.

A test sets `CHURN_BATCH_FAILPOINTS` in the child process's environment to a
comma-separated list of `name=action` or `name=action@n` (act at the n-th hit, 1-based):

- `kill`: SIGKILL this process, as the kernel's OOM killer or a power cut would;
- `term`: SIGTERM this process (the handler installed by the CLI then runs);
- `raise`: raise `InjectedFault`, an unexpected error (exit 1);
- `pause`: create `$CHURN_BATCH_FAILPOINT_DIR/<name>` and wait there forever, so the test
  can see the moment has come (no sleeping on its side) and signal the process itself.

Failpoints are how a test reaches an exact moment of a run deterministically instead of
guessing it with a timer; nothing outside tests sets the variable.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

ENV = "CHURN_BATCH_FAILPOINTS"
DIR_ENV = "CHURN_BATCH_FAILPOINT_DIR"

ACTIONS = ("kill", "term", "raise", "pause")


class InjectedFault(RuntimeError):
    """Raised by a `raise` failpoint: stands for any unexpected error at that point."""


def _parse(text: str) -> dict[str, tuple[str, int]]:
    points: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, spec = item.partition("=")
        action, _, nth = spec.partition("@")
        if action not in ACTIONS or not name:
            raise ValueError(f"{ENV}: {item!r} is not name=action[@n] with action in {ACTIONS}")
        points[name.strip()] = (action, int(nth) if nth else 1)
    return points


_POINTS = _parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}
_lock = threading.Lock()


def hit(name: str) -> None:
    """Pass the failpoint `name`; act if the environment armed it for this hit."""
    if not _POINTS:
        return
    armed = _POINTS.get(name)
    if armed is None:
        return
    with _lock:
        _hits[name] = count = _hits.get(name, 0) + 1
    action, nth = armed
    if count != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "raise":
        raise InjectedFault(f"failpoint {name}")
    else:
        _pause(name)


def _pause(name: str) -> None:
    directory = Path(os.environ.get(DIR_ENV, "."))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).touch()
    threading.Event().wait()  # until a signal ends the process

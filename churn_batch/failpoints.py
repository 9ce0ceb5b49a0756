"""Named points in a run where a fault-injection test can stop or fail the process.

A run passes `hit("publish.before_commit")` and the like at the moments that matter for
its promises (reading, checking, scoring, mid-write, just before the commit, while it
records a failure). Normally `hit` does nothing: the setting is read once, and an unset
variable costs one dictionary look-up per call.

A test sets `CHURN_BATCH_FAILPOINTS` in the child process's environment to a
comma-separated list of `name=action`, or `name=action@n` / `name@n=action` to act at
the n-th hit (1-based):

- `kill`: SIGKILL this process, as the kernel's OOM killer or a power cut would;
- `term`: SIGTERM this process (the handler installed by the CLI then runs);
- `raise`: raise `InjectedFault`, an unexpected error (exit 1);
- `pause`: create `$CHURN_BATCH_FAILPOINT_DIR/<name>` and wait there forever, so the test
  can see the moment has come (no sleeping on its side) and signal the process itself;
- `wait`: create that file too, then wait until the test creates `<name>.go` beside it
  and carry on (after `WAIT_SECONDS` without it, raise `InjectedFault`): the test acts
  while the run stands still, say terminates its database session, and the run itself
  then meets what the test did.

Failpoints are how a test reaches an exact moment of a run deterministically instead of
guessing it with a timer; nothing outside tests sets the variable.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

ENV = "CHURN_BATCH_FAILPOINTS"
DIR_ENV = "CHURN_BATCH_FAILPOINT_DIR"

ACTIONS = ("kill", "term", "raise", "pause", "wait")
WAIT_SECONDS = 300.0  # a `wait` whose test died must not hang the run forever
_WAIT_POLL_SECONDS = 0.02


class InjectedFault(RuntimeError):
    """Raised by a `raise` failpoint: stands for any unexpected error at that point."""


def _parse(text: str) -> dict[str, tuple[str, int]]:
    points: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        where, _, spec = item.partition("=")
        action, _, nth = spec.partition("@")
        # The hit count may stand with the name too: `publish.write@2=pause`.
        name, _, at = where.partition("@")
        nth = nth or at
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
    elif action == "wait":
        _wait(name)
    else:
        _pause(name)


def _announce(name: str) -> Path:
    directory = Path(os.environ.get(DIR_ENV, "."))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).touch()
    return directory


def _pause(name: str) -> None:
    _announce(name)
    threading.Event().wait()  # until a signal ends the process


def _wait(name: str) -> None:
    go = _announce(name) / f"{name}.go"
    deadline = time.monotonic() + WAIT_SECONDS
    while not go.exists():  # polled: the test's side waits on nothing but this file
        if time.monotonic() > deadline:
            raise InjectedFault(f"failpoint {name}: no {go} within {WAIT_SECONDS:.0f} s")
        time.sleep(_WAIT_POLL_SECONDS)

"""Real child processes in tests: wait for what they announce, and always reap them.

A test never guesses when a child reaches a moment of its run: the child stops at a
failpoint (`churn_batch.failpoints`), which touches a file, and the test waits for that
file with a generous deadline. However the test ends, the child is killed and reaped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

DEADLINE_SECONDS = 120.0
_POLL_SECONDS = 0.02  # how often the file is looked for; never a guess of its timing


def wait_for_file(
    path: Path, child: subprocess.Popen[Any], timeout: float = DEADLINE_SECONDS
) -> None:
    """Until `path` exists (a paused failpoint touched it); fail if the child ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path} within {timeout:.0f} s"
        try:
            code = child.wait(timeout=_POLL_SECONDS)  # waits on the child, not on a timer
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"the run ended (exit {code}) before {path.name}")


def kill_and_reap(child: subprocess.Popen[Any], *, group: bool = False) -> None:
    """SIGKILL `child` (its whole process group with `group`) if it runs, then reap it."""
    if child.poll() is None:
        if group:
            os.killpg(child.pid, signal.SIGKILL)
        else:
            child.kill()
    child.wait()

"""Write behind: run one connection's statements on a worker thread, in order.

While the database takes in batch N (a COPY waits for the server to parse, check and
index every row), the caller already reads, checks and scores batch N+1: on two cores
the server's work and ours overlap instead of adding up. Everything still runs on ONE
connection, one statement after another in submission order, so the transaction means
what it meant without the thread.

At most `depth` tasks wait, so memory stays bounded by the batch size. The first error
of a task is raised in the caller at its next `submit` or at `drain`; the tasks after it
are dropped, never run against a transaction that already failed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import cast

Task = Callable[[], object]

_STOP = object()


class WriteBehind:
    """A single worker thread running submitted tasks in order; use as a context manager.

    `drain()` waits for every submitted task and re-raises the first failure. Leaving
    the `with` block always stops and joins the worker (after an error in the caller,
    pending tasks are dropped), so the connection is free again for the caller's
    commit or rollback.
    """

    def __init__(self, depth: int = 2, name: str = "write-behind") -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._tasks: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._failed = threading.Event()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, task: Task) -> None:
        """Queue `task`, blocking while `depth` tasks wait; raise an earlier task's error."""
        self._raise_failure()
        while True:
            try:
                self._tasks.put(task, timeout=0.1)
                return
            except queue.Full:
                # A worker that failed stops taking tasks: do not wait forever for room.
                self._raise_failure()

    def drain(self) -> None:
        """Wait until every submitted task ran; raise the first error among them."""
        self._tasks.join()
        self._raise_failure()

    def close(self) -> None:
        """Stop the worker once the queue is empty (dropping tasks after a failure), join it."""
        if self._thread.is_alive():
            self._tasks.put(_STOP)
            self._thread.join()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._failed.set()  # the caller gave up: pending tasks must not run
        self.close()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                if task is _STOP:
                    return
                if not self._failed.is_set():
                    cast(Task, task)()
            except BaseException as exc:  # handed to the caller, which re-raises it
                self._error = exc
                self._failed.set()
            finally:
                self._tasks.task_done()

"""Read ahead on a second thread, so reading overlaps scoring and writing.

Arrow, the database drivers and numpy release the GIL for most of their work, so on
two cores the next batch is being read while this one is scored and written. At most
`depth` batches wait in the queue: memory stays bounded by the batch size. Stages chain:
the job reads on one thread and checks on another.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Generator, Iterator
from typing import TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

_DONE = object()

# How long a consumer that stops early waits for its producer to notice. A producer
# notices between items; one inside a long driver call (a query's first batch) may not
# for a while, and a run being stopped by SIGTERM must not wait for it: after this, the
# daemon thread is left to stop at its next item (closing its source then) or with the
# process.
STOP_WAIT_SECONDS = 5.0


def prefetch(
    items: Iterator[T], depth: int = 2, name: str = "prefetch"
) -> Generator[T, None, None]:
    """Yield `items` in order while a thread (`name`) produces up to `depth` ahead.

    An exception in the producer is re-raised in the consumer; if the consumer stops
    early (an error downstream), the producer is told to stop and the source closed.
    """
    buffer: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        """Queue `item` unless the consumer has stopped (then nobody would take it)."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while thread.is_alive():
            if time.monotonic() >= deadline:
                log.warning(
                    "the %s thread is still busy %.0fs after its consumer stopped; "
                    "leaving it to stop after its current item",
                    name, STOP_WAIT_SECONDS,
                )  # fmt: skip
                break
            thread.join(timeout=0.1)

"""Read ahead on a second thread, so reading overlaps scoring and writing.

Arrow, the database drivers and numpy release the GIL for most of their work, so on
two cores the next batch is being read while this one is scored and written. At most
`depth` batches wait in the queue: memory stays bounded by the batch size. Stages chain:
the job reads on one thread and checks on another.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


def prefetch(items: Iterator[T], depth: int = 2, name: str = "prefetch") -> Iterator[T]:
    """Yield `items` in order while a thread (`name`) produces up to `depth` ahead.

    An exception in the producer is re-raised in the consumer; if the consumer stops
    early (an error downstream), the producer is told to stop and the source closed.
    """
    buffer: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    break
            buffer.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            buffer.put(exc)
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
        while thread.is_alive():
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)

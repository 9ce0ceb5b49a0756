from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from churn_batch.prefetch import prefetch


def test_order_is_kept_and_reading_happens_on_another_thread() -> None:
    threads: set[str] = set()

    def numbers() -> Iterator[int]:
        for i in range(50):
            threads.add(threading.current_thread().name)
            yield i

    assert list(prefetch(numbers(), depth=3)) == list(range(50))
    assert threads == {"prefetch"}


def test_producer_error_reaches_the_consumer_after_earlier_items() -> None:
    def failing() -> Iterator[int]:
        yield 1
        raise OSError("disk went away")

    seen: list[int] = []
    with pytest.raises(OSError, match="disk went away"):
        for item in prefetch(failing()):
            seen.append(item)
    assert seen == [1]


def test_consumer_stopping_early_closes_the_source() -> None:
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    for item in prefetch(endless(), depth=2):
        if item == 5:
            break
    assert closed.wait(2.0), "the source generator was closed"

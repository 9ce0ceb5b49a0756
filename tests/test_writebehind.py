"""The write-behind worker: order, bounded queue, errors raised in the caller."""

from __future__ import annotations

import threading

import pytest

from churn_batch.writebehind import WriteBehind


def test_tasks_run_in_submission_order_on_one_other_thread() -> None:
    seen: list[tuple[int, str]] = []
    with WriteBehind(depth=1) as behind:
        for i in range(50):
            behind.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
        behind.drain()
    assert [i for i, _ in seen] == list(range(50))
    names = {name for _, name in seen}
    assert names == {"write-behind"}
    assert threading.current_thread().name not in names


def test_submit_blocks_while_depth_tasks_wait() -> None:
    release = threading.Event()
    started = threading.Event()
    with WriteBehind(depth=1) as behind:
        behind.submit(lambda: (started.set(), release.wait(5)))
        assert started.wait(5)
        behind.submit(lambda: None)  # the one waiting slot
        third = threading.Thread(target=behind.submit, args=(lambda: None,))
        third.start()
        third.join(0.3)
        assert third.is_alive(), "a third task was queued beyond depth=1"
        release.set()
        third.join(5)
        assert not third.is_alive()
        behind.drain()


def test_the_first_error_reaches_the_caller_and_later_tasks_never_run() -> None:
    ran: list[str] = []

    def fail() -> None:
        raise RuntimeError("server said no")

    behind = WriteBehind(depth=4)
    behind.submit(lambda: ran.append("before"))
    behind.submit(fail)
    behind.submit(lambda: ran.append("after"))
    with pytest.raises(RuntimeError, match="server said no"):
        behind.drain()
    with pytest.raises(RuntimeError, match="server said no"):
        behind.submit(lambda: ran.append("later"))
    behind.close()
    assert ran == ["before"]


def test_an_error_in_the_caller_drops_pending_tasks_and_joins_the_worker() -> None:
    ran: list[int] = []
    release = threading.Event()
    with pytest.raises(ValueError, match="caller failed"), WriteBehind(depth=4) as behind:
        behind.submit(lambda: release.wait(5))
        behind.submit(lambda: ran.append(1))
        release.set()
        raise ValueError("caller failed")
    assert not behind._thread.is_alive()
    assert ran in ([], [1])  # 1 only if it ran before the caller failed, never after


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth must be >= 1"):
        WriteBehind(depth=0)

"""Time budgets of async calls: one timer per event loop for all of an owner's calls in flight.

`asyncio.timeout()` costs a timer per call (a heap push and a cancel on asyncio's loop, a libuv
timer on uvloop's): about 5 µs a call here. An owner (a guard, a guarded route) has the same
budget for every call, so its calls' deadlines come in the order the calls start: they wait in a
queue, and one timer wakes at the oldest unsettled call's deadline. A call that settles leaves
the queue the next time it is looked at. A deadline earlier than the newest one queued (a retry
with less time left, a budget shortened by a reload) gets a timer of its own.

An entry has `state` (< SETTLED while the budget applies), `deadline` (a `perf_counter` time)
and `expire()`, called at the deadline while the entry is unsettled.
"""

from __future__ import annotations

import asyncio
from collections import deque
from threading import get_ident
from time import perf_counter
from typing import Any, Protocol

from safeserve.errors import AttemptTimeout

SETTLED = 2
# The loop's timers may fire up to a millisecond early (its clock resolution): a deadline that
# close counts as reached.
TIMER_SLACK_S = 0.001
_INF = float("inf")
_current_task = asyncio.current_task


class Entry(Protocol):
    state: int
    deadline: float

    def expire(self) -> None: ...


class Deadlines:
    """The deadlines of one owner's calls in flight on one event loop."""

    __slots__ = ("compact_at", "loop", "pending", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: deque[Any] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.compact_at = 64

    def watch(self, entry: Entry, deadline: float) -> None:
        """Call `entry.expire()` at `deadline` (perf_counter time) unless it has settled."""
        entry.deadline = deadline
        pending = self.pending
        while pending and pending[0].state >= SETTLED:
            pending.popleft()
        if pending and deadline < pending[-1].deadline:  # out of order: a timer of its own
            self.loop.call_later(deadline - perf_counter(), entry.expire)
            return
        if len(pending) >= self.compact_at:  # a slow call at the head holds the rest
            self.pending = pending = deque(q for q in pending if q.state < SETTLED)
            self.compact_at = max(64, 2 * len(pending))
        pending.append(entry)
        if self.timer is None:
            self.timer = self.loop.call_later(deadline - perf_counter(), self.check)

    def check(self) -> None:
        self.timer = None
        pending = self.pending
        now = perf_counter() + TIMER_SLACK_S
        while pending:
            entry = pending[0]
            if entry.state < SETTLED:
                if entry.deadline > now:
                    self.timer = self.loop.call_later(entry.deadline - now, self.check)
                    return
                entry.expire()
            pending.popleft()


def new_deadlines(by_thread: dict[int, Deadlines]) -> Deadlines:
    """A queue for the running loop, the first one of this thread the owner sees (queues of
    closed loops are dropped)."""
    for thread, old in list(by_thread.items()):  # a copy: other threads may add theirs
        if old.loop.is_closed():
            by_thread.pop(thread, None)
    d = by_thread[get_ident()] = Deadlines(asyncio.get_running_loop())
    return d


# `_Timed.state`
_WAITING = 0
_CANCELLED = 1  # the deadline passed and the task was cancelled
_DONE = SETTLED


class _Timed:
    """A call awaited under a deadline (an entry of `Deadlines`)."""

    __slots__ = ("cancelling", "deadline", "state", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.cancelling = task.cancelling()  # cancellations already pending are not ours
        self.state = _WAITING
        self.deadline = 0.0

    def expire(self) -> None:
        if self.state == _WAITING and not self.task.done():
            self.state = _CANCELLED
            self.task.cancel()


async def await_watched(by_thread: dict[int, Deadlines], coro: Any, limit: float) -> Any:
    """Await `coro` for at most `limit` seconds (`AttemptTimeout` after; `inf`: no limit),
    timed by the owner's queues `by_thread`. The task is cancelled at the deadline, as
    `asyncio.timeout` does, and the same rules tell its cancellation from anyone else's."""
    if not 0 < limit < _INF:
        if limit == _INF:
            return await coro
        coro.close()
        raise AttemptTimeout("no time left for the call")
    d = by_thread.get(get_ident())
    if d is None or not d.loop.is_running():
        d = new_deadlines(by_thread)
    task = _current_task(d.loop)
    if task is None:
        coro.close()
        raise RuntimeError("a time budget needs the call to run in an asyncio task")
    timed = _Timed(task)
    d.watch(timed, perf_counter() + limit)
    try:
        return await coro
    except asyncio.CancelledError:
        if timed.state == _CANCELLED:
            timed.state = _DONE
            if task.uncancel() <= timed.cancelling:
                raise AttemptTimeout(f"no answer within {limit * 1000:.0f} ms") from None
        raise
    finally:
        if timed.state == _CANCELLED:  # it ended some other way after all: not cancelled
            task.uncancel()
        timed.state = _DONE

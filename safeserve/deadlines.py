"""Time budgets of async calls: one timer per event loop for all of an owner's calls in flight.

`asyncio.timeout()` costs a timer per call (a heap push and a cancel on asyncio's loop, a libuv
timer on uvloop's): about 5 µs a call here. An owner (a guard, a guarded route) has the same
budget for every call, so its calls' deadlines come in the order the calls start: they wait in a
queue in deadline order, and one timer wakes at the earliest unsettled call's deadline. A call
that settles leaves the queue the next time the queue is looked at. A deadline earlier than the
newest one queued (a retry with less time left, a budget shortened by a reload) is put in its
place, and the timer moved earlier if it must be.

A deadline is never cut short: a timer that fires early (uvloop's are millisecond-grained) is
set again for what is left, so a call may be stopped up to a millisecond late, never early.

An entry has `state` (< SETTLED while the budget applies), `deadline` (a `perf_counter` time)
and `expire()`, called once the deadline has passed while the entry is unsettled.
"""

from __future__ import annotations

import asyncio
from collections import deque
from time import perf_counter
from typing import Any, Protocol

from safeserve.errors import AttemptTimeout

SETTLED = 2
_MIN_DELAY_S = 0.001  # a timer that fired early waits at least this long again (no spinning)
_INF = float("inf")
_current_task = asyncio.current_task
_running_loop = asyncio.get_running_loop


class Entry(Protocol):
    state: int
    deadline: float

    def expire(self) -> None: ...


class Deadlines:
    """The deadlines of one owner's calls in flight on one event loop."""

    __slots__ = ("compact_at", "due", "loop", "pending", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: deque[Any] = deque()
        self.timer: asyncio.TimerHandle | None = None
        self.due = _INF  # when the timer is set for
        self.compact_at = 64

    def watch(self, entry: Entry, deadline: float) -> None:
        """Call `entry.expire()` once `deadline` (perf_counter time) has passed, unless the
        entry has settled by then."""
        entry.deadline = deadline
        pending = self.pending
        while pending and pending[0].state >= SETTLED:
            pending.popleft()
        if len(pending) >= self.compact_at:  # a slow call at the head holds the rest
            self.pending = pending = deque(q for q in pending if q.state < SETTLED)
            self.compact_at = max(64, 2 * len(pending))
        if pending and deadline < pending[-1].deadline:
            self._insert(entry, deadline)
        else:
            pending.append(entry)
        if deadline < self.due:
            self._set_timer(deadline)

    def _insert(self, entry: Entry, deadline: float) -> None:
        """Out of order (a shorter budget): in its place, after any earlier deadline."""
        pending = self.pending
        i = len(pending) - 1
        while i > 0 and pending[i - 1].deadline > deadline:
            i -= 1
        pending.insert(i, entry)

    def _set_timer(self, due: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.due = due
        delay = max(due - perf_counter(), 0.0)
        self.timer = self.loop.call_later(delay, self.check)

    def check(self) -> None:
        """The timer: expire every unsettled entry whose deadline has passed."""
        self.timer = None
        self.due = _INF
        pending = self.pending
        now = perf_counter()
        while pending:
            entry = pending[0]
            if entry.state < SETTLED:
                if entry.deadline > now:  # early, or the next deadline: wait for it
                    self.due = entry.deadline
                    delay = max(entry.deadline - now, _MIN_DELAY_S)
                    self.timer = self.loop.call_later(delay, self.check)
                    return
                entry.expire()
            pending.popleft()


def new_deadlines(
    by_loop: dict[asyncio.AbstractEventLoop, Deadlines], loop: asyncio.AbstractEventLoop
) -> Deadlines:
    """An owner's queue for a loop it has not served yet (queues of closed loops are dropped).

    By loop, found with `get_running_loop()`: whatever runs it (a thread, then another one; a
    process forked from one that ran it), the running loop is the one to time a call on."""
    for old in list(by_loop):  # a copy: loops in other threads may add theirs
        if old.is_closed():
            by_loop.pop(old, None)
    d = by_loop[loop] = Deadlines(loop)
    return d


# `_Timed.state`
_WAITING = 0
_CANCELLED = 1  # the deadline passed and the task was cancelled
_DONE = SETTLED


class _Timed:
    """A call awaited under a deadline (an entry of `Deadlines`)."""

    __slots__ = ("cancelling", "deadline", "state", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task: asyncio.Task[Any] | None = task
        self.cancelling = task.cancelling()  # cancellations already pending are not ours
        self.state = _WAITING
        self.deadline = 0.0

    def expire(self) -> None:
        task = self.task
        if self.state == _WAITING and task is not None and not task.done():
            self.state = _CANCELLED
            task.cancel()


async def await_watched(
    by_loop: dict[asyncio.AbstractEventLoop, Deadlines], coro: Any, limit: float
) -> Any:
    """Await `coro` for at most `limit` seconds (`AttemptTimeout` after; `inf`: no limit),
    timed by the owner's queues `by_loop`. The task is cancelled at the deadline, as
    `asyncio.timeout` does, and the same rules tell its cancellation from anyone else's."""
    if not 0 < limit < _INF:
        if limit == _INF:
            return await coro
        coro.close()
        raise AttemptTimeout("no time left for the call")
    loop = _running_loop()
    task = _current_task(loop)
    if task is None:
        coro.close()
        raise RuntimeError("a time budget needs the call to run in an asyncio task")
    timed = _Timed(task)
    (by_loop.get(loop) or new_deadlines(by_loop, loop)).watch(timed, perf_counter() + limit)
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
        timed.task = None  # a queue holds a settled entry until it next looks: not its task

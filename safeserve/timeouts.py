"""Deadlines for sync calls: a per-guard elastic worker pool that abandons late calls.

A sync function cannot be interrupted, so a call with a deadline runs on a worker thread while
the caller waits for at most the time left. At the deadline the caller returns and the worker
is *abandoned*: it finishes in the background, counted, and a new worker takes its place so
that later calls never queue behind stuck ones. Past `max_abandoned` stuck workers the pool
refuses new calls (`Overloaded`) instead of growing without bound.
"""

from __future__ import annotations

import _thread
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from safeserve.errors import AttemptTimeout, Overloaded


class _Job:
    __slots__ = ("args", "done", "error", "fn", "kwargs", "on_done", "result", "state")

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.on_done: Callable[[], Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.state = 0  # 0 queued, 1 running, 2 finished, 3 cancelled before start, 4 abandoned
        self.done = _thread.allocate_lock()
        self.done.acquire()


class WorkerPool:
    """Runs sync calls under a deadline; see the module docstring."""

    def __init__(self, name: str, workers: int, max_abandoned: int) -> None:
        self.name = name
        self.workers = workers
        self.max_abandoned = max_abandoned
        self.abandoned = 0  # running now, caller gone
        self.abandoned_total = 0  # ever abandoned
        self._idle = 0  # workers blocked on the job queue
        self._waiting = 0  # jobs queued, not yet taken
        self._threads = 0
        self._lock = threading.Lock()
        self._jobs: SimpleQueue[Any] = SimpleQueue()

    def run(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout_s: float,
        on_done: Callable[[], Any] | None = None,
    ) -> Any:
        """`fn(*args, **kwargs)` within `timeout_s`, or `AttemptTimeout` (the call is abandoned).

        `on_done` runs once the call has really ended (or will never start): a bulkhead slot
        stays taken while an abandoned call still runs.
        """
        if timeout_s <= 0:
            if on_done is not None:
                on_done()
            raise AttemptTimeout("no time left for the call")
        job = _Job(fn, args, kwargs)
        job.on_done = on_done
        with self._lock:
            if self._idle <= self._waiting and self._threads - self.abandoned < self.workers:
                if self.abandoned >= self.max_abandoned:
                    if on_done is not None:
                        on_done()
                    raise Overloaded(f"{self.abandoned} calls still running past their deadline")
                self._threads += 1
                threading.Thread(
                    target=self._work, name=f"safeserve-{self.name}", daemon=True
                ).start()
            # else a worker is free, or every worker is busy with a live call: the job waits
            # within its caller's deadline
            self._waiting += 1
        self._jobs.put(job)
        if job.done.acquire(timeout=timeout_s):
            if job.error is not None:
                raise job.error
            return job.result
        with self._lock:
            if job.state == 2:  # finished just now
                pass
            elif job.state == 0:
                job.state = 3
            else:
                job.state = 4
                self.abandoned += 1
                self.abandoned_total += 1
        if job.state == 2:
            if job.error is not None:
                raise job.error
            return job.result
        raise AttemptTimeout(f"no answer within {timeout_s * 1000:.0f} ms")

    def _work(self) -> None:
        get = self._jobs.get
        lock = self._lock
        with lock:
            self._idle += 1
        while True:
            job = get()
            with lock:
                self._idle -= 1
                self._waiting -= 1
                skipped = job.state == 3  # its caller gave up before it started
                if skipped:
                    self._idle += 1
                else:
                    job.state = 1
            if skipped:
                if job.on_done is not None:
                    job.on_done()
                continue
            try:
                job.result = job.fn(*job.args, **job.kwargs)
            except BaseException as exc:
                job.error = exc
            if job.on_done is not None:
                job.on_done()
            with lock:
                if job.state == 4:
                    self.abandoned -= 1
                else:
                    job.state = 2
                retire = self._idle >= self.workers
                if retire:  # enough idle workers already: replacements retire
                    self._threads -= 1
                else:
                    self._idle += 1
            # Wake the caller last, right before blocking again: the caller then gets the
            # GIL without waiting for this thread's bookkeeping.
            job.done.release()
            if retire:
                return

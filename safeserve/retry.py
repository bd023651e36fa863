"""Retries of the primary, driven by tenacity, inside the call's one deadline.

The first attempt runs on the guard's hot path with no retry machinery at all; only when it
fails with a retryable error is a tenacity loop built, which replays that failure as its first
attempt. The loop never sleeps past the deadline, and does not start an attempt that cannot
finish in the time left (less than the primary's usual healthy latency).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import tenacity as _t
from tenacity.stop import stop_base

from safeserve import registry
from safeserve.decisions import RawAttempt
from safeserve.policy import RetryConfig

if TYPE_CHECKING:
    from safeserve.guard import Guard


class _DeadlineStop(stop_base):
    """Stop when the next backoff plus a typical attempt would overrun the deadline."""

    def __init__(self, deadline: float | None, guard: Guard) -> None:
        self.deadline = deadline
        self.guard = guard

    def __call__(self, retry_state: _t.RetryCallState) -> bool:
        if self.deadline is None:
            return False
        sleep = 0.0 if registry.testing_mode else (retry_state.upcoming_sleep or 0.0)
        left = self.deadline - time.perf_counter() - sleep
        return left <= self.guard.ok_latency_s


class RetryBudget:
    """Caps retries at a share of recent calls (Envoy's and Finagle's retry budget).

    Over the last `window_s` seconds at most `ratio` x calls + `min_per_s` x `window_s`
    retries are allowed, so a struggling model is not hit by a retry storm. Consulted only when
    a call wants to retry, never on a healthy call.
    """

    def __init__(self, ratio: float, min_per_s: float, window_s: float = 10.0) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.window_s = window_s
        self.refused = 0
        self._retries: deque[float] = deque()
        self._marks: deque[tuple[float, int]] = deque()  # (time, calls so far), about 1/s
        self._lock = threading.Lock()

    def allow(self, calls_total: int, now: float) -> bool:
        """Take one retry from the budget if there is one left."""
        with self._lock:
            horizon = now - self.window_s
            while self._retries and self._retries[0] < horizon:
                self._retries.popleft()
            if not self._marks or now - self._marks[-1][0] >= 1.0:
                self._marks.append((now, calls_total))
            while len(self._marks) > 1 and self._marks[1][0] <= horizon:
                self._marks.popleft()
            recent_calls = calls_total - self._marks[0][1]
            allowed = self.ratio * recent_calls + self.min_per_s * self.window_s
            if len(self._retries) + 1 > allowed:
                self.refused += 1
                return False
            self._retries.append(now)
            return True


class _BudgetStop(stop_base):
    """Stop when the retry budget refuses the next retry (recorded as an attempt)."""

    def __init__(self, budget: RetryBudget, guard: Guard, attempts: list[RawAttempt]) -> None:
        self.budget = budget
        self.guard = guard
        self.attempts = attempts

    def __call__(self, retry_state: _t.RetryCallState) -> bool:
        if self.budget.allow(self.guard.calls_total(), time.monotonic()):
            return False
        self.attempts.append(RawAttempt("primary", False, 0.0, "retry budget exhausted"))
        return True


class RetryRunner:
    """Builds the tenacity loop for one failed call."""

    def __init__(self, config: RetryConfig) -> None:
        self.config = config
        self._retry_on = tuple(config.retry_on)
        wait: _t.wait.wait_base = _t.wait_exponential(
            multiplier=config.backoff_s, max=config.max_backoff_s
        )
        if config.jitter and config.backoff_s > 0:
            wait = wait + _t.wait_random(0, config.backoff_s)
        self._wait = wait
        self._predicate = _t.retry_if_exception_type(self._retry_on)
        self.budget = (
            RetryBudget(config.budget, config.min_retries_per_s)
            if config.budget is not None
            else None
        )

    def retries(self, exc: BaseException) -> bool:
        """Whether this error is one the policy retries (and there is an attempt to spare)."""
        return self.config.attempts > 1 and isinstance(exc, self._retry_on)

    def _stop(self, deadline: float | None, guard: Guard, attempts: list[RawAttempt]) -> stop_base:
        stop = _t.stop_after_attempt(self.config.attempts) | _DeadlineStop(deadline, guard)
        if self.budget is not None:  # consulted last: only a retry that would happen asks it
            stop = stop | _BudgetStop(self.budget, guard, attempts)
        return stop

    def run_sync(
        self,
        first: BaseException,
        attempt: Callable[[], Any],
        deadline: float | None,
        guard: Guard,
        attempts: list[RawAttempt],
    ) -> Any:
        """Retry after `first` failed; returns the answer or raises the last error."""
        replay = _Replay(first)

        def sleep(seconds: float) -> None:
            time.sleep(_backoff(seconds, deadline))

        retrying = _t.Retrying(
            stop=self._stop(deadline, guard, attempts),
            wait=self._wait,
            retry=self._predicate,
            sleep=sleep,
            reraise=True,
        )
        return retrying(replay.then(attempt))

    async def run_async(
        self,
        first: BaseException,
        attempt: Callable[[], Awaitable[Any]],
        deadline: float | None,
        guard: Guard,
        attempts: list[RawAttempt],
    ) -> Any:
        """The async twin of `run_sync`: awaits the attempts and the sleeps."""
        replay = _Replay(first)

        async def sleep(seconds: float) -> None:
            await asyncio.sleep(_backoff(seconds, deadline))

        retrying = _t.AsyncRetrying(
            stop=self._stop(deadline, guard, attempts),
            wait=self._wait,
            retry=self._predicate,
            sleep=sleep,
            reraise=True,
        )
        return await retrying(replay.then_async(attempt))


def _backoff(seconds: float, deadline: float | None) -> float:
    """The sleep actually taken: none in testing mode, never past the call's deadline."""
    if registry.testing_mode:
        return 0.0
    if deadline is not None:
        return min(seconds, max(0.0, deadline - time.perf_counter()))
    return seconds


class _Replay:
    """Makes tenacity's first attempt the failure the guard already saw."""

    def __init__(self, first: BaseException) -> None:
        self.first: BaseException | None = first

    def then(self, attempt: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            if self.first is not None:
                exc, self.first = self.first, None
                raise exc
            return attempt()

        return run

    def then_async(self, attempt: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        async def run() -> Any:
            if self.first is not None:
                exc, self.first = self.first, None
                raise exc
            return await attempt()

        return run

"""Retries of the primary, driven by tenacity, inside the call's one deadline.

The first attempt runs on the guard's hot path with no retry machinery at all; only when it
fails with a retryable error is a tenacity loop built, which replays that failure as its first
attempt. The loop never sleeps past the deadline, and does not start an attempt that cannot
finish in the time left (less than the primary's usual healthy latency).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import tenacity as _t
from tenacity.stop import stop_base

from safeserve import registry
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

    def retries(self, exc: BaseException) -> bool:
        """Whether this error is one the policy retries (and there is an attempt to spare)."""
        return self.config.attempts > 1 and isinstance(exc, self._retry_on)

    def _stop(self, deadline: float | None, guard: Guard) -> stop_base:
        return _t.stop_after_attempt(self.config.attempts) | _DeadlineStop(deadline, guard)

    def run_sync(
        self, first: BaseException, attempt: Callable[[], Any], deadline: float | None, guard: Guard
    ) -> Any:
        """Retry after `first` failed; returns the answer or raises the last error."""
        replay = _Replay(first)

        def sleep(seconds: float) -> None:
            if registry.testing_mode:
                return
            if deadline is not None:
                seconds = min(seconds, max(0.0, deadline - time.perf_counter()))
            time.sleep(seconds)

        retrying = _t.Retrying(
            stop=self._stop(deadline, guard),
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
    ) -> Any:
        """The async twin of `run_sync`: awaits the attempts and the sleeps."""
        replay = _Replay(first)

        async def sleep(seconds: float) -> None:
            if registry.testing_mode:
                return
            if deadline is not None:
                seconds = min(seconds, max(0.0, deadline - time.perf_counter()))
            await asyncio.sleep(seconds)

        retrying = _t.AsyncRetrying(
            stop=self._stop(deadline, guard),
            wait=self._wait,
            retry=self._predicate,
            sleep=sleep,
            reraise=True,
        )
        return await retrying(replay.then_async(attempt))


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

"""Live guards, for process-wide actions: drills, testing mode, flushing, admin routes."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from safeserve.guard import Guard

_guards: weakref.WeakSet[Guard] = weakref.WeakSet()
_lock = threading.Lock()
_drills: list[tuple[str, str | None]] = []  # (reason, policy name or None for all)
testing_mode = False


def register(guard: Guard) -> None:
    """Track a new guard and apply any drill already running."""
    with _lock:
        _guards.add(guard)
        guard.forced = _forced_for(guard.name)


def live_guards() -> list[Guard]:
    """Every guard still referenced somewhere."""
    with _lock:
        return list(_guards)


def _forced_for(name: str) -> str | None:
    for reason, policy in reversed(_drills):
        if policy is None or policy == name:
            return reason
    return None


def _apply_drills() -> None:
    for g in list(_guards):
        g.forced = _forced_for(g.name)


@contextmanager
def force_degradation(reason: str = "timeout", policy: str | None = None) -> Iterator[None]:
    """Make guards (all, or those of one policy) take their degradation path without calling
    the model: outage drills and tests. Nested drills stack; the innermost wins."""
    entry = (reason, policy)
    with _lock:
        _drills.append(entry)
        _apply_drills()
    try:
        yield
    finally:
        with _lock:
            _drills.remove(entry)
            _apply_drills()


def flush_guards() -> None:
    """Let each guard write what it holds back (profiles, aggregated records)."""
    for g in live_guards():
        g.flush()


class testing:
    """Testing mode for users' suites: no backoff sleeps, synchronous log writes, breakers reset.

    Use `with ss.testing():` or the `safeserve_testing` pytest fixture.
    """

    def __init__(self, reset_breakers: bool = True) -> None:
        self._reset = reset_breakers
        self._was = False

    def __enter__(self) -> testing:
        from safeserve.logwriter import set_synchronous

        global testing_mode
        self._was = testing_mode
        testing_mode = True
        set_synchronous(True)
        if self._reset:
            for g in live_guards():
                g.breaker.reset()
        return self

    def __exit__(self, *exc: object) -> None:
        from safeserve.logwriter import set_synchronous

        global testing_mode
        testing_mode = self._was
        set_synchronous(self._was)

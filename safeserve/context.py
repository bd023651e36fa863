"""Outcomes of guarded calls made while serving one request, for the HTTP integration.

The FastAPI middleware opens a collection around an endpoint; a guarded function called inside
it notes how it was served. Only degraded and flagged calls write (a healthy call costs
nothing here), so "nothing noted" means every guarded call was served by a healthy primary.

Until a guard exists that an endpoint could call (`armed`), there is nothing to collect: the
middleware then opens no collection, and routes it does not guard pass straight through.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Noted = list[tuple[str | None, bool]]  # (served_by, degraded)

current: ContextVar[Noted | None] = ContextVar("safeserve_outcomes", default=None)

# Set, once and for good, by the first guard that an endpoint could call: any guard but the
# ones the middleware makes for routes given as policies, which only the middleware calls.
armed = False


def note(served_by: str | None, degraded: bool) -> None:
    """Record a degraded or flagged call's outcome in the current collection, if any."""
    noted = current.get()
    if noted is not None:
        noted.append((served_by, degraded))


@contextmanager
def collect() -> Iterator[Noted]:
    """Collect the outcomes noted inside the block (threads started by it share the list)."""
    noted: Noted = []
    token = current.set(noted)
    try:
        yield noted
    finally:
        current.reset(token)

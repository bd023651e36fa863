"""Outcomes of guarded calls made while serving one request, for the HTTP integration.

The FastAPI middleware opens a collection around an endpoint; a guarded function called inside
it notes how it was served: every degraded or flagged call, and the first healthy one (a
collection that holds anything means the endpoint called a guarded function, so its response
gets the X-SafeServe headers; the first degraded outcome is the one they report).

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


# A healthy call notes HEALTHY into an empty collection, inline in the guards' healthy paths:
# `noted = current_get(); if noted is not None and not noted: noted.append(HEALTHY)`.
HEALTHY = ("primary", False)
current_get = current.get


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

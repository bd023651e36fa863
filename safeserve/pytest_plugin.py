"""The `safeserve_testing` fixture, registered for users' suites through `pytest11`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from safeserve.registry import testing


@pytest.fixture
def safeserve_testing() -> Iterator[testing]:
    """Testing mode for one test: no backoff sleeps, synchronous logs, breakers reset."""
    with testing() as mode:
        yield mode

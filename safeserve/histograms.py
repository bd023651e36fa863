"""Latency and confidence histograms of a guard, in Prometheus buckets, read at scrape time.

A guard keeps them only once something exports them (`Guard.collect_histograms`, which the
admin router and the middleware call): until then a call pays nothing for them.
"""

from __future__ import annotations

import threading
from bisect import bisect_left, bisect_right

# seconds, as prometheus_client's default buckets, from a millisecond
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Histogram:
    """Counts per bucket (`counts[i]`: values <= bounds[i]; the last: above every bound) and
    their sum. Written without a lock: a rare lost increment is a scrape's rounding.

    A hot path may append values to `pending` instead of `add`ing each, and `fold` them in now
    and then: reading `counts` or `total` folds them in first.
    """

    __slots__ = ("_counts", "_total", "bounds", "pending")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0
        self.pending: list[float] = []

    def add(self, value: float) -> None:
        self._counts[bisect_left(self.bounds, value)] += 1
        self._total += value

    @property
    def counts(self) -> list[int]:
        self.fold()
        return self._counts

    @property
    def total(self) -> float:
        self.fold()
        return self._total

    def merge(self, other: Histogram) -> None:
        """Adds another histogram's counts and sum (of the same bounds), as of one fold."""
        with _folding:
            other.fold()
            for i, n in enumerate(other._counts):
                self._counts[i] += n
            self._total += other._total

    def fold(self) -> None:
        """Adds the values in `pending`: a dozen steps for any number of them. Once it returns,
        every value appended before it was called is in (another thread's fold included)."""
        pending = self.pending
        with _folding:  # one fold at a time; values appended meanwhile wait for the next
            n = len(pending)
            if not n:
                return
            values = pending[:n]
            del pending[:n]
            values.sort()
            counts = self._counts
            below = 0
            for i, bound in enumerate(self.bounds):
                upto = bisect_right(values, bound)  # the values <= bound
                counts[i] += upto - below
                below = upto
            counts[-1] += n - below
            # summed before the `+=`, which then makes no call between its read and its write
            # (where another thread's `add` could slip in and be lost)
            total = sum(values)
            self._total += total


# Folds are rare (every few hundred values, and when the histograms are read): one lock for all,
# re-entrant so that a read from inside a fold (a signal handler's, a finalizer's) cannot hang
_folding = threading.RLock()


class Histograms:
    """A guard's: the latency of every call (from its start to its answer, a fallback's
    included) and the confidence the primary's answers had, where a check reads one."""

    __slots__ = ("confidence", "latency")

    def __init__(self) -> None:
        self.latency = Histogram(LATENCY_BUCKETS)
        self.confidence = Histogram(CONFIDENCE_BUCKETS)

"""Sliding windows of call outcomes for the breaker (resilience4j's two kinds).

Each outcome is a small bit set: failure, slow, timeout. Totals are kept running, so a
snapshot is O(1); the caller (the breaker) holds its lock around `add`.
"""

from __future__ import annotations

from dataclasses import dataclass

FAILURE = 1
SLOW = 2
TIMEOUT = 4


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The window's counts at one moment."""

    calls: int
    failures: int
    slow: int
    timeouts: int

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0

    @property
    def slow_rate(self) -> float:
        return self.slow / self.calls if self.calls else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "calls": self.calls,
            "failures": self.failures,
            "errors": self.failures - self.timeouts,
            "timeouts": self.timeouts,
            "slow": self.slow,
            "failure_rate": round(self.failure_rate, 4),
            "slow_rate": round(self.slow_rate, 4),
        }


class CountWindow:
    """The last `size` outcomes, in a ring."""

    __slots__ = ("_i", "_ring", "calls", "failures", "size", "slow", "timeouts")

    def __init__(self, size: int) -> None:
        self.size = size
        self.clear()

    def clear(self) -> None:
        self._ring = [0] * self.size
        self._i = 0
        self.calls = self.failures = self.slow = self.timeouts = 0

    @property
    def all_good(self) -> bool:
        """Full of plain successes: adding another success changes nothing."""
        return self.calls == self.size and not (self.failures or self.slow)

    def add(self, outcome: int, now: float = 0.0) -> None:
        i = self._i
        if self.calls == self.size:
            old = self._ring[i]
            if old:
                self.failures -= old & FAILURE
                self.slow -= (old & SLOW) >> 1
                self.timeouts -= (old & TIMEOUT) >> 2
        else:
            self.calls += 1
        self._ring[i] = outcome
        if outcome:
            self.failures += outcome & FAILURE
            self.slow += (outcome & SLOW) >> 1
            self.timeouts += (outcome & TIMEOUT) >> 2
        self._i = i + 1 if i + 1 < self.size else 0

    def snapshot(self, now: float = 0.0) -> Snapshot:
        return Snapshot(self.calls, self.failures, self.slow, self.timeouts)


class TimeWindow:
    """The outcomes of the last `size` seconds, in one bucket per second."""

    __slots__ = ("_buckets", "_last", "calls", "failures", "size", "slow", "timeouts")

    def __init__(self, size: int) -> None:
        self.size = size
        self.clear()

    def clear(self) -> None:
        # Each bucket: [calls, failures, slow, timeouts]
        self._buckets = [[0, 0, 0, 0] for _ in range(self.size)]
        self._last = -1
        self.calls = self.failures = self.slow = self.timeouts = 0

    @property
    def all_good(self) -> bool:
        return False  # every call moves the time buckets

    def _advance(self, now: float) -> None:
        sec = int(now)
        if self._last < 0:
            self._last = sec
            return
        if sec <= self._last:
            return
        for s in range(self._last + 1, min(sec, self._last + self.size) + 1):
            b = self._buckets[s % self.size]
            self.calls -= b[0]
            self.failures -= b[1]
            self.slow -= b[2]
            self.timeouts -= b[3]
            b[0] = b[1] = b[2] = b[3] = 0
        self._last = sec

    def add(self, outcome: int, now: float = 0.0) -> None:
        self._advance(now)
        b = self._buckets[self._last % self.size]
        fail, slow, tmo = outcome & FAILURE, (outcome & SLOW) >> 1, (outcome & TIMEOUT) >> 2
        b[0] += 1
        b[1] += fail
        b[2] += slow
        b[3] += tmo
        self.calls += 1
        self.failures += fail
        self.slow += slow
        self.timeouts += tmo

    def snapshot(self, now: float = 0.0) -> Snapshot:
        self._advance(now)
        return Snapshot(self.calls, self.failures, self.slow, self.timeouts)

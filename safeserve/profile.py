"""Online feature profiles: what a guard's inputs look like, in its training baseline's bins.

The call path only appends the input to a deque (one C call). A shared background thread
drains the deques every half second and bins the values with numpy in batches; every
`profile_interval_s`, at `flush_logs()` and at exit each guard writes a `kind: "profile"`
record of counts. Counts in fixed bins merge by addition, across intervals, replicas and logs.
Redacted and hashed features are never profiled; each record names them (`redacted_or_hashed`),
so the skew report lists them as not compared rather than guessing why they are missing.
"""

from __future__ import annotations

import operator
import threading
import time
import weakref
from collections import deque
from datetime import UTC, datetime
from typing import Any

import numpy as np
from pydantic import BaseModel

from safeserve.decisions import SCHEMA_VERSION, new_id
from safeserve.validation import category_key

_TICK_S = 0.5


class Profiler:
    """One guard's running profile against a baseline."""

    def __init__(
        self,
        baseline: Any,
        skip: frozenset[str],
        policy: str,
        owner: str | None,
        writer: Any,
        interval_s: float,
    ) -> None:
        self.policy = policy
        self.owner = owner
        self.writer = writer
        self.interval_s = interval_s
        self.features = {n: f for n, f in baseline.features.items() if n not in skip}
        self.unprofiled = sorted(n for n in baseline.features if n in skip)
        self._numeric = [n for n, f in self.features.items() if f.kind == "numeric"]
        self._other = [n for n, f in self.features.items() if f.kind != "numeric"]
        self._pending: deque[Any] = deque()
        self.add = self._pending.append  # the whole hot-path cost
        self._lock = threading.Lock()
        self._reset(time.time())
        _profilers.add(self)
        _ensure_ticker()

    def _reset(self, now: float) -> None:
        self._start = now
        self._n = 0
        self._counts = {n: np.zeros(_slots(f), dtype=np.int64) for n, f in self.features.items()}
        self._nulls = dict.fromkeys(self.features, 0)
        self._out = dict.fromkeys(self.features, 0)

    # -- background --------------------------------------------------------------------------
    def drain(self) -> None:
        """Bin everything appended so far."""
        with self._lock:
            k = len(self._pending)
            if not k:
                return
            pop = self._pending.popleft
            self._bin([pop() for _ in range(k)])

    def _bin(self, rows: list[Any]) -> None:
        self._n += len(rows)
        if self._numeric:
            matrix = _numeric_matrix(rows, self._numeric)
            for j, name in enumerate(self._numeric):
                self._add(name, matrix[:, j])
        for name in self._other:
            column = np.array([category_or_null(_get(r, name)) for r in rows], dtype=object)
            self._add(name, column)

    def _add(self, name: str, values: np.ndarray) -> None:
        counts, nulls, out = self.features[name].bin_counts(values)
        self._counts[name] += counts
        self._nulls[name] += int(nulls)
        self._out[name] += int(out)

    def tick(self, now: float) -> None:
        """Drain; write a record when the interval is over."""
        self.drain()
        if now - self._start >= self.interval_s:
            self.emit(now)

    def emit(self, now: float | None = None) -> None:
        """Write the profile since the last one (nothing when no call was seen)."""
        now = time.time() if now is None else now
        self.drain()
        with self._lock:
            if not self._n:
                self._start = now
                return
            record = _ProfileRecord(self, now)
            self._reset(now)
        if self.writer is not None:
            self.writer.submit(record)

    def snapshot(self) -> dict[str, Any]:
        """The counts since the last record (after binning what is pending)."""
        self.drain()
        with self._lock:
            return _ProfileRecord(self, time.time()).to_record()


class _ProfileRecord:
    __slots__ = ("end", "features", "n", "owner", "policy", "start", "unprofiled")

    def __init__(self, profiler: Profiler, now: float) -> None:
        self.policy = profiler.policy
        self.owner = profiler.owner
        self.start = profiler._start
        self.end = now
        self.n = profiler._n
        self.unprofiled = profiler.unprofiled
        self.features = {
            name: {
                "counts": profiler._counts[name].tolist(),
                "nulls": profiler._nulls[name],
                "out_of_range": profiler._out[name],
            }
            for name in profiler.features
        }

    def to_record(self) -> dict[str, Any]:
        return {
            "kind": "profile",
            "schema_version": SCHEMA_VERSION,
            "id": new_id(),
            "ts": _iso(self.end),
            "policy": self.policy,
            "owner": self.owner,
            "start": _iso(self.start),
            "end": _iso(self.end),
            "n": self.n,
            "features": self.features,
            "redacted_or_hashed": self.unprofiled,
        }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def _slots(feature: Any) -> int:
    if feature.kind == "numeric":
        return max(1, len(feature.edges) - 1)
    return len(feature.categories) + 1


def _get(row: Any, name: str) -> Any:
    if isinstance(row, dict):
        return row.get(name)
    return getattr(row, name, None)


def category_or_null(value: Any) -> Any:
    return None if value is None else category_key(value)


def number_or_nan(value: Any) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return float("nan")  # a null; a non-number cannot be placed in numeric bins either
    return float(value)


def _numeric_matrix(rows: list[Any], names: list[str]) -> np.ndarray:
    """rows x features as floats (NaN for nulls); one C-level pass when the rows allow it."""
    first = rows[0]
    if isinstance(first, dict | BaseModel):
        get = (
            operator.itemgetter(*names) if isinstance(first, dict) else operator.attrgetter(*names)
        )
        try:
            picked = list(map(get, rows))
            matrix = np.array(picked, dtype=float)
            return matrix.reshape(len(rows), len(names))
        except (KeyError, AttributeError, TypeError, ValueError):
            pass  # a missing key, a None or a string somewhere: the careful way
    return np.array(
        [[number_or_nan(_get(r, n)) for n in names] for r in rows], dtype=float
    ).reshape(len(rows), len(names))


_profilers: weakref.WeakSet[Profiler] = weakref.WeakSet()
_ticker: threading.Thread | None = None
_ticker_lock = threading.Lock()


def _ensure_ticker() -> None:
    global _ticker
    with _ticker_lock:
        if _ticker is None or not _ticker.is_alive():
            _ticker = threading.Thread(target=_tick_forever, name="safeserve-profiles", daemon=True)
            _ticker.start()


def _tick_forever() -> None:
    while True:
        time.sleep(_TICK_S)
        now = time.time()
        for profiler in list(_profilers):
            try:
                profiler.tick(now)
            except Exception as exc:  # one bad profile must not stop the others
                import logging

                logging.getLogger("safeserve.profile").error(
                    "safeserve: profile of %s failed: %r", profiler.policy, exc
                )

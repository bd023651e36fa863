"""Serving counts of one policy in the baseline's bins, as the skew report accumulates them:
from logged decision inputs (binned a chunk at a time with numpy; numeric values also placed
on the baseline's fine quantile grid, for exact KS and Wasserstein) or from profile records;
and which features the policy's log cannot show, because they were redacted or hashed.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Hashable
from typing import Any

import numpy as np

from safeserve.baseline import Baseline, FeatureBaseline
from safeserve.skew_stats import ExactSide

__all__ = ["NOT_COMPARED", "PolicyCounts", "Side", "is_masked"]

NOT_COMPARED = "redacted/hashed in the log"
"""Why a feature was not compared, when the log cannot show its values."""

_CHUNK = 32768
_ABSENT: Any = object()
_REDACTION_MARKERS = frozenset({"[redacted]", "[REDACTED]"})
_HASH_HEX = frozenset("0123456789abcdef")


class Side:
    """Serving counts of one feature: per slot, nulls, out of range, rows."""

    __slots__ = ("counts", "n", "nulls", "out_of_range")

    def __init__(self, slots: int) -> None:
        self.counts = np.zeros(slots, dtype=np.int64)
        self.nulls = self.out_of_range = self.n = 0

    def add(self, f: FeatureBaseline, values: Any, n: int) -> None:
        counts, nulls, out = f.bin_counts(values)
        self.counts += counts
        self.nulls += nulls
        self.out_of_range += out
        self.n += n

    def merge(self, other: Side) -> None:
        self.counts += other.counts
        self.nulls += other.nulls
        self.out_of_range += other.out_of_range
        self.n += other.n


class PolicyCounts:
    """What the logs say about one policy's calls."""

    def __init__(self, baseline: Baseline) -> None:
        self.features = baseline.features
        self.numeric = [n for n, f in self.features.items() if f.kind == "numeric"]
        self.other = [n for n, f in self.features.items() if f.kind != "numeric"]
        self.degraded = {n: Side(f.slots) for n, f in self.features.items()}
        self.healthy = {n: Side(f.slots) for n, f in self.features.items()}
        self.profiled = {n: Side(f.slots) for n, f in self.features.items()}
        self.exact = {n: ExactSide(f) for n in self.numeric if (f := self.features[n]).quantiles}
        # a category list of hash-like strings: then such values are data, not hashes
        self.hashes_are_data = {
            n for n, f in self.features.items() if any(map(is_masked, f.categories))
        }
        self.profiles = 0
        self.profile_calls = 0
        self.matched_profiles = 0
        self.other_baseline = 0
        self.in_profiles: set[str] = set()
        self.unprofiled: set[str] = set()
        self.profiles_list_unprofiled = False
        self.decisions = 0
        self.rows = 0
        self.keyed = dict.fromkeys(self.features, 0)  # logged inputs holding the key
        self.masked = dict.fromkeys(self.features, 0)  # ... whose value is a marker or a hash
        self._rows: list[Any] = []
        self._flags: list[bool] = []

    def add_inputs(self, inputs: Any, degraded: bool) -> None:
        self._rows.append(inputs)
        self._flags.append(degraded)
        if len(self._rows) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        """Bin the buffered inputs (one numpy pass per chunk, not per call)."""
        rows, flags = self._rows, np.array(self._flags, dtype=bool)
        if not rows:
            return
        self._rows, self._flags = [], []
        self.rows += len(rows)
        sides = [(self.degraded, flags), (self.healthy, ~flags)]
        if self.numeric:
            matrix = self._numeric_matrix(rows)
            for j, name in enumerate(self.numeric):
                f, column = self.features[name], matrix[:, j]
                for side, mask in sides:
                    side[name].add(f, column[mask], int(mask.sum()))
                if name in self.exact:
                    self.exact[name].add(column)
        for name in self.other:
            column = np.empty(len(rows), dtype=object)
            column[:] = self._values(rows, name)
            for side, mask in sides:
                side[name].add(self.features[name], column[mask], int(mask.sum()))

    def _numeric_matrix(self, rows: list[Any]) -> np.ndarray:
        """rows x numeric features as floats, NaN for a missing, null or non-number value."""
        names = self.numeric
        try:
            matrix = np.array(list(map(operator.itemgetter(*names), rows)), dtype=np.float64)
        except (KeyError, TypeError, ValueError):
            pass  # a missing key, a None or a string somewhere: the careful way
        else:
            for name in names:
                self.keyed[name] += len(rows)
            return matrix.reshape(len(rows), len(names))
        columns = [list(map(_number, self._values(rows, name))) for name in names]
        return np.array(columns, dtype=np.float64).T.reshape(len(rows), len(names))

    def _values(self, rows: list[Any], name: str) -> list[Any]:
        """One feature's logged values (None where the key is missing), counting how many rows
        hold the key and how many hold a redaction marker or a hash instead of a value."""
        values = [r.get(name, _ABSENT) for r in rows]
        absent = values.count(_ABSENT)
        self.keyed[name] += len(values) - absent
        if absent:
            values = [None if v is _ABSENT else v for v in values]
        try:
            distinct = set(values)
        except TypeError:  # a list or dict among the values: compared by its text
            values = [v if isinstance(v, Hashable) else json.dumps(v) for v in values]
            distinct = set(values)
        hidden = {v for v in distinct if is_masked(v)}
        if hidden and name in self.hashes_are_data:
            hidden &= _REDACTION_MARKERS
        if hidden:
            self.masked[name] += sum(v in hidden for v in values)
        return values

    def add_profile(self, record: dict[str, Any]) -> None:
        """Add a profile's counts; one made against another baseline (a feature's bins differ)
        counts its calls only."""
        features = record["features"]
        if not isinstance(features, dict):
            raise TypeError("features")
        parsed = []
        for name, side in self.profiled.items():
            counts = features.get(name)
            if counts is None:
                continue
            c = np.asarray(counts["counts"], dtype=np.int64)
            parsed.append((name, side, c, int(counts["nulls"]), int(counts["out_of_range"])))
        calls = int(record["n"])
        listed = record.get("redacted_or_hashed")
        self.profiles += 1
        self.profile_calls += calls
        if any(c.shape != side.counts.shape for _, side, c, _, _ in parsed):
            self.other_baseline += 1
            return
        self.matched_profiles += 1
        for name, side, c, nulls, out_of_range in parsed:
            side.counts += c
            side.nulls += nulls
            side.out_of_range += out_of_range
            side.n += int(c.sum()) + nulls
            self.in_profiles.add(name)
        if isinstance(listed, list):
            self.profiles_list_unprofiled = True
            self.unprofiled.update(map(str, listed))

    def not_compared(self, name: str) -> str | None:
        """Why this policy's data cannot be compared with the baseline for `name`, or None."""
        if not self.profiles:
            return self.inputs_not_compared(name)
        if name in self.unprofiled:
            return NOT_COMPARED
        if not self.matched_profiles:
            return "profiles made against another baseline (bins differ)"
        if name not in self.in_profiles:
            # a guard leaves out of its profiles exactly what it redacts or hashes
            if self.profiles_list_unprofiled:
                return "not in the profiles (made against another baseline)"
            return NOT_COMPARED
        return None

    def inputs_not_compared(self, name: str) -> str | None:
        """`not_compared` for the logged inputs: a key no input holds, or mostly masked."""
        if not self.rows:
            return None
        keyed, masked = self.keyed[name], self.masked[name]
        if not keyed or 2 * masked >= keyed:
            return NOT_COMPARED
        return None


def is_masked(value: Any) -> bool:
    """A redaction marker or a salted hash (32 hex digits, or `[hash:...]`) in place of a value."""
    if not isinstance(value, str):
        return False
    if value in _REDACTION_MARKERS:
        return True
    if value.startswith("[hash:") and value.endswith("]"):
        value = value[6:-1]
    return len(value) == 32 and _HASH_HEX.issuperset(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)

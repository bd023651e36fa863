"""The degradation half of the skew report: calls, degraded calls, reasons and fallbacks over
time, and outcomes (labels that arrived later) joined to decisions to show quality by source.

Calls are counted from profile records where a policy has them (they count every call the
guard profiled), plus its drill calls (`ss.force_degradation`: a drilled call skips the model and
its input checks, so no profile counts it, but `stats()["calls"]` does); otherwise from decisions
and `rejected_while_open` aggregates, where healthy calls are only sampled, so the rate is then
an upper bound (`calls_source` says which).
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import numpy as np

__all__ = ["Degradation", "degradation_summary", "join_outcomes"]

_DECISION, _PROFILE, _DRILL = 0, 1, 2
_BUCKETS_S = (1, 5, 10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400)
_MAX_BUCKETS = 48


class Degradation:
    """Accumulates one entry per decision, aggregate or profile record (compact arrays)."""

    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.by_fallback: Counter[str] = Counter()
        self.flagged = 0
        self.times = array("d")
        self.weights = array("q")  # calls the entry stands for
        self.degraded = array("q")  # degraded calls among them
        self.policy = array("H")
        self.entry = array("b")  # _DECISION, _PROFILE or _DRILL
        self.reason_times = array("d")
        self.reason_codes: list[str] = []

    def decision(self, t: float, pid: int, record: dict[str, Any]) -> bool:
        """Count a decision record; returns whether the call was degraded."""
        degraded = record.get("degraded") is True
        reasons = record.get("reasons")
        codes = {r["code"] for r in reasons if isinstance(r.get("code"), str)} if reasons else ()
        # inlined _point: this runs once per logged call
        self.times.append(t)
        self.weights.append(1)
        self.degraded.append(degraded)
        self.policy.append(pid)
        self.entry.append(_DRILL if "forced" in codes else _DECISION)
        if record.get("flagged") is True:
            self.flagged += 1
        if degraded:
            served = record.get("served_by")
            self.by_fallback[served if isinstance(served, str) else "none"] += 1
        for code in codes:
            self.by_reason[code] += 1
            self.reason_times.append(t)
            self.reason_codes.append(code)
        return degraded

    def rejected(self, t: float, pid: int, record: dict[str, Any]) -> None:
        """Count a `rejected_while_open` aggregate: `count` calls refused by an open breaker."""
        count = int(record["count"])
        served = {str(k): int(v) for k, v in (record.get("served_by") or {}).items()}
        self._point(t, pid, count, count, _DECISION)
        self.by_reason["breaker_open"] += count
        self.reason_times.extend([t] * count)
        self.reason_codes.extend(["breaker_open"] * count)
        self.by_fallback.update(served)

    def profile(self, t: float, pid: int, n: int) -> None:
        """Count a profile record's calls (placed at the middle of its interval)."""
        self._point(t, pid, n, 0, _PROFILE)

    def _point(self, t: float, pid: int, weight: int, degraded: int, entry: int) -> None:
        self.times.append(t)
        self.weights.append(weight)
        self.degraded.append(degraded)
        self.policy.append(pid)
        self.entry.append(entry)


def degradation_summary(d: Degradation, profiled: set[int]) -> dict[str, Any]:
    """The `degradation` section; `profiled` holds the ids of policies with profile records."""
    times = np.frombuffer(d.times, dtype=np.float64) if d.times else np.empty(0)
    weights = np.frombuffer(d.weights, dtype=np.int64) if d.weights else np.empty(0, np.int64)
    degraded = np.frombuffer(d.degraded, dtype=np.int64) if d.degraded else weights[:0]
    entry = np.frombuffer(d.entry, dtype=np.int8)
    in_profiled = np.isin(np.frombuffer(d.policy, dtype=np.uint16), list(profiled))
    # a profiled policy's calls: its profiles and its drills; another's: its decisions
    counts_calls = np.where(in_profiled, entry != _DECISION, entry != _PROFILE)
    calls = int(weights[counts_calls].sum())
    total_degraded = int(degraded.sum())
    has_profiles, has_other = bool(in_profiled.any()), bool((~in_profiled).any())
    source = "+".join(
        name for name, on in (("decisions", has_other), ("profiles", has_profiles)) if on
    )
    return {
        "calls": calls,
        "degraded": total_degraded,
        "rate": total_degraded / calls if calls else None,
        "flagged": d.flagged,
        "calls_source": source or "none",
        "by_reason": dict(d.by_reason.most_common()),
        "by_fallback": dict(d.by_fallback.most_common()),
        "by_time": _by_time(d, times, np.where(counts_calls, weights, 0), degraded),
    }


def _by_time(
    d: Degradation, times: np.ndarray, calls: np.ndarray, degraded: np.ndarray
) -> list[dict[str, Any]]:
    if not times.size:
        return []
    start, span = float(times.min()), float(times.max() - times.min())
    width = next((w for w in _BUCKETS_S if span / w < _MAX_BUCKETS), _BUCKETS_S[-1])
    origin = math.floor(start / width) * width
    n = int((times.max() - origin) // width) + 1
    index = ((times - origin) // width).astype(np.int64)
    bucket_calls = np.bincount(index, weights=calls, minlength=n)
    bucket_degraded = np.bincount(index, weights=degraded, minlength=n)
    reasons: dict[str, np.ndarray] = {}
    if d.reason_codes:
        r_index = ((np.frombuffer(d.reason_times, dtype=np.float64) - origin) // width).astype(
            np.int64
        )
        codes = np.array(d.reason_codes, dtype=object)
        for code in sorted(set(d.reason_codes)):
            reasons[code] = np.bincount(r_index[codes == code], minlength=n)
    out = []
    for i in range(n):
        c, g = int(bucket_calls[i]), int(bucket_degraded[i])
        out.append(
            {
                "start": _iso(origin + i * width),
                "seconds": width,
                "calls": c,
                "degraded": g,
                "rate": g / c if c else None,
                "by_reason": {k: int(v[i]) for k, v in reasons.items() if v[i]},
            }
        )
    return out


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def join_outcomes(
    records: Iterable[dict[str, Any]], outcomes: dict[str, Any], policy: str | None
) -> dict[str, Any]:
    """Quality by `served_by` and by reason: each outcome joined to its decision by id.
    A number or boolean outcome is averaged (`mean`); others are counted by value."""
    by_served: dict[str, list[Any]] = {}
    by_reason: dict[str, list[Any]] = {}
    matched = 0
    for r in records:
        if r["kind"] != "decision" or r.get("id") not in outcomes:
            continue
        if policy is not None and r.get("policy") != policy:
            continue
        value = outcomes[r["id"]]
        matched += 1
        served = r.get("served_by")
        by_served.setdefault(served if isinstance(served, str) else "none", []).append(value)
        codes = {x.get("code") for x in r.get("reasons") or [] if isinstance(x, dict)}
        for code in codes or {"healthy"}:
            by_reason.setdefault(str(code), []).append(value)
    return {
        "outcomes": len(outcomes),
        "matched": matched,
        "unmatched": len(outcomes) - matched,
        "by_served_by": {k: _quality(v) for k, v in sorted(by_served.items())},
        "by_reason": {k: _quality(v) for k, v in sorted(by_reason.items())},
    }


def _quality(values: list[Any]) -> dict[str, Any]:
    numbers = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, str)]
    out: dict[str, Any] = {"n": len(values), "mean": None}
    if numbers and len(numbers) == len(values):
        out["mean"] = sum(numbers) / len(numbers)
    else:
        out["values"] = dict(Counter(str(v) for v in values).most_common(20))
    return out

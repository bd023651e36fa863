"""Property: whatever goes wrong, a call answers or raises a typed error, and is logged once."""

import json
import math
import tempfile
import threading
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import safeserve as ss
from safeserve.histograms import LATENCY_BUCKETS, Histogram

MODES = ["ok", "raise", "slow", "nan", "low", "invalid"]
EXCEPTIONS = [ValueError, ConnectionError, RuntimeError, KeyError, ZeroDivisionError]
EXPECTED_CODES = {
    "raise": {"error"},
    "slow": {"timeout"},
    "nan": {"invalid_output"},
    "low": {"low_confidence"},
    "invalid": {"invalid_input", "rejected"},
}
FB_ANSWER = {"y": -1.0, "by": "fb"}
STATIC_ANSWER = {"y": -2.0, "by": "static"}

# Slow calls wait on this (never set) for a bit longer than the timeout, then finish by themselves.
_never = threading.Event()


class Features(BaseModel):
    """The primary's input schema."""

    x: float
    mode: str
    exc: int = 0


def primary(x: dict) -> dict:
    mode = x["mode"]
    if mode == "raise":
        raise EXCEPTIONS[x["exc"]]("planned")
    if mode == "slow":
        _never.wait(0.15)
        return {"y": x["x"], "confidence": 0.9}
    if mode == "nan":
        return {"y": math.nan, "confidence": 0.9}
    if mode == "low":
        return {"y": x["x"], "confidence": 0.1}
    return {"y": x["x"], "confidence": 0.9}


calls_strategy = st.lists(
    st.tuples(st.sampled_from(MODES), st.integers(0, len(EXCEPTIONS) - 1)),
    min_size=1,
    max_size=12,
).filter(lambda calls: sum(m == "slow" for m, _ in calls) <= 3)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    calls=calls_strategy,
    on_invalid=st.sampled_from(["fallback", "reject"]),
    use_fb=st.booleans(),
    fb_fails_on=st.sets(st.sampled_from(MODES)),
    use_static=st.booleans(),
)
def test_every_call_answers_or_raises_typed_error_and_is_logged_once(
    calls: list[tuple[str, int]],
    on_invalid: str,
    use_fb: bool,
    fb_fails_on: set[str],
    use_static: bool,
) -> None:
    """Any fault mix: primary or fallback answers or a typed error; one record per degraded call."""

    def backup(x: dict) -> dict:
        if x["mode"] in fb_fails_on:
            raise RuntimeError("backup failed")
        return FB_ANSWER

    fallbacks = []
    if use_fb:
        fallbacks.append(ss.Fallback.model("fb", backup))
    if use_static:
        fallbacks.append(ss.Fallback.static("static", STATIC_ANSWER))

    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "decisions.jsonl"
        guard = ss.guard(
            name="prop",
            validation=ss.ValidationConfig(schema=Features, on_invalid=on_invalid),
            timeout_s=0.05,
            confidence=ss.ConfidenceConfig(threshold=0.5),
            fallbacks=fallbacks,
            log=ss.DecisionLogConfig(sink=str(log_path)),
        )(primary)

        degraded_modes: list[str] = []
        failures: list[tuple[str, Any]] = []
        for n, (mode, exc) in enumerate(calls):
            if mode == "invalid":
                x: dict[str, Any] = {"x": "not-a-number", "mode": mode}
            else:
                x = {"x": float(n), "mode": mode, "exc": exc}
            if mode != "ok":
                degraded_modes.append(mode)
            try:
                answer = guard(x)
            except ss.InputRejected:
                assert mode == "invalid"
                assert on_invalid == "reject"
                continue
            except ss.NoFallbackAvailable as err:
                failures.append((mode, err.decision.served_by))
                continue
            allowed = []
            if mode == "ok":
                allowed.append({"y": float(n), "confidence": 0.9})
            else:
                if use_fb and mode not in fb_fails_on:
                    allowed.append(FB_ANSWER)
                if use_static:
                    allowed.append(STATIC_ANSWER)
            assert answer in allowed, (mode, answer)

        assert all(mode != "ok" and served_by is None for mode, served_by in failures)
        assert ss.flush_logs() is True
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        records = [json.loads(line) for line in lines]
        decisions = [r for r in records if r["kind"] == "decision"]
        assert len(decisions) == len(degraded_modes)
        for record, mode in zip(decisions, degraded_modes, strict=True):
            assert record["degraded"] is True
            assert EXPECTED_CODES[mode] & {r["code"] for r in record["reasons"]}, (mode, record)


@given(
    st.lists(
        st.one_of(
            st.floats(min_value=0.0, max_value=20.0),
            st.sampled_from(LATENCY_BUCKETS),  # on a bound: in its bucket, not the next
        ),
        max_size=300,
    )
)
def test_a_histogram_filled_in_bulk_matches_one_filled_value_by_value(values: list[float]) -> None:
    """Values appended to `pending` (the middleware's latencies) land, once read, in the bucket
    `add` puts them in."""
    one_by_one, in_bulk = Histogram(LATENCY_BUCKETS), Histogram(LATENCY_BUCKETS)
    for v in values:
        one_by_one.add(v)
    half = len(values) // 2
    in_bulk.pending.extend(values[:half])
    in_bulk.fold()
    in_bulk.pending.extend(values[half:])  # read without a fold of its own
    assert in_bulk.counts == one_by_one.counts
    assert math.isclose(in_bulk.total, one_by_one.total, abs_tol=1e-9)
    assert in_bulk.pending == []

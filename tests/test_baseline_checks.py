"""Per-call checks derived from a training baseline, freshness, `on_invalid="flag"`, and the
online feature profiles a guard writes."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safeserve as ss

RNG = np.random.default_rng(7)
TRAIN = {
    "amount": RNG.uniform(0.0, 100.0, 2000).tolist(),
    "country": RNG.choice(["DE", "FR", "NL"], 2000).tolist(),
    "age": RNG.integers(18, 90, 2000).astype(float).tolist(),
}
GOOD = {"amount": 50.0, "country": "DE", "age": 40.0}


@pytest.fixture(scope="module")
def baseline() -> ss.Baseline:
    return ss.Baseline.from_data(TRAIN, bins=10)


def model(x: dict[str, Any]) -> dict[str, Any]:
    return {"label": "approve"}


def guarded(baseline: ss.Baseline, **validation: Any) -> Any:
    log = validation.pop("log", None)
    return ss.guard(
        name=f"bl-{time.monotonic_ns()}",
        validation=ss.ValidationConfig(baseline=baseline, **validation),
        fallbacks=[ss.Fallback.static("default", {"label": "review"})],
        log=log,
    )(model)


def reasons_of(outcome: ss.Outcome) -> dict[str, str | None]:
    return {r.code: r.detail for r in outcome.decision.reasons}


class TestBaselineChecks:
    """Each check on its own, each an `invalid_input` whose detail names the feature."""

    def test_values_inside_the_training_range_pass(self, baseline: ss.Baseline) -> None:
        predict = guarded(baseline)
        outcome = predict.call(GOOD)
        assert outcome.decision.served_by == "primary"
        assert not outcome.decision.degraded

    def test_out_of_range_value_falls_back_naming_the_feature(self, baseline: ss.Baseline) -> None:
        predict = guarded(baseline)
        outcome = predict.call({**GOOD, "amount": 1000.0})
        assert outcome.value == {"label": "review"}
        detail = reasons_of(outcome)["invalid_input"]
        assert detail is not None
        assert "amount" in detail
        assert "range" in detail

    def test_tolerance_widens_the_range(self, baseline: ss.Baseline) -> None:
        """10 % tolerance on a 0..100 range admits 105 and still refuses 115."""
        hi = baseline.features["amount"].max
        lo = baseline.features["amount"].min
        span = hi - lo
        predict = guarded(baseline, tolerance=0.1)
        assert predict.call({**GOOD, "amount": hi + 0.05 * span}).decision.served_by == "primary"
        assert predict.call({**GOOD, "amount": hi + 0.15 * span}).decision.degraded

    def test_unseen_category_is_invalid(self, baseline: ss.Baseline) -> None:
        predict = guarded(baseline)
        outcome = predict.call({**GOOD, "country": "XX"})
        detail = reasons_of(outcome)["invalid_input"]
        assert detail is not None
        assert "country" in detail
        assert "unseen" in detail

    def test_null_where_training_had_none_is_invalid(self, baseline: ss.Baseline) -> None:
        predict = guarded(baseline)
        outcome = predict.call({**GOOD, "age": None})
        detail = reasons_of(outcome)["invalid_input"]
        assert detail is not None
        assert "age" in detail
        assert "null" in detail

    def test_reject_raises_with_the_feature_problems(self, baseline: ss.Baseline) -> None:
        predict = guarded(baseline, on_invalid="reject")
        with pytest.raises(ss.InputRejected) as err:
            predict({**GOOD, "amount": -50.0, "country": "XX"})
        assert {p.loc for p in err.value.problems} == {"amount", "country"}

    def test_flag_serves_the_primary_and_records_the_problem(self, baseline: ss.Baseline) -> None:
        calls: list[dict[str, Any]] = []

        def primary(x: dict[str, Any]) -> dict[str, Any]:
            calls.append(x)
            return {"label": "approve"}

        predict = ss.guard(
            name="flag",
            validation=ss.ValidationConfig(baseline=baseline, on_invalid="flag"),
            fallbacks=[ss.Fallback.static("default", {"label": "review"})],
        )(primary)
        outcome = predict.call({**GOOD, "amount": 1000.0})
        assert outcome.value == {"label": "approve"}
        assert calls
        assert calls[0]["amount"] == 1000.0
        d = outcome.decision
        assert d.served_by == "primary"
        assert d.flagged
        assert not d.degraded
        assert [r.code for r in d.reasons] == ["invalid_input"]
        assert predict.stats()["flagged"] == 1
        assert predict.stats()["reasons"] == {"invalid_input": 1}

    def test_baseline_from_a_file(self, baseline: ss.Baseline, tmp_path: Path) -> None:
        path = tmp_path / "baseline.json"
        baseline.save(path)
        predict = guarded(str(path))  # type: ignore[arg-type]
        assert predict.call({**GOOD, "amount": 1000.0}).decision.degraded

    def test_unreadable_baseline_is_a_policy_error(self, tmp_path: Path) -> None:
        with pytest.raises(ss.PolicyError, match=r"validation\.baseline"):
            guarded(str(tmp_path / "missing.json"))  # type: ignore[arg-type]


class TestFreshness:
    """`freshness={"field", "max_age_s"}`: stale inputs are invalid with detail `stale`."""

    def guard(self) -> Any:
        return ss.guard(
            name="fresh",
            validation=ss.ValidationConfig(freshness={"field": "event_ts", "max_age_s": 300}),
            fallbacks=[ss.Fallback.static("default", {"label": "review"})],
        )(model)

    @pytest.mark.parametrize(
        "ts",
        [
            datetime.now(UTC),
            datetime.now(UTC).isoformat(),
            time.time(),
            time.time() + 60,  # a little clock skew ahead is fine
        ],
        ids=["datetime", "iso", "epoch", "skew-ahead"],
    )
    def test_fresh_input_passes(self, ts: Any) -> None:
        assert self.guard().call({"event_ts": ts}).decision.served_by == "primary"

    @pytest.mark.parametrize(
        "ts",
        [
            datetime.now(UTC) - timedelta(hours=1),
            (datetime.now(UTC) - timedelta(hours=1)).isoformat(),
            time.time() - 3600,
            None,
            time.time() + 10_000,
            time.time() * 1000,  # epoch milliseconds read as seconds
        ],
        ids=["datetime", "iso", "epoch", "missing", "future", "epoch-ms"],
    )
    def test_stale_input_is_invalid(self, ts: Any) -> None:
        outcome = self.guard().call({"event_ts": ts})
        assert outcome.value == {"label": "review"}
        detail = reasons_of(outcome)["invalid_input"]
        assert detail is not None
        assert "event_ts" in detail
        assert "stale" in detail


class TestProfiles:
    """Online profiles: counts in the baseline's bins, written as `kind: "profile"` records."""

    def test_profile_records_count_every_call_in_the_baseline_bins(
        self, baseline: ss.Baseline, tmp_path: Path
    ) -> None:
        sink = tmp_path / "log.jsonl"
        predict = guarded(baseline, log=ss.DecisionLogConfig(sink=str(sink)))
        rows = [
            {"amount": float(a), "country": c, "age": 30.0}
            for a, c in zip(RNG.uniform(0, 100, 500), RNG.choice(["DE", "FR"], 500), strict=True)
        ]
        rows.append({"amount": 500.0, "country": "XX", "age": None})
        for row in rows:
            predict(row)
        assert ss.flush_logs()
        profiles = [
            json.loads(line)
            for line in sink.read_text().splitlines()
            if json.loads(line)["kind"] == "profile"
        ]
        assert sum(p["n"] for p in profiles) == len(rows)
        amount = baseline.features["amount"]
        expected, _, out = amount.bin_counts(np.array([r["amount"] for r in rows]))
        got = np.sum([p["features"]["amount"]["counts"] for p in profiles], axis=0)
        assert got.tolist() == expected.tolist()
        assert sum(p["features"]["amount"]["out_of_range"] for p in profiles) == out == 1
        assert sum(p["features"]["age"]["nulls"] for p in profiles) == 1
        assert all(p["policy"] == predict.name for p in profiles)

    def test_redacted_and_hashed_features_are_never_profiled(
        self, baseline: ss.Baseline, tmp_path: Path
    ) -> None:
        sink = tmp_path / "log.jsonl"
        log = ss.DecisionLogConfig(sink=str(sink), redact=["amount"], hash=["country"])
        predict = guarded(baseline, log=log)
        predict(GOOD)
        assert ss.flush_logs()
        profiles = [
            json.loads(line)
            for line in sink.read_text().splitlines()
            if json.loads(line)["kind"] == "profile"
        ]
        assert profiles
        assert all(set(p["features"]) == {"age"} for p in profiles)

    def test_sixteen_threads_lose_no_count(self, baseline: ss.Baseline) -> None:
        predict = guarded(baseline)

        def feed() -> None:
            for _ in range(500):
                predict(GOOD)

        threads = [threading.Thread(target=feed) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        profile = predict.profile()
        assert profile is not None
        assert profile["n"] == 16 * 500
        assert sum(profile["features"]["amount"]["counts"]) == 16 * 500

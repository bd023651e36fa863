"""The retry budget and the aggregated log of calls rejected while the breaker is open."""

from __future__ import annotations

import json
from pathlib import Path

import safeserve as ss


def flaky(x: dict[str, int]) -> dict[str, int]:
    """Always fails with a retryable error."""
    raise ConnectionError("model host unreachable")


def static() -> list[ss.Fallback]:
    return [ss.Fallback.static("default", {"label": "review"})]


class TestRetryBudget:
    """`RetryConfig(budget=...)` caps retries at a share of recent calls."""

    def test_budget_caps_retries_and_records_the_refusal(self) -> None:
        """With budget 0.2 and no floor, 100 failing calls make at most ~20 retries."""
        calls = {"n": 0}

        def model(x: dict[str, int]) -> dict[str, int]:
            calls["n"] += 1
            raise ConnectionError("down")

        retry = ss.RetryConfig(
            attempts=3, backoff_s=0, jitter=False, budget=0.2, min_retries_per_s=0
        )
        predict = ss.guard(
            name="budget",
            retry=retry,
            fallbacks=static(),
            breaker=ss.BreakerConfig(min_calls=10**6),
        )(model)
        with ss.testing():
            outcomes = [predict.call({"i": i}) for i in range(100)]
        retries = calls["n"] - 100
        assert 0 < retries <= 21
        refused = [
            a for o in outcomes for a in o.decision.attempts if a.error == "retry budget exhausted"
        ]
        assert refused, "a refused retry is recorded in the decision's attempts"
        assert all(o.value == {"label": "review"} for o in outcomes)

    def test_without_budget_every_call_retries(self) -> None:
        """No budget: each failing call makes all its attempts."""
        calls = {"n": 0}

        def model(x: dict[str, int]) -> dict[str, int]:
            calls["n"] += 1
            raise ConnectionError("down")

        retry = ss.RetryConfig(attempts=3, backoff_s=0, jitter=False)
        predict = ss.guard(
            name="nobudget",
            retry=retry,
            fallbacks=static(),
            breaker=ss.BreakerConfig(min_calls=10**6),
        )(model)
        with ss.testing():
            for i in range(20):
                predict({"i": i})
        assert calls["n"] == 60


class TestOpenBreakerAggregate:
    """`DecisionLogConfig(open_breaker="aggregate")`: one record per second while open."""

    def test_rejected_calls_are_aggregated(self, tmp_path: Path) -> None:
        """1000 calls on a forced-open breaker write a few aggregate lines, not 1000 decisions."""
        sink = tmp_path / "log.jsonl"
        log = ss.DecisionLogConfig(sink=str(sink), open_breaker="aggregate")
        predict = ss.guard(name="agg", owner="team", fallbacks=static(), log=log)(flaky)
        predict.force_open()
        for i in range(1000):
            assert predict({"i": i}) == {"label": "review"}
        assert ss.flush_logs()
        records = [json.loads(line) for line in sink.read_text().splitlines()]
        aggregates = [r for r in records if r["kind"] == "rejected_while_open"]
        decisions = [r for r in records if r["kind"] == "decision"]
        assert decisions == []
        assert 1 <= len(aggregates) <= 3
        assert sum(r["count"] for r in aggregates) == 1000
        assert all(r["policy"] == "agg" and r["owner"] == "team" for r in aggregates)
        assert sum(r["served_by"]["default"] for r in aggregates) == 1000
        assert predict.stats()["reasons"]["breaker_open"] == 1000

    def test_each_is_the_default(self, tmp_path: Path) -> None:
        """By default every rejected call has its own decision record."""
        sink = tmp_path / "log.jsonl"
        predict = ss.guard(
            name="each", fallbacks=static(), log=ss.DecisionLogConfig(sink=str(sink))
        )(flaky)
        predict.force_open()
        for i in range(50):
            predict({"i": i})
        assert ss.flush_logs()
        kinds = [json.loads(line)["kind"] for line in sink.read_text().splitlines()]
        assert kinds.count("decision") == 50

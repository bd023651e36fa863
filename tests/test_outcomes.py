"""`ss.record_outcome`: labels that arrive later, joined to their decision by id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import safeserve as ss


def failing(x: dict[str, int]) -> dict[str, str]:
    raise ConnectionError("down")


def test_outcome_record_joins_its_decision(tmp_path: Path) -> None:
    """The outcome lands in the policy's log with the decision's id."""
    sink = tmp_path / "log.jsonl"
    predict = ss.guard(
        name="outcomes",
        fallbacks=[ss.Fallback.static("default", {"label": "review"})],
        log=ss.DecisionLogConfig(sink=str(sink)),
    )(failing)
    decision = predict.call({"i": 1}).decision
    ss.record_outcome(decision.id, {"fraud": True}, policy="outcomes")
    assert ss.flush_logs()
    records = [json.loads(line) for line in sink.read_text().splitlines()]
    outcome = next(r for r in records if r["kind"] == "outcome")
    assert outcome["decision_id"] == decision.id
    assert outcome["outcome"] == {"fraud": True}
    assert outcome["policy"] == "outcomes"
    assert any(r["kind"] == "decision" and r["id"] == decision.id for r in records)


def test_outcome_without_a_log_is_a_clear_error() -> None:
    """No sink configured for the policy: a typed error, not a silent drop."""
    ss.guard(name="no-log-outcomes")(failing)
    with pytest.raises(ss.SafeServeError, match="no decision log"):
        ss.record_outcome("some-id", 1, policy="no-log-outcomes")

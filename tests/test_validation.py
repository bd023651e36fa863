"""Input validation: pydantic schemas, fallback or reject, and what invalid input must not touch."""

import asyncio
import contextlib
from typing import Any

import pytest
from pydantic import BaseModel

import safeserve as ss

SECRET = "SECRET-not-a-number-4111"


class Txn(BaseModel):
    """A transaction as the model expects it."""

    amount: float
    country: str
    card_number: str | None = None


def recorder(answer: Any = None, exc: BaseException | None = None) -> Any:
    """A predict function that records the inputs it receives (in `.inputs`) and answers."""
    inputs: list[Any] = []

    def predict(x: Any) -> Any:
        inputs.append(x)
        if exc is not None:
            raise exc
        return answer

    predict.inputs = inputs  # type: ignore[attr-defined]
    return predict


def codes(decision: Any) -> list[str]:
    return [r.code for r in decision.reasons]


@pytest.fixture
def primary() -> Any:
    return recorder(answer={"label": "approve"})


@pytest.fixture
def backup() -> Any:
    return recorder(answer={"label": "review"})


def make_guard(primary: Any, backup: Any, on_invalid: str = "fallback", **fields: Any) -> Any:
    return ss.guard(
        name="txn",
        validation=ss.ValidationConfig(schema=Txn, on_invalid=on_invalid),
        fallbacks=[ss.Fallback.model("backup", backup)],
        **fields,
    )(primary)


class TestFallbackOnInvalid:
    def test_invalid_input_falls_back_with_invalid_input_reason(
        self, primary: Any, backup: Any
    ) -> None:
        """An input failing the schema is served by the fallback, reason invalid_input."""
        g = make_guard(primary, backup)
        out = g.call({"amount": SECRET, "country": "DE"})
        assert out.value == {"label": "review"}
        assert out.decision.served_by == "backup"
        assert out.decision.degraded is True
        assert "invalid_input" in codes(out.decision)
        stages = {r.code: r.stage for r in out.decision.reasons}
        assert stages["invalid_input"] == "validate"
        assert primary.inputs == []

    def test_fallback_is_the_default_on_invalid(self, primary: Any, backup: Any) -> None:
        """ValidationConfig without on_invalid falls back rather than rejecting."""
        g = ss.guard(
            name="txn",
            validation=ss.ValidationConfig(schema=Txn),
            fallbacks=[ss.Fallback.model("backup", backup)],
        )(primary)
        assert g({"country": "DE"}) == {"label": "review"}

    def test_fallback_receives_raw_input_when_validation_failed(
        self, primary: Any, backup: Any
    ) -> None:
        """A fallback gets the raw input, unchanged, when validation failed."""
        g = make_guard(primary, backup)
        raw = {"amount": SECRET, "country": "DE", "extra": [1, 2]}
        g(raw)
        assert backup.inputs == [raw]

    def test_fallback_receives_validated_input_when_validation_passed(self, backup: Any) -> None:
        """When validation passed but the primary failed, the fallback gets the coerced input."""
        failing = recorder(exc=ConnectionError("down"))
        g = make_guard(failing, backup)
        g({"amount": "12.5", "country": "DE"})
        assert backup.inputs == [{"amount": 12.5, "country": "DE", "card_number": None}]


class TestReject:
    def test_reject_raises_input_rejected_with_one_problem_per_field(
        self, primary: Any, backup: Any
    ) -> None:
        """on_invalid="reject" raises InputRejected listing one (loc, message) per bad field."""
        g = make_guard(primary, backup, on_invalid="reject")
        with pytest.raises(ss.InputRejected) as info:
            g({"amount": SECRET, "country": 123})
        problems = info.value.problems
        assert sorted(p.loc for p in problems) == ["amount", "country"]
        assert all(p.message for p in problems)
        assert primary.inputs == []
        assert backup.inputs == []

    def test_reject_reports_missing_field(self, primary: Any, backup: Any) -> None:
        """A missing required field is one problem located at that field."""
        g = make_guard(primary, backup, on_invalid="reject")
        with pytest.raises(ss.InputRejected) as info:
            g({"country": "DE"})
        assert [p.loc for p in info.value.problems] == ["amount"]

    def test_rejection_message_holds_no_input_value(self, primary: Any, backup: Any) -> None:
        """Neither the error message nor the problems repeat the bad value."""
        g = make_guard(primary, backup, on_invalid="reject")
        with pytest.raises(ss.InputRejected) as info:
            g({"amount": SECRET, "country": "DE"})
        assert SECRET not in str(info.value)
        assert SECRET not in repr(info.value)
        for p in info.value.problems:
            assert SECRET not in p.message
            assert SECRET not in p.loc

    def test_rejection_is_counted_in_stats(self, primary: Any, backup: Any) -> None:
        """A rejected call counts as a call and as rejected, not as served."""
        g = make_guard(primary, backup, on_invalid="reject")
        with pytest.raises(ss.InputRejected):
            g({"country": "DE"})
        stats = g.stats()
        assert stats["calls"] == 1
        assert stats["rejected"] == 1
        assert sum(stats["served_by"].values()) == 0

    def test_async_guard_rejects_invalid_input(self, backup: Any) -> None:
        """An async guard raises InputRejected from the awaited call."""

        async def predict(x: dict) -> dict:
            return {"label": "approve"}

        g = ss.guard(
            name="txn",
            validation=ss.ValidationConfig(schema=Txn, on_invalid="reject"),
            fallbacks=[ss.Fallback.model("backup", backup)],
        )(predict)

        async def main() -> Any:
            return await g({"amount": SECRET, "country": "DE"})

        with pytest.raises(ss.InputRejected):
            asyncio.run(main())


class TestInvalidInputIsolation:
    @pytest.mark.parametrize("on_invalid", ["fallback", "reject"])
    def test_invalid_input_counts_neither_success_nor_failure(
        self, backup: Any, on_invalid: str
    ) -> None:
        """Invalid inputs leave the breaker's window untouched."""
        failing = recorder(exc=ConnectionError("down"))
        breaker = ss.BreakerConfig(window_size=10, min_calls=10, open_s=60)
        g = make_guard(failing, backup, on_invalid=on_invalid, breaker=breaker)
        for _ in range(20):
            with contextlib.suppress(ss.InputRejected):
                g({"amount": SECRET, "country": "DE"})
        assert g.breaker.state == "closed"
        # Nine real failures: if invalid inputs had counted as successes the window of ten
        # would hold 9/10 failures and open; if as failures it would have opened already.
        for _ in range(9):
            g({"amount": 1.0, "country": "DE"})
        assert g.breaker.state == "closed"
        g({"amount": 1.0, "country": "DE"})
        assert g.breaker.state == "open"

    def test_invalid_input_is_never_retried(self, backup: Any) -> None:
        """Validation errors are not retried even when ValueError is retryable."""
        primary = recorder(answer={"label": "approve"})
        retry = ss.RetryConfig(attempts=3, backoff_s=0.0, retry_on=[ValueError, ConnectionError])
        g = make_guard(primary, backup, retry=retry)
        out = g.call({"amount": SECRET, "country": "DE"})
        assert primary.inputs == []
        assert [a.name for a in out.decision.attempts if a.name == "primary"] == []
        assert out.decision.served_by == "backup"


class TestValidatedInput:
    def test_primary_receives_coerced_dict(self, primary: Any, backup: Any) -> None:
        """An unannotated primary receives model_dump() of the validated input."""
        g = make_guard(primary, backup)
        assert g({"amount": "12.5", "country": "DE"}) == {"label": "approve"}
        assert primary.inputs == [{"amount": 12.5, "country": "DE", "card_number": None}]
        assert isinstance(primary.inputs[0]["amount"], float)

    def test_primary_annotated_with_schema_receives_instance(self, backup: Any) -> None:
        """A primary whose input is annotated with the schema class receives the instance."""
        seen: list[Any] = []

        def predict(x: Txn) -> dict:
            seen.append(x)
            return {"label": "approve"}

        g = make_guard(predict, backup)
        g({"amount": "3", "country": "FR"})
        assert len(seen) == 1
        assert isinstance(seen[0], Txn)
        assert seen[0].amount == 3.0

    def test_valid_input_is_served_by_primary(self, primary: Any, backup: Any) -> None:
        """A valid input goes to the primary and is not degraded."""
        g = make_guard(primary, backup)
        out = g.call({"amount": 1.0, "country": "DE"})
        assert out.decision.served_by == "primary"
        assert out.decision.degraded is False
        assert backup.inputs == []

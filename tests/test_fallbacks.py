"""Fallbacks: model, rules, cache and static kinds, their order, limits and the all-fail error."""

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import safeserve as ss

STATIC = {"label": "static"}


def codes(decision: Any) -> list[str]:
    return [r.code for r in decision.reasons]


def always_fails(x: Any) -> Any:
    raise ConnectionError("primary down")


class Switch:
    """A primary whose failure is switched by the test; answers are derived from the input."""

    def __init__(self) -> None:
        self.failing = False
        self.calls = 0

    def function(self) -> Any:
        def predict(x: dict) -> dict:
            self.calls += 1
            if self.failing:
                raise ConnectionError("primary down")
            return {"answer": x["k"], "n": self.calls}

        return predict


@pytest.fixture
def switch() -> Switch:
    return Switch()


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event slow functions wait on; set at teardown so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


class TestModelFallback:
    def test_model_fallback_serves_when_primary_fails(self) -> None:
        """Fallback.model serves its function's answer and is named in served_by."""
        g = ss.guard(name="m", fallbacks=[ss.Fallback.model("v2", lambda x: {"v2": x["a"]})])(
            always_fails
        )
        out = g.call({"a": 3})
        assert out.value == {"v2": 3}
        assert out.decision.served_by == "v2"
        assert [(a.name, a.ok) for a in out.decision.attempts] == [("primary", False), ("v2", True)]

    def test_model_fallback_gets_same_arguments_as_primary(self) -> None:
        """A model fallback is called with the primary's positional and keyword arguments."""
        seen: list[Any] = []

        def primary(x: dict, *, scale: int = 1) -> int:
            raise ConnectionError("down")

        def v2(x: dict, *, scale: int = 1) -> int:
            seen.append((x, scale))
            return x["a"] * scale

        g = ss.guard(name="m", fallbacks=[ss.Fallback.model("v2", v2)])(primary)
        assert g({"a": 2}, scale=5) == 10
        assert seen == [({"a": 2}, 5)]


RULE_CASES = [
    ("eq", "DE", "DE", True),
    ("eq", "DE", "FR", False),
    ("ne", "DE", "FR", True),
    ("ne", "DE", "DE", False),
    ("lt", 10, 5, True),
    ("lt", 10, 10, False),
    ("le", 10, 10, True),
    ("le", 10, 11, False),
    ("gt", 1000, 1001, True),
    ("gt", 1000, 1000, False),
    ("ge", 1000, 1000, True),
    ("ge", 1000, 999, False),
    ("in", ["DE", "FR"], "FR", True),
    ("in", ["DE", "FR"], "US", False),
    ("not_in", ["DE", "FR"], "US", True),
    ("not_in", ["DE", "FR"], "DE", False),
    ("is_null", True, None, True),
    ("is_null", True, 5, False),
    ("is_null", False, 5, True),
    ("is_null", False, None, False),
]


class TestRulesFallback:
    @pytest.mark.parametrize(
        ("op", "operand", "value", "matches"),
        RULE_CASES,
        ids=[f"{op}-{value}-{m}" for op, _, value, m in RULE_CASES],
    )
    def test_rule_op_matches(self, op: str, operand: Any, value: Any, matches: bool) -> None:
        """Each rule op decides whether its rule's `then` or the default is served."""
        rules = [ss.Rule(when={"f": {op: operand}}, then="hit")]
        g = ss.guard(name="m", fallbacks=[ss.Fallback.rules("rules", rules, default="miss")])(
            always_fails
        )
        out = g.call({"f": value})
        assert out.value == ("hit" if matches else "miss")
        assert out.decision.served_by == "rules"

    def test_first_matching_rule_wins(self) -> None:
        """When several rules match, the first one in order answers."""
        rules = [
            ss.Rule(when={"amount": {"gt": 10_000}}, then={"label": "block"}),
            ss.Rule(when={"amount": {"gt": 1000}}, then={"label": "review"}),
            ss.Rule(when={"amount": {"gt": 0}}, then={"label": "approve-small"}),
        ]
        g = ss.guard(
            name="m",
            fallbacks=[ss.Fallback.rules("rules", rules, default={"label": "approve"})],
        )(always_fails)
        assert g({"amount": 50_000}) == {"label": "block"}
        assert g({"amount": 5000}) == {"label": "review"}
        assert g({"amount": 5}) == {"label": "approve-small"}
        assert g({"amount": -1}) == {"label": "approve"}

    def test_all_conditions_of_a_rule_must_hold(self) -> None:
        """A rule with several features matches only when every condition holds."""
        rules = [ss.Rule(when={"amount": {"gt": 1000}, "country": {"eq": "DE"}}, then="review")]
        g = ss.guard(name="m", fallbacks=[ss.Fallback.rules("rules", rules, default="ok")])(
            always_fails
        )
        assert g({"amount": 2000, "country": "DE"}) == "review"
        assert g({"amount": 2000, "country": "FR"}) == "ok"
        assert g({"amount": 10, "country": "DE"}) == "ok"

    def test_no_match_and_no_default_moves_to_next_fallback(self) -> None:
        """A rule table with no match and no default does not answer; the next fallback does."""
        rules = [ss.Rule(when={"amount": {"gt": 1000}}, then="review")]
        g = ss.guard(
            name="m",
            fallbacks=[ss.Fallback.rules("rules", rules), ss.Fallback.static("static", STATIC)],
        )(always_fails)
        out = g.call({"amount": 5})
        assert out.value == STATIC
        assert out.decision.served_by == "static"
        assert g({"amount": 5000}) == "review"


class TestCacheFallback:
    def test_cache_serves_last_good_primary_answer_for_equal_input(self, switch: Switch) -> None:
        """After a good primary answer, an equal input is answered from the cache on failure."""
        g = ss.guard(name="m", fallbacks=[ss.Fallback.cache("cache", ttl_s=60, max_items=10)])(
            switch.function()
        )
        first = g({"k": "a", "nested": {"xs": [1, 2]}})
        second = g({"k": "a", "nested": {"xs": [1, 2]}})
        switch.failing = True
        out = g.call({"nested": {"xs": [1, 2]}, "k": "a"})
        assert out.value == second
        assert out.value != first
        assert out.decision.served_by == "cache"

    def test_cache_misses_for_unseen_input_and_next_fallback_serves(self, switch: Switch) -> None:
        """The cache has no answer for an input it never saw; the next fallback serves."""
        g = ss.guard(
            name="m",
            fallbacks=[
                ss.Fallback.cache("cache", ttl_s=60, max_items=10),
                ss.Fallback.static("static", STATIC),
            ],
        )(switch.function())
        g({"k": "a"})
        switch.failing = True
        out = g.call({"k": "b"})
        assert out.decision.served_by == "static"

    def test_cache_keeps_only_good_primary_answers(self) -> None:
        """Invalid primary outputs and fallback answers never enter the cache."""
        answers = {"mode": "good"}

        def predict(x: dict) -> dict:
            if answers["mode"] == "nan":
                return {"y": float("nan")}
            if answers["mode"] == "fail":
                raise ConnectionError("down")
            return {"y": 1.0}

        g = ss.guard(
            name="m",
            fallbacks=[
                ss.Fallback.cache("cache", ttl_s=60, max_items=10),
                ss.Fallback.static("static", STATIC),
            ],
        )(predict)
        g({"k": 1})
        answers["mode"] = "nan"
        out = g.call({"k": 1})
        assert out.decision.served_by == "cache"
        assert out.value == {"y": 1.0}
        answers["mode"] = "fail"
        assert g.call({"k": 2}).decision.served_by == "static"
        assert g.call({"k": 2}).decision.served_by == "static"

    def test_cache_entries_expire_after_ttl(self, switch: Switch) -> None:
        """An answer older than ttl_s is no longer served."""
        g = ss.guard(
            name="m",
            fallbacks=[
                ss.Fallback.cache("cache", ttl_s=0.2, max_items=10),
                ss.Fallback.static("static", STATIC),
            ],
        )(switch.function())
        g({"k": "a"})
        switch.failing = True
        assert g.call({"k": "a"}).decision.served_by == "cache"
        time.sleep(0.35)
        assert g.call({"k": "a"}).decision.served_by == "static"

    def test_cache_evicts_least_recently_used(self, switch: Switch) -> None:
        """With max_items=2 the least recently used input is evicted, not the oldest."""
        g = ss.guard(
            name="m",
            fallbacks=[
                ss.Fallback.cache("cache", ttl_s=60, max_items=2),
                ss.Fallback.static("static", STATIC),
            ],
        )(switch.function())
        g({"k": "a"})
        g({"k": "b"})
        switch.failing = True
        assert g.call({"k": "a"}).decision.served_by == "cache"  # a is now most recent
        switch.failing = False
        g({"k": "c"})  # evicts b, the least recently used
        switch.failing = True
        assert g.call({"k": "b"}).decision.served_by == "static"
        assert g.call({"k": "a"}).decision.served_by == "cache"
        assert g.call({"k": "c"}).decision.served_by == "cache"


class TestStaticFallback:
    def test_static_fallback_serves_its_value(self) -> None:
        """Fallback.static answers with its fixed value."""
        g = ss.guard(name="m", fallbacks=[ss.Fallback.static("default", {"label": "review"})])(
            always_fails
        )
        out = g.call({"a": 1})
        assert out.value == {"label": "review"}
        assert out.decision.served_by == "default"


class TestOrderAndLimits:
    def test_fallbacks_are_tried_in_order_and_first_answer_serves(self) -> None:
        """A failing fallback passes to the next; later fallbacks are not called."""
        called: list[str] = []

        def broken(x: Any) -> Any:
            called.append("broken")
            raise RuntimeError("broken too")

        def later(x: Any) -> Any:
            called.append("later")
            return "later"

        g = ss.guard(
            name="m",
            fallbacks=[
                ss.Fallback.model("broken", broken),
                ss.Fallback.static("static", STATIC),
                ss.Fallback.model("later", later),
            ],
        )(always_fails)
        out = g.call({"a": 1})
        assert out.value == STATIC
        assert out.decision.served_by == "static"
        assert called == ["broken"]
        assert [a.name for a in out.decision.attempts] == ["primary", "broken", "static"]
        assert [a.ok for a in out.decision.attempts] == [False, False, True]

    def test_fallback_timeout_moves_to_next_fallback(self, release: threading.Event) -> None:
        """A fallback slower than its own timeout_s is abandoned and the next one serves."""

        def slow(x: Any) -> Any:
            release.wait(5)
            return "slow"

        g = ss.guard(
            name="m",
            fallbacks=[
                ss.Fallback.model("slow", slow, timeout_s=0.1),
                ss.Fallback.static("static", STATIC),
            ],
        )(always_fails)
        start = time.monotonic()
        out = g.call({"a": 1})
        elapsed = time.monotonic() - start
        assert elapsed < 1.0
        assert out.decision.served_by == "static"

    def test_fallback_threshold_rejects_low_confidence_answer(self) -> None:
        """A fallback answer below its own threshold is skipped for the next fallback."""
        g = ss.guard(
            name="m",
            fallbacks=[
                ss.Fallback.model("weak", lambda x: {"confidence": 0.2}, threshold=0.5),
                ss.Fallback.static("static", STATIC),
            ],
        )(always_fails)
        assert g.call({"a": 1}).decision.served_by == "static"

    def test_fallback_threshold_accepts_confident_answer(self) -> None:
        """A fallback answer at or above its threshold is served."""
        g = ss.guard(
            name="m",
            fallbacks=[
                ss.Fallback.model("strong", lambda x: {"confidence": 0.9}, threshold=0.5),
                ss.Fallback.static("static", STATIC),
            ],
        )(always_fails)
        out = g.call({"a": 1})
        assert out.decision.served_by == "strong"
        assert out.value == {"confidence": 0.9}

    def test_fallback_without_threshold_is_served_as_is(self) -> None:
        """The policy's confidence threshold does not apply to a fallback's answer."""

        def primary(x: Any) -> Any:
            return {"confidence": 0.1}

        g = ss.guard(
            name="m",
            confidence=ss.ConfidenceConfig(threshold=0.9),
            fallbacks=[
                ss.Fallback.model("v2", lambda x: {"confidence": 0.05}),
                ss.Fallback.static("static", STATIC),
            ],
        )(primary)
        out = g.call({"a": 1})
        assert out.decision.served_by == "v2"
        assert out.value == {"confidence": 0.05}


class TestNoFallbackAvailable:
    def test_all_failing_raises_no_fallback_available_with_decision(self) -> None:
        """When the primary and every fallback fail, NoFallbackAvailable carries the decision."""

        def broken(x: Any) -> Any:
            raise RuntimeError("broken")

        g = ss.guard(
            name="m",
            fallbacks=[
                ss.Fallback.model("broken", broken),
                ss.Fallback.rules("rules", [ss.Rule(when={"a": {"gt": 100}}, then="big")]),
            ],
        )(always_fails)
        with pytest.raises(ss.NoFallbackAvailable) as info:
            g({"a": 1})
        decision = info.value.decision
        assert isinstance(decision, ss.Decision)
        assert decision.served_by is None
        assert decision.degraded is True
        assert "error" in codes(decision)
        assert "fallback_failed" in codes(decision)
        assert g.stats()["failed"] == 1

    def test_no_fallbacks_configured_raises_no_fallback_available(self) -> None:
        """A failing primary with no fallbacks raises NoFallbackAvailable, not the raw error."""
        g = ss.guard(name="m")(always_fails)
        with pytest.raises(ss.NoFallbackAvailable) as info:
            g({"a": 1})
        assert info.value.decision.served_by is None


def test_an_async_guards_sync_model_fallback_runs_off_the_event_loop() -> None:
    """A sync model fallback may take its time (an outage sends every call to it): on an async
    guard it runs in a worker thread, as FastAPI runs a `def` endpoint, never on the loop."""
    threads: list[int] = []

    def backup(x: int) -> int:
        threads.append(threading.get_ident())
        return -x

    async def model(x: int) -> int:
        raise RuntimeError("down")

    guard = ss.guard(name="offloop", fallbacks=[ss.Fallback.model("backup", backup)])(model)

    async def main() -> int:
        return await guard(3)

    assert asyncio.run(main()) == -3
    assert len(threads) == 1
    assert threads[0] != threading.get_ident()


@pytest.mark.parametrize("name", ["primary", "none"])
def test_a_fallback_cannot_take_a_name_served_by_gives_others(name: str) -> None:
    """`served_by` says "primary" of the model and "none" of a call nothing answered: a
    fallback of either name would be counted and recorded as the other."""
    with pytest.raises(ss.PolicyError, match=f"'{name}' is reserved"):
        ss.Policy(name="reserved", fallbacks=[ss.Fallback.static(name, 1)])

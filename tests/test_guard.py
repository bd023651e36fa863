"""ss.guard: wrapping sync, async and method callables, config, defaults and the breaker."""

import asyncio
import inspect
import threading
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

import safeserve as ss

SAFE = {"label": "safe"}


class Row(BaseModel):
    """A tiny input schema for config tests."""

    a: int


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Model:
    """A controllable primary: counts its calls and raises while `failing` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing = False

    def function(self) -> Any:
        def predict(x: dict) -> dict:
            """Predict a label for x."""
            self.calls += 1
            if self.failing:
                raise ConnectionError("model down")
            return {"label": "ok", "a": x["a"]}

        return predict


def codes(decision: Any) -> list[str]:
    return [r.code for r in decision.reasons]


def arun(fn: Any, *args: Any) -> Any:
    """Await fn(*args) in a fresh event loop."""

    async def main() -> Any:
        return await fn(*args)

    return asyncio.run(main())


@pytest.fixture
def model() -> Model:
    return Model()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker_guard(model: Model, clock: FakeClock) -> Any:
    cfg = ss.BreakerConfig(window_size=10, min_calls=10, open_s=30, half_open_calls=3, clock=clock)
    return ss.guard(name="m", breaker=cfg, fallbacks=[ss.Fallback.static("safe", SAFE)])(
        model.function()
    )


def trip(guard: Any, model: Model) -> None:
    """Fail ten calls in a row so a window of 10 opens the breaker."""
    model.failing = True
    for _ in range(10):
        guard({"a": 1})
    assert guard.breaker.state == "open"


class TestSyncFunctions:
    def test_sync_guard_returns_the_primary_answer(self, model: Model) -> None:
        """A healthy sync call returns exactly what the primary returned."""
        g = ss.guard(name="m")(model.function())
        assert g({"a": 7}) == {"label": "ok", "a": 7}
        assert model.calls == 1

    def test_sync_guard_serves_fallback_when_primary_raises(self, model: Model) -> None:
        """A primary exception is answered by the first fallback."""
        g = ss.guard(name="m", fallbacks=[ss.Fallback.static("safe", SAFE)])(model.function())
        model.failing = True
        assert g({"a": 1}) == SAFE

    def test_call_returns_outcome_with_decision_for_healthy_call(self, model: Model) -> None:
        """.call() returns an Outcome whose Decision describes a healthy primary call."""
        g = ss.guard(name="m")(model.function())
        out = g.call({"a": 3})
        assert isinstance(out, ss.Outcome)
        assert out.value == {"label": "ok", "a": 3}
        assert isinstance(out.decision, ss.Decision)
        assert out.decision.served_by == "primary"
        assert out.decision.degraded is False
        assert out.decision.reasons == []

    def test_call_returns_outcome_with_decision_for_degraded_call(self, model: Model) -> None:
        """.call() on a degraded call names the fallback and the reason."""
        g = ss.guard(name="m", fallbacks=[ss.Fallback.static("safe", SAFE)])(model.function())
        model.failing = True
        out = g.call({"a": 3})
        assert out.value == SAFE
        assert out.decision.served_by == "safe"
        assert out.decision.degraded is True
        assert "error" in codes(out.decision)

    def test_policy_attribute_is_the_effective_policy(self, model: Model) -> None:
        """The wrapper exposes the effective ss.Policy it runs with."""
        g = ss.guard(name="m", owner="team")(model.function())
        assert isinstance(g.policy, ss.Policy)
        assert g.policy.name == "m"
        assert g.policy.owner == "team"


class TestAsyncFunctions:
    def test_async_function_gets_a_coroutine_function_wrapper(self) -> None:
        """Guarding an async def yields a wrapper that is itself a coroutine function."""

        async def predict(x: dict) -> dict:
            await asyncio.sleep(0)
            return {"y": x["a"]}

        g = ss.guard(name="m")(predict)
        assert inspect.iscoroutinefunction(g) or asyncio.iscoroutinefunction(g)
        assert arun(g, {"a": 2}) == {"y": 2}

    def test_async_call_is_awaitable_and_returns_outcome(self) -> None:
        """.call() on an async guard is awaited and gives an Outcome with a Decision."""

        async def predict(x: dict) -> dict:
            return {"y": x["a"]}

        g = ss.guard(name="m")(predict)
        out = arun(g.call, {"a": 5})
        assert isinstance(out, ss.Outcome)
        assert out.value == {"y": 5}
        assert out.decision.served_by == "primary"

    def test_async_primary_failure_falls_back(self) -> None:
        """An async primary's exception is answered by a fallback."""

        async def predict(x: dict) -> dict:
            raise ConnectionError("down")

        g = ss.guard(name="m", fallbacks=[ss.Fallback.static("safe", SAFE)])(predict)
        out = arun(g.call, {"a": 1})
        assert out.value == SAFE
        assert out.decision.served_by == "safe"
        assert "error" in codes(out.decision)

    def test_async_guard_awaits_an_async_model_fallback(self) -> None:
        """An async guard awaits an async Fallback.model and serves its answer."""

        async def predict(x: dict) -> dict:
            raise ConnectionError("down")

        async def backup(x: dict) -> dict:
            await asyncio.sleep(0)
            return {"backup": x["a"]}

        g = ss.guard(name="m", fallbacks=[ss.Fallback.model("v2", backup)])(predict)
        assert arun(g, {"a": 4}) == {"backup": 4}


class TestMethods:
    @pytest.fixture
    def scorer_cls(self) -> Any:
        seen: list[Any] = []

        def backup(x: dict) -> int:
            seen.append(x)
            return -1

        class Scorer:
            fallback_inputs = seen

            def __init__(self, k: int) -> None:
                self.k = k

            @ss.guard(name="scorer", fallbacks=[ss.Fallback.model("backup", backup)])
            def predict(self, x: dict) -> int:
                """Score x with this scorer's factor."""
                if x.get("boom"):
                    raise RuntimeError("boom")
                return self.k * x["a"]

        return Scorer

    def test_method_guard_binds_self(self, scorer_cls: Any) -> None:
        """A guarded method sees its own instance."""
        assert scorer_cls(2).predict({"a": 3}) == 6
        assert scorer_cls(3).predict({"a": 3}) == 9

    def test_method_call_returns_outcome(self, scorer_cls: Any) -> None:
        """.call() works on a bound guarded method."""
        out = scorer_cls(2).predict.call({"a": 5})
        assert out.value == 10
        assert out.decision.served_by == "primary"

    def test_method_fallback_model_receives_arguments_without_self(self, scorer_cls: Any) -> None:
        """A fallback for a method is called with the input, not with self."""
        x = {"a": 1, "boom": True}
        assert scorer_cls(2).predict(x) == -1
        assert scorer_cls.fallback_inputs == [x]

    def test_method_keeps_metadata(self, scorer_cls: Any) -> None:
        """A guarded method keeps its name, docstring and (self, x) signature."""
        assert scorer_cls.predict.__name__ == "predict"
        assert scorer_cls.predict.__doc__ == "Score x with this scorer's factor."
        assert list(inspect.signature(scorer_cls.predict).parameters) == ["self", "x"]
        assert list(inspect.signature(scorer_cls(1).predict).parameters) == ["x"]

    def test_async_method_is_awaitable(self) -> None:
        """An async method gets an awaitable guarded wrapper bound to its instance."""

        class AsyncScorer:
            def __init__(self, k: int) -> None:
                self.k = k

            @ss.guard(name="ascorer")
            async def predict(self, x: dict) -> int:
                return self.k * x["a"]

        assert arun(AsyncScorer(4).predict, {"a": 2}) == 8


class TestMetadata:
    def test_sync_wrapper_keeps_name_doc_and_signature(self) -> None:
        """The wrapper keeps __name__, __doc__ and the signature, as functools.wraps does."""

        def score_transaction(x: dict, *, threshold: float = 0.5) -> dict:
            """Score one transaction."""
            return x

        g = ss.guard(name="m")(score_transaction)
        assert g.__name__ == "score_transaction"
        assert g.__doc__ == "Score one transaction."
        assert inspect.signature(g) == inspect.signature(score_transaction)

    def test_async_wrapper_keeps_name_doc_and_signature(self) -> None:
        """The async wrapper keeps __name__, __doc__ and the signature."""

        async def score_async(x: dict, limit: int = 3) -> dict:
            """Score one request asynchronously."""
            return x

        g = ss.guard(name="m")(score_async)
        assert g.__name__ == "score_async"
        assert g.__doc__ == "Score one request asynchronously."
        assert inspect.signature(g) == inspect.signature(score_async)


class TestPolicyFields:
    def test_guard_without_policy_takes_fields(self) -> None:
        """ss.guard(name=..., timeout_s=..., fallbacks=[...]) works with no Policy object."""

        def predict(x: dict) -> dict:
            raise ValueError("bad")

        g = ss.guard(name="m", timeout_s=0.5, fallbacks=[ss.Fallback.static("s", 0)])(predict)
        assert g.policy.name == "m"
        assert g.policy.timeout_s == 0.5
        assert g({"a": 1}) == 0

    def test_fields_override_policy_and_leave_it_unchanged(self) -> None:
        """Keyword fields override the policy's values; unnamed fields keep the policy's."""

        def predict(x: dict) -> dict:
            raise ValueError("bad")

        policy = ss.Policy(
            name="fraud",
            owner="a",
            timeout_s=1.0,
            fallbacks=[ss.Fallback.static("p", "from-policy")],
        )
        g = ss.guard(policy, owner="b", fallbacks=[ss.Fallback.static("o", "from-override")])(
            predict
        )
        assert g.policy.name == "fraud"
        assert g.policy.owner == "b"
        assert g.policy.timeout_s == 1.0
        assert g({"a": 1}) == "from-override"
        assert policy.owner == "a"

    def test_guard_with_policy_uses_its_fields(self) -> None:
        """A Policy passed positionally configures the guard."""

        def predict(x: dict) -> dict:
            raise ValueError("bad")

        policy = ss.Policy(name="p", owner="o", fallbacks=[ss.Fallback.static("s", 1)])
        g = ss.guard(policy)(predict)
        out = g.call({"a": 1})
        assert out.value == 1
        assert out.decision.policy == "p"
        assert out.decision.owner == "o"

    def test_policy_by_keyword(self) -> None:
        """SPEC's signature is `ss.guard(policy=None, **fields)`: the keyword works too."""
        policy = ss.Policy(name="kw", fallbacks=[ss.Fallback.static("s", 1)])
        g = ss.guard(policy=policy, owner="team")(lambda x: x)
        assert (g.policy.name, g.policy.owner, g(5)) == ("kw", "team", 5)

    def test_decorating_with_a_policy_that_names_its_model_is_an_error(self) -> None:
        """`ss.guard(policy)` of a policy with `model` is that model's guard; using it as a
        decorator raises instead of binding the function's name to a fallback's answer."""

        def model(x: dict) -> int:
            return int(x["a"]) * 2

        policy = ss.Policy(name="named", model=model, fallbacks=[ss.Fallback.static("s", -1)])
        assert ss.guard(policy)({"a": 2}) == 4
        with pytest.raises(ss.PolicyError, match=r"named\.model: .*not a decorator"):

            @ss.guard(policy)
            def predict(x: dict) -> int:
                return 0

        @ss.guard(policy, model=None)
        def mine(x: dict) -> int:
            return 7

        assert mine({"a": 1}) == 7


def _noop(x: dict) -> dict:
    return x


class TestInvalidConfig:
    @pytest.mark.parametrize(
        ("build", "field"),
        [
            (lambda: ss.guard(name="m", timeout_s=-1)(_noop), "timeout_s"),
            (lambda: ss.Policy(name="m", timeout_s=-1), "timeout_s"),
            (lambda: ss.Policy(owner="x"), "name"),
            (lambda: ss.guard(name="m", tiemout_s=1)(_noop), "tiemout_s"),
            (lambda: ss.BreakerConfig(failure_rate_threshold=2), "failure_rate_threshold"),
            (lambda: ss.BreakerConfig(window_size=0), "window_size"),
            (lambda: ss.BreakerConfig(open_s=-5), "open_s"),
            (lambda: ss.BreakerConfig(window="hourly"), "window"),
            (lambda: ss.RetryConfig(attempts=0), "attempts"),
            (lambda: ss.ValidationConfig(schema=Row, on_invalid="explode"), "on_invalid"),
            (lambda: ss.ConfidenceConfig(threshold=0.5, action="ignore"), "action"),
            (lambda: ss.DecisionLogConfig(sample_rate=1.5), "sample_rate"),
        ],
        ids=[
            "guard-timeout",
            "policy-timeout",
            "policy-missing-name",
            "guard-unknown-field",
            "breaker-rate",
            "breaker-window-size",
            "breaker-open-s",
            "breaker-window",
            "retry-attempts",
            "validation-on-invalid",
            "confidence-action",
            "log-sample-rate",
        ],
    )
    def test_invalid_config_raises_policy_error_naming_field(self, build: Any, field: str) -> None:
        """A bad config value raises ss.PolicyError whose message names the field."""
        with pytest.raises(ss.PolicyError) as info:
            build()
        assert field in str(info.value)
        assert any(field in p for p in info.value.problems)


class TestDefaults:
    def test_breaker_config_defaults_are_resilience4j_figures(self) -> None:
        """BreakerConfig() has the default figures SPEC lists."""
        cfg = ss.BreakerConfig()
        assert cfg.window == "count"
        assert cfg.window_size == 100
        assert cfg.min_calls == 100
        assert cfg.failure_rate_threshold == 0.5
        assert cfg.slow_call_s == 60
        assert cfg.slow_call_rate_threshold == 1.0
        assert cfg.open_s == 60
        assert cfg.open_backoff == 1.0
        assert cfg.half_open_calls == 10
        assert cfg.success_threshold in (None, cfg.half_open_calls)
        assert cfg.probe_timeout_s is None
        assert cfg.consecutive_failures is None

    def test_policy_defaults_no_retry_no_timeout_no_bulkhead_and_a_breaker(self) -> None:
        """A bare guard has no retry, no timeout, no concurrency limit and a default breaker."""
        g = ss.guard(name="m")(_noop)
        assert g.policy.retry is None
        assert g.policy.timeout_s is None
        assert g.policy.max_concurrent is None
        assert g.policy.breaker == ss.BreakerConfig()
        assert g.breaker.state == "closed"

    def test_other_config_defaults(self) -> None:
        """Validation falls back, confidence is auto/fallback by default."""
        assert ss.ValidationConfig(schema=Row).on_invalid == "fallback"
        conf = ss.ConfidenceConfig(threshold=0.5)
        assert conf.extract == "auto"
        assert conf.action == "fallback"

    def test_no_timeout_runs_sync_call_inline_on_caller_thread(self) -> None:
        """With timeout_s=None a sync primary runs on the caller's own thread."""
        seen: list[int] = []

        def predict(x: dict) -> int:
            seen.append(threading.get_ident())
            return 1

        g = ss.guard(name="m")(predict)
        g({"a": 1})
        assert seen == [threading.get_ident()]

    def test_no_retry_means_one_attempt(self, model: Model) -> None:
        """Without retry a retryable-looking error is tried once."""
        g = ss.guard(name="m", fallbacks=[ss.Fallback.static("safe", SAFE)])(model.function())
        model.failing = True
        out = g.call({"a": 1})
        assert model.calls == 1
        assert [a.name for a in out.decision.attempts] == ["primary", "safe"]

    def test_default_breaker_opens_only_after_min_calls(self, model: Model) -> None:
        """The default breaker needs 100 calls before it can open, then opens at 100% failures."""
        g = ss.guard(name="m", fallbacks=[ss.Fallback.static("safe", SAFE)])(model.function())
        model.failing = True
        for _ in range(99):
            g({"a": 1})
        assert g.breaker.state == "closed"
        g({"a": 1})
        assert g.breaker.state == "open"

    def test_default_half_open_closes_after_half_open_calls_successes(
        self, model: Model, clock: FakeClock
    ) -> None:
        """success_threshold defaults to half_open_calls: that many probes close the breaker."""
        cfg = ss.BreakerConfig(
            window_size=10, min_calls=10, open_s=5, half_open_calls=4, clock=clock
        )
        g = ss.guard(name="m", breaker=cfg, fallbacks=[ss.Fallback.static("safe", SAFE)])(
            model.function()
        )
        trip(g, model)
        clock.advance(6)
        model.failing = False
        for _ in range(3):
            g({"a": 1})
            assert g.breaker.state == "half_open"
        g({"a": 1})
        assert g.breaker.state == "closed"


class TestDecisionsAndStats:
    @pytest.mark.parametrize(
        "log", [None, ss.DecisionLogConfig(sample_rate=0.0)], ids=["no-log", "rate-0"]
    )
    def test_healthy_calls_record_no_decision(self, model: Model, log: Any) -> None:
        """Healthy calls leave predict.decisions() empty when sample_rate is 0."""
        fields: dict[str, Any] = {"name": "m"}
        if log is not None:
            fields["log"] = log
        g = ss.guard(**fields)(model.function())
        for i in range(20):
            g({"a": i})
        assert g.decisions() == []

    def test_degraded_call_is_in_decisions(self, model: Model) -> None:
        """A degraded call leaves exactly one decision in the in-memory ring."""
        g = ss.guard(name="m", fallbacks=[ss.Fallback.static("safe", SAFE)])(model.function())
        g({"a": 1})
        model.failing = True
        g({"a": 2})
        decisions = g.decisions()
        assert len(decisions) == 1
        assert decisions[0].served_by == "safe"

    def test_stats_count_calls_served_by_reasons_and_failures(self) -> None:
        """stats() counts every call, answers per server, reasons, degraded and failed calls."""

        def predict(x: dict) -> dict:
            if x["fail"]:
                raise ValueError("primary failed")
            return {"ok": True}

        def backup(x: dict) -> dict:
            if x["fb_fail"]:
                raise ValueError("backup failed")
            return {"ok": "backup"}

        g = ss.guard(name="m", fallbacks=[ss.Fallback.model("fb", backup)])(predict)
        for _ in range(3):
            g({"fail": False, "fb_fail": False})
        for _ in range(2):
            g({"fail": True, "fb_fail": False})
        stats = g.stats()
        assert stats["calls"] == 5
        assert {k: v for k, v in stats["served_by"].items() if v} == {"primary": 3, "fb": 2}
        assert stats["reasons"]["error"] == 2
        assert stats["degraded"] == 2
        with pytest.raises(ss.NoFallbackAvailable):
            g({"fail": True, "fb_fail": True})
        stats = g.stats()
        assert stats["calls"] == 6
        assert stats["failed"] == 1
        assert {k: v for k, v in stats["served_by"].items() if v} == {"primary": 3, "fb": 2}


class TestBreaker:
    def test_breaker_opens_after_enough_failures(self, breaker_guard: Any, model: Model) -> None:
        """Ten failures in a window of ten open the breaker; nine do not."""
        model.failing = True
        for _ in range(9):
            breaker_guard({"a": 1})
        assert breaker_guard.breaker.state == "closed"
        breaker_guard({"a": 1})
        assert breaker_guard.breaker.state == "open"

    def test_open_breaker_serves_fallback_without_calling_model(
        self, breaker_guard: Any, model: Model
    ) -> None:
        """While open, calls are served by the fallback with breaker_open and the model rests."""
        trip(breaker_guard, model)
        model.failing = False
        before = model.calls
        out = breaker_guard.call({"a": 1})
        assert model.calls == before
        assert out.value == SAFE
        assert out.decision.served_by == "safe"
        assert "breaker_open" in codes(out.decision)
        assert out.decision.breaker_state == "open"

    def test_open_breaker_half_opens_after_open_s_and_closes_after_probes(
        self, breaker_guard: Any, model: Model, clock: FakeClock
    ) -> None:
        """After open_s the breaker admits probes; success_threshold successes close it."""
        trip(breaker_guard, model)
        clock.advance(31)
        model.failing = False
        out = breaker_guard.call({"a": 1})
        assert out.decision.served_by == "primary"
        assert out.decision.breaker_state == "half_open"
        assert breaker_guard.breaker.state == "half_open"
        breaker_guard({"a": 1})
        assert breaker_guard.breaker.state == "half_open"
        breaker_guard({"a": 1})
        assert breaker_guard.breaker.state == "closed"

    def test_explicit_success_threshold_closes_after_that_many_probes(
        self, model: Model, clock: FakeClock
    ) -> None:
        """success_threshold below half_open_calls closes the breaker after that many probes."""
        cfg = ss.BreakerConfig(
            window_size=10,
            min_calls=10,
            open_s=5,
            half_open_calls=5,
            success_threshold=2,
            clock=clock,
        )
        g = ss.guard(name="m", breaker=cfg, fallbacks=[ss.Fallback.static("safe", SAFE)])(
            model.function()
        )
        trip(g, model)
        clock.advance(6)
        model.failing = False
        g({"a": 1})
        assert g.breaker.state == "half_open"
        g({"a": 1})
        assert g.breaker.state == "closed"

    def test_breaker_stays_open_before_open_s(
        self, breaker_guard: Any, model: Model, clock: FakeClock
    ) -> None:
        """Before open_s has passed the breaker keeps blocking calls."""
        trip(breaker_guard, model)
        clock.advance(29)
        model.failing = False
        before = model.calls
        out = breaker_guard.call({"a": 1})
        assert model.calls == before
        assert "breaker_open" in codes(out.decision)

    def test_failed_probe_reopens_breaker(
        self, breaker_guard: Any, model: Model, clock: FakeClock
    ) -> None:
        """A failing probe in half-open sends the breaker back to open."""
        trip(breaker_guard, model)
        clock.advance(31)
        breaker_guard({"a": 1})
        assert breaker_guard.breaker.state == "open"
        before = model.calls
        breaker_guard({"a": 1})
        assert model.calls == before

    def test_manual_open_blocks_then_half_opens_after_open_s(
        self, breaker_guard: Any, model: Model, clock: FakeClock
    ) -> None:
        """open() blocks calls for open_s, then probes are admitted as usual."""
        breaker_guard.open()
        assert breaker_guard.breaker.state == "open"
        out = breaker_guard.call({"a": 1})
        assert model.calls == 0
        assert "breaker_open" in codes(out.decision)
        clock.advance(31)
        out = breaker_guard.call({"a": 1})
        assert out.decision.served_by == "primary"
        assert out.decision.breaker_state == "half_open"

    def test_force_open_stays_open_until_close(
        self, breaker_guard: Any, model: Model, clock: FakeClock
    ) -> None:
        """force_open() blocks even long after open_s, until close()."""
        breaker_guard.force_open()
        assert breaker_guard.breaker.state == "forced_open"
        clock.advance(10_000)
        out = breaker_guard.call({"a": 1})
        assert model.calls == 0
        assert out.decision.served_by == "safe"
        assert "breaker_open" in codes(out.decision)
        assert breaker_guard.breaker.state == "forced_open"
        breaker_guard.close()
        assert breaker_guard.breaker.state == "closed"
        assert breaker_guard({"a": 1}) == {"label": "ok", "a": 1}
        assert model.calls == 1

    def test_force_open_ends_with_reset(self, breaker_guard: Any, model: Model) -> None:
        """reset() returns a forced-open breaker to closed."""
        breaker_guard.force_open()
        breaker_guard.reset()
        assert breaker_guard.breaker.state == "closed"
        breaker_guard({"a": 1})
        assert model.calls == 1

    def test_close_clears_window_counts(self, breaker_guard: Any, model: Model) -> None:
        """close() forgets the failures counted so far."""
        model.failing = True
        for _ in range(9):
            breaker_guard({"a": 1})
        breaker_guard.close()
        breaker_guard({"a": 1})
        assert breaker_guard.breaker.state == "closed"

    def test_reset_returns_to_closed_with_fresh_metrics(
        self, breaker_guard: Any, model: Model
    ) -> None:
        """reset() closes an open breaker and starts a fresh window."""
        trip(breaker_guard, model)
        breaker_guard.reset()
        assert breaker_guard.breaker.state == "closed"
        for _ in range(9):
            breaker_guard({"a": 1})
        assert breaker_guard.breaker.state == "closed"
        breaker_guard({"a": 1})
        assert breaker_guard.breaker.state == "open"

    def test_disable_never_blocks_until_reset(self, breaker_guard: Any, model: Model) -> None:
        """disable() lets every call through whatever fails, until reset()."""
        breaker_guard.disable()
        assert breaker_guard.breaker.state == "disabled"
        model.failing = True
        for _ in range(30):
            breaker_guard({"a": 1})
        assert model.calls == 30
        assert breaker_guard.breaker.state == "disabled"
        breaker_guard.reset()
        assert breaker_guard.breaker.state == "closed"

    def test_breaker_state_is_per_guard(self, model: Model, clock: FakeClock) -> None:
        """Two guards with the same name keep separate breakers."""
        cfg = ss.BreakerConfig(window_size=10, min_calls=10, open_s=30, clock=clock)
        fb = [ss.Fallback.static("safe", SAFE)]
        g1 = ss.guard(name="same", breaker=cfg, fallbacks=fb)(model.function())
        g2 = ss.guard(name="same", breaker=cfg, fallbacks=fb)(model.function())
        trip(g1, model)
        assert g2.breaker.state == "closed"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://cache:6379/0", "a redis://host:port/db"),
        ("redis://:6379/abc", "is a number (a / or @ in the password is written %2F or %40)"),
        ("redis://cache:port/0", "the port is not a number"),
    ],
)
def test_a_bad_store_url_is_a_policy_error(url: str, message: str) -> None:
    """A breaker store URL that redis-py could not use is refused with the field's name."""
    with pytest.raises(ss.PolicyError, match=r"BreakerConfig\.store: .*") as err:
        ss.BreakerConfig(store=url)
    assert message in str(err.value)


def test_a_bad_store_url_never_quotes_the_password() -> None:
    """A password holding a "/" (base64 keys do) moves its end into the URL's path: the
    refusal does not quote it."""
    with pytest.raises(ss.PolicyError) as err:
        ss.BreakerConfig(store="rediss://:AbC/dEf+ghIJ=@cache.example.net:6380/0")
    assert "dEf" not in str(err.value)


def test_reload_takes_a_policy() -> None:
    g = ss.guard(name="reload-type")(_noop)
    with pytest.raises(ss.PolicyError, match=r"reload: expected an ss\.Policy, got dict"):
        g.reload({"name": "reload-type"})  # type: ignore[arg-type]


def test_a_rule_on_a_field_the_schema_lacks_is_a_policy_error() -> None:
    """In code as in a policies file: a rule that could never match is refused."""
    rules = ss.Fallback.rules("rules", [ss.Rule(when={"amout": {"gt": 1}}, then=1)])
    with pytest.raises(ss.PolicyError, match=r"rules\[0\]\.when\.amout: not a field"):
        ss.Policy(name="typo", validation=ss.ValidationConfig(schema=Row), fallbacks=[rules])


class TestAnswerChecks:
    """`Guard.check_answers`: answers the caller cannot use (serve's: no JSON form) fail."""

    @staticmethod
    def no_sets(answer: Any) -> None:
        if isinstance(answer, set):
            raise TypeError("a set answer")

    def policy(self) -> ss.Policy:
        return ss.Policy(
            name="checked",
            fallbacks=[ss.Fallback.model("odd", lambda x: {x}), ss.Fallback.static("fixed", 0)],
        )

    def test_a_failing_answer_is_invalid_output_and_the_next_fallback_answers(self) -> None:
        guard = ss.guard(self.policy())(lambda x: {x} if x < 0 else x)
        guard.check_answers(self.no_sets)
        assert guard(3) == 3
        outcome = guard.call(-1)
        assert (outcome.value, outcome.decision.served_by) == (0, "fixed")
        reasons = [(r.code, r.detail) for r in outcome.decision.reasons]
        assert reasons == [
            ("invalid_output", "a set answer"),
            ("fallback_failed", "odd: TypeError: a set answer"),
        ]
        assert guard.breaker.figures()["consecutive_failures"] == 1

    def test_async_guards_and_reloads_keep_the_check(self) -> None:
        async def model(x: int) -> Any:
            return {x}

        guard = ss.guard(self.policy())(model)
        guard.check_answers(self.no_sets)
        guard.reload(self.policy().model_copy(update={"timeout_s": 1.0}))
        outcome = asyncio.run(guard.call(2))
        assert (outcome.value, outcome.decision.served_by) == (0, "fixed")
        assert outcome.decision.reasons[0].code == "invalid_output"

    def test_batch_rows_are_held_to_it(self) -> None:
        policy = self.policy().model_copy(update={"batch": True, "check_finite": False})
        guard = ss.guard(policy)(lambda rows: [{r["a"]} if r["a"] < 0 else r["a"] for r in rows])
        guard.check_answers(self.no_sets)
        result = guard.batch([{"a": 1}, {"a": -2}, {"a": 3}])
        assert list(result.values) == [1, 0, 3]
        assert list(result.served_by) == ["primary", "fixed", "primary"]
        [decision] = result.decisions
        assert decision.reasons[0].code == "invalid_output"

    def test_a_batchs_fallback_answers_and_integer_rows_are_held_to_it(self) -> None:
        def down(rows: Any) -> Any:
            raise RuntimeError("down")

        fallbacks = [
            ss.Fallback.model("odd", lambda x: [{1}]),
            ss.Fallback.model("oddb", lambda rows: [{1} for _ in rows], batch=True),
            ss.Fallback.static("fixed", 0),
        ]
        guard = ss.guard(name="batch-fb", batch=True, fallbacks=fallbacks)(down)
        guard.check_answers(self.no_sets)
        assert list(guard.batch([{"a": 1}, {"a": 2}]).served_by) == ["fixed", "fixed"]

        seen: list[Any] = []

        def no_twos(answer: Any) -> None:
            seen.append(answer)
            if answer == 2:
                raise ValueError("two")

        ints = ss.guard(name="batch-int", batch=True, fallbacks=[ss.Fallback.static("fixed", -1)])
        counted = ints(lambda rows: np.arange(len(rows)))
        counted.check_answers(no_twos)
        result = counted.batch([{"a": 1}, {"a": 2}, {"a": 3}])
        assert list(result.values) == [0, 1, -1]

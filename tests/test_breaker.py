"""The in-process circuit breaker as users rely on it: resilience4j's rules, through the guard.

Every breaker here runs on a `FakeClock` (`BreakerConfig(clock=...)`), so no test sleeps
through `open_s`; only slow-call and concurrency tests sleep, for milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from pydantic import BaseModel

import safeserve as ss

STATIC = {"label": "static"}
OK: dict[str, Any] = {"amount": 1.0}
FAIL: dict[str, Any] = {"amount": 1.0, "fail": "conn"}
ERRORS: dict[str, type[Exception]] = {
    "conn": ConnectionError,
    "value": ValueError,
    "key": KeyError,
}
FIGURE_KEYS = {
    "calls",
    "failures",
    "errors",
    "timeouts",
    "slow",
    "failure_rate",
    "slow_rate",
    "consecutive_failures",
    "state",
    "open_remaining_s",
}


# -- test doubles -----------------------------------------------------------------------------
class FakeClock:
    """A monotonic clock (seconds) that only moves when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Model:
    """A model driven by its input: answers, raises (`fail`), sleeps (`sleep`) or hangs (`hang`).

    `hang` blocks on `gate` (then fails or answers as `fail` says); `entered` counts every call.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.failures_left = 0  # fail this many calls with ConnectionError, then answer

    def __call__(self, x: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.calls += 1
            flaky = self.failures_left > 0
            if flaky:
                self.failures_left -= 1
        if x.get("sleep"):
            time.sleep(x["sleep"])
        if x.get("hang"):
            self.gate.wait(5)
        if flaky:
            raise ConnectionError("flaky")
        if x.get("fail"):
            raise ERRORS[x["fail"]](f"model says {x['fail']}")
        return {"label": "model"}

    async def async_call(self, x: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.calls += 1
            flaky = self.failures_left > 0
            if flaky:
                self.failures_left -= 1
        if x.get("sleep"):
            await asyncio.sleep(x["sleep"])
        if flaky:
            raise ConnectionError("flaky")
        if x.get("fail"):
            raise ERRORS[x["fail"]](f"model says {x['fail']}")
        return {"label": "model"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def model() -> Iterator[Model]:
    """A fresh model; its gate opens at teardown so no hung call outlives the test."""
    m = Model()
    yield m
    m.gate.set()


def guarded(
    model: Model,
    clock: FakeClock,
    *,
    log: ss.DecisionLogConfig | None = None,
    retry: ss.RetryConfig | None = None,
    timeout_s: float | None = None,
    validation: ss.ValidationConfig | None = None,
    is_async: bool = False,
    **breaker: Any,
) -> Any:
    """A guard named "fraud" around `model`, with a static fallback and the given breaker."""
    config = ss.BreakerConfig(clock=clock, **breaker)
    decorate = ss.guard(
        name="fraud",
        owner="risk-oncall",
        breaker=config,
        fallbacks=[ss.Fallback.static("static", STATIC)],
        log=log,
        retry=retry,
        timeout_s=timeout_s,
        validation=validation,
    )
    if is_async:

        async def apredict(x: dict[str, Any]) -> dict[str, Any]:
            return await model.async_call(x)

        return decorate(apredict)

    def predict(x: dict[str, Any]) -> dict[str, Any]:
        return model(x)

    return decorate(predict)


def codes(outcome: Any) -> list[str]:
    return [r.code for r in outcome.decision.reasons]


def rejected(predict: Any, x: dict[str, Any] = OK) -> bool:
    """Make one call; True when the breaker turned it away (`breaker_open`)."""
    return "breaker_open" in codes(predict.call(x))


def trip(predict: Any, n: int) -> None:
    """`n` failing calls."""
    for _ in range(n):
        predict(FAIL)


def breaker_records(path: Path) -> list[dict[str, Any]]:
    """The `kind: "breaker"` lines of a decision-log file, after flushing the log."""
    assert ss.flush_logs()
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("kind") == "breaker"]


# -- windows and thresholds -------------------------------------------------------------------
class TestCountWindow:
    """`window="count"`: the last `window_size` calls, judged once `min_calls` were made."""

    def test_no_rate_is_judged_below_min_calls(self, model: Model, clock: FakeClock) -> None:
        """Four failures out of four stay closed while min_calls is five."""
        predict = guarded(model, clock, window_size=10, min_calls=5)
        trip(predict, 4)
        figures = predict.breaker.figures()
        assert figures["failure_rate"] == 1.0
        assert predict.breaker.state == "closed"
        assert not rejected(predict)

    def test_opens_at_min_calls_when_rate_reaches_threshold(
        self, model: Model, clock: FakeClock
    ) -> None:
        """The fifth failure makes min_calls: 100 % >= 50 % opens it."""
        predict = guarded(model, clock, window_size=10, min_calls=5)
        trip(predict, 5)
        assert predict.breaker.state == "open"
        calls = model.calls
        assert rejected(predict)
        assert model.calls == calls

    def test_rate_is_judged_on_the_call_that_reaches_min_calls_even_a_success(
        self, model: Model, clock: FakeClock
    ) -> None:
        """resilience4j checks the thresholds after every call: F F F then S is 75 % of 4."""
        predict = guarded(model, clock, window_size=10, min_calls=4)
        trip(predict, 3)
        predict(OK)
        assert predict.breaker.state == "open"

    def test_rate_below_threshold_stays_closed(self, model: Model, clock: FakeClock) -> None:
        """Two failures in five calls (40 %) stay under a 50 % threshold."""
        predict = guarded(model, clock, window_size=5, min_calls=5)
        for x in (FAIL, OK, FAIL, OK, OK):
            predict(x)
        assert predict.breaker.figures()["failure_rate"] == pytest.approx(0.4)
        assert predict.breaker.state == "closed"

    def test_old_calls_slide_out_of_the_window(self, model: Model, clock: FakeClock) -> None:
        """Only the last `window_size` calls count: evicted failures no longer weigh."""
        predict = guarded(model, clock, window_size=4, min_calls=4, failure_rate_threshold=0.75)
        for x in (FAIL, FAIL, OK, OK, FAIL, FAIL):  # window now OK OK FAIL FAIL: 50 %
            predict(x)
        figures = predict.breaker.figures()
        assert figures["calls"] == 4
        assert figures["failures"] == 2
        assert predict.breaker.state == "closed"
        predict(FAIL)  # OK FAIL FAIL FAIL: 75 %
        assert predict.breaker.state == "open"


class TestTimeWindow:
    """`window="time"`: the calls of the last `window_size` seconds, bucketed per second."""

    def test_calls_expire_after_window_size_seconds(self, model: Model, clock: FakeClock) -> None:
        """Calls older than the window leave the figures."""
        predict = guarded(model, clock, window="time", window_size=10, min_calls=100)
        trip(predict, 2)
        clock.advance(5)
        predict(FAIL)
        predict(OK)
        assert predict.breaker.figures()["calls"] == 4
        clock.advance(5.5)  # the first second's bucket is out; the one of t=5 is not
        figures = predict.breaker.figures()
        assert (figures["calls"], figures["failures"]) == (2, 1)
        clock.advance(10)
        figures = predict.breaker.figures()
        assert (figures["calls"], figures["failures"]) == (0, 0)

    def test_expired_failures_do_not_trip_it(self, model: Model, clock: FakeClock) -> None:
        """Failures that left the window are not counted toward min_calls or the rate."""
        predict = guarded(model, clock, window="time", window_size=10, min_calls=4)
        trip(predict, 3)
        clock.advance(11)
        predict(OK)
        predict(OK)
        predict(FAIL)
        assert predict.breaker.figures()["calls"] == 3
        assert predict.breaker.state == "closed"  # without expiry: 4 of 6 failed
        predict(FAIL)  # 2 of 4 within the window: 50 %
        assert predict.breaker.state == "open"

    def test_failures_within_the_window_trip_it(self, model: Model, clock: FakeClock) -> None:
        """Failures spread over several seconds inside the window add up."""
        predict = guarded(model, clock, window="time", window_size=10, min_calls=4)
        for _ in range(4):
            predict(FAIL)
            clock.advance(2)
        assert predict.breaker.state == "open"


class TestSlowCalls:
    """`slow_call_s` + `slow_call_rate_threshold`: a model that answers too slowly trips it."""

    def test_slow_successes_open_the_breaker(self, model: Model, clock: FakeClock) -> None:
        """Two slow answers in four calls reach a 50 % slow-call threshold."""
        predict = guarded(
            model,
            clock,
            window_size=4,
            min_calls=4,
            slow_call_s=0.005,
            slow_call_rate_threshold=0.5,
        )
        slow = {"amount": 1.0, "sleep": 0.02}
        assert predict(slow) == {"label": "model"}  # slow, but served by the primary
        predict(OK)
        predict(OK)
        figures = predict.breaker.figures()
        assert (figures["slow"], figures["failures"]) == (1, 0)
        assert predict.breaker.state == "closed"
        predict(slow)
        assert predict.breaker.state == "open"

    def test_fast_calls_are_not_slow(self, model: Model, clock: FakeClock) -> None:
        """Calls under `slow_call_s` never count as slow."""
        predict = guarded(model, clock, window_size=4, min_calls=4, slow_call_s=1.0)
        for _ in range(6):
            predict(OK)
        figures = predict.breaker.figures()
        assert figures["slow"] == 0
        assert figures["slow_rate"] == 0.0
        assert predict.breaker.state == "closed"

    @pytest.mark.parametrize("is_async", [False, True])
    def test_no_slow_call_s_means_no_slow_calls(
        self, model: Model, clock: FakeClock, is_async: bool
    ) -> None:
        """`slow_call_s=None` turns slow-call detection off: slow answers are plain successes,
        failures still trip it, and degraded records still carry a latency."""
        predict = guarded(
            model,
            clock,
            is_async=is_async,
            window_size=4,
            min_calls=4,
            slow_call_s=None,
            slow_call_rate_threshold=0.5,
        )
        call = predict.call if not is_async else lambda x: asyncio.run(predict.call(x))
        for _ in range(4):
            healthy = call({"amount": 1.0, "sleep": 0.01}).decision
            assert (healthy.served_by, healthy.latency_ms >= 10) == ("primary", True)
        figures = predict.breaker.figures()
        assert (figures["calls"], figures["slow"]) == (4, 0)
        assert predict.breaker.state == "closed"
        failed = call(FAIL)
        assert failed.decision.served_by == "static"
        assert failed.decision.latency_ms > 0
        call(FAIL)
        assert predict.breaker.state == "open"


class TestFigures:
    """`breaker.figures()` shows timeouts, errors and slow calls apart."""

    def test_figures_have_every_documented_key(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock)
        figures = predict.breaker.figures()
        assert set(figures) >= FIGURE_KEYS
        assert figures["state"] == "closed"
        assert figures["open_remaining_s"] == 0

    def test_timeouts_errors_and_slow_calls_are_counted_apart(
        self, model: Model, clock: FakeClock
    ) -> None:
        """1 timeout, 2 errors, 3 slow answers, 1 fast answer: each in its own figure."""
        predict = guarded(model, clock, timeout_s=0.05, slow_call_s=0.01, min_calls=100)
        predict({"amount": 1.0, "hang": True})
        predict(FAIL)
        predict({"amount": 1.0, "fail": "value"})
        for _ in range(3):
            predict({"amount": 1.0, "sleep": 0.02})
        predict(OK)
        figures = predict.breaker.figures()
        assert figures["calls"] == 7
        assert figures["timeouts"] == 1
        assert figures["errors"] == 2
        assert figures["failures"] == 3
        # the timed-out call took longer than slow_call_s too (resilience4j counts slow failures)
        assert figures["slow"] in (3, 4)
        assert figures["failure_rate"] == pytest.approx(3 / 7, abs=1e-3)
        assert figures["consecutive_failures"] == 0


# -- open, half-open, backoff -----------------------------------------------------------------
class TestOpenAndHalfOpen:
    """Open for `open_s`, then half-open: probes decide between closed and open again."""

    def test_open_rejects_without_calling_the_model(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, window_size=2, min_calls=2, open_s=30)
        trip(predict, 2)
        calls = model.calls
        outcome = predict.call(OK)
        assert outcome.value == STATIC
        assert codes(outcome) == ["breaker_open"]
        assert outcome.decision.breaker_state == "open"
        assert model.calls == calls

    def test_half_open_after_open_s(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, window_size=2, min_calls=2, open_s=30)
        trip(predict, 2)
        assert predict.breaker.figures()["open_remaining_s"] == pytest.approx(30)
        clock.advance(29.9)
        assert predict.breaker.state == "open"
        assert predict.breaker.figures()["open_remaining_s"] == pytest.approx(0.1)
        assert rejected(predict)
        clock.advance(0.1)
        assert predict.breaker.state == "half_open"
        calls = model.calls
        assert predict.call(OK).decision.breaker_state == "half_open"
        assert model.calls == calls + 1

    def test_success_threshold_successes_close_it(self, model: Model, clock: FakeClock) -> None:
        """With success_threshold=2 of 3 probes, the second success closes it."""
        predict = guarded(
            model,
            clock,
            window_size=2,
            min_calls=2,
            open_s=10,
            half_open_calls=3,
            success_threshold=2,
        )
        trip(predict, 2)
        clock.advance(10)
        predict(OK)
        assert predict.breaker.state == "half_open"
        predict(OK)
        assert predict.breaker.state == "closed"
        assert predict.breaker.figures()["calls"] == 0  # closed starts with a fresh window

    def test_success_threshold_defaults_to_half_open_calls(
        self, model: Model, clock: FakeClock
    ) -> None:
        predict = guarded(model, clock, window_size=2, min_calls=2, open_s=10, half_open_calls=3)
        trip(predict, 2)
        clock.advance(10)
        predict(OK)
        predict(OK)
        assert predict.breaker.state == "half_open"
        predict(OK)
        assert predict.breaker.state == "closed"

    def test_one_failed_probe_reopens_it(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(
            model,
            clock,
            window_size=2,
            min_calls=2,
            open_s=10,
            half_open_calls=3,
            success_threshold=2,
        )
        trip(predict, 2)
        clock.advance(10)
        predict(OK)
        predict(FAIL)
        assert predict.breaker.state == "open"
        assert rejected(predict)
        assert predict.breaker.figures()["open_remaining_s"] == pytest.approx(10)

    def test_probes_beyond_half_open_calls_are_rejected(
        self, model: Model, clock: FakeClock
    ) -> None:
        """A probe whose call is still running holds its permit: a second caller is refused."""
        predict = guarded(model, clock, window_size=2, min_calls=2, open_s=10, half_open_calls=1)
        trip(predict, 2)
        clock.advance(10)
        probe = threading.Thread(target=predict, args=({"amount": 1.0, "hang": True},))
        probe.start()
        _wait_for(lambda: model.calls == 3)
        assert rejected(predict)
        assert model.calls == 3
        model.gate.set()
        probe.join(5)
        assert predict.breaker.state == "closed"


class TestOpenBackoff:
    """`open_backoff` grows the open period on each re-open, up to `max_open_s`."""

    @staticmethod
    def assert_open_for(predict: Any, clock: FakeClock, seconds: float) -> None:
        """Open for exactly `seconds`, then half-open."""
        assert predict.breaker.state == "open"
        assert predict.breaker.figures()["open_remaining_s"] == pytest.approx(seconds)
        clock.advance(seconds - 0.01)
        assert predict.breaker.state == "open"
        clock.advance(0.01)
        assert predict.breaker.state == "half_open"

    def test_each_reopen_waits_longer_up_to_max_open_s(
        self, model: Model, clock: FakeClock
    ) -> None:
        predict = guarded(
            model,
            clock,
            consecutive_failures=1,
            open_s=10,
            open_backoff=2,
            max_open_s=30,
            half_open_calls=1,
        )
        predict(FAIL)
        self.assert_open_for(predict, clock, 10)
        predict(FAIL)  # first re-open: 10 x 2
        self.assert_open_for(predict, clock, 20)
        predict(FAIL)  # 40, capped
        self.assert_open_for(predict, clock, 30)
        predict(FAIL)
        self.assert_open_for(predict, clock, 30)

    def test_closing_restarts_the_backoff(self, model: Model, clock: FakeClock) -> None:
        """After a recovery, the next outage opens for `open_s` again."""
        predict = guarded(
            model,
            clock,
            consecutive_failures=1,
            open_s=10,
            open_backoff=3,
            max_open_s=100,
            half_open_calls=1,
        )
        predict(FAIL)
        clock.advance(10)
        predict(FAIL)
        clock.advance(100)
        predict(OK)
        assert predict.breaker.state == "closed"
        predict(FAIL)
        self.assert_open_for(predict, clock, 10)

    def test_fixed_open_s_by_default(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, consecutive_failures=1, open_s=10, half_open_calls=1)
        predict(FAIL)
        for _ in range(3):
            self.assert_open_for(predict, clock, 10)
            predict(FAIL)


class TestProbeLimit:
    """Exactly `half_open_calls` probes reach the model, however many callers are concurrent."""

    def test_ten_threads_three_probes(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, window_size=2, min_calls=2, open_s=10, half_open_calls=3)
        trip(predict, 2)
        clock.advance(10)
        before = model.calls
        hung = {"amount": 1.0, "hang": True, "fail": "conn"}  # a dead model, slow to say so
        barrier = threading.Barrier(10)
        done: list[Any] = []

        def caller() -> None:
            barrier.wait(5)
            done.append(predict(hung))

        threads = [threading.Thread(target=caller) for _ in range(10)]
        for t in threads:
            t.start()
        _wait_for(lambda: len(done) >= 7, timeout=2)
        time.sleep(0.05)  # give any caller wrongly let through the time to reach the model
        assert model.calls - before == 3
        assert len(done) == 7
        assert all(answer == STATIC for answer in done)
        model.gate.set()
        for t in threads:
            t.join(5)
        assert model.calls - before == 3
        assert predict.breaker.state == "open"

    def test_hundred_asyncio_tasks_three_probes(self, model: Model, clock: FakeClock) -> None:
        entered = 0

        async def dead_model(x: dict[str, Any]) -> dict[str, Any]:
            nonlocal entered
            entered += 1
            await gate.wait()
            raise ConnectionError("dead")

        gate: asyncio.Event
        predict = ss.guard(
            name="fraud",
            breaker=ss.BreakerConfig(
                clock=clock, window_size=2, min_calls=2, open_s=10, half_open_calls=3
            ),
            fallbacks=[ss.Fallback.static("static", STATIC)],
        )(dead_model)

        async def scenario() -> list[Any]:
            nonlocal gate
            gate = asyncio.Event()
            gate.set()
            for _ in range(2):
                await predict(OK)
            assert predict.breaker.state == "open"
            clock.advance(10)
            gate.clear()
            start = entered
            tasks = [asyncio.create_task(predict(OK)) for _ in range(100)]
            for _ in range(20):
                await asyncio.sleep(0)
            assert entered - start == 3
            assert sum(t.done() for t in tasks) == 97
            gate.set()
            answers = await asyncio.gather(*tasks)
            assert entered - start == 3
            return answers

        answers = asyncio.run(scenario())
        assert answers == [STATIC] * 100
        assert predict.breaker.state == "open"


class TestProbeTimeout:
    """A probe hung past `probe_timeout_s` counts as a failure and frees its permit."""

    def test_hung_probe_reopens_and_frees_its_permit(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(
            model,
            clock,
            window_size=2,
            min_calls=2,
            open_s=10,
            half_open_calls=1,
            probe_timeout_s=5,
        )
        trip(predict, 2)
        clock.advance(10)
        hung = {"amount": 1.0, "hang": True, "fail": "conn"}
        probe = threading.Thread(target=predict, args=(hung,))
        probe.start()
        _wait_for(lambda: model.calls == 3)
        assert rejected(predict)  # the permit is taken
        assert predict.breaker.state == "half_open"
        clock.advance(5)
        assert rejected(predict)  # the hung probe failed: open again
        assert predict.breaker.state == "open"
        clock.advance(10)
        assert predict.breaker.state == "half_open"
        assert not rejected(predict)  # its permit was freed: a new probe gets through
        assert model.calls == 4
        assert predict.breaker.state == "closed"
        model.gate.set()  # the hung probe finally fails; too late to count
        probe.join(5)
        assert predict.breaker.state == "closed"
        assert predict.breaker.figures()["failures"] == 0

    def test_probes_without_probe_timeout_hold_their_permit(
        self, model: Model, clock: FakeClock
    ) -> None:
        predict = guarded(model, clock, window_size=2, min_calls=2, open_s=10, half_open_calls=1)
        trip(predict, 2)
        clock.advance(10)
        probe = threading.Thread(target=predict, args=({"amount": 1.0, "hang": True},))
        probe.start()
        _wait_for(lambda: model.calls == 3)
        clock.advance(3600)
        assert rejected(predict)
        assert predict.breaker.state == "half_open"
        model.gate.set()
        probe.join(5)
        assert predict.breaker.state == "closed"

    def test_cancelled_async_probe_frees_its_permit(self, model: Model, clock: FakeClock) -> None:
        """A probe whose caller went away (task cancelled) must not leave it stuck half-open."""
        predict = guarded(
            model, clock, is_async=True, window_size=2, min_calls=2, open_s=10, half_open_calls=1
        )

        async def scenario() -> bool:
            for _ in range(2):
                await predict(FAIL)
            clock.advance(10)
            probe = asyncio.create_task(predict({"amount": 1.0, "sleep": 5.0}))
            await asyncio.sleep(0.01)
            assert model.calls == 3
            probe.cancel()
            with pytest.raises(asyncio.CancelledError):
                await probe
            # freed as "no outcome" or counted as a failure (open for open_s): either way,
            # once open_s has passed, the next caller is a probe
            clock.advance(10)
            outcome = await predict.call(OK)
            return "breaker_open" in codes(outcome)

        assert not asyncio.run(scenario()), "the cancelled probe kept its half-open permit"
        assert model.calls == 4
        assert predict.breaker.state == "closed"


class TestStaleOutcomes:
    """An outcome that arrives after a state change belongs to the old state."""

    def test_a_call_admitted_while_closed_is_not_a_probe(
        self, model: Model, clock: FakeClock
    ) -> None:
        """A slow success from before the trip does not close a half-open breaker."""
        predict = guarded(model, clock, window_size=2, min_calls=2, open_s=10, half_open_calls=1)
        straggler = threading.Thread(target=predict, args=({"amount": 1.0, "hang": True},))
        straggler.start()
        _wait_for(lambda: model.calls == 1)
        trip(predict, 2)
        clock.advance(10)
        assert predict.breaker.state == "half_open"
        model.gate.set()
        straggler.join(5)
        assert predict.breaker.state == "half_open"
        calls = model.calls
        assert not rejected(predict)  # the one probe permit is still there
        assert model.calls == calls + 1

    def test_concurrent_failures_open_it_once(self, model: Model, clock: FakeClock) -> None:
        events: list[Any] = []
        predict = guarded(model, clock, window_size=5, min_calls=5, on_state_change=[events.append])
        barrier = threading.Barrier(16)

        def caller() -> None:
            barrier.wait(5)
            for _ in range(5):
                predict(FAIL)

        threads = [threading.Thread(target=caller) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        assert [(e.from_state, e.to_state) for e in events] == [("closed", "open")]
        assert predict.breaker.state == "open"


# -- what counts ------------------------------------------------------------------------------
class TestConsecutiveFailures:
    """`consecutive_failures` trips on N failures in a row, even below `min_calls`."""

    def test_trips_below_min_calls(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, min_calls=100, consecutive_failures=3)
        for x in (FAIL, FAIL, OK, FAIL, FAIL):
            predict(x)
        assert predict.breaker.state == "closed"
        assert predict.breaker.figures()["consecutive_failures"] == 2
        predict(FAIL)
        assert predict.breaker.state == "open"

    def test_off_by_default(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock)
        trip(predict, 50)
        assert predict.breaker.state == "closed"


class TestWhatCounts:
    """record_on / ignore_on, invalid input, retries, async failures."""

    def test_ignored_errors_count_as_neither_success_nor_failure(
        self, model: Model, clock: FakeClock
    ) -> None:
        predict = guarded(
            model, clock, window_size=5, min_calls=2, consecutive_failures=2, ignore_on=[KeyError]
        )
        ignored = {"amount": 1.0, "fail": "key"}
        for _ in range(10):
            assert predict(ignored) == STATIC
        figures = predict.breaker.figures()
        assert (figures["calls"], figures["failures"]) == (0, 0)
        assert predict.breaker.state == "closed"
        predict(FAIL)
        predict(ignored)  # not a success: the failure streak goes on
        predict(FAIL)
        assert predict.breaker.state == "open"

    def test_ignored_error_in_a_probe_does_not_close_or_reopen(
        self, model: Model, clock: FakeClock
    ) -> None:
        predict = guarded(
            model,
            clock,
            window_size=2,
            min_calls=2,
            open_s=10,
            half_open_calls=1,
            ignore_on=[KeyError],
        )
        trip(predict, 2)
        clock.advance(10)
        predict({"amount": 1.0, "fail": "key"})
        assert predict.breaker.state == "half_open"
        assert not rejected(predict)  # the ignored probe gave its permit back
        assert predict.breaker.state == "closed"

    def test_record_on_narrows_what_counts_as_a_failure(
        self, model: Model, clock: FakeClock
    ) -> None:
        predict = guarded(
            model,
            clock,
            window_size=4,
            min_calls=2,
            consecutive_failures=2,
            record_on=[ConnectionError],
        )
        for _ in range(6):
            assert predict({"amount": 1.0, "fail": "value"}) == STATIC
        assert predict.breaker.figures()["failures"] == 0
        assert predict.breaker.state == "closed"
        trip(predict, 2)
        assert predict.breaker.state == "open"

    def test_invalid_input_never_counts(self, model: Model, clock: FakeClock) -> None:
        class Txn(BaseModel):
            amount: float
            fail: str | None = None

        predict = guarded(
            model,
            clock,
            validation=ss.ValidationConfig(schema=Txn),
            window_size=2,
            min_calls=1,
            consecutive_failures=1,
            open_s=10,
            half_open_calls=1,
        )
        bad = {"amount": "not a number"}
        for _ in range(5):
            outcome = predict.call(bad)
            assert outcome.value == STATIC
            assert "invalid_input" in codes(outcome)
        assert predict.breaker.figures()["calls"] == 0
        assert predict.breaker.state == "closed"
        assert model.calls == 0
        # nor does it use up a half-open probe
        predict(FAIL)
        clock.advance(10)
        predict(bad)
        assert predict.breaker.state == "half_open"
        assert not rejected(predict)
        assert predict.breaker.state == "closed"

    def test_async_failures_are_counted(self, model: Model, clock: FakeClock) -> None:
        """pybreaker misses failures of `async def` functions; safeserve must not."""
        predict = guarded(model, clock, is_async=True, min_calls=100, consecutive_failures=3)

        async def scenario() -> Any:
            for _ in range(3):
                assert await predict(FAIL) == STATIC
            return await predict.call(OK)

        outcome = asyncio.run(scenario())
        assert predict.breaker.state == "open"
        assert codes(outcome) == ["breaker_open"]
        assert model.calls == 3

    def test_async_failure_rate_and_timeouts_are_counted(
        self, model: Model, clock: FakeClock
    ) -> None:
        predict = guarded(model, clock, is_async=True, timeout_s=0.02, window_size=4, min_calls=4)

        async def scenario() -> None:
            await predict({"amount": 1.0, "sleep": 1.0})
            await predict(FAIL)
            await predict(OK)

        asyncio.run(scenario())
        figures = predict.breaker.figures()
        assert (figures["calls"], figures["timeouts"], figures["errors"]) == (3, 1, 1)
        asyncio.run(predict(FAIL))
        assert predict.breaker.state == "open"

    @pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
    def test_retries_of_one_call_are_one_outcome(
        self, model: Model, clock: FakeClock, is_async: bool
    ) -> None:
        """3 calls x 3 attempts are 3 failures: a consecutive_failures=5 breaker stays closed."""
        retry = ss.RetryConfig(attempts=3, backoff_s=0, jitter=False, retry_on=[ConnectionError])
        predict = guarded(
            model, clock, retry=retry, is_async=is_async, min_calls=100, consecutive_failures=5
        )

        def call(x: dict[str, Any]) -> Any:
            return asyncio.run(predict(x)) if is_async else predict(x)

        for _ in range(3):
            assert call(FAIL) == STATIC
        assert model.calls == 9
        figures = predict.breaker.figures()
        assert (figures["calls"], figures["failures"]) == (3, 3)
        assert figures["consecutive_failures"] == 3
        assert predict.breaker.state == "closed"
        model.failures_left = 2  # fails twice, then answers: one success
        assert call(OK) == {"label": "model"}
        figures = predict.breaker.figures()
        assert (figures["calls"], figures["failures"]) == (4, 3)
        assert figures["consecutive_failures"] == 0


# -- events, logs, hooks ----------------------------------------------------------------------
class TestTransitionRecords:
    """Every transition is a `kind: "breaker"` record and an `on_state_change` event."""

    def test_each_transition_is_logged_with_policy_owner_and_figures(
        self, model: Model, clock: FakeClock, tmp_path: Path
    ) -> None:
        path = tmp_path / "decisions.jsonl"
        predict = guarded(
            model,
            clock,
            log=ss.DecisionLogConfig(sink=str(path)),
            window_size=2,
            min_calls=2,
            open_s=10,
            half_open_calls=1,
        )
        trip(predict, 2)
        clock.advance(10)
        predict(OK)
        records = breaker_records(path)
        assert [(r["from_state"], r["to_state"]) for r in records] == [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
        ]
        for r in records:
            assert r["policy"] == "fraud"
            assert r["owner"] == "risk-oncall"
            assert r["shadow"] is False
            assert r["schema_version"] >= 1
            assert r["id"]
            assert r["ts"]
            assert {"calls", "failures", "errors", "timeouts", "slow"} <= set(r["figures"])
        assert records[0]["figures"]["calls"] == 2
        assert records[0]["figures"]["failures"] == 2
        assert len({r["id"] for r in records}) == 3

    def test_hooks_get_every_event(self, model: Model, clock: FakeClock) -> None:
        events: list[Any] = []
        predict = guarded(
            model,
            clock,
            window_size=2,
            min_calls=2,
            open_s=10,
            half_open_calls=1,
            on_state_change=[events.append],
        )
        trip(predict, 2)
        clock.advance(10)
        predict(FAIL)
        clock.advance(10)
        predict(OK)
        assert [(e.from_state, e.to_state) for e in events] == [
            ("closed", "open"),
            ("open", "half_open"),
            ("half_open", "open"),
            ("open", "half_open"),
            ("half_open", "closed"),
        ]
        first = events[0]
        assert (first.policy, first.owner, first.shadow) == ("fraud", "risk-oncall", False)
        assert first.figures["failures"] == 2
        assert isinstance(first.reason, str)

    def test_a_raising_hook_never_breaks_a_call(self, model: Model, clock: FakeClock) -> None:
        seen: list[str] = []

        def broken(event: Any) -> None:
            raise RuntimeError("pager down")

        predict = guarded(
            model,
            clock,
            window_size=2,
            min_calls=2,
            open_s=10,
            half_open_calls=1,
            on_state_change=[broken, lambda e: seen.append(e.to_state)],
        )
        assert predict(FAIL) == STATIC
        assert predict(FAIL) == STATIC  # this one opens it
        clock.advance(10)
        assert predict(OK) == {"label": "model"}  # half-open, then closed
        assert seen == ["open", "half_open", "closed"]
        predict.open()
        predict.reset()
        assert seen[-2:] == ["open", "closed"]

    def test_manual_control_fires_events(self, model: Model, clock: FakeClock) -> None:
        events: list[Any] = []
        predict = guarded(model, clock, on_state_change=[events.append])
        predict.open()
        predict.close()
        predict.force_open()
        predict.reset()
        predict.disable()
        predict.reset()
        assert [e.to_state for e in events] == [
            "open",
            "closed",
            "forced_open",
            "closed",
            "disabled",
            "closed",
        ]


class TestMetricsOnly:
    """`mode="metrics_only"`: measures and logs what it would do (shadow), never blocks."""

    def test_never_blocks(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(
            model, clock, mode="metrics_only", window_size=2, min_calls=2, consecutive_failures=1
        )
        assert predict.breaker.state == "metrics_only"
        for _ in range(20):
            outcome = predict.call(FAIL)
            assert "breaker_open" not in codes(outcome)
        assert model.calls == 20
        assert predict.breaker.state == "metrics_only"
        assert not rejected(predict)
        assert model.calls == 21

    def test_logs_the_transitions_it_would_make_as_shadow(
        self, model: Model, clock: FakeClock, tmp_path: Path
    ) -> None:
        path = tmp_path / "shadow.jsonl"
        events: list[Any] = []
        predict = guarded(
            model,
            clock,
            log=ss.DecisionLogConfig(sink=str(path)),
            mode="metrics_only",
            window_size=2,
            min_calls=2,
            open_s=10,
            half_open_calls=1,
            on_state_change=[events.append],
        )
        trip(predict, 2)  # would open
        for _ in range(3):
            predict(OK)  # would have been rejected: served by the model all the same
        assert model.calls == 5
        clock.advance(10)
        predict(OK)  # would be a probe, which succeeds
        assert predict.breaker.state == "metrics_only"
        records = breaker_records(path)
        assert [r["to_state"] for r in records] == ["open", "half_open", "closed"]
        for r in records:
            assert r["shadow"] is True
            assert r["policy"] == "fraud"
            assert r["owner"] == "risk-oncall"
        assert records[0]["from_state"] == "closed"
        assert records[0]["figures"]["failures"] == 2
        assert all(e.shadow for e in events)


# -- manual control ---------------------------------------------------------------------------
class TestManualControl:
    """open(), force_open(), close(), reset(), disable() on the guard (SPEC 1)."""

    def test_open_lasts_open_s_then_half_open(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, open_s=30, half_open_calls=1)
        predict.open()
        assert predict.breaker.state == "open"
        assert rejected(predict)
        assert model.calls == 0
        clock.advance(30)
        assert predict.breaker.state == "half_open"
        assert not rejected(predict)
        assert predict.breaker.state == "closed"

    def test_force_open_stays_open_until_close(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, open_s=30)
        predict.force_open()
        assert predict.breaker.state == "forced_open"
        clock.advance(1e6)
        assert predict.breaker.state == "forced_open"
        outcome = predict.call(OK)
        assert codes(outcome) == ["breaker_open"]
        assert outcome.decision.breaker_state == "forced_open"
        assert model.calls == 0
        predict.close()
        assert predict.breaker.state == "closed"
        assert not rejected(predict)

    def test_force_open_stays_open_until_reset(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, open_s=30)
        predict.force_open()
        clock.advance(1e6)
        assert rejected(predict)
        predict.reset()
        assert predict.breaker.state == "closed"
        assert not rejected(predict)

    def test_close_clears_the_window_counts(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, window_size=10, min_calls=5, consecutive_failures=4)
        trip(predict, 3)
        predict.close()
        figures = predict.breaker.figures()
        assert (figures["calls"], figures["failures"], figures["consecutive_failures"]) == (
            0,
            0,
            0,
        )
        trip(predict, 3)  # would be 6 failures (and 6 in a row) without the clearing
        assert predict.breaker.state == "closed"

    def test_close_an_open_breaker_lets_calls_through(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, window_size=2, min_calls=2, open_s=30)
        trip(predict, 2)
        assert predict.breaker.state == "open"
        predict.close()
        assert predict.breaker.state == "closed"
        assert predict.breaker.figures()["open_remaining_s"] == 0
        assert not rejected(predict)

    def test_reset_returns_to_closed_with_fresh_metrics(
        self, model: Model, clock: FakeClock
    ) -> None:
        predict = guarded(
            model,
            clock,
            window_size=4,
            min_calls=4,
            consecutive_failures=3,
            open_s=10,
            open_backoff=2,
            half_open_calls=1,
        )
        trip(predict, 3)
        clock.advance(10)
        predict(FAIL)  # a re-open: the next would wait longer
        predict.reset()
        assert predict.breaker.state == "closed"
        figures = predict.breaker.figures()
        assert (figures["calls"], figures["failures"], figures["consecutive_failures"]) == (
            0,
            0,
            0,
        )
        trip(predict, 3)
        assert predict.breaker.state == "open"
        assert predict.breaker.figures()["open_remaining_s"] == pytest.approx(10)

    def test_disable_never_blocks_until_reset(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, window_size=2, min_calls=1, consecutive_failures=1)
        predict.disable()
        assert predict.breaker.state == "disabled"
        for _ in range(10):
            assert not rejected(predict, FAIL)
        clock.advance(1e6)
        assert predict.breaker.state == "disabled"
        assert model.calls == 10
        predict.reset()
        assert predict.breaker.state == "closed"
        predict(FAIL)
        assert predict.breaker.state == "open"

    def test_disable_overrides_an_open_breaker(self, model: Model, clock: FakeClock) -> None:
        predict = guarded(model, clock, window_size=2, min_calls=2)
        trip(predict, 2)
        predict.disable()
        assert not rejected(predict)


# -- concurrency ------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", ["closed", "time_window", "half_open"])
def test_no_lock_is_held_across_the_model_call(model: Model, clock: FakeClock, setup: str) -> None:
    """8 threads x 20 ms calls through one guard overlap (pybreaker's took 8 x 20 ms)."""
    predict = guarded(
        model,
        clock,
        window="time" if setup == "time_window" else "count",
        window_size=10,
        min_calls=100,
        half_open_calls=8,
        open_s=10,
    )
    if setup == "half_open":
        predict.open()
        clock.advance(10)
    barrier = threading.Barrier(8)
    answers: list[Any] = []

    def caller() -> None:
        barrier.wait(5)
        answers.append(predict({"amount": 1.0, "sleep": 0.02}))

    threads = [threading.Thread(target=caller) for _ in range(8)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    wall = time.perf_counter() - t0
    assert answers == [{"label": "model"}] * 8
    assert model.calls == 8
    assert wall < 0.12, f"8 x 20 ms calls took {wall:.3f} s: calls were serialised"
    if setup == "half_open":
        assert predict.breaker.state == "closed"


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return
        time.sleep(0.002)


# -- a reference model of the rules -----------------------------------------------------------
class ReferenceBreaker:
    """resilience4j's rules, small: a count window, min_calls, a failure-rate threshold,
    open_s, half_open_calls probes and success_threshold successes to close."""

    def __init__(
        self,
        window_size: int,
        min_calls: int,
        threshold: float,
        open_s: float,
        half_open_calls: int,
        success_threshold: int,
    ) -> None:
        self.window: deque[bool] = deque(maxlen=window_size)
        self.min_calls = min_calls
        self.threshold = threshold
        self.open_s = open_s
        self.half_open_calls = half_open_calls
        self.success_threshold = success_threshold
        self.state = "closed"
        self.open_until = 0.0
        self.probes = self.successes = 0

    def current(self, now: float) -> str:
        if self.state == "open" and now >= self.open_until:
            return "half_open"
        return self.state

    def admit(self, now: float) -> bool:
        if self.current(now) != self.state:
            self.state = "half_open"
            self.probes = self.successes = 0
        if self.state == "closed":
            return True
        if self.state == "half_open" and self.probes < self.half_open_calls:
            self.probes += 1
            return True
        return False

    def record(self, failed: bool, now: float) -> None:
        if self.state == "closed":
            self.window.append(failed)
            calls = len(self.window)
            if calls >= self.min_calls and sum(self.window) / calls >= self.threshold:
                self._open(now)
        elif self.state == "half_open":
            if failed:
                self._open(now)
            else:
                self.successes += 1
                if self.successes >= self.success_threshold:
                    self.state = "closed"
                    self.window.clear()

    def _open(self, now: float) -> None:
        self.state = "open"
        self.open_until = now + self.open_s


@st.composite
def breaker_settings(draw: st.DrawFn) -> dict[str, Any]:
    window_size = draw(st.integers(2, 6))
    half_open_calls = draw(st.integers(1, 4))
    return {
        "window_size": window_size,
        "min_calls": draw(st.integers(1, window_size)),
        "failure_rate_threshold": draw(st.sampled_from([0.25, 0.5, 0.6, 1.0])),
        "open_s": draw(st.sampled_from([1.0, 5.0, 30.0])),
        "half_open_calls": half_open_calls,
        "success_threshold": draw(st.integers(1, half_open_calls)),
    }


class BreakerMachine(RuleBasedStateMachine):
    """Random calls and clock moves: the guard's breaker must follow the reference model."""

    def __init__(self) -> None:
        super().__init__()
        self.predict: Any = None

    @initialize(config=breaker_settings())
    def build(self, config: dict[str, Any]) -> None:
        self.clock = FakeClock()
        self.model = Model()
        self.predict = guarded(self.model, self.clock, **config)
        self.rules = ReferenceBreaker(
            config["window_size"],
            config["min_calls"],
            config["failure_rate_threshold"],
            config["open_s"],
            config["half_open_calls"],
            config["success_threshold"],
        )

    def _call(self, failing: bool) -> None:
        now = self.clock.now
        admitted = self.rules.admit(now)
        before = self.model.calls
        outcome = self.predict.call(FAIL if failing else OK)
        assert ("breaker_open" in codes(outcome)) == (not admitted)
        assert self.model.calls - before == (1 if admitted else 0)
        if admitted:
            self.rules.record(failing, now)

    @rule()
    def successful_call(self) -> None:
        self._call(failing=False)

    @rule()
    def failing_call(self) -> None:
        self._call(failing=True)

    @rule(seconds=st.sampled_from([0.5, 1.0, 4.0, 5.0, 29.5, 30.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def same_state(self) -> None:
        if self.predict is None:
            return
        assert self.predict.breaker.state == self.rules.current(self.clock.now)
        if self.rules.state == "closed":
            assert self.predict.breaker.figures()["calls"] == len(self.rules.window)


BreakerMachine.TestCase.settings = settings(
    max_examples=400,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBreakerFollowsReferenceModel = BreakerMachine.TestCase

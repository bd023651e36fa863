"""Timeouts and retries: abandoned sync calls, cancelled async calls, one deadline per call."""

import asyncio
import gc
import multiprocessing
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

import safeserve as ss

STATIC = {"label": "static"}


def codes(decision: Any) -> list[str]:
    return [r.code for r in decision.reasons]


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event slow models wait on (as a 5 s sleep); set at teardown to free their threads."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def testing_mode() -> Iterator[None]:
    """Backoff sleeps off, synchronous logs, breakers reset."""
    with ss.testing():
        yield


class SlowModel:
    """A sync model that 'sleeps' 5 s on slow inputs and answers at once otherwise."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release
        self.started = 0
        self.fast_calls = 0
        self.lock = threading.Lock()

    def function(self) -> Any:
        def predict(x: dict) -> dict:
            if x.get("slow"):
                with self.lock:
                    self.started += 1
                self.release.wait(5)
                return {"label": "slow"}
            with self.lock:
                self.fast_calls += 1
            return {"label": "fast"}

        return predict


@pytest.fixture
def slow_model(release: threading.Event) -> SlowModel:
    return SlowModel(release)


class TestSyncTimeout:
    def test_sync_timeout_abandons_call_and_returns_quickly(self, slow_model: SlowModel) -> None:
        """A 0.1 s timeout on a 5 s sync call answers from a fallback well under 1 s."""
        g = ss.guard(name="m", timeout_s=0.1, fallbacks=[ss.Fallback.static("static", STATIC)])(
            slow_model.function()
        )
        start = time.monotonic()
        out = g.call({"slow": True})
        elapsed = time.monotonic() - start
        assert elapsed < 1.0
        assert out.value == STATIC
        assert out.decision.served_by == "static"
        assert "timeout" in codes(out.decision)
        assert g.stats()["abandoned"] == 1

    def test_fast_call_succeeds_after_many_abandoned_calls(self, slow_model: SlowModel) -> None:
        """Twenty abandoned sleeping calls do not starve the pool: a fast call still runs."""
        g = ss.guard(name="m", timeout_s=0.05, fallbacks=[ss.Fallback.static("static", STATIC)])(
            slow_model.function()
        )
        for _ in range(20):
            assert g({"slow": True}) == STATIC
        assert g.stats()["abandoned"] == 20
        out = g.call({"slow": False})
        assert out.value == {"label": "fast"}
        assert out.decision.served_by == "primary"

    def test_past_max_abandoned_new_calls_degrade_with_overloaded(
        self, slow_model: SlowModel, release: threading.Event
    ) -> None:
        """Beyond max_abandoned running abandoned calls, new calls are not started: overloaded."""
        g = ss.guard(
            name="m",
            timeout_s=0.05,
            max_abandoned=3,
            fallbacks=[ss.Fallback.static("static", STATIC)],
        )(slow_model.function())
        for _ in range(5):
            g({"slow": True})
        assert slow_model.started <= 4
        start = time.monotonic()
        out = g.call({"slow": False})
        assert time.monotonic() - start < 1.0
        assert slow_model.fast_calls == 0
        assert out.decision.served_by == "static"
        assert "overloaded" in codes(out.decision)
        assert g.stats()["reasons"]["overloaded"] >= 1

        # Once the abandoned calls finish the guard serves from the primary again.
        release.set()
        deadline = time.monotonic() + 3.0
        served_by = None
        while time.monotonic() < deadline:
            served_by = g.call({"slow": False}).decision.served_by
            if served_by == "primary":
                break
            time.sleep(0.02)
        assert served_by == "primary"


class TestAsyncTimeout:
    def test_async_timeout_cancels_the_coroutine(self) -> None:
        """At the deadline an async primary is cancelled and a fallback serves."""
        seen: list[str] = []

        async def predict(x: dict) -> dict:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            return {"label": "slow"}

        g = ss.guard(name="m", timeout_s=0.1, fallbacks=[ss.Fallback.static("static", STATIC)])(
            predict
        )

        async def main() -> tuple[Any, float, list[str]]:
            start = time.monotonic()
            out = await g.call({"a": 1})
            elapsed = time.monotonic() - start
            await asyncio.sleep(0.05)
            return out, elapsed, list(seen)

        out, elapsed, seen_in_loop = asyncio.run(main())
        assert elapsed < 1.0
        assert out.decision.served_by == "static"
        assert "timeout" in codes(out.decision)
        assert seen_in_loop == ["cancelled"]

    @staticmethod
    def sleeper(name: str, timeout_s: float) -> Any:
        async def predict(x: dict) -> dict:
            await asyncio.sleep(5)
            return {"label": "slow"}

        fallbacks = [ss.Fallback.static("static", STATIC)]
        return ss.guard(name=name, timeout_s=timeout_s, fallbacks=fallbacks)(predict)

    def test_timeout_leaves_the_task_uncancelled(self) -> None:
        """After a timed-out call the task's cancellation count is back to what it was, so
        asyncio.timeout and TaskGroup in the caller keep working."""
        g = self.sleeper("uncancelled", 0.05)

        async def main() -> tuple[str, int, bool]:
            out = await g.call({})
            count = asyncio.current_task().cancelling()  # type: ignore[union-attr]
            try:
                async with asyncio.timeout(0.05):
                    await asyncio.sleep(5)
            except TimeoutError:
                return out.decision.served_by, count, True
            return out.decision.served_by, count, False

        assert asyncio.run(main()) == ("static", 0, True)

    def test_a_model_that_swallows_the_cancellation_still_leaves_the_task_uncancelled(
        self,
    ) -> None:
        """A primary that catches the deadline's cancellation and answers anyway is served;
        the cancellation it swallowed is not left counted on the task."""

        async def stubborn(x: dict) -> dict:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                return {"label": "late"}
            return {"label": "slow"}

        g = ss.guard(name="stubborn", timeout_s=0.05)(stubborn)

        async def main() -> tuple[Any, int]:
            answer = await g({})
            return answer, asyncio.current_task().cancelling()  # type: ignore[union-attr]

        assert asyncio.run(main()) == ({"label": "late"}, 0)

    def test_cancellation_from_outside_is_not_a_timeout(self) -> None:
        """A caller cancelled during a timed call is cancelled, not served by a fallback."""
        g = self.sleeper("outside", 1.0)

        async def main() -> tuple[bool, float]:
            task = asyncio.create_task(g({}))
            await asyncio.sleep(0.05)
            start = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return task.cancelled(), time.monotonic() - start

        cancelled, waited = asyncio.run(main())
        assert cancelled
        assert waited < 0.5

    def test_outer_budget_expiring_inside_an_inner_guard_is_the_outers_timeout(self) -> None:
        """Guard A (0.1 s) calls guard B (1 s): at 0.1 s B is cancelled and A times out."""
        inner = self.sleeper("inner", 1.0)

        async def outer_fn(x: dict) -> Any:
            return await inner(x)

        outer = ss.guard(
            name="outer", timeout_s=0.1, fallbacks=[ss.Fallback.static("static", STATIC)]
        )(outer_fn)

        async def main() -> tuple[Any, float]:
            start = time.monotonic()
            out = await outer.call({})
            return out, time.monotonic() - start

        out, elapsed = asyncio.run(main())
        assert elapsed < 0.5
        assert (out.decision.served_by, codes(out.decision)) == ("static", ["timeout"])
        assert inner.stats()["calls"] == 0  # cancelled from outside: no outcome of its own

    def test_budget_shortened_by_a_reload_applies_at_once(self) -> None:
        """A call under a new, shorter budget times out on time, though a call with the old,
        longer one is still waiting."""
        g = self.sleeper("reloaded", 2.0)

        async def main() -> tuple[Any, float]:
            long = asyncio.create_task(g({}))
            await asyncio.sleep(0.02)
            g.reload(g.policy.model_copy(update={"timeout_s": 0.1}))
            start = time.monotonic()
            out = await g.call({})
            elapsed = time.monotonic() - start
            long.cancel()
            return out, elapsed

        out, elapsed = asyncio.run(main())
        assert elapsed < 1.0
        assert (out.decision.served_by, codes(out.decision)) == ("static", ["timeout"])


class TestDeadlineQueue:
    """An async guard's time budgets share one timer per event loop (safeserve.deadlines):
    the cases where one timer for many calls could get a deadline wrong."""

    sleeper = staticmethod(TestAsyncTimeout.sleeper)

    @staticmethod
    def timed_call(g: Any, x: dict[str, Any]) -> Any:
        async def call() -> tuple[Any, float]:
            start = time.monotonic()
            out = await g.call(x)
            return out, time.monotonic() - start

        return call()

    def test_shorter_budget_after_the_queue_emptied_is_honoured(self) -> None:
        """The queue's timer waits for a finished call's 3 s deadline; a call under a budget
        reloaded to 0.1 s still stops at 0.1 s."""

        async def predict(x: dict) -> dict:
            await asyncio.sleep(x["s"])
            return {"label": "ok"}

        g = ss.guard(name="emptied", timeout_s=3.0, fallbacks=[ss.Fallback.static("s", STATIC)])(
            predict
        )

        async def main() -> tuple[Any, float]:
            await g({"s": 0})
            g.reload(g.policy.model_copy(update={"timeout_s": 0.1}))
            return await self.timed_call(g, {"s": 10})

        out, elapsed = asyncio.run(main())
        assert elapsed < 1.0
        assert codes(out.decision) == ["timeout"]

    def test_retry_with_less_time_left_stops_at_the_calls_deadline(self) -> None:
        """A retry with 50 ms of the call's budget left, queued behind a later deadline of a
        call that has finished, still ends the call at its 1 s budget."""

        async def predict(x: dict) -> dict:
            if x["who"] == "R":
                x["who"] = "R2"
                raise ConnectionError("transient")
            if x["who"] == "R2":
                await asyncio.sleep(10)
            return {"label": "ok"}

        retry = ss.RetryConfig(
            attempts=2,
            backoff_s=0.95,
            jitter=False,
            attempt_timeout_s=0.9,
            retry_on=[ConnectionError],
        )
        fallbacks = [ss.Fallback.static("static", STATIC)]
        g = ss.guard(name="late-retry", timeout_s=1.0, retry=retry, fallbacks=fallbacks)(predict)

        async def main() -> tuple[Any, float]:
            start = time.monotonic()
            r = asyncio.create_task(g.call({"who": "R"}))
            await asyncio.sleep(0.92)
            await g({"who": "C"})  # a fast call: deadline at +1.82 s, the queue's timer with it
            return await r, time.monotonic() - start

        out, elapsed = asyncio.run(main())
        assert elapsed < 1.4
        assert out.decision.served_by == "static"

    def test_a_timer_that_fires_early_cuts_nothing_short(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Woken half a millisecond before the deadline (uvloop's timers are millisecond-
        grained), the queue expires nothing and waits again; at the deadline it expires."""
        from safeserve import deadlines

        clock = [100.0]
        monkeypatch.setattr(deadlines, "perf_counter", lambda: clock[0])

        class Call:
            state, deadline, expired = 0, 0.0, False

            def expire(self) -> None:
                self.expired = True

        async def main() -> list[bool]:
            d = deadlines.Deadlines(asyncio.get_running_loop())
            call = Call()
            d.watch(call, 100.0005)
            seen = []
            for now in (100.0, 100.0005):
                clock[0] = now
                d.check()  # the timer, early, then on time
                seen.append(call.expired)
            return seen

        assert asyncio.run(main()) == [False, True]

    def test_a_forked_child_times_its_own_calls(self) -> None:
        """A process forked while the parent's loop runs (multiprocessing's 'fork', started
        from async code) times its calls on its own loop."""
        g = self.sleeper("forked", 0.1)
        ctx = multiprocessing.get_context("fork")
        answers = ctx.SimpleQueue()

        def child() -> None:
            async def call() -> None:
                out = await g.call({})
                answers.put(out.decision.served_by)

            asyncio.run(asyncio.wait_for(call(), 3))

        async def main() -> int:
            task = asyncio.create_task(g.call({}))  # the parent's queue, in use
            await asyncio.sleep(0.01)
            process = ctx.Process(target=child)
            process.start()
            await asyncio.get_running_loop().run_in_executor(None, process.join, 10)
            await task
            return process.exitcode if process.exitcode is not None else -1

        assert asyncio.run(main()) == 0
        assert answers.get() == "static"

    def test_a_loop_moved_to_another_thread_times_nothing_here(self) -> None:
        """A loop first run here, then run by another thread: this thread's next loop times
        its own calls (on its own task)."""
        g = self.sleeper("moved", 0.1)
        moved = asyncio.new_event_loop()
        moved.run_until_complete(g.call({}))  # this thread's queue, for `moved`
        thread = threading.Thread(target=moved.run_forever, daemon=True)
        thread.start()
        try:
            out, elapsed = asyncio.run(self.timed_call(g, {}))
        finally:
            moved.call_soon_threadsafe(moved.stop)
            thread.join(5)
            moved.close()
        assert elapsed < 1.0
        assert codes(out.decision) == ["timeout"]

    def test_a_queue_does_not_keep_finished_calls_alive(self) -> None:
        """Calls that have ended are not held (nor what they returned) until the queue next
        looks at them."""

        class Answer:
            pass

        answers: list[weakref.ref[Answer]] = []

        async def predict(x: dict) -> Answer:
            await asyncio.sleep(0.01)  # all 50 in flight at once, then all done
            answer = Answer()
            answers.append(weakref.ref(answer))
            return answer

        g = ss.guard(name="kept", timeout_s=60.0)(predict)

        async def main() -> int:
            tasks = [asyncio.create_task(g({})) for _ in range(50)]
            for task in tasks:
                await task
            del tasks, task
            gc.collect()
            return sum(ref() is not None for ref in answers)

        assert asyncio.run(main()) <= 1  # the last may linger in asyncio's own bookkeeping


def counting_model(exc_sequence: list[BaseException | None]) -> Any:
    """A model raising the listed exceptions in turn (None answers); records each invocation."""
    calls: list[int] = []

    def predict(x: dict) -> dict:
        calls.append(1)
        i = min(len(calls), len(exc_sequence)) - 1
        exc = exc_sequence[i]
        if exc is not None:
            raise exc
        return {"label": "ok"}

    predict.calls = calls  # type: ignore[attr-defined]
    return predict


@pytest.mark.usefixtures("testing_mode")
class TestRetries:
    @pytest.mark.parametrize(
        "exc", [ConnectionError("refused"), ConnectionRefusedError("refused")], ids=repr
    )
    def test_listed_errors_are_retried_up_to_attempts(self, exc: BaseException) -> None:
        """An error in retry_on (or a subclass) is retried until attempts run out."""
        model = counting_model([exc])
        g = ss.guard(
            name="m",
            retry=ss.RetryConfig(attempts=3, backoff_s=0.01, retry_on=[ConnectionError]),
            fallbacks=[ss.Fallback.static("static", STATIC)],
        )(model)
        out = g.call({"a": 1})
        assert len(model.calls) == 3
        assert out.decision.served_by == "static"
        attempts = [(a.name, a.ok) for a in out.decision.attempts]
        assert attempts == [("primary", False)] * 3 + [("static", True)]
        assert all(
            a.error.startswith(type(exc).__name__ + ":")
            for a in out.decision.attempts
            if a.name == "primary"
        )

    def test_unlisted_error_is_not_retried(self) -> None:
        """An error outside retry_on fails after one attempt."""
        model = counting_model([ValueError("bad")])
        g = ss.guard(
            name="m",
            retry=ss.RetryConfig(attempts=3, backoff_s=0.01, retry_on=[ConnectionError]),
            fallbacks=[ss.Fallback.static("static", STATIC)],
        )(model)
        out = g.call({"a": 1})
        assert len(model.calls) == 1
        assert [a.name for a in out.decision.attempts] == ["primary", "static"]
        assert out.decision.attempts[0].error == "ValueError: bad"

    def test_retry_succeeds_and_records_attempts_in_order(self) -> None:
        """Two failures then a success: the primary answers and attempts list all three."""
        model = counting_model([ConnectionError("a"), ConnectionError("b"), None])
        g = ss.guard(
            name="m",
            retry=ss.RetryConfig(attempts=5, backoff_s=0.01, retry_on=[ConnectionError]),
            fallbacks=[ss.Fallback.static("static", STATIC)],
        )(model)
        out = g.call({"a": 1})
        assert out.value == {"label": "ok"}
        assert out.decision.served_by == "primary"
        assert len(model.calls) == 3
        attempts = out.decision.attempts
        assert [(a.name, a.ok) for a in attempts] == [
            ("primary", False),
            ("primary", False),
            ("primary", True),
        ]
        assert [a.error for a in attempts] == ["ConnectionError: a", "ConnectionError: b", None]

    def test_default_retry_on_covers_connection_and_timeout_errors(self) -> None:
        """RetryConfig's default retry_on retries TimeoutError and ConnectionError."""
        model = counting_model([TimeoutError("t"), ConnectionError("c"), None])
        g = ss.guard(name="m", retry=ss.RetryConfig(attempts=3))(model)
        assert g({"a": 1}) == {"label": "ok"}
        assert len(model.calls) == 3

    def test_async_retries_only_listed_errors(self) -> None:
        """An async primary is retried on listed errors only."""
        calls: list[int] = []

        async def predict(x: dict) -> dict:
            calls.append(1)
            if len(calls) < 3:
                raise ConnectionError("flaky")
            raise ValueError("bad")

        g = ss.guard(
            name="m",
            retry=ss.RetryConfig(attempts=5, backoff_s=0.01, retry_on=[ConnectionError]),
            fallbacks=[ss.Fallback.static("static", STATIC)],
        )(predict)

        async def main() -> Any:
            return await g.call({"a": 1})

        out = asyncio.run(main())
        assert len(calls) == 3
        assert [a.error.split(":")[0] for a in out.decision.attempts if a.name == "primary"] == [
            "ConnectionError",
            "ConnectionError",
            "ValueError",
        ]


class TestOneDeadline:
    def test_retries_share_one_deadline_and_stop_when_caller_returns(
        self, release: threading.Event
    ) -> None:
        """Attempt timeouts and retries never outlive timeout_s, nor run on afterwards."""
        invocations: list[int] = []

        def predict(x: dict) -> dict:
            invocations.append(1)
            release.wait(5)
            return {"label": "slow"}

        g = ss.guard(
            name="m",
            timeout_s=0.3,
            retry=ss.RetryConfig(
                attempts=10,
                backoff_s=0.05,
                attempt_timeout_s=0.2,
                jitter=False,
                retry_on=[TimeoutError, ConnectionError],
            ),
            fallbacks=[ss.Fallback.static("static", STATIC)],
        )(predict)
        start = time.monotonic()
        out = g.call({"a": 1})
        elapsed = time.monotonic() - start
        assert elapsed < 1.0
        assert out.decision.served_by == "static"
        assert "timeout" in codes(out.decision)
        assert 1 <= len(invocations) <= 3
        after_return = len(invocations)
        time.sleep(0.5)
        assert len(invocations) == after_return

    def test_async_retries_share_one_deadline(self) -> None:
        """An async primary's retries also stop at the call's single deadline."""
        invocations: list[int] = []

        async def predict(x: dict) -> dict:
            invocations.append(1)
            await asyncio.sleep(5)
            return {"label": "slow"}

        g = ss.guard(
            name="m",
            timeout_s=0.3,
            retry=ss.RetryConfig(
                attempts=10,
                backoff_s=0.05,
                attempt_timeout_s=0.2,
                jitter=False,
                retry_on=[TimeoutError, ConnectionError],
            ),
            fallbacks=[ss.Fallback.static("static", STATIC)],
        )(predict)

        async def main() -> tuple[Any, float, int, int]:
            start = time.monotonic()
            out = await g.call({"a": 1})
            elapsed = time.monotonic() - start
            after_return = len(invocations)
            await asyncio.sleep(0.5)
            return out, elapsed, after_return, len(invocations)

        out, elapsed, after_return, later = asyncio.run(main())
        assert elapsed < 1.0
        assert out.decision.served_by == "static"
        assert 1 <= after_return <= 3
        assert later == after_return

    def test_backoff_never_sleeps_past_the_deadline(self) -> None:
        """A 5 s backoff inside a 0.3 s budget does not hold the caller past the budget."""
        model = counting_model([ConnectionError("down")])
        g = ss.guard(
            name="m",
            timeout_s=0.3,
            retry=ss.RetryConfig(
                attempts=5, backoff_s=5, max_backoff_s=5, jitter=False, retry_on=[ConnectionError]
            ),
            fallbacks=[ss.Fallback.static("static", STATIC)],
        )(model)
        start = time.monotonic()
        out = g.call({"a": 1})
        elapsed = time.monotonic() - start
        assert elapsed < 1.0
        assert out.decision.served_by == "static"
        assert len(model.calls) == 1

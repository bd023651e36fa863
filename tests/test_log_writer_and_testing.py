"""The log writer under a stuck sink, and the `safeserve_testing` fixture users get via pytest11."""

from __future__ import annotations

import time
from pathlib import Path

import safeserve as ss


def test_fixture_turns_off_backoff_and_writes_logs_synchronously(
    safeserve_testing: ss.testing, tmp_path: Path
) -> None:
    """Inside the fixture a 10 s backoff does not sleep and the record is on disk at once."""
    sink = tmp_path / "log.jsonl"

    @ss.guard(
        name="fixture",
        retry=ss.RetryConfig(attempts=3, backoff_s=10.0, jitter=False),
        fallbacks=[ss.Fallback.static("default", 0)],
        log=ss.DecisionLogConfig(sink=str(sink)),
    )
    def model(x: int) -> int:
        raise ConnectionError("down")

    started = time.perf_counter()
    assert model(1) == 0
    assert time.perf_counter() - started < 5.0
    assert len(sink.read_text().splitlines()) == 1  # no flush_logs() needed


def test_fixture_resets_breakers_opened_before_the_test() -> None:
    """Entering testing mode resets live breakers."""
    predict = ss.guard(name="reset-me", fallbacks=[ss.Fallback.static("d", 0)])(lambda x: x)
    predict.force_open()
    assert predict.breaker.state == "forced_open"
    with ss.testing():
        assert predict.breaker.state == "closed"
        assert predict(5) == 5


def test_full_log_queue_drops_are_counted_and_reported() -> None:
    """A stuck sink never blocks calls: drops are counted in stats() and logged afterwards."""
    import threading

    gate = threading.Event()
    seen: list[dict[str, object]] = []

    def slow_sink(record: dict[str, object]) -> None:
        gate.wait(5)
        seen.append(record)

    predict = ss.guard(
        name="drops",
        fallbacks=[ss.Fallback.static("d", 0)],
        log=ss.DecisionLogConfig(sink=slow_sink, queue_size=1),
    )(lambda x: 1 / 0)
    started = time.perf_counter()
    for i in range(50):
        assert predict(i) == 0
    assert time.perf_counter() - started < 2.0  # the stuck sink never held a call up
    dropped = predict.stats()["dropped_records"]
    assert dropped > 0
    gate.set()
    assert ss.flush_logs()
    decisions = [r for r in seen if r["kind"] == "decision"]
    drops = [r for r in seen if r["kind"] == "drops"]
    assert len(decisions) + dropped == 50
    assert sum(int(r["count"]) for r in drops) == dropped  # type: ignore[call-overload]

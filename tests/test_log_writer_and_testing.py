"""The log writer under a stuck sink, and the `safeserve_testing` fixture users get via pytest11."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


class TestSinkFailures:
    """A sink that refuses records: the guard keeps serving, and the loss is counted, never
    silent (stats, `flush_logs()`, one warning per kind of error)."""

    @staticmethod
    def crashing(sink: object) -> ss.Guarded:
        def predict(x: int) -> int:
            raise ConnectionError("down")

        return ss.guard(
            name="sink-failures",
            fallbacks=[ss.Fallback.static("default", 0)],
            log=ss.DecisionLogConfig(sink=sink),  # type: ignore[arg-type]
        )(predict)

    def test_a_sink_that_cannot_be_opened_fails_the_policy(self, tmp_path: Path) -> None:
        """A path under a regular file is refused when the guard is made, naming the field."""
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("")
        with pytest.raises(ss.PolicyError, match=r"log\.sink: cannot append to"):
            self.crashing(str(blocker / "decisions.jsonl"))

    def test_a_raising_callable_sink_is_counted(self, capsys: pytest.CaptureFixture[str]) -> None:
        def sink(record: dict[str, object]) -> None:
            raise RuntimeError("collector down")

        predict = self.crashing(sink)
        for i in range(3):
            assert predict(i) == 0  # still served
        assert ss.flush_logs() is False
        assert predict.stats()["log_write_failures"] == 3
        warnings = [line for line in capsys.readouterr().err.splitlines() if "refused" in line]
        assert len(warnings) == 1  # once per kind of error, not per record
        assert "collector down" in warnings[0]
        detach(predict)
        assert ss.flush_logs() is True  # each loss is reported once

    def test_a_full_disk_is_counted(self) -> None:
        """Writes to /dev/full fail with ENOSPC: the records are counted as lost."""
        predict = self.crashing("/dev/full")
        for i in range(4):
            assert predict(i) == 0
        assert ss.flush_logs() is False
        assert predict.stats()["log_write_failures"] == 4
        detach(predict)


def test_values_json_allows_but_the_renderer_refuses_do_not_lose_the_record(
    tmp_path: Path,
) -> None:
    """A string UTF-8 cannot hold ("\\ud800", which a client may send in JSON) is written as
    U+FFFD, an integer beyond 64 bits as its digits: the record of the call is kept, not replaced
    by a drops record."""
    path = tmp_path / "decisions.jsonl"

    @ss.guard(
        name="surrogates",
        fallbacks=[ss.Fallback.static("default", 0)],
        log=ss.DecisionLogConfig(sink=str(path)),
    )
    def predict(x: dict[str, str]) -> int:
        raise ConnectionError("down")

    assert predict({"customer_id": "c-\ud800", "\udc00": "key", "n": 2**70}) == 0
    assert ss.flush_logs() is True
    [record] = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["kind"] == "decision"
    assert record["inputs"] == {"customer_id": "c-\ufffd", "\ufffd": "key", "n": str(2**70)}
    assert predict.stats()["log_write_failures"] == 0
    detach(predict)


def detach(guard: ss.Guarded) -> None:
    """Take a guard off its failing sink, so later tests' records (breaker resets under
    `ss.testing()`) do not fail there and turn their `flush_logs()` False."""
    guard.reload(guard.policy.model_copy(update={"log": None}))


def test_structlog_is_imported_only_by_a_process_that_writes_a_log(tmp_path: Path) -> None:
    """Guards without a log leave structlog (and rich, which it imports) out of the process;
    the first file log brings it in, and its records are written."""
    log = tmp_path / "decisions.jsonl"
    code = (
        "import sys, safeserve as ss\n"
        "fb = [ss.Fallback.static('s', 0)]\n"
        "def crash(x): raise RuntimeError('boom')\n"
        "quiet = ss.guard(ss.Policy(name='quiet', fallbacks=fb))(crash)\n"
        "quiet(1)\n"
        "print('structlog' in sys.modules)\n"
        f"log = ss.DecisionLogConfig(sink={str(log)!r}, sample_rate=1.0)\n"
        "logged = ss.guard(ss.Policy(name='logged', fallbacks=fb, log=log))(crash)\n"
        "logged(1); ss.flush_logs()\n"
        "print('structlog' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["False", "True"]
    assert '"policy":"logged"' in log.read_text().replace(" ", "")

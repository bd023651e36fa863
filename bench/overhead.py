"""Per-call overhead of safeserve guards against the bare call and named peers.

Run ``python bench/overhead.py`` (about a minute) or ``python bench/overhead.py --quick``
(a few seconds). Everything runs in one process: each row is a loop of N calls timed with
``time.perf_counter_ns``; rows are measured round-robin (one repeat of every row, then the
next repeat) so drift in CPU speed hits every row alike, and the table reports the median
of the repeats (the min is shown beside it). Overheads are "row minus bare call", so the
loop's own cost cancels out. The peers (pybreaker, tenacity, pyresilience, circuitbreaker)
come with the project's ``bench`` extra.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import importlib
import platform
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import circuitbreaker  # type: ignore[import-untyped]
import numpy as np
import pybreaker
import pyresilience as pr
import tenacity

INPUT: dict[str, Any] = {"amount": 120.0, "country": "FR"}
ANSWER: dict[str, Any] = {"label": "approve", "confidence": 0.93}
DEFAULT_ANSWER: dict[str, Any] = {"label": "review", "confidence": 1.0}

Caller = Callable[[Any], Any]
AsyncCaller = Callable[[Any], Awaitable[Any]]


def model(x: Any) -> dict[str, Any]:
    """The tiny model every row wraps."""
    return {"label": "approve", "confidence": 0.93}


async def amodel(x: Any) -> dict[str, Any]:
    """The same model as a coroutine function (never suspends)."""
    return {"label": "approve", "confidence": 0.93}


def failing_model(x: Any) -> dict[str, Any]:
    """A primary that always fails, to time the degraded path."""
    raise ValueError("model exploded")


# --------------------------------------------------------------------------- timing


@dataclass
class Settings:
    """How long to measure: repeats per row and seconds per repeat."""

    repeats: int
    repeat_s: float


@dataclass
class Row:
    """One line of the table: how to run N calls, and the timings collected."""

    key: str
    label: str
    run: Callable[[int], int]  # runs n calls, returns the elapsed ns
    max_n: int = 2_000_000
    after_repeat: Callable[[], None] | None = None
    n: int = 0
    samples: list[float] = field(default_factory=list)  # ns per call, one per repeat
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the cyclic GC out of the timed loop."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def sync_loop(fn: Caller, arg: Any = INPUT) -> Callable[[int], int]:
    """A runner timing ``fn(arg)`` n times."""

    def run(n: int) -> int:
        calls = range(n)
        with gc_paused():
            start = time.perf_counter_ns()
            for _ in calls:
                fn(arg)
            return time.perf_counter_ns() - start

    return run


def async_loop(
    loop: asyncio.AbstractEventLoop, fn: AsyncCaller, arg: Any = INPUT
) -> Callable[[int], int]:
    """A runner timing ``await fn(arg)`` n times inside the given event loop."""

    async def body(n: int) -> int:
        calls = range(n)
        start = time.perf_counter_ns()
        for _ in calls:
            await fn(arg)
        return time.perf_counter_ns() - start

    def run(n: int) -> int:
        with gc_paused():
            return loop.run_until_complete(body(n))

    return run


def calibrate(row: Row, settings: Settings) -> None:
    """Warm the row up, then choose N so one repeat lasts about ``repeat_s``."""
    n = 50
    while True:
        elapsed = row.run(n)
        if elapsed > 20_000_000 or n >= row.max_n:  # 20 ms is enough to estimate
            break
        n = min(n * 4, row.max_n)
    per_call = elapsed / n
    row.n = max(100, min(row.max_n, int(settings.repeat_s * 1e9 / per_call)))
    if row.after_repeat is not None:
        row.after_repeat()


def measure(rows: list[Row], settings: Settings) -> None:
    """Calibrate every row, then run the repeats round-robin."""
    live = []
    for row in rows:
        if row.error is not None:
            continue
        try:
            calibrate(row, settings)
            live.append(row)
        except Exception as exc:  # a broken row is reported, not fatal
            row.error = f"{type(exc).__name__}: {exc}"[:120]
    for _ in range(settings.repeats):
        for row in list(live):
            try:
                row.samples.append(row.run(row.n) / row.n)
                if row.after_repeat is not None:
                    row.after_repeat()
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}"[:120]
                row.samples.clear()
                live.remove(row)


# --------------------------------------------------------------------------- peers


def tenacity_pybreaker_stack() -> Caller:
    """tenacity around pybreaker, as users stack them (the SPEC's reference)."""
    breaker = pybreaker.CircuitBreaker()
    return tenacity.retry(stop=tenacity.stop_after_attempt(3))(breaker(model))


def pybreaker_alone() -> Caller:
    breaker = pybreaker.CircuitBreaker()
    return breaker(model)


def circuitbreaker_alone() -> Caller:
    return circuitbreaker.circuit()(model)  # type: ignore[no-any-return]


def pyresilience_breaker() -> pr.CircuitBreakerConfig:
    """pyresilience's breaker with safeserve's default window (count 100, min 100, 50%)."""
    return pr.CircuitBreakerConfig(
        sliding_window_size=100,
        minimum_calls=100,
        failure_rate_threshold=0.5,
        recovery_timeout=60.0,
        slow_call_duration=60.0,
        slow_call_rate_threshold=1.0,
    )


def pyresilience_happy() -> Caller:
    """pyresilience with breaker, retry and fallback equivalent to the safeserve row."""
    decorate = pr.resilient(
        retry=pr.RetryConfig(
            max_attempts=3,
            delay=0.01,
            backoff_factor=2.0,
            max_delay=2.0,
            retry_on=(ConnectionError,),
        ),
        circuit_breaker=pyresilience_breaker(),
        fallback=pr.FallbackConfig(handler=DEFAULT_ANSWER),
    )
    return decorate(model)


def pyresilience_degraded() -> Caller:
    """pyresilience serving a static fallback for a raising function, breaker never opening."""
    decorate = pr.resilient(
        circuit_breaker=pr.CircuitBreakerConfig(
            sliding_window_size=100, minimum_calls=10**9, recovery_timeout=60.0
        ),
        fallback=pr.FallbackConfig(handler=DEFAULT_ANSWER),
    )
    return decorate(failing_model)


def pyresilience_timeout() -> Caller:
    decorate = pr.resilient(
        timeout=pr.TimeoutConfig(seconds=1.0, pool_size=8),
        circuit_breaker=pyresilience_breaker(),
    )
    return decorate(model)


def pyresilience_async_timeout() -> AsyncCaller:
    decorate = pr.resilient(timeout=pr.TimeoutConfig(seconds=1.0))
    return decorate(amodel)


def thread_pool_call(pool: concurrent.futures.ThreadPoolExecutor) -> Caller:
    """What a hand-written sync timeout costs: submit to a pool, wait for the result."""

    def call(x: Any) -> Any:
        return pool.submit(model, x).result(timeout=1.0)

    return call


class HandoffFloor:
    """Two queues and one worker thread: the least any thread-pool timeout can cost here."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (x := self._requests.get()) is not None:
            self._replies.put(model(x))

    def __call__(self, x: Any) -> Any:
        self._requests.put(x)
        return self._replies.get(timeout=1.0)

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()


async def asyncio_timeout_call(x: Any) -> Any:
    async with asyncio.timeout(1.0):
        return await amodel(x)


# --------------------------------------------------------------------------- safeserve


def load_safeserve() -> tuple[ModuleType | None, str]:
    """Import safeserve from this working tree (preferred over any installed copy)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "safeserve" / "__init__.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        ss = importlib.import_module("safeserve")
    except Exception as exc:
        return None, f"import safeserve failed: {type(exc).__name__}: {exc}"
    if not hasattr(ss, "guard"):
        return None, "safeserve has no `guard` yet"
    return ss, ""


def ss_happy(ss: Any, sink: Path) -> Any:
    """The SPEC's "Cost" case: breaker on, retry configured, confidence check, 1% sampling."""
    return ss.guard(
        name="bench",
        retry=ss.RetryConfig(attempts=3, backoff_s=0.01, retry_on=[ConnectionError]),
        confidence=ss.ConfidenceConfig(threshold=0.5),
        log=ss.DecisionLogConfig(sink=str(sink), sample_rate=0.01),
        fallbacks=[ss.Fallback.static("default", DEFAULT_ANSWER)],
    )(model)


FEATURES = [f"f{i}" for i in range(20)]
WIDE_INPUT = dict.fromkeys(FEATURES, 0.25)  # 20 numeric features, inside the training range


def ss_wide(ss: Any, with_checks: bool, profile: bool) -> Any:
    """A guard on a 20-feature input: bare, with baseline checks, with checks and a profile."""
    rng = np.random.default_rng(0)
    baseline = ss.Baseline.from_data({n: rng.normal(size=10_000) for n in FEATURES})
    validation = ss.ValidationConfig(baseline=baseline, profile=profile) if with_checks else None
    return ss.guard(name=f"bench-wide-{with_checks}-{profile}", validation=validation)(model)


def ss_degraded(ss: Any, sink: Path) -> Any:
    """Primary raises, a static fallback serves, a decision record goes to the file sink."""
    return ss.guard(
        name="bench-degraded",
        breaker=ss.BreakerConfig(min_calls=10**9, window_size=100),
        log=ss.DecisionLogConfig(sink=str(sink)),
        fallbacks=[ss.Fallback.static("default", DEFAULT_ANSWER)],
    )(failing_model)


def ss_degraded_ring(ss: Any) -> Any:
    """The degraded case with no ``log=``: records stay in the in-memory ring (cost split)."""
    return ss.guard(
        name="bench-degraded-ring",
        breaker=ss.BreakerConfig(min_calls=10**9, window_size=100),
        fallbacks=[ss.Fallback.static("default", DEFAULT_ANSWER)],
    )(failing_model)


def ss_timeout(ss: Any) -> Any:
    return ss.guard(name="bench-timeout", timeout_s=1.0)(model)


def ss_async_timeout(ss: Any) -> Any:
    return ss.guard(name="bench-async-timeout", timeout_s=1.0)(amodel)


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


def check_guards(ss: Any, guards: dict[str, Any], loop: asyncio.AbstractEventLoop) -> list[str]:
    """Check that each guard answers as the SPEC says before timing it; return problems."""
    problems: list[str] = []

    def expect(cond: bool, message: str) -> None:
        if not cond:
            problems.append(message)

    def attempt(what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:
            problems.append(f"{what}: raised {type(exc).__name__}: {exc}")

    def happy() -> None:
        guard = guards["happy"]
        expect(guard(INPUT) == ANSWER, "happy: guard(x) did not return the model's answer")
        outcome = guard.call(INPUT)
        expect(outcome.value == ANSWER, "happy: .call(x).value is not the model's answer")
        expect(outcome.decision.served_by == "primary", "happy: .call() served_by != primary")
        expect(outcome.decision.degraded is False, "happy: .call() decision marked degraded")
        expect(guard.breaker.state == "closed", f"happy: breaker is {guard.breaker.state!r}")

    def degraded() -> None:
        guard = guards["degraded"]
        expect(guard(INPUT) == DEFAULT_ANSWER, "degraded: fallback answer not served")
        decision = guard.call(INPUT).decision
        expect(decision.served_by == "default", "degraded: served_by != 'default'")
        expect(decision.degraded is True, "degraded: decision not marked degraded")
        codes = [r.code for r in decision.reasons]
        expect("error" in codes, f"degraded: reasons {codes} lack 'error'")

    def timeout() -> None:
        expect(guards["timeout"](INPUT) == ANSWER, "timeout: guard(x) wrong answer")

    def async_timeout() -> None:
        guard = guards["async_timeout"]
        expect(asyncio.iscoroutinefunction(guard) or callable(guard), "async: not callable")
        expect(loop.run_until_complete(guard(INPUT)) == ANSWER, "async: wrong answer")

    attempt("happy", happy)
    attempt("degraded", degraded)
    attempt("timeout", timeout)
    attempt("async timeout", async_timeout)
    return problems


# --------------------------------------------------------------------------- report


def fmt_ns(ns: float) -> str:
    return f"{ns:,.0f}"


def fmt_us(ns: float) -> str:
    return f"{ns / 1000:.2f} us"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(rows: list[Row], base: Row, title: str) -> None:
    """One table; the overhead column is each row's median minus ``base``'s."""
    print(f"\n{title}")
    print(f"{'row':<58} {'ns/call':>9} {'min':>9} {'overhead':>10}")
    print("-" * 89)
    for row in rows:
        if row.error is not None or not row.samples:
            print(f"{row.label:<58} {'ERROR':>9}  {row.error}")
            continue
        over = "" if row is base else f"{row.median - base.median:+,.0f}"
        print(f"{row.label:<58} {fmt_ns(row.median):>9} {fmt_ns(row.best):>9} {over:>10}")


def target_lines(by_key: dict[str, Row]) -> list[tuple[str, str, str]]:
    """The SPEC's targets as (target, measured, PASS/FAIL) triples."""
    out: list[tuple[str, str, str]] = []

    def ok(*keys: str) -> bool:
        return all(k in by_key and by_key[k].samples for k in keys)

    def med(key: str) -> float:
        return by_key[key].median

    def missing(target: str, *keys: str) -> None:
        gone = [k for k in keys if not (k in by_key and by_key[k].samples)]
        out.append((target, f"not measured ({', '.join(gone)})", "FAIL"))

    bare = med("bare")
    target = "happy-path overhead < 2 us"
    if ok("ss_happy"):
        over = med("ss_happy") - bare
        out.append((target, fmt_us(over), verdict(over < 2000)))
    else:
        missing(target, "ss_happy")

    for peer, factor, name in (
        ("stack", 5.0, "tenacity+pybreaker"),
        ("pyr_happy", 1.5, "pyresilience"),
    ):
        target = f">= {factor:g}x lighter than {name} (total per call)"
        if ok("ss_happy", peer):
            ratio = med(peer) / med("ss_happy")
            over_ratio = (med(peer) - bare) / max(med("ss_happy") - bare, 1.0)
            out.append(
                (
                    target,
                    f"{ratio:.1f}x (overhead ratio {over_ratio:.1f}x)",
                    verdict(ratio >= factor),
                )
            )
        else:
            missing(target, "ss_happy", peer)

    for key, base, limit, target in (
        ("wide_checks", "wide", 3000, "baseline checks, 20 features < 3 us"),
        ("wide_profile", "wide_checks", 1000, "online profile on the call path < 1 us"),
    ):
        if ok(key, base):
            cost = med(key) - med(base)
            out.append((target, fmt_us(cost), verdict(cost < limit)))
        else:
            missing(target, key, base)

    target = "degraded call (fallback + record) < 20 us"
    if ok("ss_degraded"):
        total = med("ss_degraded")
        extra = ""
        if ok("pyr_degraded"):
            extra = f" (pyresilience fallback {fmt_us(med('pyr_degraded'))})"
        out.append((target, fmt_us(total) + extra, verdict(total < 20_000)))
    else:
        missing(target, "ss_degraded")

    target = "sync timeout overhead < 40 us"
    if ok("ss_timeout"):
        over = med("ss_timeout") - bare
        extra = ""
        if ok("pool", "floor"):
            extra = f" (pool {fmt_us(med('pool') - bare)}, floor {fmt_us(med('floor') - bare)})"
        out.append((target, fmt_us(over) + extra, verdict(over < 40_000)))
    else:
        missing(target, "ss_timeout")

    target = "async timeout within 2 us of asyncio.timeout"
    if ok("ss_async", "async_timeout"):
        diff = med("ss_async") - med("async_timeout")
        out.append((target, f"{diff / 1000:+.2f} us", verdict(diff <= 2000)))
    else:
        missing(target, "ss_async", "async_timeout")
    return out


# --------------------------------------------------------------------------- main


def build_rows(
    ss: Any,
    guards: dict[str, Any],
    loop: asyncio.AbstractEventLoop,
    pool: concurrent.futures.ThreadPoolExecutor,
    floor: HandoffFloor,
) -> tuple[list[Row], list[Row], list[Row], list[Row]]:
    """The rows of the four tables: happy path, degraded, sync timeout, async timeout."""
    flush: Callable[[], None] | None = None
    if ss is not None:

        def flush() -> None:
            ss.flush_logs()

    def guarded(key: str, label: str, guard_key: str, **kw: Any) -> Row:
        if guard_key in guards:
            return Row(key, label, sync_loop(guards[guard_key]), after_repeat=flush, **kw)
        return Row(key, label, sync_loop(model), error="safeserve not available")

    bare = Row("bare", "1  bare model(x)", sync_loop(model))
    happy = [
        bare,
        guarded("ss_happy", "2  safeserve guard, happy path (retry/conf/log 1%)", "happy"),
        Row(
            "stack",
            "3  tenacity.retry(stop_after_attempt(3)) + pybreaker",
            sync_loop(tenacity_pybreaker_stack()),
        ),
        Row("pybreaker", "3b pybreaker.CircuitBreaker() alone", sync_loop(pybreaker_alone())),
        Row(
            "circuitbreaker", "3c circuitbreaker.circuit() alone", sync_loop(circuitbreaker_alone())
        ),
        Row("pyr_happy", "4  pyresilience breaker+retry+fallback", sync_loop(pyresilience_happy())),
    ]
    for key, label in (
        ("wide", "4b safeserve guard, 20-feature input"),
        ("wide_checks", "4c  + baseline checks (range/category/null, 20 features)"),
        ("wide_profile", "4d  + online profile (values buffered, binned off the call)"),
    ):
        if key in guards:
            happy.append(Row(key, label, sync_loop(guards[key], WIDE_INPUT)))
        else:
            happy.append(Row(key, label, sync_loop(model), error="safeserve not available"))
    # A degraded repeat queues one record per call: keep N under the log queue (10,000) and
    # flush between repeats, so the timing never benefits from dropped records.
    degraded = [
        guarded(
            "ss_degraded",
            "5  safeserve degraded: raise -> static fallback -> record",
            "degraded",
            max_n=8000,
        ),
        guarded(
            "ss_degraded_ring",
            "5c same, no log= (record kept in the in-memory ring only)",
            "degraded_ring",
        ),
        Row(
            "pyr_degraded",
            "5d pyresilience breaker+fallback, raising function",
            sync_loop(pyresilience_degraded()),
        ),
    ]
    sync_timeout = [
        guarded("ss_timeout", "6  safeserve guard(timeout_s=1.0), sync", "timeout"),
        Row(
            "pool",
            "6b ThreadPoolExecutor(8).submit(model, x).result(1.0)",
            sync_loop(thread_pool_call(pool)),
        ),
        Row(
            "pyr_timeout",
            "6c pyresilience TimeoutConfig(1.0)+breaker",
            sync_loop(pyresilience_timeout()),
        ),
        Row("floor", "6d thread handoff floor (2 SimpleQueues, 1 thread)", sync_loop(floor)),
    ]
    async_rows = [
        Row("async_bare", "7  await amodel(x)", async_loop(loop, amodel)),
        Row(
            "async_timeout",
            "7b async with asyncio.timeout(1.0): await amodel(x)",
            async_loop(loop, asyncio_timeout_call),
        ),
        (
            Row(
                "ss_async",
                "7c safeserve async guard(timeout_s=1.0)",
                async_loop(loop, guards["async_timeout"]),
                after_repeat=flush,
            )
            if "async_timeout" in guards
            else Row(
                "ss_async",
                "7c safeserve async guard(timeout_s=1.0)",
                sync_loop(model),
                error="safeserve not available",
            )
        ),
        Row(
            "pyr_async",
            "7d pyresilience async TimeoutConfig(1.0)",
            async_loop(loop, pyresilience_async_timeout()),
        ),
    ]
    return happy, degraded, sync_timeout, async_rows


def make_guards(ss: Any, tmp: Path) -> tuple[dict[str, Any], list[str]]:
    guards: dict[str, Any] = {}
    problems: list[str] = []
    makers: dict[str, Callable[[], Any]] = {
        "happy": lambda: ss_happy(ss, tmp / "happy.jsonl"),
        "degraded": lambda: ss_degraded(ss, tmp / "degraded.jsonl"),
        "degraded_ring": lambda: ss_degraded_ring(ss),
        "wide": lambda: ss_wide(ss, False, False),
        "wide_checks": lambda: ss_wide(ss, True, False),
        "wide_profile": lambda: ss_wide(ss, True, True),
        "timeout": lambda: ss_timeout(ss),
        "async_timeout": lambda: ss_async_timeout(ss),
    }
    for key, make in makers.items():
        try:
            guards[key] = make()
        except Exception as exc:
            problems.append(f"building the {key} guard raised {type(exc).__name__}: {exc}")
    return guards, problems


def after_run_checks(ss: Any, guards: dict[str, Any], tmp: Path) -> list[str]:
    """After timing: records written, nothing dropped, breaker still closed."""
    problems: list[str] = []
    try:
        if not ss.flush_logs():
            problems.append("ss.flush_logs() returned False (queue not drained)")
    except Exception as exc:
        problems.append(f"ss.flush_logs() raised {type(exc).__name__}: {exc}")
    if "degraded" in guards:
        try:
            stats = guards["degraded"].stats()
            lines = count_lines(tmp / "degraded.jsonl")
            if stats.get("dropped_records", 0):
                problems.append(f"degraded guard dropped {stats['dropped_records']} records")
            if lines < stats["degraded"] - stats.get("dropped_records", 0):
                problems.append(
                    f"degraded guard: {stats['degraded']} degraded calls but {lines} log lines"
                )
            if guards["degraded"].breaker.state != "closed":
                problems.append(f"degraded guard's breaker is {guards['degraded'].breaker.state}")
        except Exception as exc:
            problems.append(f"degraded stats check raised {type(exc).__name__}: {exc}")
    if "happy" in guards:
        try:
            stats = guards["happy"].stats()
            lines = count_lines(tmp / "happy.jsonl")
            rate = lines / max(stats["calls"], 1)
            if stats.get("degraded", 0):
                problems.append(f"happy guard degraded {stats['degraded']} calls")
            if not 0.005 <= rate <= 0.02:
                problems.append(f"happy guard sampled {rate:.4f} of calls (sample_rate=0.01)")
        except Exception as exc:
            problems.append(f"happy stats check raised {type(exc).__name__}: {exc}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short run (a few seconds)")
    args = parser.parse_args(argv)
    settings = Settings(repeats=5, repeat_s=0.03) if args.quick else Settings(7, 0.35)

    started = time.perf_counter()
    ss, why = load_safeserve()
    loop = asyncio.new_event_loop()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    floor = HandoffFloor()
    problems: list[str] = [why] if why else []
    with tempfile.TemporaryDirectory(prefix="safeserve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        guards: dict[str, Any] = {}
        if ss is not None:
            guards, build_problems = make_guards(ss, tmp)
            problems += build_problems
            problems += check_guards(ss, guards, loop)
        tables = build_rows(ss, guards, loop, pool, floor)
        all_rows = [row for table in tables for row in table]
        measure(all_rows, settings)
        if ss is not None:
            problems += after_run_checks(ss, guards, tmp)
    pool.shutdown()
    floor.close()
    loop.close()

    version = getattr(ss, "__version__", "?") if ss is not None else "not importable"
    print(
        f"safeserve overhead bench: safeserve {version}, python {platform.python_version()},"
        f" {platform.machine()}; ns per call, median of {settings.repeats} repeats"
        f" (min beside it); overhead = row - bare sync call"
    )
    bare, async_bare = tables[0][0], tables[3][0]
    print_table(tables[0], bare, "Healthy call (overhead vs row 1)")
    print_table(tables[1], bare, "Degraded call (overhead vs row 1)")
    print_table(tables[2], bare, "Sync call with a timeout (overhead vs row 1)")
    print_table(tables[3], async_bare, "Async call, one event loop (overhead vs row 7)")

    by_key = {row.key: row for row in all_rows}
    print(f"\n{'target':<56} {'measured':<44} result")
    print("-" * 107)
    for target, measured, result in target_lines(by_key):
        print(f"{target:<56} {measured:<44} {result}")
    if problems:
        print("\nproblems found:")
        for problem in problems:
            print(f"  - {problem}")
    print(f"\ntotal bench time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

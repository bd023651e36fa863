"""Circuit-breaker costs: safeserve against pybreaker and circuitbreaker, in memory and in Redis.

Run ``python bench/breaker.py`` (under a minute and a half) or ``--quick`` (under 20 s). One
process times the per-call rows (loops of N calls, repeats measured round-robin, median
reported, overhead = row minus the bare call in the same run); child processes are used only
for the cross-process rows (a trip's propagation, and 4 replicas sharing one breaker). The Redis
rows run against a ``redis-server`` this script starts on a free loopback port and stops
(``tests/redis_server.py``). Issue 3 sets the targets printed at the end:

(a) happy-path breaker overhead at or below circuitbreaker's, >= 3x below pybreaker's. The
    targets are judged like for like: a guard doing what those two do (count outcomes, trip),
    i.e. with slow-call detection and the NaN/inf search of answers turned off
    (``BreakerConfig(slow_call_s=None)``, ``check_finite=False``). The default guard, which
    also times every call for slow-call detection and searches every answer for NaN, is
    printed beside it with its own ratios;
(b) 8 threads x 10 calls x 20 ms (GIL released) within 10 % of the bare threads' wall time;
(c) with the Redis store: overhead < 10 us per call, >= 25x below pybreaker's Redis storage;
(d) a trip in one process stops the primary calls of another within 100 ms;
(e) calls per second of 4 processes sharing one breaker (reported, no target).
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing as mp
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import circuitbreaker  # type: ignore[import-untyped]
import pybreaker
import redis

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):  # this working tree, and the redis-server helper
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from redis_server import RedisServer  # noqa: E402

import safeserve as ss  # noqa: E402

INPUT: dict[str, Any] = {"amount": 120.0, "country": "FR"}
ANSWER: dict[str, Any] = {"label": "approve", "confidence": 0.93}
STATIC: dict[str, Any] = {"label": "review"}
TRIP: dict[str, Any] = {"window_size": 10, "min_calls": 5, "failure_rate_threshold": 0.5}
THREADS, CALLS_PER_THREAD, SLEEP_S = 8, 10, 0.02
PROCESSES = 4


def model(x: Any) -> dict[str, Any]:
    """The trivial model every row wraps."""
    return {"label": "approve", "confidence": 0.93}


def sleepy_model(x: Any) -> dict[str, Any]:
    """A 20 ms call that releases the GIL, as a remote or native model does."""
    time.sleep(SLEEP_S)
    return {"label": "approve", "confidence": 0.93}


@dataclass
class Settings:
    quick: bool
    repeats: int  # per-call rows
    repeat_s: float
    thread_repeats: int  # (b)
    trips: int  # (d), per variant
    throughput_s: float  # (e)


QUICK = Settings(True, repeats=5, repeat_s=0.03, thread_repeats=3, trips=5, throughput_s=0.5)
FULL = Settings(False, repeats=7, repeat_s=0.25, thread_repeats=5, trips=12, throughput_s=1.0)


# --------------------------------------------------------------------------- builders


def safeserve_guard(fn: Callable[[Any], Any], name: str, **breaker: Any) -> Any:
    """A guard with only a breaker (plus a static fallback for the rows that trip it)."""
    fields: dict[str, Any] = {"name": name}
    if breaker:
        fields["breaker"] = ss.BreakerConfig(**breaker)
        fields["fallbacks"] = [ss.Fallback.static("static", dict(STATIC))]
    return ss.guard(**fields)(fn)


def pybreaker_redis(fn: Callable[[Any], Any], url: str, namespace: str) -> Callable[[Any], Any]:
    """pybreaker with its Redis storage, as its README shows."""
    client = redis.Redis.from_url(url)
    storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, client, namespace=namespace)
    return pybreaker.CircuitBreaker(state_storage=storage)(fn)  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def store_connected(guard: Any) -> bool:
    return bool(guard.stats().get("store", {}).get("connected"))


# --------------------------------------------------------------------------- per-call timing


@dataclass
class Row:
    """One timed row: ``run(n)`` makes n calls and returns the elapsed ns."""

    key: str
    label: str
    run: Callable[[int], int] | None
    max_n: int = 2_000_000
    n: int = 0
    samples: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def loop_of(fn: Callable[[Any], Any]) -> Callable[[int], int]:
    def run(n: int) -> int:
        calls = range(n)
        with gc_paused():
            start = time.perf_counter_ns()
            for _ in calls:
                fn(INPUT)
            return time.perf_counter_ns() - start

    return run


def row_of(key: str, label: str, build: Callable[[], Callable[[Any], Any]], **kw: Any) -> Row:
    """A row whose callable is built now; a failure to build is reported in the row."""
    try:
        fn = build()
        if fn(INPUT) != ANSWER:
            return Row(key, label, None, error=f"returned {fn(INPUT)!r}", **kw)
        return Row(key, label, loop_of(fn), **kw)
    except Exception as exc:
        return Row(key, label, None, error=f"{type(exc).__name__}: {exc}"[:100], **kw)


def measure(rows: list[Row], settings: Settings) -> None:
    """Calibrate each row to about ``repeat_s`` per repeat, then run the repeats round-robin."""
    live: list[Row] = []
    for row in rows:
        if row.run is None:
            continue
        try:
            n, elapsed = 20, 0
            while n < row.max_n:
                elapsed = row.run(n)
                if elapsed > 20_000_000:
                    break
                n = min(n * 4, row.max_n)
            row.n = max(20, min(row.max_n, int(settings.repeat_s * 1e9 * n / max(elapsed, 1))))
            live.append(row)
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"[:100]
    for _ in range(settings.repeats):
        for row in live:
            if row.error is None and row.run is not None:
                try:
                    row.samples.append(row.run(row.n) / row.n)
                except Exception as exc:
                    row.error = f"{type(exc).__name__}: {exc}"[:100]


# --------------------------------------------------------------------------- (b) threads


def threaded_wall_s(fn: Callable[[Any], Any]) -> float:
    """Wall time of THREADS threads each making CALLS_PER_THREAD calls, started together."""
    barrier = threading.Barrier(THREADS + 1)

    def worker() -> None:
        barrier.wait()
        for _ in range(CALLS_PER_THREAD):
            fn(INPUT)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


@dataclass
class WallRow:
    key: str
    label: str
    fn: Callable[[Any], Any] | None
    repeats: int
    samples: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def measure_threads(settings: Settings) -> list[WallRow]:
    def build(key: str, label: str, make: Callable[[], Any], repeats: int = 0) -> WallRow:
        try:
            return WallRow(key, label, make(), repeats or settings.thread_repeats)
        except Exception as exc:
            return WallRow(key, label, None, 0, error=f"{type(exc).__name__}: {exc}"[:100])

    rows = [
        build("bare", "bare threads", lambda: sleepy_model),
        build("ss", "safeserve guard", lambda: safeserve_guard(sleepy_model, "bench-threads")),
        # pybreaker holds its lock across the call: ~1.6 s a run, so fewer repeats
        build(
            "pybreaker",
            "pybreaker.CircuitBreaker()",
            lambda: pybreaker.CircuitBreaker()(sleepy_model),
            repeats=1 if settings.quick else 2,
        ),
        build("cb", "circuitbreaker.circuit()", lambda: circuitbreaker.circuit()(sleepy_model)),
    ]
    for i in range(settings.thread_repeats):
        for row in rows:
            if row.fn is not None and row.error is None and i < row.repeats:
                try:
                    row.samples.append(threaded_wall_s(row.fn))
                except Exception as exc:
                    row.error = f"{type(exc).__name__}: {exc}"[:100]
    return rows


# --------------------------------------------------------------------------- (d) propagation


def replica_b(url: str, conn: Connection) -> None:
    """Child process: for each policy name received, build replica B, then call it until a call
    no longer reaches the primary, and send back that moment (``time.monotonic``, which is
    system-wide on Linux, so comparable with the parent's)."""
    reached = [False]

    def predict(x: Any) -> dict[str, Any]:
        reached[0] = True
        return dict(ANSWER)

    while (name := conn.recv()) is not None:
        try:
            guard = safeserve_guard(predict, name, store=url, open_s=60.0, **TRIP)
            ready = wait_for(lambda g=guard: store_connected(g), 5.0)
            guard(INPUT)
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"[:100]))
            continue
        conn.send(("ready", ready))
        stopped_at: float | None = None
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            reached[0] = False
            guard(INPUT)
            if not reached[0]:
                stopped_at = time.monotonic()
                break
            time.sleep(0.0005)  # a replica serving ~2,000 requests/s
        conn.send(("stopped", stopped_at))


def failing_model(x: Any) -> dict[str, Any]:
    raise ConnectionError("model down")


def measure_propagation(url: str, settings: Settings) -> tuple[dict[str, list[float]], list[str]]:
    """Trip the shared breaker in this process (by ``open()``, then by failures); replica B in a
    child process reports when its calls stop reaching its primary."""
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=replica_b, args=(url, there), daemon=True)
    child.start()
    results: dict[str, list[float]] = {"open": [], "failures": []}
    problems: list[str] = []
    try:
        for trial in range(settings.trips * 2):
            variant = "open" if trial % 2 == 0 else "failures"
            name = f"bench-trip-{uuid.uuid4().hex[:8]}"
            a = safeserve_guard(failing_model, name, store=url, open_s=60.0, **TRIP)
            if not wait_for(lambda g=a: store_connected(g), 5.0):
                problems.append(f"(d) replica A never connected: {a.stats().get('store')}")
                break
            here.send(name)
            if not here.poll(30.0):
                problems.append("(d) replica B did not start")
                break
            status, detail = here.recv()
            if status != "ready" or not detail:
                problems.append(f"(d) replica B not ready: {status} {detail}")
                break
            time.sleep(random.uniform(0.02, 0.12))  # any phase of both sync timers
            if variant == "open":
                t0 = time.monotonic()
                a.open()
            else:
                for _ in range(TRIP["min_calls"]):
                    a(INPUT)
                t0 = time.monotonic()  # the failure that crossed the threshold is recorded
            if not here.poll(10.0):
                problems.append("(d) replica B did not answer")
                break
            _, stopped_at = here.recv()
            if stopped_at is None:
                problems.append(f"(d) {variant}: replica B still called its primary after 5 s")
                results[variant].append(float("inf"))
            else:
                results[variant].append(stopped_at - t0)
    finally:
        here.send(None)
        child.join(10.0)
        if child.is_alive():
            child.kill()
    return results, problems


# --------------------------------------------------------------------------- (e) throughput


def throughput_worker(job: tuple[str, str, str, float, float]) -> tuple[int, float, str]:
    """One of the PROCESSES replicas: build the variant, wait for the common start, call it
    until the common end; return (pid, calls per second, error)."""
    variant, url, name, start_at, duration = job
    try:
        if variant == "bare":
            fn: Callable[[Any], Any] = model
        elif variant == "ss_local":
            fn = safeserve_guard(model, name)
        elif variant == "ss_store":
            fn = safeserve_guard(model, name, store=url)
            if not wait_for(lambda: store_connected(fn), 5.0):
                return os.getpid(), 0.0, "safeserve store never connected"
        else:
            fn = pybreaker_redis(model, url, name)
        fn(INPUT)
    except Exception as exc:
        return os.getpid(), 0.0, f"{type(exc).__name__}: {exc}"[:100]
    time.sleep(max(0.0, start_at - time.time()))
    began, end, n = time.time(), start_at + duration, 0
    with gc_paused():
        while time.time() < end:
            for _ in range(50):
                fn(INPUT)
            n += 50
    return os.getpid(), n / max(time.time() - began, 1e-9), ""


def warm_worker(_: int) -> int:
    time.sleep(0.2)  # keep each warm-up task on its own worker
    return os.getpid()


def measure_throughput(url: str, settings: Settings) -> tuple[dict[str, float], list[str]]:
    variants = ["bare", "ss_local", "ss_store", "pybreaker_redis"]
    rates: dict[str, float] = {}
    problems: list[str] = []
    with mp.get_context("spawn").Pool(PROCESSES) as pool:
        pool.map(warm_worker, range(PROCESSES), chunksize=1)
        for variant in variants:
            name = f"bench-tput-{uuid.uuid4().hex[:8]}"
            start_at = time.time() + 0.6
            jobs = [(variant, url, name, start_at, settings.throughput_s)] * PROCESSES
            out = pool.map(throughput_worker, jobs, chunksize=1)
            errors = {err for _, _, err in out if err}
            if errors:
                problems.append(f"(e) {variant}: {'; '.join(sorted(errors))}")
                continue
            if len({pid for pid, _, _ in out}) != PROCESSES:
                problems.append(f"(e) {variant}: ran on fewer than {PROCESSES} processes")
            rates[variant] = sum(rate for _, rate, _ in out)
    return rates, problems


# --------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def us(ns: float) -> str:
    return f"{ns / 1000:.2f} us"


def print_call_rows(title: str, rows: list[Row]) -> None:
    bare = rows[0]
    print(f"\n{title}")
    print(f"{'row':<52} {'ns/call':>10} {'overhead':>12} {'x ss':>8}")
    print("-" * 85)
    ss_over = None
    for row in rows:
        if row.key.startswith("ss") and row.ok and bare.ok:
            ss_over = ss_over if ss_over is not None else row.median - bare.median
    for row in rows:
        if not row.ok:
            print(f"{row.label:<52} {'ERROR':>10}  {row.error}")
            continue
        over = row.median - bare.median if bare.ok else float("nan")
        ratio = ""
        if row is not bare and ss_over is not None and not row.key.startswith("ss"):
            ratio = f"{over / max(ss_over, 1.0):.1f}x"
        shown = "" if row is bare else f"{over:+,.0f} ns"
        print(f"{row.label:<52} {row.median:>10,.0f} {shown:>12} {ratio:>8}")


def redis_version() -> str:
    try:
        out = subprocess.run(
            [RedisServer().binary, "--version"], capture_output=True, text=True, check=False
        )
        return out.stdout.split()[2].removeprefix("v=")
    except Exception:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short run (under 20 s)")
    settings = QUICK if parser.parse_args(argv).quick else FULL
    started = time.perf_counter()
    problems: list[str] = []
    targets: list[tuple[str, str, bool]] = []

    # (a) happy path, in memory
    local_rows = [
        row_of("bare", "bare model(x)", lambda: model),
        row_of(
            "ss",
            "safeserve, breaker only (like for like)",
            lambda: ss.guard(
                name="b", check_finite=False, breaker=ss.BreakerConfig(slow_call_s=None)
            )(model),
        ),
        row_of(
            "ss_default",
            "safeserve ss.guard(name=...): + slow calls, NaN check",
            lambda: ss.guard(name="b-default")(model),
        ),
        row_of(
            "pybreaker", "pybreaker.CircuitBreaker()", lambda: pybreaker.CircuitBreaker()(model)
        ),
        row_of("cb", "circuitbreaker.circuit()", lambda: circuitbreaker.circuit()(model)),
    ]
    measure(local_rows, settings)

    # (b) threads
    wall_rows = measure_threads(settings)

    with RedisServer() as server:
        url = server.url
        # (c) happy path through Redis
        ss_store: dict[str, Any] = {}

        def build_store_guard() -> Any:
            guard = safeserve_guard(model, "bench-store", store=url)
            if not wait_for(lambda: store_connected(guard), 5.0):
                raise RuntimeError(f"store never connected: {guard.stats().get('store')}")
            ss_store["guard"] = guard
            return guard

        redis_rows = [
            row_of("bare", "bare model(x)", lambda: model),
            row_of("ss_store", "safeserve BreakerConfig(store=redis://...)", build_store_guard),
            row_of(
                "ss_local",
                "safeserve, in-memory breaker (reference)",
                lambda: ss.guard(name="c")(model),
            ),
            row_of(
                "pybreaker_redis",
                "pybreaker + CircuitRedisStorage",
                lambda: pybreaker_redis(model, url, "bench-pybreaker"),
                max_n=200_000,
            ),
        ]
        measure(redis_rows, settings)
        if "guard" in ss_store:
            guard = ss_store["guard"]
            client = redis.Redis.from_url(url, socket_timeout=1.0)
            if not client.exists("safeserve:bench-store:state"):
                problems.append("(c) no safeserve:bench-store:state key: is the store in use?")
            client.close()
            stats = guard.stats()
            if guard.breaker.state != "closed" or stats.get("degraded"):
                problems.append(f"(c) store guard degraded: {guard.breaker.state}, {stats}")

        # (d) and (e): child processes
        try:
            trips, trip_problems = measure_propagation(url, settings)
        except Exception as exc:
            trips, trip_problems = {}, [f"(d) raised {type(exc).__name__}: {exc}"]
        problems += trip_problems
        try:
            rates, rate_problems = measure_throughput(url, settings)
        except Exception as exc:
            rates, rate_problems = {}, [f"(e) raised {type(exc).__name__}: {exc}"]
        problems += rate_problems
        # The guards built above outlive the server; their reconnect warnings are noise now.
        logging.getLogger("safeserve.store").setLevel(logging.ERROR)

    # ---- report
    print(
        f"safeserve breaker bench{' (--quick)' if settings.quick else ''}: safeserve"
        f" {getattr(ss, '__version__', '?')}, python {platform.python_version()},"
        f" redis-server {redis_version()}, {os.cpu_count()} CPUs; per-call rows: median of"
        f" {settings.repeats} repeats, overhead = row - bare call, 'x ss' = overhead / safeserve's"
    )
    print_call_rows("(a) happy path, in-memory breaker", local_rows)
    by = {row.key: row for row in local_rows}
    if all(by[k].ok for k in ("bare", "ss", "pybreaker", "cb")):
        bare = by["bare"].median
        ss_o, pb_o, cb_o = (by[k].median - bare for k in ("ss", "pybreaker", "cb"))
        targets.append(
            ("(a) overhead <= circuitbreaker's", f"{us(ss_o)} vs {us(cb_o)}", ss_o <= cb_o)
        )
        targets.append(
            (
                "(a) overhead >= 3x below pybreaker's",
                f"{pb_o / max(ss_o, 1.0):.1f}x ({us(pb_o)})",
                pb_o >= 3 * ss_o,
            )
        )
    else:
        targets.append(("(a) in-memory overhead", "not measured", False))
    if all(by[k].ok for k in ("bare", "ss_default", "pybreaker", "cb")):
        bare = by["bare"].median
        d_o, pb_o, cb_o = (by[k].median - bare for k in ("ss_default", "pybreaker", "cb"))
        targets.append(
            (
                "(a) default guard (no target)",
                f"{us(d_o)}: circuitbreaker {cb_o / max(d_o, 1.0):.2f}x,"
                f" pybreaker {pb_o / max(d_o, 1.0):.1f}x",
                True,
            )
        )

    print(
        f"\n(b) {THREADS} threads x {CALLS_PER_THREAD} calls x {SLEEP_S * 1000:.0f} ms"
        " (time.sleep) through one breaker; wall time, median"
    )
    print(f"{'row':<52} {'wall ms':>10} {'vs bare':>12} {'repeats':>8}")
    print("-" * 85)
    walls = {row.key: row for row in wall_rows}
    for row in wall_rows:
        if not row.ok:
            print(f"{row.label:<52} {'ERROR':>10}  {row.error}")
            continue
        vs = f"{row.median / walls['bare'].median:.2f}x" if walls["bare"].ok else ""
        print(f"{row.label:<52} {row.median * 1000:>10.1f} {vs:>12} {len(row.samples):>8}")
    if walls["bare"].ok and walls["ss"].ok:
        ratio = walls["ss"].median / walls["bare"].median
        peers = ", ".join(
            f"{walls[k].label.split('.')[0]} {walls[k].median / walls['bare'].median:.2f}x"
            for k in ("pybreaker", "cb")
            if walls[k].ok
        )
        targets.append(
            ("(b) 8 threads within 10 % of bare", f"{ratio:.3f}x ({peers})", ratio <= 1.10)
        )
    else:
        targets.append(("(b) 8 threads within 10 % of bare", "not measured", False))

    print_call_rows("(c) happy path, breaker state in Redis (loopback)", redis_rows)
    rby = {row.key: row for row in redis_rows}
    if all(rby[k].ok for k in ("bare", "ss_store", "pybreaker_redis")):
        bare = rby["bare"].median
        ss_o = rby["ss_store"].median - bare
        pb_o = rby["pybreaker_redis"].median - bare
        targets.append(("(c) Redis store overhead < 10 us", us(ss_o), ss_o < 10_000))
        targets.append(
            (
                "(c) >= 25x below pybreaker's Redis storage",
                f"{pb_o / max(ss_o, 1.0):.0f}x ({us(pb_o)})",
                pb_o >= 25 * ss_o,
            )
        )
    else:
        targets.append(("(c) Redis store overhead", "not measured", False))

    print("\n(d) trip in process A -> process B's calls stop reaching its primary (ms)")
    print(f"{'trip by':<52} {'median':>10} {'max':>12} {'trials':>8}")
    print("-" * 85)
    for variant, label in (("open", "A: predict.open()"), ("failures", "A: 5 failing calls")):
        got = trips.get(variant, [])
        if not got:
            print(f"{label:<52} {'ERROR':>10}")
            targets.append((f"(d) {label} -> B stops <= 100 ms", "not measured", False))
            continue
        med, worst = statistics.median(got) * 1000, max(got) * 1000
        print(f"{label:<52} {med:>10.1f} {worst:>12.1f} {len(got):>8}")
        targets.append((f"(d) {label} -> B stops <= 100 ms", f"max {worst:.1f} ms", worst <= 100.0))

    print(f"\n(e) {PROCESSES} processes sharing one breaker, {settings.throughput_s:g} s each")
    print(f"{'row':<52} {'calls/s':>10} {'per proc':>12} {'vs ss':>8}")
    print("-" * 85)
    labels = {
        "bare": "bare model(x)",
        "ss_local": "safeserve, in-memory breaker per process",
        "ss_store": "safeserve, one breaker in Redis",
        "pybreaker_redis": "pybreaker + CircuitRedisStorage, one breaker",
    }
    for key, label in labels.items():
        if key not in rates:
            print(f"{label:<52} {'ERROR':>10}")
            continue
        vs = f"{rates[key] / rates['ss_store']:.3g}x" if rates.get("ss_store") else ""
        print(f"{label:<52} {rates[key]:>10,.0f} {rates[key] / PROCESSES:>12,.0f} {vs:>8}")
    targets.append(
        (
            f"(e) {PROCESSES} processes share one breaker (no target)",
            f"{rates['ss_store']:,.0f} calls/s" if "ss_store" in rates else "not measured",
            "ss_store" in rates,
        )
    )

    print(f"\n{'target':<48} {'measured':<50} result")
    print("-" * 106)
    for target, measured, ok in targets:
        print(f"{target:<48} {measured:<50} {verdict(ok)}")
    if problems:
        print("\nproblems found:")
        for problem in problems:
            print(f"  - {problem}")
    print(f"\ntotal bench time {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Concurrency: exact counts and exactly one log record per degraded call under load."""

import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import safeserve as ss

THREADS = 16
CALLS_PER_THREAD = 1000
TASKS = 1000


class Row(BaseModel):
    """One numbered input row."""

    i: int
    v: float


def make_input(i: int) -> dict:
    """Deterministic mix: i % 8 == 0 raises in the primary, i % 8 == 1 is invalid, else healthy."""
    if i % 8 == 1:
        return {"i": i, "v": "not-a-number"}
    return {"i": i, "v": float(i)}


def expected_counts(numbers: range) -> dict[str, Any]:
    errors = {i for i in numbers if i % 8 == 0}
    invalid = {i for i in numbers if i % 8 == 1}
    return {
        "errors": errors,
        "invalid": invalid,
        "degraded": errors | invalid,
        "healthy": len(numbers) - len(errors) - len(invalid),
    }


def sync_predict(x: dict) -> dict:
    if x["i"] % 8 == 0:
        raise ValueError("planned failure")
    return {"y": x["v"] * 2}


async def async_predict(x: dict) -> dict:
    await asyncio.sleep(0)
    if x["i"] % 8 == 0:
        raise ValueError("planned failure")
    return {"y": x["v"] * 2}


def make_guard(fn: Any, log_path: Path) -> Any:
    return ss.guard(
        name="load",
        validation=ss.ValidationConfig(schema=Row),
        fallbacks=[ss.Fallback.static("static", {"y": -1.0})],
        log=ss.DecisionLogConfig(sink=str(log_path)),
    )(fn)


def nonzero(counts: dict) -> dict:
    return {k: v for k, v in counts.items() if v}


def check(guard: Any, log_path: Path, numbers: range, answers: dict[int, Any]) -> None:
    """Stats, answers and the log must match the deterministic mix exactly."""
    exp = expected_counts(numbers)
    n_err, n_inv = len(exp["errors"]), len(exp["invalid"])
    for i in numbers:
        want = {"y": -1.0} if i in exp["degraded"] else {"y": float(i) * 2}
        assert answers[i] == want, i

    stats = guard.stats()
    assert stats["calls"] == len(numbers)
    assert nonzero(stats["served_by"]) == {"primary": exp["healthy"], "static": n_err + n_inv}
    assert nonzero(stats["reasons"]) == {"error": n_err, "invalid_input": n_inv}
    assert stats["degraded"] == n_err + n_inv
    assert stats["failed"] == 0
    assert stats["dropped_records"] == 0

    assert ss.flush_logs() is True
    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    decisions = [r for r in records if r["kind"] == "decision"]
    assert {r["kind"] for r in records} <= {"decision", "breaker", "profile"}
    assert not [r for r in records if r["kind"] == "breaker"]
    assert len(decisions) == n_err + n_inv
    assert len({r["id"] for r in decisions}) == len(decisions)
    assert sorted(r["inputs"]["i"] for r in decisions) == sorted(exp["degraded"])
    by_reason = {r["inputs"]["i"]: [reason["code"] for reason in r["reasons"]] for r in decisions}
    assert all(by_reason[i] == ["error"] for i in exp["errors"])
    assert all(by_reason[i] == ["invalid_input"] for i in exp["invalid"])


def test_threads_through_one_guard_count_and_log_exactly(tmp_path: Path) -> None:
    """16 threads x 1000 calls: stats() and the log's decision lines are exact."""
    log_path = tmp_path / "threads.jsonl"
    guard = make_guard(sync_predict, log_path)
    answers: dict[int, Any] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def worker(t: int) -> None:
        barrier.wait()
        local: dict[int, Any] = {}
        try:
            for j in range(CALLS_PER_THREAD):
                i = t * CALLS_PER_THREAD + j
                local[i] = guard(make_input(i))
        except BaseException as exc:
            errors.append(exc)
        answers.update(local)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    check(guard, log_path, range(THREADS * CALLS_PER_THREAD), answers)


def test_async_tasks_through_one_guard_count_and_log_exactly(tmp_path: Path) -> None:
    """1000 concurrent asyncio tasks: stats() and the log's decision lines are exact."""
    log_path = tmp_path / "tasks.jsonl"
    guard = make_guard(async_predict, log_path)

    async def main() -> list[Any]:
        return await asyncio.gather(*(guard(make_input(i)) for i in range(TASKS)))

    results = asyncio.run(main())
    check(guard, log_path, range(TASKS), dict(enumerate(results)))


def test_a_histogram_folding_in_bulk_loses_no_value_added_meanwhile() -> None:
    """A route folds its appended latencies into the histogram while another thread `add`s to
    it (a guarded function called from a sync endpoint): every value stays in count and sum.
    Threads switch as often as the interpreter lets them, so a fold that another thread's add
    could slip into (between reading the sum and writing it back) loses some here."""
    from safeserve.histograms import LATENCY_BUCKETS, Histogram

    hist = Histogram(LATENCY_BUCKETS)
    adds, folds, batch = 20_000, 2_000, [0.25] * 8  # sums exact in binary

    def add_all() -> None:
        for _ in range(adds):
            hist.add(0.5)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        adder = threading.Thread(target=add_all)
        adder.start()
        for _ in range(folds):
            hist.pending.extend(batch)
            hist.fold()
        adder.join()
    finally:
        sys.setswitchinterval(interval)
    assert sum(hist.counts) == adds + folds * len(batch)
    assert hist.total == adds * 0.5 + folds * sum(batch)


def test_a_histogram_read_during_another_threads_fold_waits_for_it() -> None:
    """A scrape that comes while the route's thread folds its latencies in (they have left
    `pending`, and are not yet in the buckets) sees them all, not a count short of them."""
    from safeserve.histograms import LATENCY_BUCKETS, Histogram

    hist = Histogram(LATENCY_BUCKETS)
    values = [(i * 7919 % 10_007) / 1000 for i in range(300_000)]  # unsorted: a slow fold
    hist.pending.extend(values)
    folder = threading.Thread(target=hist.fold)
    folder.start()
    while hist.pending:  # until the fold has taken them
        pass
    seen = sum(hist.counts)
    folder.join()
    assert seen == len(values)


def test_a_histogram_read_from_inside_a_fold_does_not_hang() -> None:
    """Code that runs while a thread folds and reads the histogram on that thread (a signal
    handler, a finalizer; here the sort's comparison) gets an answer instead of waiting for
    itself."""
    from safeserve.histograms import LATENCY_BUCKETS, Histogram

    hist = Histogram(LATENCY_BUCKETS)
    seen: list[int] = []

    class Reading(float):
        def __lt__(self, other: object) -> bool:
            if not seen:
                seen.append(sum(hist.counts))
            return float(self) < float(other)  # type: ignore[arg-type]

    hist.pending.extend([Reading(0.5), Reading(0.002)])
    folder = threading.Thread(target=hist.fold, daemon=True)
    folder.start()
    folder.join(timeout=10)
    assert not folder.is_alive()
    assert (seen, sum(hist.counts)) == ([0], 2)

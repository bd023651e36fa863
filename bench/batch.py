"""Batch guards: vectorized validation and the cost of `predict.batch` over the bare model call.

Run ``python bench/batch.py`` (about half a minute; ``--quick`` for a few seconds). One process:

1. validation of 1M rows x 20 numeric features against a baseline (range and null checks), with
   numpy over blocks of rows, against guarding the same rows one call at a time (measured on
   10k rows and scaled) — target < 0.4 s and >= 100x;
2. the same rows against a pydantic input schema of 20 bounded float fields, tested a column at
   a time, against the same guard's schema validation one call at a time — target >= 100x;
3. `predict.batch(X)` of a `batch=True` guard (output and confidence checks on, no baseline)
   against calling the model on the same 100k-row array directly — target < 5 % overhead.

Each figure is the median of several repeats (min beside it), measured round-robin.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import Field, create_model

import safeserve as ss
from safeserve.batch_rows import Rows, failing_rows
from safeserve.batch_schema import column_rules, suspect_rows
from safeserve.validation import BaselineChecks

FEATURES = 20
RNG = np.random.default_rng(11)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """(median, min) seconds of `fn` over `repeats` runs."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def round_robin(rows: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Each row once per repeat, in turn, so CPU drift hits every row alike."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def validation(n_rows: int, n_single: int, repeats: int) -> None:
    names = [f"x{j}" for j in range(FEATURES)]
    train = RNG.uniform(0.0, 1.0, (10_000, FEATURES))
    baseline = ss.Baseline.from_data(train, feature_names=names)
    x = RNG.uniform(0.05, 0.95, (n_rows, FEATURES))
    x[::1000, 3] = 7.0  # a row in a thousand out of range
    checks = BaselineChecks(baseline, 0.0, frozenset())
    rows = Rows(x, names)

    def vectorized() -> None:
        failing_rows(checks, rows)

    med, best = timed(vectorized, repeats)
    values_per_s = n_rows * FEATURES / med

    guard_fields: dict[str, Any] = {
        "validation": ss.ValidationConfig(baseline=baseline, profile=False),
        "fallbacks": [ss.Fallback.static("default", 0.0)],
    }
    whole = ss.guard(name="bench-batch-whole", batch=True, **guard_fields)(
        lambda batch: batch[:, 0]
    )
    whole_med, _ = timed(lambda: whole.batch(x, feature_names=names), max(3, repeats // 2))

    single = ss.guard(name="bench-batch-single", **guard_fields)(lambda row: row["x0"])
    dict_rows = [dict(zip(names, r, strict=True)) for r in x[:n_single].tolist()]

    def row_by_row() -> None:
        for row in dict_rows:
            single(row)

    single_med, _ = timed(row_by_row, max(1, repeats // 2))
    single_scaled = single_med * n_rows / n_single
    print(f"validation, {n_rows:,} rows x {FEATURES} numeric features")
    print(
        f"  vectorized checks      {med * 1000:8.1f} ms (min {best * 1000:.1f})"
        f"  = {values_per_s / 1e6:.0f} M values/s   target < 400 ms, >= 50 M/s"
    )
    print(f"  whole predict.batch    {whole_med * 1000:8.1f} ms (trivial model, fallbacks)")
    print(
        f"  guard row by row       {single_scaled * 1000:8.1f} ms (measured on {n_single:,} rows,"
        " scaled)"
    )
    print(f"  ratio row-by-row / vectorized checks  {single_scaled / med:8.0f}x   target >= 100x")
    print(f"  ratio row-by-row / whole batch        {single_scaled / whole_med:8.0f}x")


def schema_validation(n_rows: int, n_single: int, repeats: int) -> None:
    names = [f"x{j}" for j in range(FEATURES)]
    fields: dict[str, Any] = {n: (float, Field(ge=0.0, le=1.0)) for n in names}
    schema = create_model("Features", **fields)
    x = RNG.uniform(0.05, 0.95, (n_rows, FEATURES))
    x[::1000, 3] = 7.0
    rules = column_rules(schema)
    assert rules is not None
    rows = Rows(x, names)
    med, best = timed(lambda: suspect_rows(rules, rows), repeats)
    single = ss.guard(
        name="bench-batch-schema-single",
        validation=ss.ValidationConfig(schema=schema),
        fallbacks=[ss.Fallback.static("default", 0.0)],
    )(lambda row: row["x0"])
    dict_rows = [dict(zip(names, r, strict=True)) for r in x[:n_single].tolist()]

    def row_by_row() -> None:
        for row in dict_rows:
            single(row)

    single_med, _ = timed(row_by_row, max(1, repeats // 2))
    single_scaled = single_med * n_rows / n_single
    print(f"schema validation, {n_rows:,} rows x {FEATURES} bounded float fields (pydantic)")
    print(f"  column tests           {med * 1000:8.1f} ms (min {best * 1000:.1f})")
    print(
        f"  guard row by row       {single_scaled * 1000:8.1f} ms (measured on {n_single:,} rows,"
        " scaled)"
    )
    print(f"  ratio row-by-row / column tests      {single_scaled / med:8.0f}x   target >= 100x")


def overhead(n_rows: int, repeats: int) -> None:
    w1 = RNG.normal(0.0, 0.3, (FEATURES, 64))
    w2 = RNG.normal(0.0, 0.3, (64, 2))

    def model(batch: np.ndarray) -> np.ndarray:
        hidden = np.maximum(batch @ w1, 0.0)
        logits = hidden @ w2
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    names = [f"x{j}" for j in range(FEATURES)]
    x = RNG.uniform(0.0, 1.0, (n_rows, FEATURES))
    predict = ss.guard(
        name="bench-batch-overhead",
        batch=True,
        confidence=ss.ConfidenceConfig(threshold=0.0),
        fallbacks=[ss.Fallback.static("default", [0.5, 0.5])],
    )(model)
    times = round_robin(
        {
            "bare": lambda: model(x).tolist(),
            "bare_array": lambda: model(x),
            "guarded": lambda: predict.batch(x, feature_names=names),
        },
        repeats,
    )
    bare = statistics.median(times["bare_array"])
    bare_list = statistics.median(times["bare"])
    guarded = statistics.median(times["guarded"])
    print(f"predict.batch overhead, {n_rows:,} rows x {FEATURES} features, MLP 20-64-2")
    print(f"  model(X)               {bare * 1000:8.2f} ms")
    print(f"  model(X).tolist()      {bare_list * 1000:8.2f} ms")
    print(f"  predict.batch(X)       {guarded * 1000:8.2f} ms")
    print(f"  overhead vs model(X)          {100 * (guarded / bare - 1):6.1f} %   target < 5 %")
    print(f"  overhead vs model(X).tolist() {100 * (guarded / bare_list - 1):6.1f} %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a few seconds)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 9
    print(f"safeserve {ss.__version__}, numpy {np.__version__}, Python {platform.python_version()}")
    with ss.testing():
        validation(1_000_000, 10_000, repeats)
        schema_validation(1_000_000, 10_000, repeats)
        overhead(100_000, repeats * 3)


if __name__ == "__main__":
    main()

"""Baseline building and profiling: safeserve against whylogs, on 20 numeric features.

Run ``python bench/baseline.py`` (1 M rows, about a minute with whylogs) or ``--quick``
(100 k rows, a few seconds). Timed in one process, median of the repeats:

- building a baseline from the in-memory columns, and from a CSV file end to end (read included);
- profiling the rows into the baseline's fixed bins (``FeatureBaseline.bin_counts`` per feature,
  as the online profiles and the skew report do);
- whylogs ``why.log(DataFrame)`` on the same rows, when whylogs is installed (with its usage
  telemetry switched off); otherwise the figure measured for issue 6 is printed as reference.

Targets from issue 6: baseline on 1 M rows < 2 s; profiling 1 M rows < 1 s (>= 18x whylogs).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from safeserve.baseline import Baseline  # noqa: E402

FEATURES = 20
WHYLOGS_REFERENCE_S = {100_000: 1.9, 1_000_000: 18.2}  # issue 6, whylogs 1.6.4 on this machine


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `repeats` calls, in seconds."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def whylogs_profile_s(data: np.ndarray, names: list[str]) -> float | None:
    """Seconds whylogs needs to profile the rows, or None when it is not installed."""
    os.environ.setdefault("WHYLOGS_NO_ANALYTICS", "True")  # no usage telemetry over the network
    try:
        import pandas as pd
        import whylogs as why
    except ImportError:
        return None
    frame = pd.DataFrame(data, columns=names)
    why.log(frame.head(1000))  # warm-up: imports and first-call setup
    return timed(lambda: why.log(frame), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 k rows instead of 1 M")
    args = parser.parse_args()
    rows = 100_000 if args.quick else 1_000_000
    repeats = 3
    rng = np.random.default_rng(6)
    names = [f"f{i}" for i in range(FEATURES)]
    scales = rng.uniform(1.0, 100.0, FEATURES)
    data = rng.normal(size=(rows, FEATURES)) * scales
    data[rng.random(data.shape) < 0.01] = np.nan  # 1 % nulls
    serving = rng.normal(0.2, 1.1, size=(rows, FEATURES)) * scales  # drifted traffic

    print(f"baseline bench: {rows:,} rows x {FEATURES} numeric features, median of {repeats}")
    build_s = timed(lambda: Baseline.from_data(data, feature_names=names), repeats)
    baseline = Baseline.from_data(data, feature_names=names)
    features = list(baseline.features.values())

    csv_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, values in (("no empty cells", np.nan_to_num(data)), ("1 % empty cells", data)):
            path = Path(tmp) / "train.csv"
            text = np.where(np.isnan(values), "", values.astype(str))
            path.write_text(
                ",".join(names) + "\n" + "\n".join(",".join(r) for r in text.tolist()) + "\n"
            )
            csv_s[label] = timed(functools.partial(Baseline.from_data, path), repeats)
            expected = Baseline.from_data(values, feature_names=names)
            assert Baseline.from_data(path) == expected, "CSV and array baselines differ"
            csv_s[label + f" ({path.stat().st_size / 1e6:.0f} MB)"] = csv_s.pop(label)

    def profile() -> None:
        for j, f in enumerate(features):
            f.bin_counts(serving[:, j])

    profile_s = timed(profile, repeats)
    why_s = whylogs_profile_s(serving, names)
    reference = why_s is None
    if why_s is None:
        why_s = WHYLOGS_REFERENCE_S[rows]

    scale = 1_000_000 / rows
    print(f"  build baseline from arrays      {build_s:8.3f} s")
    for label, seconds in csv_s.items():
        print(f"  build baseline from CSV         {seconds:8.3f} s   (read included, {label})")
    print(f"  profile into baseline bins      {profile_s:8.3f} s")
    source = "issue 6 reference, whylogs not installed" if reference else "measured here"
    print(f"  whylogs why.log                 {why_s:8.3f} s   ({source})")
    print(f"  ratio whylogs / safeserve profile: {why_s / profile_s:6.1f}x")
    print(f"  ratio whylogs / safeserve build (arrays): {why_s / build_s:6.1f}x")
    for label, seconds in csv_s.items():
        print(f"  ratio whylogs / safeserve build (CSV, {label}): {why_s / seconds:6.1f}x")
    print("targets (per 1 M rows; --quick scales its figures up linearly):")
    checks = [
        ("baseline build < 2 s (arrays)", build_s * scale < 2.0),
        *((f"baseline build < 2 s (CSV, {label})", s * scale < 2.0) for label, s in csv_s.items()),
        ("profiling < 1 s", profile_s * scale < 1.0),
        ("profiling >= 18x faster than whylogs", why_s / profile_s >= 18.0),
    ]
    for label, ok in checks:
        print(f"  [{'ok' if ok else 'MISSED'}] {label}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())

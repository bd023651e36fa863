"""The skew report at scale: `safeserve skew` on a 1 M-line decision log, drift statistics
against numpy / scipy loops and Evidently, and the report from profiles.

Run ``python bench/skew.py`` (1 M rows; ``--rows N`` for fewer). 20 numeric N(0, 1) features,
a 100 k-row baseline, serving data with 3 features shifted by 0.5 sd. Measured:

- end to end: a subprocess running `safeserve skew LOG --baseline B --json OUT` on a decision
  log with inputs (peak RSS: the child's VmHWM);
- drift statistics on the rows in memory: safeserve (bin counts + every statistic) against a
  numpy PSI loop, a scipy `ks_2samp` loop and Evidently's DataDriftPreset, with the features
  each flags. Evidently needs pandas < 3, so it runs in its own interpreter:
  ``python -m venv /tmp/ev && /tmp/ev/bin/pip install evidently "pandas<3"`` then
  ``--evidently-python /tmp/ev/bin/python``; without it issue 7's figure is printed;
- the same report from profile records (1000 records covering every call).

Targets (issue 7): end to end < 10 s and < 2 GB; statistics >= 10x faster than Evidently with
the same features flagged; < 1 s from profiles.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from safeserve.baseline import Baseline  # noqa: E402
from safeserve.skew import analyze  # noqa: E402
from safeserve.skew_stats import ExactSide, Thresholds, evaluate_feature  # noqa: E402

FEATURES = 20
SHIFTED = (3, 8, 15)
EVIDENTLY_REFERENCE_S = {100_000: 9.98, 1_000_000: 49.9}  # issue 7, on this machine
EVIDENTLY_REFERENCE_GB = 1.18
NAMES = [f"f{i:02d}" for i in range(FEATURES)]
# runs the skew command whether or not `safeserve.cli` has it wired in yet
RUNNER = textwrap.dedent(
    """
    import argparse, sys
    from safeserve.skew_cli import add_skew_parser
    parser = argparse.ArgumentParser(prog="safeserve")
    add_skew_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(sys.argv[1:])
    code = args.handler(args)
    # peak RSS of this process image (VmHWM): getrusage of a child would also count the
    # parent's pages it was forked with
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print("peak_rss_kb", hwm, file=sys.stderr)
    sys.exit(code)
    """
)


def data(rows: int, seed: int, shifted: bool) -> np.ndarray:
    """rows x 20 normal values, the SHIFTED columns moved by 0.5 sd when `shifted`."""
    x = np.random.default_rng(seed).normal(0.0, 1.0, (rows, FEATURES))
    if shifted:
        x[:, list(SHIFTED)] += 0.5
    return x


def write_decisions(path: Path, x: np.ndarray) -> None:
    """A decision log with inputs, one line per row (5% degraded), written with orjson."""
    import orjson

    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    degraded = np.random.default_rng(3).random(len(x)) < 0.05
    with path.open("wb") as f:
        for start in range(0, len(x), 100_000):
            block = x[start : start + 100_000].round(6).tolist()
            lines = []
            for i, row in enumerate(block, start):
                bad = bool(degraded[i])
                lines.append(
                    orjson.dumps(
                        {
                            "kind": "decision",
                            "schema_version": 1,
                            "id": f"{i:032x}",
                            "ts": (t0 + timedelta(milliseconds=i)).isoformat(),
                            "policy": "bench",
                            "owner": "ml",
                            "model_version": "v1",
                            "served_by": "rules" if bad else "primary",
                            "degraded": bad,
                            "flagged": False,
                            "reasons": [{"code": "timeout", "stage": "call", "detail": None}]
                            if bad
                            else [],
                            "attempts": [
                                {"name": "primary", "ok": not bad, "latency_ms": 1.2, "error": None}
                            ],
                            "confidence": 0.9,
                            "breaker_state": "closed",
                            "latency_ms": 1.3,
                            "row": None,
                            "batch_id": None,
                            "inputs": dict(zip(NAMES, row, strict=True)),
                        }
                    )
                )
            f.write(b"\n".join(lines) + b"\n")


def write_profiles(path: Path, baseline: Baseline, x: np.ndarray, records: int) -> None:
    """`records` profile records (as from many replicas) covering every row."""
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    with path.open("w") as f:
        for k, part in enumerate(np.array_split(x, records)):
            features = {}
            for j, name in enumerate(NAMES):
                counts, nulls, out = baseline.features[name].bin_counts(part[:, j])
                features[name] = {"counts": counts.tolist(), "nulls": nulls, "out_of_range": out}
            start, end = t0 + timedelta(seconds=k), t0 + timedelta(seconds=k + 1)
            record = {"kind": "profile", "schema_version": 1, "id": str(k), "ts": end.isoformat()}
            record |= {"policy": "bench", "owner": "ml", "start": start.isoformat()}
            record |= {"end": end.isoformat(), "n": len(part), "features": features}
            f.write(json.dumps(record) + "\n")


def run_cli(log: Path, baseline: Path, out: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS in GB, exit code) of the skew command in a child process."""
    argv = [sys.executable, "-c", RUNNER, "skew", str(log), "--baseline", str(baseline)]
    start = time.perf_counter()
    done = subprocess.run(
        [*argv, "--json", str(out), "-q"], check=False, cwd=ROOT, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    peak_kb = int(done.stderr.split("peak_rss_kb")[-1].split()[0])
    return seconds, peak_kb / 2**20, done.returncode


def safeserve_stats(baseline: Baseline, x: np.ndarray) -> tuple[float, set[str]]:
    """Seconds for every statistic of every feature on rows in memory (KS and Wasserstein
    from the exact values, as the report does for logged inputs), and the flagged set."""
    from safeserve.skew_counts import Side

    start = time.perf_counter()
    flagged = set()
    for j, name in enumerate(NAMES):
        f = baseline.features[name]
        side, exact = Side(f.slots), ExactSide(f)
        side.add(f, x[:, j], len(x))
        exact.add(x[:, j])
        item = evaluate_feature(f, side, "inputs", thresholds=Thresholds(), exact=exact)
        if item["severity"] != "none":
            flagged.add(name)
    return time.perf_counter() - start, flagged


def numpy_psi_loop(ref: np.ndarray, cur: np.ndarray) -> tuple[float, set[str]]:
    """A plain numpy PSI per feature on decile bins of the reference (the usual script)."""
    start = time.perf_counter()
    flagged = set()
    for j, name in enumerate(NAMES):
        edges = np.quantile(ref[:, j], np.linspace(0, 1, 11))
        edges[0], edges[-1] = -np.inf, np.inf
        e = np.maximum(np.histogram(ref[:, j], edges)[0] / len(ref), 1e-4)
        a = np.maximum(np.histogram(cur[:, j], edges)[0] / len(cur), 1e-4)
        if np.sum((a - e) * np.log(a / e)) >= 0.1:
            flagged.add(name)
    return time.perf_counter() - start, flagged


def scipy_ks_loop(ref: np.ndarray, cur: np.ndarray) -> tuple[float, set[str]]:
    """scipy.stats.ks_2samp per feature (flagged: statistic >= 0.1)."""
    from scipy.stats import ks_2samp

    start = time.perf_counter()
    flagged = {n for j, n in enumerate(NAMES) if ks_2samp(ref[:, j], cur[:, j]).statistic >= 0.1}
    return time.perf_counter() - start, flagged


EVIDENTLY_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, resource
    import numpy as np, pandas as pd
    from evidently import Report
    from evidently.presets import DataDriftPreset
    names = [f"f{i:02d}" for i in range(20)]
    ref = pd.DataFrame(np.load(sys.argv[1]), columns=names)
    cur = pd.DataFrame(np.load(sys.argv[2]), columns=names)
    Report([DataDriftPreset()]).run(cur.head(1000), ref.head(1000))  # warm-up
    start = time.perf_counter()
    result = Report([DataDriftPreset()]).run(cur, ref)
    seconds = time.perf_counter() - start
    flagged = sorted(
        m["config"]["column"]
        for m in result.dict()["metrics"]
        if m["config"]["type"].endswith("ValueDrift") and m["value"] >= m["config"]["threshold"]
    )
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    peak = int(hwm) / 2**20
    print(json.dumps({"seconds": seconds, "peak_gb": peak, "flagged": flagged}))
    """
)


def evidently(python: str | None, ref: np.ndarray, cur: np.ndarray, tmp: Path) -> dict | None:
    """Evidently's DataDriftPreset timed in its own interpreter, or None."""
    if not python:
        return None
    np.save(tmp / "ref.npy", ref)
    np.save(tmp / "cur.npy", cur)
    argv = [python, "-c", EVIDENTLY_SCRIPT, str(tmp / "ref.npy"), str(tmp / "cur.npy")]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode:
        print(f"evidently failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--evidently-python", help="a python with evidently installed")
    opts = parser.parse_args()
    ref, cur = data(100_000, 1, False), data(opts.rows, 2, True)
    expected = {NAMES[j] for j in SHIFTED}
    baseline = Baseline.from_data(ref, feature_names=NAMES)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        baseline.save(tmp / "baseline.json")
        start = time.perf_counter()
        write_decisions(tmp / "decisions.jsonl", cur)
        size = (tmp / "decisions.jsonl").stat().st_size
        print(
            f"wrote {opts.rows:,}-line decision log ({size / 2**20:,.0f} MB) in "
            f"{time.perf_counter() - start:.1f} s"
        )
        seconds, peak, code = run_cli(tmp / "decisions.jsonl", tmp / "baseline.json", tmp / "o")
        report = json.loads((tmp / "o").read_text())
        flagged = {f["name"] for f in report["features"] if f["severity"] != "none"}
        ok = "OK" if flagged == expected else f"MISMATCH {sorted(flagged)}"
        print(
            f"safeserve skew end to end: {seconds:.2f} s (target < 10), peak RSS {peak:.2f} GB "
            f"(target < 2), exit {code}; flagged {sorted(flagged)} {ok}"
        )
        safeserve_stats(baseline, cur[:1000])  # warm-up: scipy's import for p-values
        ours, ours_flagged = safeserve_stats(baseline, cur)
        psi_s, psi_flagged = numpy_psi_loop(ref, cur)
        ks_s, ks_flagged = scipy_ks_loop(ref, cur)
        print(
            f"drift statistics on {opts.rows:,} rows in memory: safeserve {ours:.2f} s, "
            f"flagged {sorted(ours_flagged)}"
        )
        print(
            f"  numpy PSI loop   {psi_s:.2f} s ({psi_s / ours:.1f}x safeserve), "
            f"flagged {sorted(psi_flagged)}"
        )
        print(
            f"  scipy ks_2samp   {ks_s:.2f} s ({ks_s / ours:.1f}x safeserve), "
            f"flagged {sorted(ks_flagged)}"
        )
        ev = evidently(opts.evidently_python, ref, cur, tmp)
        if ev is not None:
            same = "the same" if set(ev["flagged"]) == ours_flagged else "DIFFERENT"
            print(
                f"  Evidently        {ev['seconds']:.2f} s ({ev['seconds'] / ours:.0f}x "
                f"safeserve), peak {ev['peak_gb']:.2f} GB, flagged {ev['flagged']} ({same})"
            )
        else:
            ref_s = EVIDENTLY_REFERENCE_S.get(opts.rows)
            if ref_s:
                print(
                    f"  Evidently (not run here; issue 7's figure on this machine) {ref_s} s, "
                    f"{EVIDENTLY_REFERENCE_GB} GB at 1M: {ref_s / ours:.0f}x safeserve"
                )
        write_profiles(tmp / "profiles.jsonl", baseline, cur, 1000)
        start = time.perf_counter()
        prof = analyze([tmp / "profiles.jsonl"], baseline)
        p_seconds = time.perf_counter() - start
        p_flagged = {f["name"] for f in prof["features"] if f["severity"] != "none"}
        print(
            f"from 1000 profile records ({prof['degradation']['calls']:,} calls): "
            f"{p_seconds:.2f} s (target < 1); flagged {sorted(p_flagged)} "
            f"{'OK' if p_flagged == expected else 'MISMATCH'}"
        )
        cli_s, _, _ = run_cli(tmp / "profiles.jsonl", tmp / "baseline.json", tmp / "p")
        print(f"  as a command (interpreter start and imports included): {cli_s:.2f} s")


if __name__ == "__main__":
    main()

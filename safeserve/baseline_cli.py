"""`safeserve baseline DATA -o baseline.json`: build a training baseline from a data file."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from safeserve.datasource import KINDS, BaselineError, Kind, cli_spelling

_PROGRESS_MIN_BYTES = 16 << 20
"""Files at least this large show a progress bar (when stderr is a terminal)."""


def add_baseline_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `baseline` subcommand (its handler is `baseline_command`)."""
    parser = commands.add_parser(
        "baseline",
        help="compute a training baseline (statistics and bins per feature) from a data file",
        description="Read training data (CSV, Parquet, JSONL, .npy/.npz) and write each "
        "feature's kind, count, null rate, range, mean/std, quantile bins and top categories "
        "as a versioned JSON baseline for ValidationConfig(baseline=...) and `safeserve skew`.",
    )
    parser.add_argument("data", type=Path, metavar="DATA", help="the training data file")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="OUT",
        help="baseline JSON to write (its directory must exist; replaced atomically)",
    )
    parser.add_argument("--bins", type=int, default=10, metavar="N", help="quantile bins (10)")
    parser.add_argument(
        "--top-k", type=int, default=20, metavar="K", help="categories kept per feature (20)"
    )
    parser.add_argument(
        "--owner",
        action="append",
        default=[],
        metavar="FEATURE=TEAM",
        help="the team that produces a feature (repeatable)",
    )
    parser.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="FEATURE=KIND",
        help=f"force a feature's kind, one of {', '.join(KINDS)} (repeatable)",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="COLUMN",
        help="leave a column out of the baseline entirely, e.g. a PII or empty column (repeatable)",
    )
    parser.add_argument("--prediction", metavar="COLUMN", help="the model's prediction column")
    parser.add_argument("--confidence", metavar="COLUMN", help="the model's confidence column")
    parser.add_argument(
        "--feature-names", metavar="A,B,...", help="column names of a plain 2-D .npy array"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    parser.set_defaults(handler=baseline_command)


def baseline_command(args: argparse.Namespace) -> int:
    """Run `safeserve baseline`: 0 when written, 2 on bad input, usage or an unwritable file."""
    out, err = sys.stdout, sys.stderr
    parent = args.output.parent
    if not parent.is_dir():  # checked first: no minutes of reading for a mistyped -o
        what = "not a directory" if parent.exists() else "no such directory"
        print(f"safeserve baseline: -o {args.output}: {parent}: {what}", file=err)
        return 2
    try:
        with cli_spelling():
            return _build(args, out, err)
    except BaselineError as exc:
        for problem in exc.problems:
            print(f"safeserve baseline: {problem}", file=err)
        return 2
    except OSError as exc:
        print(f"safeserve baseline: {exc.filename or args.output}: {exc.strerror}", file=err)
        return 2


def _build(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from safeserve.baseline import Baseline

    owners = _pairs(args.owner, "--owner")
    kinds: dict[str, Kind] = {}
    for name, kind in _pairs(args.kind, "--kind").items():
        if kind not in KINDS:
            raise BaselineError([f"--kind {name}={kind}: the kind is one of {', '.join(KINDS)}"])
        kinds[name] = kind
    names = args.feature_names.split(",") if args.feature_names else None
    bar = _bar(args.data, err) if not args.quiet else None
    started = time.perf_counter()
    baseline = Baseline.from_data(
        args.data,
        bins=args.bins,
        top_k=args.top_k,
        owners=owners,
        kinds=kinds,
        exclude=args.exclude,
        prediction=args.prediction,
        confidence=args.confidence,
        feature_names=names,
        progress=bar,
    )
    baseline.save(args.output)
    if not args.quiet:
        by_kind: dict[str, int] = {}
        for f in baseline.features.values():
            by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
        kinds_text = ", ".join(f"{n} {k}" for k, n in by_kind.items())
        left_out = f"; left out: {', '.join(args.exclude)}" if args.exclude else ""
        print(
            f"wrote {args.output}: {len(baseline.features)} features ({kinds_text}) from "
            f"{baseline.n_rows:,} rows in {time.perf_counter() - started:.2f} s{left_out}",
            file=out,
        )
    return 0


def _pairs(items: list[str], option: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise BaselineError([f"{option} {item!r}: expected NAME=VALUE"])
        pairs[name] = value
    return pairs


def _bar(data: Path, stream: TextIO) -> _ProgressBar | None:
    try:
        large = data.stat().st_size >= _PROGRESS_MIN_BYTES
    except OSError:
        return None
    if not (large and stream.isatty()):
        return None
    print(f"safeserve baseline: reading {data} ...", end="", file=stream, flush=True)
    return _ProgressBar(stream)


class _ProgressBar:
    """`progress(done, total)` drawn as one self-overwriting line on a terminal."""

    __slots__ = ("stream",)

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, done: int, total: int) -> None:
        filled = 30 * done // max(total, 1)
        bar = "#" * filled + "." * (30 - filled)
        end = "\n" if done >= total else ""
        print(f"\rsafeserve baseline: [{bar}] {done}/{total} features", end=end, file=self.stream)
        self.stream.flush()

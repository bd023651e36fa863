"""`safeserve skew LOGS... --baseline B`: drift and degradation from decision logs.

Exit codes (SPEC 5): 0 when no feature reaches `--fail-on` (and the drifted share stays under
`--fail-share`), 1 when the gate trips, 2 for usage errors, unreadable logs or baselines, and
data that leaves nothing to judge: no decision or profile record (of the `--policy` asked for),
or, with a gate, no feature with serving values to compare. A gate that judged nothing must not
pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from safeserve.skew_stats import SEVERITIES, Thresholds

_PROGRESS_MIN_BYTES = 64 << 20
_TOP = 10


def add_skew_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `skew` subcommand (its handler is `skew_command`)."""
    parser = commands.add_parser(
        "skew",
        help="training-serving skew, drift and degradation from decision logs",
        description="Compare the features seen in decision logs (logged inputs, or profile "
        "records where a policy has them) with a training baseline: PSI, Jensen-Shannon, KS, "
        "normalized Wasserstein, L-infinity, null-rate and out-of-range changes, with "
        "severity; and degradation by reason, fallback and time. Exits 0 when clean, 1 when "
        "the --fail-on gate trips, 2 for usage errors, unreadable files, or no records to judge.",
    )
    parser.add_argument("logs", nargs="+", type=Path, metavar="LOGS", help="JSONL logs (.gz ok)")
    parser.add_argument("--baseline", type=Path, required=True, metavar="B", help="baseline JSON")
    parser.add_argument("--html", type=Path, metavar="F", help="write the HTML report to F")
    parser.add_argument("--json", type=Path, metavar="F", help="write the JSON report to F")
    parser.add_argument(
        "--fail-on",
        choices=("moderate", "major"),
        help="exit 1 when a feature reaches this severity",
    )
    parser.add_argument(
        "--fail-share",
        type=float,
        metavar="X",
        help="exit 1 when at least this share of features drifted (moderate or worse)",
    )
    parser.add_argument(
        "--method",
        choices=("auto", "psi", "ks", "js", "wasserstein"),
        default="auto",
        help="the headline test (auto: by reference size, as Evidently)",
    )
    parser.add_argument("--policy", metavar="NAME", help="only this policy's records")
    parser.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="STAT=MODERATE,MAJOR",
        help="override a severity threshold, e.g. psi=0.1,0.25 (repeatable); "
        f"stats: {', '.join(_threshold_names())}",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print only problems (and why the gate tripped) to stderr",
    )
    parser.set_defaults(handler=skew_command)


def _threshold_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Thresholds) if f.name != "alpha"]


def skew_command(args: argparse.Namespace) -> int:
    """Run `safeserve skew`; returns the exit code."""
    from safeserve.baseline import Baseline
    from safeserve.datasource import BaselineError
    from safeserve.skew import SkewInputError, analyze

    out, err = sys.stdout, sys.stderr
    try:
        thresholds = _thresholds(args.threshold)
        if args.fail_share is not None and not 0 < args.fail_share <= 1:
            raise ValueError("--fail-share: must be in (0, 1]")
    except ValueError as exc:
        print(f"safeserve skew: {exc}", file=err)
        return 2
    try:
        baseline = Baseline.load(args.baseline)
    except BaselineError as exc:
        for problem in exc.problems:
            print(f"safeserve skew: {problem}", file=err)
        return 2
    except OSError as exc:
        print(f"safeserve skew: {args.baseline}: {exc.strerror or exc}", file=err)
        return 2
    started = time.perf_counter()
    try:
        report = analyze(
            args.logs,
            baseline,
            method=args.method,
            policy=args.policy,
            thresholds=thresholds,
            progress=_bar(args.logs, err) if not args.quiet else None,
        )
    except SkewInputError as exc:
        print(f"safeserve skew: cannot read {exc}", file=err)
        return 2
    if not report["judged"]:
        print(f"safeserve skew: {_nothing_to_judge(report, args.policy)}", file=err)
        return 2
    report["gate"] = _gate(report["features"], args.fail_on, args.fail_share)
    report["thresholds"] = dataclasses.asdict(thresholds)
    try:
        if args.json is not None:
            text = json.dumps(_finite(report), indent=1, allow_nan=False)
            args.json.write_text(text + "\n", encoding="utf-8")
        if args.html is not None:
            from safeserve.skew_report import render_html

            args.html.write_text(render_html(_finite(report)), encoding="utf-8")
    except OSError as exc:
        print(f"safeserve skew: cannot write {exc.filename}: {exc.strerror}", file=err)
        return 2
    if report["skipped"]:
        causes = ", ".join(f"{_CAUSES.get(k, k)} {v}" for k, v in report["skipped_by"].items())
        print(f"safeserve skew: skipped {report['skipped']} log lines ({causes})", file=err)
    if report["profiles_other_baseline"]:
        print(
            f"safeserve skew: {report['profiles_other_baseline']} profile record(s) made "
            "against another baseline (bins differ): skipped (their calls still count)",
            file=err,
        )
    if not args.quiet:
        seconds = time.perf_counter() - started
        summarize(report, out, seconds=seconds, logs=len(args.logs), paths=(args.json, args.html))
    gate = report["gate"]
    if gate["judged"] == 0 and (args.fail_on or args.fail_share is not None):
        print(
            "safeserve skew: nothing to judge: no feature has serving values to compare "
            "(no logged inputs or profiles for them); the gate cannot pass",
            file=err,
        )
        return 2
    if gate["tripped"]:
        if args.quiet:
            print(f"safeserve skew: gate tripped: {gate_reason(gate)}", file=err)
        return 1
    return 0


_CAUSES = {
    "not_json": "not JSON",
    "not_a_record": "not a record",
    "unknown_schema_version": "unknown schema_version",
    "malformed": "malformed",
    "duplicate": "duplicate id (read once)",
}


def _nothing_to_judge(report: dict[str, Any], policy: str | None) -> str:
    """The message for logs with no decision or profile record (of the chosen policy)."""
    known = report["policies_in_logs"]
    where = f"for policy {policy!r} " if policy is not None else ""
    others = f"policies in the logs: {', '.join(known)}" if known else "the logs hold no policy"
    seen = sum(report["records"].values())
    return (
        f"nothing to judge: no decision or profile records {where}in the logs "
        f"({seen} other records, {report['skipped']} lines skipped); {others}"
    )


def gate_reason(gate: dict[str, Any]) -> str:
    """One line: which features reached `--fail-on`, or the drifted share against
    `--fail-share`."""
    parts = []
    if gate["features"]:
        parts.append(f"{', '.join(gate['features'])} at --fail-on {gate['fail_on']}")
    share = gate["fail_share"]
    if share is not None and gate["drifted_share"] >= share:
        parts.append(f"{gate['drifted_share']:.0%} of features drifted (--fail-share {share:g})")
    return "; ".join(parts)


def _thresholds(items: list[str]) -> Thresholds:
    changes: dict[str, tuple[float, float]] = {}
    for item in items:
        name, _, values = item.partition("=")
        parts = values.split(",")
        if name not in _threshold_names() or len(parts) != 2:
            raise ValueError(f"--threshold {item!r}: expected STAT=MODERATE,MAJOR")
        low, high = float(parts[0]), float(parts[1])
        if not 0 <= low <= high:
            raise ValueError(f"--threshold {item!r}: need 0 <= MODERATE <= MAJOR")
        changes[name] = (low, high)
    return dataclasses.replace(Thresholds(), **changes)  # type: ignore[arg-type]


def _gate(
    features: list[dict[str, Any]], fail_on: str | None, fail_share: float | None
) -> dict[str, Any]:
    at = SEVERITIES.index(fail_on) if fail_on else None
    hits = [f["name"] for f in features if at is not None and SEVERITIES.index(f["severity"]) >= at]
    judged = [f for f in features if f.get("compared", True) and f["n"]]
    drifted = sum(f["severity"] != "none" for f in judged)
    share = drifted / len(judged) if judged else 0.0
    tripped = bool(hits) or (fail_share is not None and share >= fail_share)
    return {
        "fail_on": fail_on,
        "fail_share": fail_share,
        "drifted_share": share,
        "judged": len(judged),
        "features": hits,
        "tripped": tripped,
    }


def _finite(value: Any) -> Any:
    """NaN and infinities (not JSON) become None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def summarize(
    report: dict[str, Any],
    out: TextIO,
    *,
    seconds: float | None = None,
    logs: int = 1,
    paths: tuple[Path | None, Path | None] = (None, None),
) -> None:
    """The terminal summary: top drifted features, owners, degradation by reason, the gate;
    `paths` are the (json, html) files written, named at the end."""
    from safeserve.skew_report import rank_key

    everything = sorted(report["features"], key=rank_key)
    features = [f for f in everything if f.get("compared", True)]
    counts = {s: sum(f["severity"] == s for f in features) for s in ("major", "moderate")}
    records = sum(report["records"].values())
    print(
        f"safeserve skew: {logs} log(s), {records:,} records, {report['skipped']} skipped, "
        f"{len(everything)} features" + (f", in {seconds:.2f} s" if seconds is not None else ""),
        file=out,
    )
    print(
        f"drift ({report['method']}): {counts['major']} major, {counts['moderate']} moderate",
        file=out,
    )
    print(
        f"  {'feature':<22}{'kind':<12}{'n':>9}{'psi':>8}{'js':>8}{'ks':>7}{'w1':>7}{'linf':>7}"
        f"  {'severity':<10}{'why (the deciding statistic)':<34}{'owner':<16}source",
        file=out,
    )
    stats = (("psi", 8), ("js", 8), ("ks", 7), ("wasserstein", 7), ("linf", 7))
    for f in features[:_TOP]:
        cells = "".join(f"{f[k]:>{w}.3f}" if f[k] is not None else f"{'-':>{w}}" for k, w in stats)
        why = f["why"] or f["method"]
        why = why if len(why) < 34 else why[:32] + "…"
        source = f["source"] + (" (exact)" if f.get("exact") else "")
        print(
            f"  {f['name'][:21]:<22}{f['kind']:<12}{f['n']:>9}{cells}  {f['severity']:<10}"
            f"{why:<34}{(f['owner'] or '-')[:15]:<16}{source}",
            file=out,
        )
    if len(features) > _TOP:
        print(f"  ... {len(features) - _TOP} more (see --json / --html)", file=out)
    left_out: dict[str, list[str]] = {}
    for f in everything:
        if not f.get("compared", True):
            left_out.setdefault(f["not_compared"], []).append(f["name"])
    for reason, names in left_out.items():
        print(f"  not compared ({reason}): {', '.join(names)}", file=out)
    for owner, names in report["by_owner"].items():
        print(f"  owner {owner}: {', '.join(names)}", file=out)
    d = report["degradation"]
    rate = f"{d['rate']:.1%}" if d["rate"] is not None else "-"
    note = " (healthy calls sampled: an upper bound)" if "decisions" in d["calls_source"] else ""
    print(f"degradation: {d['degraded']:,} of {d['calls']:,} calls ({rate}){note}", file=out)
    for title, items in (("by reason", d["by_reason"]), ("by fallback", d["by_fallback"])):
        if items:
            print(f"  {title}: {', '.join(f'{k} {v}' for k, v in items.items())}", file=out)
    diff = d["features_degraded_vs_healthy"][:3]
    if diff:
        text = ", ".join(
            f"{r['name']} (JS {r['js']:.3f}, null {r['null_rate_degraded']:.1%} vs "
            f"{r['null_rate_healthy']:.1%})"
            for r in diff
        )
        print(f"  differs most between degraded and healthy calls: {text}", file=out)
    for key, m in (report.get("model") or {}).items():
        psi = f"{m['psi']:.3f}" if m["psi"] is not None else "-"
        print(
            f"model health: served {key} vs training: PSI {psi}, severity {m['severity']} "
            f"({m['n']} answers from decision records: degraded calls and sampled healthy ones)",
            file=out,
        )
    gate = report.get("gate") or {"fail_on": None, "fail_share": None}
    if gate["fail_on"] or gate["fail_share"] is not None:
        if gate["tripped"]:
            print(f"gate: TRIPPED (exit 1): {gate_reason(gate)}", file=out)
        else:
            print(f"gate: passed; at --fail-on: {', '.join(gate['features']) or 'none'}", file=out)
    for flag, path in zip(("json", "html"), paths, strict=True):
        if path is not None:
            print(f"{flag}: {path}", file=out)


def _bar(logs: list[Path], stream: TextIO) -> _ProgressBar | None:
    total = 0
    for path in logs:
        try:
            total += path.stat().st_size
        except OSError:
            return None
    if total < _PROGRESS_MIN_BYTES or not stream.isatty():
        return None
    return _ProgressBar(stream, total)


class _ProgressBar:
    """`progress(bytes_read)` drawn as one self-overwriting line on a terminal."""

    __slots__ = ("stream", "total")

    def __init__(self, stream: TextIO, total: int) -> None:
        self.stream, self.total = stream, total

    def __call__(self, done: int) -> None:
        filled = min(30, 30 * done // max(self.total, 1))
        end = "\n" if done >= self.total else ""
        bar = "#" * filled + "." * (30 - filled)
        print(
            f"\rsafeserve skew: [{bar}] {done >> 20} / {self.total >> 20} MB",
            end=end,
            file=self.stream,
        )
        self.stream.flush()

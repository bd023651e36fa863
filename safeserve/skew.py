"""Training-serving skew and degradation from decision logs: `analyze(logs, baseline)`.

Logs (any number, plain or .gz) are streamed once; a bad line is counted in `skipped`, never
fatal. Which data a feature's statistics come from, per policy: when the logs hold profile
records for the policy, its profiles (they count every call); otherwise its decisions' logged
`inputs` (binned under the same contract by `safeserve.skew_counts`; all degraded calls but only
sampled healthy ones). Never both for the same calls: decision inputs of a profiled policy only
feed the degraded-vs-healthy comparison. Each feature's `source` says which. Everything is counts in
the baseline's fixed bins (and, for logged numeric inputs, in its fine quantiles: exact KS and
Wasserstein), so logs of many replicas merge by addition, exactly.

A record is read once: the same `id` seen again (a log given twice, overlapping rotations) is
counted in `skipped_by["duplicate"]`. A profile whose bins do not match the baseline's was made
against another baseline: its calls still count, its feature counts are left out
(`profiles_other_baseline`).

Redacted and hashed features cannot be compared with the baseline, so they are never judged:
per policy, a feature is `not compared` when its profiles leave it out (a guard never profiles
what it redacts or hashes; profile records list them in `redacted_or_hashed`), or when its
logged inputs never hold the key (redacted fields are dropped from `inputs`) or hold mostly
redaction markers or salted hashes (32 hex digits) where the baseline's categories are not
such. The feature's own record then says why (`compared: false`, `not_compared`).
"""

from __future__ import annotations

import gzip
import operator
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from safeserve.baseline import Baseline, FeatureBaseline
from safeserve.skew_counts import PolicyCounts, Side
from safeserve.skew_degradation import Degradation, degradation_summary, join_outcomes
from safeserve.skew_stats import ExactSide, Method, Thresholds, evaluate_feature, js_divergence, psi

__all__ = ["SCHEMA_VERSIONS", "SkewInputError", "analyze", "read_records"]

SCHEMA_VERSIONS = frozenset({1})
"""Record schema versions this reader understands; others are skipped and counted."""

_JUDGED = ("decision", "profile", "rejected_while_open")
"""Record kinds that say something about a policy's calls."""

try:
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # the `fast` extra is optional
    import json

    _loads = json.loads


class SkewInputError(OSError):
    """A log cannot be opened or read (exit 2 in the CLI)."""


def read_records(
    paths: Sequence[str | os.PathLike[str]],
    skipped: Counter[str],
    progress: Callable[[int], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Every record of `paths` in order; bad lines are counted in `skipped` by cause.
    `progress(bytes_read)` is called every few thousand lines."""
    done = 0
    for path in paths:
        p = Path(path)
        try:
            with p.open("rb") as raw, _decompressed(p, raw) as stream:
                for i, line in enumerate(stream):
                    if progress is not None and not i % 8192:
                        progress(done + raw.tell())
                    if not line.strip():
                        continue
                    try:
                        record = _loads(line)
                    except ValueError:
                        skipped["not_json"] += 1
                        continue
                    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
                        skipped["not_a_record"] += 1
                    elif record.get("schema_version") not in SCHEMA_VERSIONS:
                        skipped["unknown_schema_version"] += 1
                    else:
                        yield record
                done += raw.tell()
        except (OSError, EOFError) as exc:
            raise SkewInputError(f"{p}: {getattr(exc, 'strerror', None) or exc}") from None
    if progress is not None:
        progress(done)


def _decompressed(path: Path, raw: BinaryIO) -> AbstractContextManager[Iterable[bytes]]:
    """The file's lines as bytes: gunzipped for a .gz file."""
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return nullcontext(raw)


def _epoch(value: Any) -> float:
    return datetime.fromisoformat(value).timestamp()


def analyze(
    logs: Sequence[str | os.PathLike[str]],
    baseline: Baseline,
    *,
    method: Method = "auto",
    policy: str | None = None,
    thresholds: Thresholds | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The skew report of `logs` against `baseline`, as the `safeserve skew --json` document.

    Raises `SkewInputError` when a log cannot be read; bad lines are counted, not raised.
    `judged` counts the decision, profile and open-breaker records of the chosen policy (zero:
    there was nothing to judge), `policies_in_logs` names every policy the logs hold.
    """
    thresholds = thresholds or Thresholds()
    skipped: Counter[str] = Counter()
    records: Counter[str] = Counter()
    policies: dict[str, PolicyCounts] = {}
    in_logs: set[str] = set()
    pids: dict[str, int] = {}
    deg = Degradation()
    outcomes: dict[str, Any] = {}
    model = _ModelHealth(baseline)
    seen: set[str] = set()
    for record in read_records(logs, skipped, progress):
        rid = record.get("id")  # inlined _unique: this runs once per log line
        if isinstance(rid, str):
            if rid in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(rid)
        kind = record["kind"]
        if kind == "outcome":
            if isinstance(record.get("decision_id"), str):
                outcomes[record["decision_id"]] = record.get("outcome")
                records[kind] += 1
            else:
                skipped["malformed"] += 1
            continue
        name = record.get("policy")
        if kind not in _JUDGED:
            records[kind] += 1
            continue
        if not isinstance(name, str):
            skipped["malformed"] += 1
            continue
        in_logs.add(name)
        if policy is not None and name != policy:
            continue
        if name not in policies:
            policies[name], pids[name] = PolicyCounts(baseline), len(pids)
        state, pid = policies[name], pids[name]
        try:
            t = _epoch(record["ts"])
            if kind == "decision":
                degraded = deg.decision(t, pid, record)
                state.decisions += 1
                model.add(record)
                if isinstance(record.get("inputs"), dict):
                    state.add_inputs(record["inputs"], degraded)
            elif kind == "profile":
                middle = (_epoch(record["start"]) + _epoch(record["end"])) / 2
                state.add_profile(record)
                deg.profile(middle, pid, int(record["n"]))
            else:
                deg.rejected(t, pid, record)
        except (KeyError, TypeError, ValueError, AttributeError):
            skipped["malformed"] += 1
            continue
        records[kind] += 1
    for state in policies.values():
        state.flush()
    profiled = {pids[n] for n, s in policies.items() if s.profiles}
    degradation = degradation_summary(deg, profiled)
    degradation["features_degraded_vs_healthy"] = _degraded_vs_healthy(baseline, policies)
    features = [
        _feature(name, f, policies, method, thresholds) for name, f in baseline.features.items()
    ]
    by_owner: dict[str, list[str]] = {}
    for item in features:
        if item["severity"] != "none":
            by_owner.setdefault(item["owner"] or "unowned", []).append(item["name"])
    return {
        "schema_version": 1,
        "features": features,
        "not_compared": [
            {"name": f["name"], "reason": f["not_compared"]} for f in features if not f["compared"]
        ],
        "degradation": degradation,
        "skipped": sum(skipped.values()),
        "skipped_by": dict(skipped),
        "profiles_other_baseline": sum(s.other_baseline for s in policies.values()),
        "records": dict(records),
        "judged": sum(records[k] for k in _JUDGED),
        "policies": sorted(policies),
        "policies_in_logs": sorted(in_logs),
        "method": method,
        "by_owner": by_owner,
        "outcomes": (
            join_outcomes(_unique(read_records(logs, Counter()), Counter()), outcomes, policy)
            if outcomes
            else None
        ),
        "model": model.report(method, thresholds),
    }


def _unique(records: Iterable[dict[str, Any]], skipped: Counter[str]) -> Iterator[dict[str, Any]]:
    """Each record once: a record whose `id` was seen before is counted as a duplicate."""
    seen: set[str] = set()
    add = seen.add
    for record in records:
        rid = record.get("id")
        if isinstance(rid, str):
            if rid in seen:
                skipped["duplicate"] += 1
                continue
            add(rid)
        yield record


def _feature(
    name: str,
    f: FeatureBaseline,
    policies: dict[str, PolicyCounts],
    method: Method,
    thresholds: Thresholds,
) -> dict[str, Any]:
    """One feature's drift record, or its record of why it was not compared."""
    side, source, exact, reasons = _serving(name, f, policies)
    item = evaluate_feature(f, side, source, method=method, thresholds=thresholds, exact=exact)
    item["compared"], item["not_compared"] = True, None
    if reasons and source == "none":
        item["compared"] = False
        item["not_compared"] = "; ".join(sorted(reasons))
        item["why"] = f"not compared ({item['not_compared']})"
    return item


_PREDICTION_KEYS = ("prediction", "label", "class", "score")


class _ModelHealth:
    """The served answers' confidences (and predictions, when outputs are logged) against the
    baseline's distributions: the model-health layer above the input features.

    Decision records hold every degraded call but only a sample of healthy ones, so this is a
    biased view, and the report says so (`source`)."""

    def __init__(self, baseline: Baseline) -> None:
        self.targets = {
            key: f
            for key, f in (("confidence", baseline.confidence), ("prediction", baseline.prediction))
            if f is not None
        }
        self.values: dict[str, list[Any]] = {key: [] for key in self.targets}

    def add(self, record: dict[str, Any]) -> None:
        if "confidence" in self.values and record.get("confidence") is not None:
            self.values["confidence"].append(record["confidence"])
        if "prediction" in self.values and "output" in record:
            value = _prediction_of(record["output"])
            if value is not None:
                self.values["prediction"].append(value)

    def report(self, method: Method, thresholds: Thresholds) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, f in self.targets.items():
            values = self.values[key]
            side = Side(f.slots)
            if values:
                column = (
                    np.asarray(values, dtype=float)
                    if f.kind == "numeric"
                    else np.array([str(v) for v in values], dtype=object)
                )
                side.add(f, column, len(values))
            item = evaluate_feature(f, side, "decisions", method=method, thresholds=thresholds)
            item["name"] = key
            out[key] = item
        return out


def _prediction_of(output: Any) -> Any:
    if isinstance(output, dict):
        for key in _PREDICTION_KEYS:
            if key in output:
                return output[key]
        return None
    return output if isinstance(output, int | float | str) else None


def _serving(
    name: str, f: FeatureBaseline, policies: dict[str, PolicyCounts]
) -> tuple[Side, str, ExactSide | None, set[str]]:
    """A feature's serving counts over all policies (profiles where a policy has them, else
    decision inputs); their source ("inputs", "profiles", "inputs+profiles" or "none"); the
    exact serving values when every contributing policy logged inputs; and why policies whose
    data cannot be compared (redacted or hashed) were left out."""
    total = Side(f.slots)
    exact = ExactSide(f) if f.kind == "numeric" and f.quantiles else None
    sources: set[str] = set()
    reasons: set[str] = set()
    for state in policies.values():
        reason = state.not_compared(name)
        if reason is not None:
            reasons.add(reason)
        elif state.profiles:
            sources.add("profiles")
            total.merge(state.profiled[name])
            exact = None
        else:
            sources.add("inputs")
            total.merge(state.degraded[name])
            total.merge(state.healthy[name])
            if exact is not None:
                exact.merge(state.exact[name])
    return total, "+".join(sorted(sources)) or "none", exact, reasons


def _degraded_vs_healthy(
    baseline: Baseline, policies: dict[str, PolicyCounts]
) -> list[dict[str, Any]]:
    """Features ranked by how much degraded calls' inputs differ from healthy ones' (JS)."""
    ranked = []
    for name, f in baseline.features.items():
        bad, good = Side(f.slots), Side(f.slots)
        for state in policies.values():
            if state.inputs_not_compared(name) is not None:
                continue
            bad.merge(state.degraded[name])
            good.merge(state.healthy[name])
        if not bad.n or not good.n:
            continue
        ranked.append(
            {
                "name": name,
                "kind": f.kind,
                "owner": f.owner,
                "js": js_divergence(bad.counts, good.counts),
                "psi": psi(good.counts, bad.counts),
                "null_rate_degraded": bad.nulls / bad.n,
                "null_rate_healthy": good.nulls / good.n,
                "out_of_range_degraded": bad.out_of_range / bad.n,
                "out_of_range_healthy": good.out_of_range / good.n,
                "n_degraded": bad.n,
                "n_healthy": good.n,
            }
        )
    gap = operator.itemgetter("null_rate_degraded", "null_rate_healthy")
    ranked.sort(key=lambda r: (-(r["js"] + abs(gap(r)[0] - gap(r)[1])), r["name"]))
    return ranked

"""Training-serving skew and degradation from decision logs: `analyze(logs, baseline)`.

Logs (any number, plain or .gz) are streamed once; a bad line is counted in `skipped`, never
fatal. Which data a feature's statistics come from, per policy: when the logs hold profile
records for the policy, its profiles (they count every call); otherwise its decisions' logged
`inputs` (binned here under the same contract; all degraded calls but only sampled healthy
ones). Never both for the same calls: decision inputs of a profiled policy only feed the
degraded-vs-healthy comparison. Each feature's `source` says which. Everything is counts in
the baseline's fixed bins, so logs of many replicas merge by addition, exactly.
"""

from __future__ import annotations

import gzip
import math
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
from safeserve.skew_degradation import Degradation, degradation_summary, join_outcomes
from safeserve.skew_stats import Method, Thresholds, evaluate_feature, js_divergence, psi

__all__ = ["SCHEMA_VERSIONS", "SkewInputError", "analyze", "read_records"]

SCHEMA_VERSIONS = frozenset({1})
"""Record schema versions this reader understands; others are skipped and counted."""

_CHUNK = 32768

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


class _Side:
    """Serving counts of one feature: per slot, nulls, out of range, rows."""

    __slots__ = ("counts", "n", "nulls", "out_of_range")

    def __init__(self, slots: int) -> None:
        self.counts = np.zeros(slots, dtype=np.int64)
        self.nulls = self.out_of_range = self.n = 0

    def add(self, f: FeatureBaseline, values: Any, n: int) -> None:
        counts, nulls, out = f.bin_counts(values)
        self.counts += counts
        self.nulls += nulls
        self.out_of_range += out
        self.n += n

    def merge(self, other: _Side) -> None:
        self.counts += other.counts
        self.nulls += other.nulls
        self.out_of_range += other.out_of_range
        self.n += other.n


class _Policy:
    """What the logs say about one policy's calls."""

    def __init__(self, baseline: Baseline) -> None:
        self.features = baseline.features
        self.numeric = [n for n, f in self.features.items() if f.kind == "numeric"]
        self.other = [n for n, f in self.features.items() if f.kind != "numeric"]
        self.degraded = {n: _Side(f.slots) for n, f in self.features.items()}
        self.healthy = {n: _Side(f.slots) for n, f in self.features.items()}
        self.profiled = {n: _Side(f.slots) for n, f in self.features.items()}
        self.profiles = 0
        self.profile_calls = 0
        self.decisions = 0
        self._rows: list[Any] = []
        self._flags: list[bool] = []

    def add_inputs(self, inputs: Any, degraded: bool) -> None:
        self._rows.append(inputs)
        self._flags.append(degraded)
        if len(self._rows) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        """Bin the buffered inputs (one numpy pass per chunk, not per call)."""
        rows, flags = self._rows, np.array(self._flags, dtype=bool)
        if not rows:
            return
        self._rows, self._flags = [], []
        sides = [(self.degraded, flags), (self.healthy, ~flags)]
        if self.numeric:
            matrix = _numeric_matrix(rows, self.numeric)
            for j, name in enumerate(self.numeric):
                f, column = self.features[name], matrix[:, j]
                for side, mask in sides:
                    side[name].add(f, column[mask], int(mask.sum()))
        for name in self.other:
            column = np.empty(len(rows), dtype=object)
            column[:] = [r.get(name) for r in rows]
            for side, mask in sides:
                side[name].add(self.features[name], column[mask], int(mask.sum()))

    def add_profile(self, record: dict[str, Any]) -> None:
        features = record["features"]
        for name, side in self.profiled.items():
            counts = features.get(name) if isinstance(features, dict) else None
            if counts is None:
                continue
            c = np.asarray(counts["counts"], dtype=np.int64)
            if c.shape != side.counts.shape:
                raise ValueError(f"{name}: {c.size} counts for {side.counts.size} bins")
            side.counts += c
            side.nulls += int(counts["nulls"])
            side.out_of_range += int(counts["out_of_range"])
            side.n += int(c.sum()) + int(counts["nulls"])
        self.profiles += 1
        self.profile_calls += int(record["n"])


def _numeric_matrix(rows: list[Any], names: list[str]) -> np.ndarray:
    """rows x features as floats, NaN for a missing, null or non-number value."""
    try:
        return np.array(list(map(operator.itemgetter(*names), rows)), dtype=np.float64).reshape(
            len(rows), len(names)
        )
    except (KeyError, TypeError, ValueError):
        pass  # a missing key, a None or a string somewhere: the careful way
    return np.array([[_number(r.get(n)) for n in names] for r in rows], dtype=np.float64)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


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
    """
    thresholds = thresholds or Thresholds()
    skipped: Counter[str] = Counter()
    records: Counter[str] = Counter()
    policies: dict[str, _Policy] = {}
    pids: dict[str, int] = {}
    deg = Degradation()
    outcomes: dict[str, Any] = {}
    model = _ModelHealth(baseline)
    for record in read_records(logs, skipped, progress):
        kind = record["kind"]
        if kind == "outcome":
            if isinstance(record.get("decision_id"), str):
                outcomes[record["decision_id"]] = record.get("outcome")
                records[kind] += 1
            else:
                skipped["malformed"] += 1
            continue
        name = record.get("policy")
        if kind not in ("decision", "profile", "rejected_while_open"):
            records[kind] += 1
            continue
        if not isinstance(name, str) or (policy is not None and name != policy):
            if not isinstance(name, str):
                skipped["malformed"] += 1
            continue
        if name not in policies:
            policies[name], pids[name] = _Policy(baseline), len(pids)
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
                state.add_profile(record)
                middle = (_epoch(record["start"]) + _epoch(record["end"])) / 2
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
        evaluate_feature(f, *_serving(name, f, policies), method=method, thresholds=thresholds)
        for name, f in baseline.features.items()
    ]
    by_owner: dict[str, list[str]] = {}
    for item in features:
        if item["severity"] != "none":
            by_owner.setdefault(item["owner"] or "unowned", []).append(item["name"])
    return {
        "schema_version": 1,
        "features": features,
        "degradation": degradation,
        "skipped": sum(skipped.values()),
        "skipped_by": dict(skipped),
        "records": dict(records),
        "policies": sorted(policies),
        "method": method,
        "by_owner": by_owner,
        "outcomes": (
            join_outcomes(read_records(logs, Counter()), outcomes, policy) if outcomes else None
        ),
        "model": model.report(method, thresholds),
    }


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
            side = _Side(f.slots)
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


def _serving(name: str, f: FeatureBaseline, policies: dict[str, _Policy]) -> tuple[_Side, str]:
    """A feature's serving counts over all policies (profiles where a policy has them, else
    decision inputs) and their source: "inputs", "profiles", "inputs+profiles" or "none"."""
    total = _Side(f.slots)
    sources: set[str] = set()
    for state in policies.values():
        if state.profiles:
            sources.add("profiles")
            total.merge(state.profiled[name])
        else:
            sources.add("inputs")
            total.merge(state.degraded[name])
            total.merge(state.healthy[name])
    return total, "+".join(sorted(sources)) or "none"


def _degraded_vs_healthy(baseline: Baseline, policies: dict[str, _Policy]) -> list[dict[str, Any]]:
    """Features ranked by how much degraded calls' inputs differ from healthy ones' (JS)."""
    ranked = []
    for name, f in baseline.features.items():
        bad, good = _Side(f.slots), _Side(f.slots)
        for state in policies.values():
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

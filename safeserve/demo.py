"""`safeserve demo`: a fraud scorer served through a guard while faults are injected in phases.

Only the public API is used, so this module doubles as a worked example of a full policy.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shlex
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO, get_args

import numpy as np
from pydantic import BaseModel, Field

import safeserve as ss

POLICY = "fraud"
LOG_NAME = "decisions.jsonl"
BASELINE_NAME = "baseline.json"
REPORT_NAME = "skew.html"
TRAINING_ROWS = 5000
DEFAULT_OUT = "safeserve-demo-out"
TIMEOUT_S = 0.1  # the whole call's budget; a slow call sleeps SLOW_S and is abandoned
SLOW_S = 0.25
OPEN_S = 0.5
TICK_S = 0.01  # the breaker's clock is simulated: 100 calls a second, whatever the machine
CONFIDENCE = 0.6
SAMPLE_RATE = 0.02
REPEAT_RATE = 0.25  # share of transactions that repeat an earlier one (what the cache can answer)
FALLBACKS = ("fraud-v2", "cache", "rules", "static")

Category = Literal["grocery", "fuel", "restaurant", "electronics", "travel", "gaming"]
CATEGORIES: tuple[str, ...] = get_args(Category)
CATEGORY_SHARE = (0.3, 0.15, 0.2, 0.15, 0.1, 0.1)
CATEGORY_WEIGHT = {
    "grocery": -0.8,
    "fuel": -0.4,
    "restaurant": -0.2,
    "electronics": 0.9,
    "travel": 0.5,
    "gaming": 1.1,
}
HOME = ("FR", "DE", "ES", "IT")
COUNTRIES = (*HOME, "US", "BR", "TH", "AE")
COUNTRY_SHARE = (0.35, 0.2, 0.15, 0.1, 0.08, 0.05, 0.04, 0.03)
# bias, log1p(amount), night (hour < 6), foreign country, merchant category weight
WEIGHTS = np.array([-6.0, 0.75, 1.1, 1.3, 1.0])

Fault = Literal["none", "slow", "transient", "crash", "nan"]


class Txn(BaseModel):
    """A card transaction as the fraud model expects it."""

    amount: float = Field(ge=0, le=100_000)
    merchant_category: Category
    hour: int = Field(ge=0, le=23)
    country: str = Field(pattern=r"^[A-Z]{2}$")
    card_number: str


def _answer(p: float) -> dict[str, Any]:
    return {
        "label": "decline" if p >= 0.5 else "approve",
        "score": round(p, 4),
        "confidence": round(max(p, 1.0 - p), 4),
    }


def score_v3(x: dict[str, Any]) -> dict[str, Any]:
    """The primary model: a hand-written logistic regression over four features."""
    features = np.array(
        [
            1.0,
            math.log1p(x["amount"]),
            float(x["hour"] < 6),
            float(x["country"] not in HOME),
            CATEGORY_WEIGHT[x["merchant_category"]],
        ]
    )
    return _answer(float(1.0 / (1.0 + np.exp(-(WEIGHTS @ features)))))


class Faults:
    """The fault injector: the driver arms one fault per call; `host_down` breaks both models."""

    def __init__(self) -> None:
        self.fault: Fault = "none"
        self.host_down = False
        self._attempt = 0

    def arm(self, fault: Fault) -> None:
        """Set the fault for the next call (its retries included)."""
        self.fault = fault
        self._attempt = 0

    def primary(self, x: dict[str, Any]) -> dict[str, Any]:
        """The deployed v3 model behind the injector: slow, failing or wrong as armed."""
        attempt, self._attempt = self._attempt, self._attempt + 1
        if self.host_down:
            raise ConnectionError("model host unreachable")
        if self.fault == "slow":
            time.sleep(SLOW_S)
        elif self.fault == "transient" and attempt == 0:
            raise ConnectionError("connection reset by peer")
        elif self.fault == "crash":
            raise ValueError("feature vector has the wrong shape")
        answer = score_v3(x)
        if self.fault == "nan":
            answer.update(score=float("nan"), confidence=float("nan"))
        return answer

    def fraud_v2(self, x: dict[str, Any]) -> dict[str, Any]:
        """The previous model (amount and country only), deployed on the same host as v3."""
        if self.host_down:
            raise ConnectionError("model host unreachable")
        amount = x.get("amount")
        if not isinstance(amount, int | float) or isinstance(amount, bool) or amount < 0:
            raise ValueError("fraud-v2 needs a non-negative numeric amount")
        z = -5.0 + 0.7 * math.log1p(amount) + 1.2 * (x.get("country") not in HOME)
        return _answer(1.0 / (1.0 + math.exp(-z)))


@dataclass
class SimClock:
    """A monotonic clock the driver advances by one tick per call, so breaker timing is exact."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


class Traffic:
    """Synthetic transactions from a seeded generator; some repeat earlier ones exactly."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.seen: list[dict[str, Any]] = []

    def _fresh(self) -> dict[str, Any]:
        rng = self.rng
        return {
            "amount": round(float(rng.lognormal(3.5, 1.3)), 2),
            "merchant_category": str(rng.choice(CATEGORIES, p=CATEGORY_SHARE)),
            "hour": int(rng.integers(0, 24)),
            "country": str(rng.choice(COUNTRIES, p=COUNTRY_SHARE)),
            "card_number": f"4242-4242-4242-{int(rng.integers(10_000)):04d}",
        }

    def drifted(self) -> dict[str, Any]:
        """A transaction from a new market: larger amounts, mostly foreign, more at night."""
        x = self._fresh()
        x["amount"] = round(x["amount"] * 3, 2)
        x["country"] = str(self.rng.choice(("US", "BR", "TH", "AE", "FR")))
        x["hour"] = int(self.rng.choice((0, 1, 2, 3, 22, 23, 12)))
        return x

    def training_rows(self, n: int) -> list[dict[str, Any]]:
        """What the model was trained on (card numbers left out: never profiled)."""
        rows = []
        for _ in range(n):
            row = self._fresh()
            del row["card_number"]
            rows.append(row)
        return rows

    def transaction(self) -> dict[str, Any]:
        """A valid transaction: a repeat with probability REPEAT_RATE, else a new one."""
        if self.seen and self.rng.random() < REPEAT_RATE:
            return dict(self.seen[int(self.rng.integers(len(self.seen)))])
        txn = self._fresh()
        self.seen.append(txn)
        return dict(txn)

    def malformed(self) -> dict[str, Any]:
        """A transaction broken in one of the ways upstream services break them."""
        x = self._fresh()
        kind = int(self.rng.integers(5))
        if kind == 0:
            del x["amount"]
        elif kind == 1:
            x["amount"] = -x["amount"]
        elif kind == 2:
            x["hour"] += 24
        elif kind == 3:
            x["amount"] = f"{x['amount']:.2f}".replace(".", ",")
        else:
            x["country"] = x["country"].lower()
        return x


@dataclass(frozen=True)
class Phase:
    """One stretch of traffic: how many calls, what goes wrong, and how often."""

    name: str
    calls: int
    story: str
    faults: dict[Fault, float] = field(default_factory=dict)
    malformed: float = 0.0
    host_down: bool = False
    drill: bool = False
    drift: bool = False

    def pick(self, u: float) -> Fault:
        """The fault for a call, given a uniform draw `u`."""
        for fault, share in self.faults.items():
            if u < share:
                return fault
            u -= share
        return "none"


PHASES = (
    Phase("healthy", 200, f"clean traffic; scores with confidence < {CONFIDENCE} fall back"),
    Phase(
        "malformed",
        200,
        "30% of inputs fail the Txn schema (missing, negative, out-of-range or mistyped fields)",
        malformed=0.3,
    ),
    Phase(
        "slow",
        200,
        f"15% of calls take {SLOW_S * 1000:.0f} ms; the timeout is {TIMEOUT_S * 1000:.0f} ms",
        faults={"slow": 0.15},
    ),
    Phase(
        "errors",
        200,
        "15% transient ConnectionError (retried), 8% ValueError, 5% NaN scores",
        faults={"transient": 0.15, "crash": 0.08, "nan": 0.05},
    ),
    Phase("outage", 200, "model host down: v3 and fraud-v2 raise ConnectionError", host_down=True),
    Phase(
        "recovery",
        200,
        f"host back; the breaker half-opens after {OPEN_S} s and closes after 3 good probes",
    ),
    Phase(
        "drift",
        200,
        "a new market: amounts x3, mostly foreign, at night (the skew report finds it)",
        drift=True,
    ),
    Phase("drill", 50, 'calls inside ss.force_degradation(reason="timeout")', drill=True),
)


def build_policy(
    faults: Faults, clock: SimClock, log_path: Path, baseline: ss.Baseline
) -> ss.Policy:
    """The demo's policy: every stage of a guard configured, fallbacks from best to last resort."""
    rules = [
        ss.Rule(when={"amount": {"gt": 2000}}, then={"label": "review"}),
        ss.Rule(
            when={"country": {"not_in": list(HOME)}, "hour": {"lt": 6}}, then={"label": "review"}
        ),
        ss.Rule(when={"amount": {"le": 50}}, then={"label": "approve"}),
    ]
    # `schema` is an alias, which pydantic's mypy plugin does not accept here (yet)
    # the schema, then checks from the training baseline (range +25 %, unseen category, null);
    # the baseline's bins also hold the guard's online profile of what it serves
    validation = ss.ValidationConfig(  # type: ignore[call-arg, unused-ignore]
        schema=Txn, baseline=baseline, tolerance=0.25, on_invalid="fallback"
    )
    return ss.Policy(
        name=POLICY,
        owner="risk-ml-oncall",
        model_version="v3",
        validation=validation,
        timeout_s=TIMEOUT_S,
        retry=ss.RetryConfig(
            attempts=3,
            backoff_s=0.005,
            max_backoff_s=0.02,
            jitter=False,
            retry_on=[ConnectionError],
        ),
        breaker=ss.BreakerConfig(
            window="count",
            window_size=20,
            min_calls=10,
            failure_rate_threshold=0.5,
            slow_call_s=1.0,
            open_s=OPEN_S,
            half_open_calls=3,
            clock=clock,
        ),
        confidence=ss.ConfidenceConfig(threshold=CONFIDENCE),
        fallbacks=[
            ss.Fallback.model("fraud-v2", faults.fraud_v2),
            ss.Fallback.cache("cache", ttl_s=3600, max_items=10_000),
            ss.Fallback.rules("rules", rules),  # no default: unmatched inputs go on
            ss.Fallback.static("static", {"label": "review"}),
        ],
        log=ss.DecisionLogConfig(
            sink=str(log_path),
            sample_rate=SAMPLE_RATE,
            include_outputs=True,
            redact=["card_number"],
        ),
    )


@dataclass
class PhaseResult:
    """What one phase did: answers by source, reasons, latencies and the breaker's moves."""

    name: str
    calls: int = 0
    served_by: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    retried: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    breaker: str = ""
    transitions: list[tuple[str, str]] = field(default_factory=list)


def _delta(after: dict[str, int], before: dict[str, int]) -> Counter[str]:
    return Counter({k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)})


def _read_new(path: Path, offset: int) -> tuple[list[dict[str, Any]], int, int]:
    """Records appended since byte `offset`: the records, the new offset, unparsable lines."""
    if not path.exists():
        return [], offset, 0
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    data = data[: data.rfind(b"\n") + 1]
    records, bad = [], 0
    for line in data.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            bad += 1
    return records, offset + len(data), bad


@dataclass
class Run:
    """A whole demo run: where it logs, its seed, and what each phase produced."""

    log_path: Path
    seed: int
    results: list[PhaseResult] = field(default_factory=list)
    records: Counter[str] = field(default_factory=Counter)
    bad_lines: int = 0
    baseline: ss.Baseline | None = None


def run_phases(run: Run, on_phase: Callable[[PhaseResult], None]) -> None:
    """Serve every phase's traffic through one guard, calling `on_phase` as each one ends."""
    rng = np.random.default_rng(run.seed)
    traffic, faults, clock = Traffic(rng), Faults(), SimClock()
    training = Traffic(np.random.default_rng(run.seed + 1)).training_rows(TRAINING_ROWS)
    run.baseline = ss.Baseline.from_data(training)
    run.baseline.save(run.log_path.parent / BASELINE_NAME)
    predict = ss.guard(build_policy(faults, clock, run.log_path, run.baseline))(faults.primary)
    offset = 0
    for phase in PHASES:
        result = PhaseResult(phase.name)
        faults.host_down = phase.host_down
        before = predict.stats()
        drill = (
            ss.force_degradation(reason="timeout", policy=POLICY)
            if phase.drill
            else contextlib.nullcontext()
        )
        with drill:
            for _ in range(phase.calls):
                malformed = rng.random() < phase.malformed
                if malformed:
                    x = traffic.malformed()
                else:
                    x = traffic.drifted() if phase.drift else traffic.transaction()
                faults.arm(phase.pick(float(rng.random())))
                clock.now += TICK_S
                start = time.perf_counter()
                try:
                    decision = predict.call(x).decision
                except ss.NoFallbackAvailable as exc:
                    decision = exc.decision
                result.latencies_ms.append((time.perf_counter() - start) * 1000)
                primary_tries = sum(a.name == "primary" for a in decision.attempts)
                result.retried += primary_tries > 1
        after = predict.stats()
        result.calls = after["calls"] - before["calls"]
        result.served_by = _delta(after["served_by"], before["served_by"])
        result.reasons = _delta(after["reasons"], before["reasons"])
        result.failed = after["failed"] - before["failed"]
        result.breaker = predict.breaker.state
        ss.flush_logs()
        records, offset, bad = _read_new(run.log_path, offset)
        run.bad_lines += bad
        run.records.update(str(r.get("kind")) for r in records)
        result.transitions = [
            (str(r["from_state"]), str(r["to_state"]))
            for r in records
            if r.get("kind") == "breaker"
        ]
        run.results.append(result)
        on_phase(result)


COLUMNS = (
    "phase",
    "calls",
    "primary",
    *FALLBACKS,
    "failed",
    "retried",
    "p50 ms",
    "p99 ms",
    "breaker",
    "reasons",
)
_TEXT = {"phase": 9, "breaker": 11, "reasons": 0}


def _cell(column: str, value: object) -> str:
    width = _TEXT.get(column, max(len(column), 5))
    return str(value).ljust(width) if column in _TEXT else str(value).rjust(width)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def table_row(result: PhaseResult | None) -> str:
    """One aligned row of the phase table (the header when `result` is None)."""
    if result is None:
        return "  ".join(_cell(c, c) for c in COLUMNS).rstrip()
    p50, p99 = np.percentile(result.latencies_ms, [50, 99]) if result.latencies_ms else (0, 0)
    values: list[object] = [
        result.name,
        result.calls,
        result.served_by["primary"],
        *(result.served_by[name] for name in FALLBACKS),
        result.failed,
        result.retried,
        f"{p50:.2f}",
        f"{p99:.2f}",
        result.breaker,
        _counts(result.reasons) or "-",
    ]
    return "  ".join(_cell(c, v) for c, v in zip(COLUMNS, values, strict=True)).rstrip()


def _report(run: Run, say: Callable[[str], None]) -> None:
    served: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for r in run.results:
        served.update(r.served_by)
        reasons.update(r.reasons)
    calls = sum(r.calls for r in run.results)
    fallbacks = Counter({k: n for k, n in served.items() if k != "primary"})
    say("\nbreaker transitions (kind=breaker records in the log):")
    for r in run.results:
        if r.transitions:
            chain = [r.transitions[0][0], *(to for _, to in r.transitions)]
            say(f"  {r.name:<9}  {' -> '.join(chain)}")
    if not any(r.transitions for r in run.results):
        say("  none logged")
    say("\nsummary")
    say(
        f"  calls: {calls}; served by the primary: {served['primary']}; "
        f"by a fallback: {fallbacks.total()}; unanswered: {sum(r.failed for r in run.results)}"
    )
    say(f"  fallbacks that served: {_counts(fallbacks) or 'none'}")
    say(f"  degradation reasons: {_counts(reasons) or 'none'}")
    if reasons["fallback_failed"]:
        say(
            "    (fallback_failed: once per fallback that could not answer before one did, "
            "e.g. a model error, a cache miss, no matching rule)"
        )
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(run.records.items()))
    say(f"  decision log: {run.log_path}")
    say(
        f"    {run.records.total()} records ({kinds or 'none'}); degraded calls are all "
        f"logged, healthy ones sampled at {SAMPLE_RATE:.0%}; card_number is redacted"
    )
    if run.bad_lines:
        say(f"    warning: {run.bad_lines} log lines were not valid JSON")
    log = shlex.quote(str(run.log_path))
    baseline = shlex.quote(str(run.log_path.parent / BASELINE_NAME))
    html = run.log_path.parent / REPORT_NAME
    say("\nskew report of this run's log against the training baseline")
    _skew_report(run, html, say)
    say("\nnext")
    say(f"  head -n 3 {log} | python -m json.tool --json-lines   # read a few records")
    say(f"  safeserve skew {log} --baseline {baseline} --fail-on major   # the report as a gate")
    say(f"  open {shlex.quote(str(html))}   # the charts")


def _skew_report(run: Run, html: Path, say: Callable[[str], None]) -> None:
    import io

    from safeserve.skew import analyze
    from safeserve.skew_cli import summarize
    from safeserve.skew_report import render_html

    assert run.baseline is not None
    report = analyze([run.log_path], run.baseline)
    html.write_text(render_html(report, "safeserve demo: skew report"), encoding="utf-8")
    text = io.StringIO()
    summarize(report, text, logs=1, paths=(None, html))
    for line in text.getvalue().splitlines():
        say(f"  {line}")


def prepare_out_dir(out: Path | None) -> tuple[Path, bool]:
    """The output directory, created (a new one by default); and whether an old log was replaced."""
    if out is None:
        out, n = Path(DEFAULT_OUT), 2
        while out.exists():
            out, n = Path(f"{DEFAULT_OUT}-{n}"), n + 1
    out.mkdir(parents=True, exist_ok=True)
    log = out / LOG_NAME
    replaced = log.exists()
    if replaced:
        log.unlink()  # the sink appends: a re-run must not mix two runs in one log
    return out.resolve(), replaced


def run_demo(out: Path | None, seed: int, stream: TextIO) -> int:
    """Run every phase, print the phase table and the summary; returns the exit code."""

    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    random.seed(seed)  # anything drawing from the stdlib generator (log sampling) repeats too
    out_dir, replaced = prepare_out_dir(out)
    run = Run(out_dir / LOG_NAME, seed)
    say(f'safeserve demo: policy "{POLICY}" (owner risk-ml-oncall), seed {seed}')
    say(f"  output directory: {out_dir}{' (its old decisions.jsonl replaced)' * replaced}")
    say(f"  primary: v3, a logistic fraud scorer; fallbacks in order: {', '.join(FALLBACKS)}")
    say(
        f"  guard: timeout {TIMEOUT_S * 1000:.0f} ms, 3 attempts on ConnectionError, breaker "
        f"opens at 50% failures of the last 20 calls, open {OPEN_S} s on a clock simulating "
        f"{1 / TICK_S:.0f} calls/s"
    )
    say("\nphases")
    for phase in PHASES:
        say(f"  {phase.name:<9}  {phase.calls:>3} calls  {phase.story}")
    say(
        "\ncolumns: answers by source (failed: nothing answered); retried: the primary needed "
        "more than one attempt;\n         latency per call; the breaker's state at the end of "
        "the phase; reasons as counted by stats()\n"
    )
    say(table_row(None))
    run_phases(run, lambda result: say(table_row(result)))
    _report(run, say)
    return 0

"""admin_router: health, Prometheus metrics and breaker controls for a set of guards.

Everything is read from the guards' own counters at request or scrape time, so serving these
routes adds nothing to a guarded call.
"""

from __future__ import annotations

import hmac
import itertools
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from time import monotonic
from typing import Annotated, Any

from fastapi import APIRouter, Header, Security
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from safeserve import registry
from safeserve.breaker import DISABLED, FORCED_OPEN, HALF_OPEN, METRICS_ONLY, OPEN
from safeserve.guard import Guard, _Bound
from safeserve.histograms import CONFIDENCE_BUCKETS, LATENCY_BUCKETS, Histogram
from safeserve.logwriter import LogWriter

_COUNTERS = {
    "calls": ("Guarded calls by how they were served", ["policy", "served_by"]),
    "degradations": ("Degraded calls by reason", ["policy", "reason"]),
    "log_dropped_records": ("Decision records dropped by a full log queue", ["policy"]),
    "log_write_failures": ("Decision records the log sink refused (write errors)", ["sink"]),
}
_STATES = ("closed", OPEN, HALF_OPEN, FORCED_OPEN, DISABLED, METRICS_ONLY)


class _RecentRate:
    """Degradation rate over about the last minute, from counts sampled on each read."""

    window_s = 60.0

    def __init__(self) -> None:
        self._samples: weakref.WeakKeyDictionary[Guard, deque[tuple[float, int, int]]] = (
            weakref.WeakKeyDictionary()
        )

    def rate(self, guard: Guard, calls: int, degraded: int) -> float:
        """Degraded / calls since the newest sample at least `window_s` old (else since start)."""
        now = monotonic()
        samples = self._samples.setdefault(guard, deque())
        while len(samples) > 1 and now - samples[1][0] >= self.window_s:
            samples.popleft()
        base_calls, base_degraded = 0, 0
        if samples and now - samples[0][0] >= self.window_s:
            base_calls, base_degraded = samples[0][1], samples[0][2]
        if not samples or now - samples[-1][0] >= 1.0:
            samples.append((now, calls, degraded))
        n = calls - base_calls
        return round((degraded - base_degraded) / n, 4) if n > 0 else 0.0


class _Collector(Collector):
    """Prometheus metrics read from the guards' own counters at scrape time (no hot-path cost).

    Guards sharing a name are summed under one `policy` label (an open breaker wins the state).
    Exporting every guard, it counts those gone too (`registry.totals`).
    """

    def __init__(self, guards: Callable[[], list[Guard]], every_guard: bool) -> None:
        self.guards = guards
        self.every_guard = every_guard
        # every writer a scrape has seen (one per sink, for the process's life: `writer_for`),
        # so that a sink's failures stay counted once no guard writes there
        self.writers: dict[int, LogWriter] = {}

    def collect(self) -> Iterator[Metric]:
        counts: dict[str, Counter[tuple[str, ...]]] = {name: Counter() for name in _COUNTERS}
        states: dict[str, str] = {}
        latency: dict[str, Histogram] = {}
        confidence: dict[str, Histogram] = {}
        guards = self.guards()
        for g in guards:
            w = g.policy_writer()
            if w is not None:
                self.writers.setdefault(id(w), w)
            if states.get(g.name) not in (OPEN, FORCED_OPEN):
                states[g.name] = g.breaker.state
        for w in list(self.writers.values()):  # a sink shared by guards is counted once
            counts["log_write_failures"][(w.name,)] += w.failed  # sinks may share a name
        if self.every_guard:  # those of guards gone too, so that no total goes down
            by_name = registry.totals()
        else:
            by_name = {}
            for g in guards:
                by_name.setdefault(g.name, registry.Totals()).add(g.remains)
        checked = {g.name for g in guards if g.policy.confidence is not None}
        for name, t in by_name.items():
            counts["calls"].update({(name, str(k)): n for k, n in t.served.items()})
            counts["calls"][name, "none"] += t.unanswered  # failed or rejected: nothing answered
            counts["degradations"].update({(name, k): n for k, n in t.reasons.items()})
            counts["log_dropped_records"][(name,)] += t.dropped
            if t.histogrammed:
                latency[name] = t.histograms.latency
                if name in checked or any(t.histograms.confidence.counts):
                    confidence[name] = t.histograms.confidence
        for name, (documentation, labels) in _COUNTERS.items():
            counter = CounterMetricFamily(f"safeserve_{name}", documentation, labels=labels)
            for values, n in counts[name].items():
                counter.add_metric(list(values), n)
            yield counter
        gauge = GaugeMetricFamily(
            "safeserve_breaker_state", "1 for the breaker's state", labels=["policy", "state"]
        )
        for policy, state in states.items():
            for s in _STATES:
                gauge.add_metric([policy, s], float(s == state))
        yield gauge
        yield _histogram(
            "safeserve_call_duration_seconds",
            "Guarded calls and routes, from the call to its answer (a fallback's included)",
            LATENCY_BUCKETS,
            latency,
        )
        yield _histogram(
            "safeserve_confidence",
            "The confidence of the primary's answers, where the policy checks one",
            CONFIDENCE_BUCKETS,
            confidence,
        )


def _histogram(
    name: str, documentation: str, bounds: tuple[float, ...], by_policy: dict[str, Histogram]
) -> HistogramMetricFamily:
    """A histogram family, one series per policy (its guards already added up)."""
    family = HistogramMetricFamily(name, documentation, labels=["policy"])
    les = (*map(str, bounds), "+Inf")
    for policy, h in by_policy.items():
        buckets = list(zip(les, itertools.accumulate(h.counts), strict=True))
        family.add_metric([policy], buckets, h.total)
    return family


def _refusal(authorization: str | None, token: str | None) -> JSONResponse | None:
    """None when the bearer token matches; else the 401/403 to send."""
    if token is None:
        return JSONResponse({"error": "forbidden", "detail": "no admin token configured"}, 403)
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return JSONResponse({"error": "unauthorized"}, 401, headers={"WWW-Authenticate": "Bearer"})
    # the header's bytes (read as latin-1) against the token's UTF-8: a non-ASCII token matches
    # (ASCII spaces stripped from the bytes: "\xa0" is the last byte of "à")
    if not hmac.compare_digest(given.encode("latin-1", "replace").strip(b" \t"), token.encode()):
        return JSONResponse({"error": "forbidden"}, 403)
    return None


def _described(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {}}}


def _distinct(guards: Iterable[Guard]) -> list[Guard]:
    """The guards in order, each once; a bound method's (`svc.predict`) is its guard's."""
    seen: dict[int, Guard] = {}
    for given in guards:
        g = given._guard if isinstance(given, _Bound) else given
        seen.setdefault(id(g), g)
    return list(seen.values())


def admin_router(
    guards: Iterable[Guard] | None = None, token: str | None = None, prefix: str = "/safeserve"
) -> APIRouter:
    """Health, Prometheus metrics and breaker controls for `guards` (if None: every live guard,
    and in the metrics the counts of guards gone since, so that no counter goes down).

    `POST {prefix}/breakers/{name}/{open|close|reset}` needs `Authorization: Bearer <token>`;
    without a configured token it always answers 403.
    """
    # a guarded method (`svc.predict`) counts as its guard, and a guard listed twice once
    fixed = _distinct(guards) if guards is not None else None
    if token is not None:  # "" (a variable set but empty) is no token; a secret file's "\n" goes
        token = token.strip(" \t\r\n") or None  # what `_refusal` strips from the header, and lines
    if fixed is None:
        registry.collect_histograms_everywhere()
    else:
        for g in fixed:
            g.collect_histograms()

    def chosen() -> list[Guard]:
        return fixed if fixed is not None else registry.live_guards()

    recent = _RecentRate()
    metrics = CollectorRegistry(auto_describe=False)  # one per router: re-creation is fine
    metrics.register(_Collector(chosen, every_guard=fixed is None))
    router = APIRouter(prefix=prefix, tags=["safeserve"])

    @router.get("/health", responses={503: _described("a guard's breaker is open")})
    async def health() -> JSONResponse:
        entries = []
        for g in chosen():
            stats = g.stats()
            # a rejected input is answered degraded too (422, X-SafeServe-Degraded: true)
            degraded = stats["degraded"] + stats["rejected"]
            entries.append(
                {
                    "name": g.name,
                    "owner": g.policy.owner,
                    "state": stats["breaker_state"],
                    "calls": stats["calls"],
                    "degraded": degraded,
                    "recent_degradation_rate": recent.rate(g, stats["calls"], degraded),
                }
            )
        down = any(e["state"] in (OPEN, FORCED_OPEN) for e in entries)
        body = {"status": "unavailable" if down else "ok", "guards": entries}
        return JSONResponse(body, 503 if down else 200)

    # HEAD too (some load balancers and uptime checks probe with it), left out of the OpenAPI
    # schema, where it would be a second operation of the same name
    router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @router.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    # {name:path}: a guard's name may hold "/" (sent as %2F); the action is the last segment
    @router.post(
        "/breakers/{name:path}/{action}",
        # documents the bearer scheme in OpenAPI; `_refusal` reads the header itself
        dependencies=[Security(HTTPBearer(auto_error=False))],
        responses={
            401: _described("no bearer token sent"),
            403: _described("the wrong token, or none configured"),
            404: _described("no such guard or action"),
        },
    )
    async def breaker_action(
        name: str, action: str, authorization: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        refused = _refusal(authorization, token)
        if refused is not None:
            return refused
        if action not in ("open", "close", "reset"):
            return JSONResponse(
                {"error": "unknown action", "actions": ["open", "close", "reset"]}, 404
            )
        targets = [g for g in chosen() if g.name == name]
        if not targets:
            return JSONResponse({"error": "unknown guard"}, 404)
        for g in targets:
            getattr(g, action)()
        return JSONResponse(
            {"name": name, "action": action, "states": [g.breaker.state for g in targets]}
        )

    return router

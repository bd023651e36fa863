"""FastAPI / Starlette integration: a pure ASGI middleware that guards routes, and admin routes.

`SafeServeMiddleware` applies a guard's breaker, bulkhead, time budget and fallbacks around an
HTTP endpoint, the way the guard does around a function: the degradation path, counters and
decision records are the guard's own, so `stats()`, `decisions()`, drills and the log behave
the same for a route as for a decorated function. Only `http.response.start` is inspected: a
5xx start is dropped and replaced by a fallback's answer; any other start is sent at once and
the body streams through untouched. `admin_router` serves health, Prometheus metrics and
breaker controls for a set of guards.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import math
import re
import weakref
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from time import monotonic, perf_counter
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from safeserve import registry
from safeserve.breaker import DISABLED, FORCED_OPEN, HALF_OPEN, METRICS_ONLY, OPEN
from safeserve.context import Noted
from safeserve.context import current as _outcomes
from safeserve.decisions import RawReason, json_safe
from safeserve.degrade import Degradation, failed_attempt
from safeserve.errors import AttemptTimeout, NoFallbackAvailable
from safeserve.guard import AsyncGuard, Guard
from safeserve.policy import Policy

SERVED_BY = b"x-safeserve-served-by"
DEGRADED = b"x-safeserve-degraded"
_HEALTHY = [(SERVED_BY, b"primary"), (DEGRADED, b"false")]
_JSON = (b"content-type", b"application/json")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COUNTERS = {
    "calls": ("Guarded calls by how they were served", ["policy", "served_by"]),
    "degradations": ("Degraded calls by reason", ["policy", "reason"]),
    "log_dropped_records": ("Decision records dropped by a full log queue", ["policy"]),
}
_STATES = ("closed", OPEN, HALF_OPEN, FORCED_OPEN, DISABLED, METRICS_ONLY)


class EndpointError(Exception):
    """The endpoint answered with a 5xx status, or returned without answering."""


class LatencyHistogram:
    """Request latencies of one guarded route, in Prometheus buckets (read at scrape time)."""

    __slots__ = ("counts", "total_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total_s = 0.0


# Latency of the guards a middleware serves, for the metrics route; written at setup only.
_latencies: weakref.WeakKeyDictionary[Guard, LatencyHistogram] = weakref.WeakKeyDictionary()


class _Route:
    """A guarded route: its guard and latency histogram."""

    __slots__ = ("guard", "latency")

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.latency = _latencies.setdefault(guard, LatencyHistogram())


def _guard_for(target: Policy | Guard, path: str) -> Guard:
    """The route's guard: the one given, or a new one whose 'function' is the endpoint."""
    if isinstance(target, Guard):
        return target
    if not isinstance(target, Policy):
        raise TypeError(f"routes[{path!r}]: expected a Policy or a guard, got {type(target)!r}")

    async def endpoint(body: Any) -> Any:
        """Stands for the HTTP endpoint, which the middleware calls itself."""
        raise NotImplementedError(f"the endpoint {path} is served by SafeServeMiddleware")

    endpoint.__qualname__ = endpoint.__name__ = f"endpoint {path}"
    return AsyncGuard(endpoint, target)


def _template_regex(template: str) -> str:
    """A path template ("/items/{id}", "/files/{p:path}") as a regex with no capture groups."""
    out = []
    for i, part in enumerate(re.split(r"\{([^}]*)\}", template)):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            kind = part.partition(":")[2]
            out.append({"path": ".*", "int": "[0-9]+"}.get(kind, "[^/]+"))
    return "".join(out)


def _add_headers(message: Message, extra: list[tuple[bytes, bytes]]) -> None:
    # a new list: a Response object reuses its own header list for every send
    message["headers"] = [*message.get("headers", ()), *extra]


def _noted_headers(noted: Noted) -> list[tuple[bytes, bytes]]:
    """Headers for what guarded calls inside the endpoint noted (the first degraded one wins)."""
    for served_by, degraded in noted:
        if degraded:
            name = "none" if served_by is None else served_by
            return [(SERVED_BY, name.encode("latin-1", "replace")), (DEGRADED, b"true")]
    return _HEALTHY


class SafeServeMiddleware:
    """Guards the listed routes (exact paths or templates) with a policy or an existing guard.

    Routes not listed, and non-HTTP scopes, go straight to the app; an unlisted endpoint that
    calls a guarded function which degraded still gets the X-SafeServe headers.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Mapping[str, Policy | Guard],
        *,
        max_body_bytes: int = 1 << 20,
        annotate_unlisted: bool = True,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.annotate_unlisted = annotate_unlisted
        self.exact: dict[str, _Route] = {}
        self.templated: list[_Route] = []
        patterns = []
        for path, target in routes.items():
            route = _Route(_guard_for(target, path))
            if "{" in path:
                patterns.append(f"(?P<r{len(self.templated)}>{_template_regex(path)})")
                self.templated.append(route)
            else:
                self.exact[path] = route
        self.pattern = re.compile("|".join(patterns)) if patterns else None
        self.guards = [r.guard for r in (*self.exact.values(), *self.templated)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.exact.get(scope["path"])
        if route is None and self.pattern is not None:
            match = self.pattern.fullmatch(scope["path"])
            if match is not None and match.lastgroup is not None:
                route = self.templated[int(match.lastgroup[1:])]
        if route is not None:
            await _Responder(self.app, route, self.max_body_bytes, scope, receive, send).run()
        elif self.annotate_unlisted:
            await _annotated(self.app, scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _annotated(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run an unlisted endpoint; add the headers only if a guarded call in it noted something."""
    noted: Noted = []

    async def send_noted(message: Message) -> None:
        if noted and message["type"] == "http.response.start":
            _add_headers(message, _noted_headers(noted))
        await send(message)

    token = _outcomes.set(noted)  # context.collect(), minus the generator's cost
    try:
        await app(scope, receive, send_noted)
    finally:
        _outcomes.reset(token)


class _Responder:
    """One guarded request: admission, the endpoint under its time budget, else a fallback.

    Attributes set only when needed fall back to the class defaults below (a healthy request
    sets few of them).
    """

    body_size = 0
    body_done = False
    started = False  # a response start went out: the endpoint's answer stands
    closed = False  # the endpoint's messages are dropped from now on
    expired = False  # the time budget ran out before the response started
    failed_status = 0
    decided: asyncio.Future[None] | None = None
    task: asyncio.Task[None] | None = None
    permit = 0

    def __init__(
        self, app: ASGIApp, route: _Route, max_body: int, scope: Scope, receive: Receive, send: Send
    ) -> None:
        self.app = app
        self.route = route
        self.max_body = max_body
        self.scope = scope
        self.receive = receive
        self.send = send
        self.chunks: list[bytes] = []
        self.noted: Noted = []
        self.t0 = perf_counter()
        # the rest of the state starts at the class defaults above

    async def run(self) -> None:
        token = _outcomes.set(self.noted)  # what context.collect() does, without its cost
        try:
            await self.guarded()
        finally:
            _outcomes.reset(token)

    async def guarded(self) -> None:
        guard = self.route.guard
        p = guard._p
        if guard.forced is not None:
            await self.fall_back(guard._drill(p, (), {}, 0), None)
            return
        permit = guard.breaker.fast_permit
        notices: list[RawReason] | None = None
        if not permit or p.bulkhead is not None:
            permit, notices, refused = guard._admit(p, (), {}, 0, None)
            if refused is not None:
                await self.fall_back(refused, None)
                return
        self.permit = permit
        failure: Exception | None = None
        try:
            if p.timeout_s is None:
                await self.app(self.scope, self.receive_tee, self.send_checked)
            else:
                await self.call_within(p.timeout_s)
            if not self.started:
                failure = EndpointError(
                    f"HTTP {self.failed_status}"
                    if self.failed_status
                    else "the endpoint returned without a response"
                )
        except asyncio.CancelledError:
            guard.breaker.release(permit)  # the client or server went away: no outcome
            raise
        except Exception as exc:
            if self.started:
                raise  # a streamed response failed midway: too late for a fallback
            failure = exc
        finally:
            if p.bulkhead is not None:
                p.bulkhead.release()
        latency = perf_counter() - self.t0
        histogram = self.route.latency
        histogram.counts[bisect_left(LATENCY_BUCKETS, latency)] += 1
        histogram.total_s += latency
        if failure is not None:
            attempts = [failed_attempt(failure, latency)]
            d = guard._primary_failed(p, failure, (), {}, 0, permit, self.t0, attempts)
            await self.fall_back(d, notices)
        elif notices:  # served, but a notice (e.g. store_unavailable) goes on the record
            d = Degradation(p, (None,), {}, 0, guard.breaker.state_of(permit), [])
            d.flagged = True
            guard._finish(d, None, "primary", self.t0, False, notices)

    async def call_within(self, timeout_s: float) -> None:
        """Run the endpoint in its own task, abandoned if it has not started its response by
        the deadline (a sync endpoint's thread cannot be interrupted, only left behind)."""
        loop = asyncio.get_running_loop()
        self.decided = decided = loop.create_future()
        self.task = task = loop.create_task(self.endpoint())
        task.add_done_callback(self._ended)
        timer = loop.call_later(timeout_s, self._expire)
        try:
            await decided
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            timer.cancel()
        if self.expired:
            raise AttemptTimeout(f"no response within {timeout_s * 1000:.0f} ms")
        await task

    async def endpoint(self) -> None:
        await self.app(self.scope, self.receive_tee, self.send_checked)

    def _expire(self) -> None:
        if not self.started and self.task is not None:
            self.expired = self.closed = True
            self.task.cancel()
            self._decide()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            task.exception()  # an abandoned endpoint's error is seen here, not logged as lost
        self._decide()

    def _decide(self) -> None:
        if self.decided is not None and not self.decided.done():
            self.decided.set_result(None)

    async def receive_tee(self) -> Message:
        """The request, as read by the endpoint; its body is kept for a fallback."""
        message = await self.receive()
        if message["type"] == "http.request":
            if not message.get("more_body") and not self.chunks:
                self.chunks.append(message.get("body", b""))  # the common case: one chunk
                self.body_size = len(self.chunks[0])
                self.body_done = True
            else:
                self._keep(message)
        return message

    def _keep(self, message: Message) -> None:
        body = message.get("body", b"")
        self.body_size += len(body)
        if self.body_size <= self.max_body:
            self.chunks.append(body)
        self.body_done = not message.get("more_body", False)

    async def send_checked(self, message: Message) -> None:
        if self.closed:
            return
        if message["type"] == "http.response.start":
            status = message["status"]
            if status >= 500:
                self.failed_status = status
                self.closed = True
                self._decide()
                return
            self.started = True
            guard = self.route.guard
            breaker = guard.breaker
            if status >= 400:  # a 4xx is the endpoint's answer, neither success nor failure
                breaker.release(self.permit)
            else:
                latency = perf_counter() - self.t0
                if latency >= breaker.quiet_below:
                    breaker.on_success(self.permit, latency)
            next(guard._healthy_count)
            message["headers"] = [*message.get("headers", ()), *_noted_headers(self.noted)]
            if self.decided is not None:
                self._decide()
        await self.send(message)

    async def request_input(self) -> Any:
        """The request body as parsed JSON (None when absent, too large or not JSON)."""
        while not self.body_done:
            message = await self.receive()
            if message["type"] != "http.request":
                break
            self._keep(message)
        if not self.chunks or self.body_size > self.max_body:
            return None
        try:
            return json.loads(b"".join(self.chunks))
        except ValueError:
            return None

    async def fall_back(self, d: Degradation, notices: list[RawReason] | None) -> None:
        """Walk the guard's fallbacks with the parsed body; answer 200 JSON, else 503."""
        guard = self.route.guard
        d.args = (await self.request_input(),)
        try:
            value = await guard._fallback_async(d, self.t0, False, notices)
        except NoFallbackAvailable:
            retry_after = max(1, math.ceil(guard.breaker.retry_after_s()))
            body = {"error": "unavailable", "policy": guard.name}
            extra = [(b"retry-after", str(retry_after).encode())]
            await self.respond(503, body, _noted_headers(self.noted[-1:]) + extra)
            return
        await self.respond(200, json_safe(value), _noted_headers(self.noted[-1:]))

    async def respond(self, status: int, body: Any, headers: list[tuple[bytes, bytes]]) -> None:
        content = json.dumps(body, separators=(",", ":")).encode()
        length = (b"content-length", str(len(content)).encode())
        start = {"type": "http.response.start", "status": status}
        await self.send({**start, "headers": [_JSON, length, *headers]})
        await self.send({"type": "http.response.body", "body": content})


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
    """

    def __init__(self, guards: Callable[[], list[Guard]]) -> None:
        self.guards = guards

    def collect(self) -> Iterator[Metric]:
        counts: dict[str, Counter[tuple[str, ...]]] = {name: Counter() for name in _COUNTERS}
        states: dict[str, str] = {}
        latency: dict[str, tuple[list[int], float]] = {}
        for g in self.guards():
            stats = g.stats()
            counts["calls"].update({(g.name, str(k)): n for k, n in stats["served_by"].items()})
            counts["calls"][g.name, "none"] += stats["failed"]
            counts["degradations"].update({(g.name, k): n for k, n in stats["reasons"].items()})
            counts["log_dropped_records"][(g.name,)] += stats["dropped_records"]
            if states.get(g.name) not in (OPEN, FORCED_OPEN):
                states[g.name] = stats["breaker_state"]
            h = _latencies.get(g)
            if h is not None:
                buckets, total = latency.get(g.name, ([0] * len(h.counts), 0.0))
                summed = [a + b for a, b in zip(buckets, h.counts, strict=True)]
                latency[g.name] = (summed, total + h.total_s)
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
        histogram = HistogramMetricFamily(
            "safeserve_request_duration_seconds", "Guarded route latency", labels=["policy"]
        )
        bounds = (*map(str, LATENCY_BUCKETS), "+Inf")
        for policy, (buckets, total) in latency.items():
            cumulative = itertools.accumulate(buckets)
            histogram.add_metric([policy], list(zip(bounds, cumulative, strict=True)), total)
        yield histogram


def _refusal(authorization: str | None, token: str | None) -> JSONResponse | None:
    """None when the bearer token matches; else the 401/403 to send."""
    if token is None:
        return JSONResponse({"error": "forbidden", "detail": "no admin token configured"}, 403)
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return JSONResponse({"error": "unauthorized"}, 401, headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return JSONResponse({"error": "forbidden"}, 403)
    return None


def admin_router(
    guards: Iterable[Guard] | None = None, token: str | None = None, prefix: str = "/safeserve"
) -> APIRouter:
    """Health, Prometheus metrics and breaker controls for `guards` (all live guards if None).

    `POST {prefix}/breakers/{name}/{open|close|reset}` needs `Authorization: Bearer <token>`;
    without a configured token it always answers 403.
    """
    fixed = list(guards) if guards is not None else None

    def chosen() -> list[Guard]:
        return fixed if fixed is not None else registry.live_guards()

    recent = _RecentRate()
    metrics = CollectorRegistry(auto_describe=False)  # one per router: re-creation is fine
    metrics.register(_Collector(chosen))
    router = APIRouter(prefix=prefix, tags=["safeserve"])

    @router.get("/health")
    async def health() -> JSONResponse:
        entries = []
        for g in chosen():
            stats = g.stats()
            entries.append(
                {
                    "name": g.name,
                    "owner": g.policy.owner,
                    "state": stats["breaker_state"],
                    "calls": stats["calls"],
                    "degraded": stats["degraded"],
                    "recent_degradation_rate": recent.rate(g, stats["calls"], stats["degraded"]),
                }
            )
        down = any(e["state"] in (OPEN, FORCED_OPEN) for e in entries)
        body = {"status": "unavailable" if down else "ok", "guards": entries}
        return JSONResponse(body, 503 if down else 200)

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @router.post("/breakers/{name}/{action}")
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

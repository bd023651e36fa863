"""SafeServeMiddleware: a pure ASGI middleware that guards HTTP routes with a guard's policy.

It applies a guard's breaker, bulkhead, time budget and fallbacks around an endpoint, the way the
guard does around a function: the degradation path, counters and decision records are the
guard's own, so `stats()`, `decisions()`, drills and the log behave the same for a route as for a
decorated function. Only `http.response.start` is inspected: a 5xx start is dropped and replaced
by a fallback's answer; any other start is sent at once and the body streams through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import re
import threading
import warnings
from collections.abc import Awaitable, Mapping
from contextvars import Context, copy_context
from functools import partial
from random import random
from time import perf_counter
from typing import Any

from starlette.convertors import CONVERTOR_TYPES
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from safeserve import context
from safeserve.context import Noted
from safeserve.context import current as _outcomes
from safeserve.deadlines import SETTLED, Deadlines, new_deadlines
from safeserve.decisions import RawReason
from safeserve.degrade import Degradation, failed_attempt
from safeserve.errors import AttemptTimeout, NoFallbackAvailable
from safeserve.guard import AsyncGuard, Guard
from safeserve.integrations.encoding import encode_answer
from safeserve.logwriter import flush_logs
from safeserve.pipeline import Pipeline
from safeserve.policy import Policy
from safeserve.recording import loads_json
from safeserve.tracing import flush_spans

SERVED_BY = b"x-safeserve-served-by"
DEGRADED = b"x-safeserve-degraded"
_HEALTHY = [(SERVED_BY, b"primary"), (DEGRADED, b"false")]
_UNAVAILABLE = [(SERVED_BY, b"none"), (DEGRADED, b"true")]
_NOTHING_NOTED: Any = ()  # a request's `noted` while nothing can be noted (falsy, never appended)
_JSON = (b"content-type", b"application/json")
# the latencies a route puts in its histogram at once (`Histogram.fold`)
_FOLD_AT = 256
_GROUP = "_safeserve_route"  # a template's group in the routes' regex: _safeserve_route0, ...
_NOTED_KEY = "safeserve.noted"  # in a failed request's scope: what its guarded calls noted
Headers = list[tuple[bytes, bytes]]
# Called through module-level names: in Python 3.11 a method called on an imported name, or on
# an attribute holding a callable, is looked up on every call instead of specialized.
_set_noted = _outcomes.set
_reset_noted = _outcomes.reset
_current_task = asyncio.current_task


class EndpointError(Exception):
    """The endpoint answered with a 5xx status, or returned without answering."""


class _Route:
    """A guarded route: the app behind it, its guard, latency histogram, body limit and the
    time budgets of its requests in flight."""

    __slots__ = ("app", "deadlines", "guard", "latency", "max_body", "pending")

    def __init__(self, app: ASGIApp, guard: Guard, max_body: int) -> None:
        self.app = app
        self.guard = guard
        # an answer's latency is appended to `pending`; the histogram outlives the guard's reloads
        self.latency = guard.collect_histograms().latency
        self.pending = self.latency.pending
        self.max_body = max_body
        self.deadlines: dict[asyncio.AbstractEventLoop, Deadlines] = {}


def _guard_for(target: Policy | Guard, path: str) -> Guard:
    """The route's guard: the one given, or a new one whose 'function' is the endpoint."""
    if isinstance(target, Guard):
        return target
    if not isinstance(target, Policy):
        raise TypeError(f"routes[{path!r}]: expected a Policy or a guard, got {type(target)!r}")
    ignored = _not_for_routes(target)
    if ignored:
        warnings.warn(
            f"routes[{path!r}]: policy {target.name!r}: a route's middleware ignores "
            f"{', '.join(ignored)}: they act on a guarded function's calls and answers",
            UserWarning,
            stacklevel=3,
        )

    async def endpoint(body: Any) -> Any:
        """Stands for the HTTP endpoint, which the middleware calls itself."""
        raise NotImplementedError(f"the endpoint {path} is served by SafeServeMiddleware")

    endpoint.__qualname__ = endpoint.__name__ = f"endpoint {path}"
    return _RouteGuard(endpoint, target)


def _not_for_routes(policy: Policy) -> list[str]:
    """The parts of a policy a guarded route cannot apply: the middleware sees the endpoint's
    HTTP answer, not a model's input and output."""
    parts = [f for f in ("validation", "retry", "confidence") if getattr(policy, f) is not None]
    if any(f.kind == "cache" for f in policy.fallbacks):
        parts.append("cache fallbacks (they fill from the primary's answers)")
    if policy.batch:
        parts.append("batch")
    return parts


class _RouteGuard(AsyncGuard):
    """The guard of a route given as a policy: only the middleware calls it."""

    endpoint_callable = False


def _template_regex(template: str) -> str:
    """A path template ("/items/{id}", "/files/{p:path}") as a regex, each parameter matched by
    its starlette convertor's regex (a convertor of the app's own too)."""
    out = []
    for i, part in enumerate(re.split(r"\{([^}]*)\}", template)):
        if i % 2 == 0:
            out.append(re.escape(part))
            continue
        kind = part.partition(":")[2].strip() or "str"
        convertor = CONVERTOR_TYPES.get(kind)
        if convertor is None:
            raise ValueError(f"routes[{template!r}]: unknown path convertor {kind!r}")
        out.append(f"(?:{convertor.regex})")
    return "".join(out)


def _add_headers(message: Message, extra: Headers) -> None:
    # a new list: a Response object reuses its own header list for every send
    message["headers"] = [*message.get("headers", ()), *extra]


async def _dropped() -> None:
    """What `send` awaits for a message the middleware drops."""


async def _disconnected() -> Message:
    """`receive` of a request already answered."""
    return {"type": "http.disconnect"}


async def _discard(message: Message) -> None:
    """`send` of a request already answered."""


def _retrieved(task: asyncio.Task[Any]) -> None:
    """Marks a task's exception as seen (it was handled, or reached the log already)."""
    if not task.cancelled():
        task.exception()


def _last_part(message: Message) -> bool:
    """Whether the message ends the response."""
    return message["type"] == "http.response.body" and not message.get("more_body", False)


def _timeout(budget: float | None) -> AttemptTimeout:
    return AttemptTimeout(f"no response within {(budget or 0) * 1000:.0f} ms")


def _noted_headers(noted: Noted) -> Headers:
    """Headers for what guarded calls inside the endpoint noted (the first degraded one wins)."""
    for served_by, degraded in noted:
        if degraded:
            name = "none" if served_by is None else served_by
            return [(SERVED_BY, name.encode("latin-1", "replace")), (DEGRADED, b"true")]
    return _HEALTHY


class SafeServeMiddleware:
    """Guards the listed routes (exact paths or templates) with a policy or an existing guard.

    Routes not listed, and non-HTTP scopes, go straight to the app; an unlisted endpoint that
    calls a guarded function still gets the X-SafeServe headers. Until the
    process has a guard an endpoint could call (`context.armed`), endpoints are not watched
    for such calls: a guarded route skips that, and unlisted ones cost a dict lookup only. A
    guard made while a request is in flight reports from the next request on.
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
            route = _Route(app, _guard_for(target, path), max_body_bytes)
            if "{" in path:
                patterns.append(f"(?P<{_GROUP}{len(self.templated)}>{_template_regex(path)})")
                self.templated.append(route)
            else:
                self.exact[path] = route
        self.pattern = re.compile("|".join(patterns)) if patterns else None
        self.guards = [r.guard for r in (*self.exact.values(), *self.templated)]

    # A plain function returning the awaitable that serves the request: a request costs one
    # coroutine (the route's, or the app's own), not one more for the middleware.
    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "http":
            path = scope["path"]
            if scope.get("root_path"):  # behind a prefix: match the path the app routes on
                path = _route_path(path, scope["root_path"])
            route = self.exact.get(path)
            if route is None and self.pattern is not None:
                match = self.pattern.fullmatch(path)
                if match is not None:
                    route = self.templated[_template_of(match)]
            if route is not None:
                return _Responder().serve(route, scope, receive, send)
            if self.annotate_unlisted and context.armed:
                return _annotated(self.app, scope, receive, send)
        elif scope["type"] == "lifespan":
            return _lifespan(self.app, scope, receive, send)
        return self.app(scope, receive, send)

    # ASGI servers tell ASGI 3 apps from WSGI ones by `asyncio.iscoroutinefunction(__call__)`
    # (uvicorn), or by `inspect.iscoroutinefunction` (hypercorn; uvicorn on Python 3.14), which
    # a plain function passes from Python 3.12 on
    __call__._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    if hasattr(inspect, "markcoroutinefunction"):
        inspect.markcoroutinefunction(__call__)


def _template_of(match: re.Match[str]) -> int:
    """Which template matched: the group that closed last is its own, unless a convertor's regex
    has groups of its own."""
    name = match.lastgroup
    if name is None or not name.startswith(_GROUP):
        groups = match.groupdict()
        name = next(k for k, v in groups.items() if v is not None and k.startswith(_GROUP))
    return int(name[len(_GROUP) :])


def _route_path(path: str, root_path: str) -> str:
    """The path without the app's mount prefix, as starlette routes on it."""
    if path.startswith(root_path) and path[len(root_path) : len(root_path) + 1] in ("/", ""):
        return path[len(root_path) :]
    return path


class FlushLogsAtShutdown:
    """A pure ASGI middleware that only writes the queued decision records and exports the
    queued spans before the app's lifespan shutdown completes, as `SafeServeMiddleware` does
    (for `safeserve serve`'s app, which has no guarded route)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] == "lifespan":
            return _lifespan(self.app, scope, receive, send)
        return self.app(scope, receive, send)


async def _lifespan(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """The app's lifespan, with the queued decision records written and the queued spans
    exported before shutdown completes: on SIGTERM uvicorn raises the signal again once shut
    down, before `atexit` handlers run."""

    async def send_flushed(message: Message) -> None:
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await asyncio.to_thread(_flush_at_shutdown)
        await send(message)

    await app(scope, receive, send_flushed)


def _flush_at_shutdown() -> None:
    flush_logs()
    flush_spans()


async def _annotated(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run an unlisted endpoint; add the headers if it called a guarded function."""
    noted: Noted = []

    async def send_noted(message: Message) -> None:
        if noted and message["type"] == "http.response.start":
            _add_headers(message, _noted_headers(noted))
        await send(message)

    token = _set_noted(noted)  # context.collect(), minus the generator's cost
    try:
        await app(scope, receive, send_noted)
    except Exception:
        if noted:  # for the 500 the app's error handler sends (`install_error_handlers`)
            scope[_NOTED_KEY] = noted
        raise
    finally:
        _reset_noted(token)


def failed_request_headers(scope: Scope) -> dict[str, str]:
    """The X-SafeServe headers for an unlisted request that failed after calling a guarded
    function (none if it called none): its answer is sent by the app's error handler."""
    noted = scope.get(_NOTED_KEY)
    if not noted:
        return {}
    return {name.decode(): value.decode("latin-1") for name, value in _noted_headers(noted)}


# What happens to the endpoint's messages (`_Responder.state`).
# The time budget still applies below _SETTLED and no longer from it on.
_WAITING = 0  # the response start is checked when it comes
_FAILING = 1  # dropped: a 5xx start, from an endpoint still running under its time budget
_SETTLED = SETTLED  # 2, the deadline queue's own
_STARTED = 2  # passed on: the endpoint's answer stands
_DROPPED = 3  # dropped: the endpoint ended (or failed) without a response; a fallback answers
_EXPIRED = 4  # dropped: the time budget ran out before the response started
_CANCELLED = 5  # _EXPIRED, and the request's task was cancelled at the deadline
_ANSWERED = 6  # dropped: the endpoint's 5xx response is over, a fallback answers (has answered)
_STUCK = 7  # _CANCELLED, but not unwound a loop turn later: a fallback answers meanwhile


class _Rest:
    """The request's messages after the first (a body sent in parts): kept up to max_body."""

    __slots__ = ("chunks", "done", "left", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False
        self.left = False  # the client went away


class _Responder:
    """One guarded request: admission, the endpoint under its time budget, else a fallback.

    A healthy request is accounted for when its response starts (`send_checked`), a 5xx one
    when its response is over (`answer_failed`): what the app does after its response
    (background tasks, dependency cleanup) neither holds the bulkhead slot nor delays the
    fallback. Slots: Python 3.11 reads a slot or an instance attribute fast, a class default
    slowly. A request sets only those its way needs: `failed_status` with a 5xx start, `task`
    and `deadline` under a time budget (`serve`), `rest` with a body in parts, `slot` while it
    holds a bulkhead slot.
    """

    __slots__ = (
        "answering",
        "context",
        "deadline",
        "failed_status",
        "first",
        "noted",
        "notices",
        "permit",
        "receive",
        "rest",
        "route",
        "send",
        "slot",
        "span",
        "state",
        "t0",
        "task",
    )
    answering: asyncio.Task[None]
    context: Context
    deadline: float
    failed_status: int
    slot: threading.BoundedSemaphore | None
    span: Any
    task: asyncio.Task[Any] | None

    # Set up by `serve`, not an `__init__`: Python 3.11 runs a class's `__init__` in an eval
    # loop of its own, a cost per request.
    route: _Route
    receive: Receive
    send: Send
    noted: Noted
    t0: float
    state: int
    permit: int
    notices: list[RawReason] | None
    first: Message | None
    rest: _Rest | None

    async def serve(self, route: _Route, scope: Scope, receive: Receive, send: Send) -> None:
        """Admit, run the endpoint, then answer from a fallback if it did not answer."""
        self.t0 = perf_counter()
        self.route = route
        self.receive = receive
        self.send = send
        self.noted = _NOTHING_NOTED  # a list of its own once there is anything to note
        self.state = _WAITING
        self.permit = 0
        self.notices = None  # on the call's record (store_unavailable)
        # the request as the endpoint read it, kept for a fallback: the first message as it is
        # (usually the whole body), then the bodies of any later ones
        self.first = None
        self.rest = None
        guard = route.guard
        p = guard._p
        # what context.collect() does, without its cost; `fall_back` collects for itself
        token = None
        if context.armed:
            self.noted = []
            token = _set_noted(self.noted)
        budget = p.timeout_s
        if p.tracer is not None:  # the request's span: the endpoint's framework may open its own
            self.span = p.tracer.current_span()
        try:
            if guard.forced is not None:
                await self.fall_back(guard._drill(p, (), {}, 0), None)
                return
            permit = guard.breaker.fast_permit
            notices: list[RawReason] | None = None
            send_checked = self.send_checked
            if not permit or p.bulkhead is not None:
                permit, notices, refused = guard._admit(p, (), {}, 0, None, may_block=False)
                if refused is not None:
                    await self.fall_back(refused, None)
                    return
                self.notices = notices  # the call's record is the flagged one `served_with` writes
                if p.bulkhead is not None:  # held until the response is over
                    self.slot = p.bulkhead
                    send_checked = partial(self.send_held, counted=not notices)
                elif notices:
                    send_checked = partial(self.send_checked, counted=False)
            self.permit = permit
            try:
                if budget is not None:
                    loop = asyncio.get_running_loop()
                    self.task = _current_task(loop)
                    self.context = copy_context()  # for a fallback answering in a task of its own
                    deadlines = route.deadlines.get(loop) or new_deadlines(route.deadlines, loop)
                    deadlines.watch(self, self.t0 + budget)
                app = route.app
                await app(scope, self.receive_tee, send_checked)
            except asyncio.CancelledError:
                if self.state == _STUCK:
                    await self.answered_at_deadline()
                    return
                # not ours when another cancellation (the client or server went away, a
                # caller's timeout) came first
                if not self.cancelled_at_deadline():
                    self.abandoned()
                    raise
                failure: Exception = _timeout(budget)
            except Exception as exc:
                if self.state == _STUCK:
                    await self.answered_at_deadline()
                    return
                # a streamed response failed midway, the app failed after a fallback answered
                # (too late for a fallback), or the client left mid-upload (no outcome)
                if self.state in (_STARTED, _ANSWERED) or isinstance(exc, ClientDisconnect):
                    self.abandoned()
                    raise
                # the endpoint may have turned the deadline's cancellation into another error
                failure = _timeout(budget) if self.cancelled_at_deadline() else exc
            else:
                if self.state == _STARTED:  # served by the endpoint, counted at its start
                    if notices:
                        self.served_with(notices)
                    return
                if self.state == _ANSWERED:  # by a fallback, once the 5xx response was over
                    return
                if self.state == _STUCK:
                    await self.answered_at_deadline()
                    return
                if self.timed_out():  # the endpoint swallowed the cancellation
                    failure = _timeout(budget)
                elif self.state == _FAILING:
                    failure = EndpointError(f"HTTP {self.failed_status}")
                else:
                    failure = EndpointError("the endpoint returned without a response")
            finally:
                if p.bulkhead is not None:
                    self.release_slot()
            self.state = _DROPPED
            await self.endpoint_failed(failure)
        finally:
            if token is not None:
                _reset_noted(token)
            if budget is not None:  # the queue may hold this settled request until its deadline:
                # not its body, task, or the server's request (which `receive`/`send` belong to)
                self.first = self.rest = self.task = None
                self.receive, self.send = _disconnected, _discard

    def abandoned(self) -> None:
        """The request ends without a fallback's answer from `serve`. An answer already started
        was accounted at its start (and its permit used), a fallback's after a 5xx by
        `answer_failed`; else there is no outcome."""
        notices = self.notices
        if self.state == _STARTED:
            if notices:
                self.served_with(notices)
            return
        if self.state == _ANSWERED:
            return
        breaker = self.route.guard.breaker
        breaker.release(self.permit)
        for notice in notices or ():  # for the next call's record
            breaker.post_notice(notice)
        self.state = _DROPPED  # its deadline must not cancel the task's later work

    def served_with(self, notices: list[RawReason]) -> None:
        """Served by the endpoint, but a notice (e.g. store_unavailable) goes on the record."""
        guard = self.route.guard
        d = Degradation(guard._p, (None,), {}, 0, guard.breaker.state_of(self.permit), [])
        d.flagged = True
        guard._finish(d, None, "primary", self.t0, False, notices, timed=False)  # timed at start

    def expire(self) -> None:
        """The deadline passed before the response started: drop the endpoint's messages and
        cancel it where it waits (a sync endpoint's thread cannot be interrupted, only left
        behind); `serve` then answers from a fallback, or, if the endpoint has not unwound a
        loop turn later, `answer_if_stuck` does."""
        if self.state >= _SETTLED:
            return
        self.state = _EXPIRED
        task = self.task
        if task is not None and not task.done() and not task.cancelling():
            self.state = _CANCELLED
            task.cancel()
            # the deadlines' timer runs in the context of the request that set it: not this one
            task.get_loop().call_soon(self.answer_if_stuck, context=self.context)

    def answer_if_stuck(self) -> None:
        """Cancelled at the deadline, the endpoint has still not unwound: it waits for what the
        cancellation cannot stop (a sync endpoint's thread behind a task group's shield, cleanup
        that awaits). A fallback answers now, in a task of its own."""
        if self.state == _CANCELLED and self.task is not None:
            self.state = _STUCK
            self.answering = self.task.get_loop().create_task(self.answer_expired())
            self.answering.add_done_callback(_retrieved)  # should no one await it

    async def answer_expired(self) -> None:
        await self.endpoint_failed(_timeout(self.route.guard._p.timeout_s))

    async def answered_at_deadline(self) -> None:
        """The endpoint unwound after a fallback began to answer at the deadline: that answer
        stands, and the deadline's cancellation is taken back. Another cancellation that came
        too goes on (the answer finishes on its own, with its record)."""
        task = self.task
        if task is not None and task.uncancel() > 0:
            raise asyncio.CancelledError
        await self.answering

    def cancelled_at_deadline(self) -> bool:
        """Whether the deadline cancelled the endpoint's task (that cancellation taken back)."""
        return self.state == _CANCELLED and self.timed_out()

    def timed_out(self) -> bool:
        """Whether the endpoint ended because of the deadline (consumes our cancellation)."""
        state = self.state
        if state != _CANCELLED:
            return state == _EXPIRED
        self.state = _EXPIRED
        # another cancellation pending (the client went away) wins over the timeout
        return self.task is not None and self.task.uncancel() == 0

    async def receive_tee(self) -> Message:
        """The request, as read by the endpoint; its body is kept for a fallback."""
        receive = self.receive
        message = await receive()
        if self.first is None:
            self.first = message
        else:
            self._keep(message)
        return message

    def _keep(self, message: Message) -> None:
        """A message after the first: its body is kept, up to max_body."""
        rest = self.rest
        if rest is None:
            rest = self.rest = _Rest()
        if rest.done:
            rest.left = rest.left or message["type"] == "http.disconnect"
            return
        if message["type"] != "http.request":
            rest.done = True
            rest.left = message["type"] == "http.disconnect"
            return
        body = message.get("body", b"")
        rest.size += len(body)
        if rest.size <= self.route.max_body:
            rest.chunks.append(body)
        rest.done = not message.get("more_body", False)

    def send_checked(self, message: Message, counted: bool = True) -> Awaitable[None]:
        """The endpoint's `send`: the response start is checked and accounted, the rest passed
        on. A plain function returning `send`'s awaitable: one coroutine less per message."""
        state = self.state
        if state:
            if state == _STARTED:
                send = self.send  # a slot read; `self.send(...)` would look it up as a method
                return send(message)
            if state == _FAILING and _last_part(message) and not self.client_left():
                return self.answer_failed()
            return _dropped()
        send = self.send
        if message["type"] != "http.response.start":
            return send(message)
        status = message["status"]
        if status >= 500:
            self.failed_status = status
            self.state = _FAILING
            return _dropped()
        self.state = _STARTED
        route = self.route
        guard = route.guard
        breaker = guard.breaker
        latency = perf_counter() - self.t0
        if status < 400:
            if latency >= breaker.quiet_below:
                breaker.on_success(self.permit, latency)
        else:  # a 4xx is the endpoint's answer, neither success nor failure
            breaker.release(self.permit)
        pending = route.pending  # into the histogram in bulk (`Histogram.fold`)
        pending.append(latency)
        if len(pending) >= _FOLD_AT:
            route.latency.fold()
        if counted:  # else `served_with` counts and records it
            next(guard._healthy_count)
            p = guard._p
            if not p.plain_healthy:  # a sample to record (`log.sample_rate`), a span to annotate
                self.healthy_extras(p, latency)
        extra = _noted_headers(self.noted) if self.noted else _HEALTHY
        # _add_headers, inline: a call costs a frame here
        message["headers"] = [*message.get("headers", ()), *extra]
        return send(message)

    def send_held(self, message: Message, counted: bool = True) -> Awaitable[None]:
        """`send_checked` for a request holding a bulkhead slot: freed when its response is
        over, not when the app returns (background tasks run in between)."""
        sending = self.send_checked(message, counted)
        if self.state == _STARTED and _last_part(message):
            self.release_slot()
        return sending

    def release_slot(self) -> None:
        slot = self.slot
        if slot is not None:
            self.slot = None
            slot.release()

    async def answer_failed(self) -> None:
        """The endpoint's 5xx response is over: a fallback answers now, not once the app has
        returned (it runs background tasks and dependency cleanup first), and the time budget
        no longer applies."""
        self.state = _ANSWERED
        if getattr(self, "slot", None) is not None:
            self.release_slot()
        await self.endpoint_failed(EndpointError(f"HTTP {self.failed_status}"))

    async def endpoint_failed(self, failure: Exception) -> None:
        """The endpoint failed: count it, then a fallback answers, on the request's span (not
        one the endpoint's framework has open while it sends, or none in a task of its own)."""
        guard = self.route.guard
        p = guard._p
        attempts = [failed_attempt(failure, perf_counter() - self.t0)]
        d = guard._primary_failed(p, failure, (), {}, 0, self.permit, self.t0, attempts)
        tracer, span = p.tracer, getattr(self, "span", None)
        if tracer is None or span is None:
            await self.fall_back(d, self.notices)
            return
        with tracer.annotating(span):
            await self.fall_back(d, self.notices)

    def client_left(self) -> bool:
        """Whether the endpoint has read that the client went away (its 5xx may say so)."""
        first = self.first
        if first is None:
            return False
        return first["type"] == "http.disconnect" or (self.rest is not None and self.rest.left)

    def healthy_extras(self, p: Pipeline, latency: float) -> None:
        """A healthy answer's record, when sampled (`log.sample_rate`), and the request's span
        annotated (`log.trace`): the span current when the request came in, as for a degraded
        answer, not one the endpoint's framework has open while the response starts."""
        if p.tracer is None:
            self.sample(p, latency)
            return
        # no span kept if a reload turned tracing on while the request ran: the current one
        span = getattr(self, "span", None)
        with p.tracer.annotating(span) if span is not None else contextlib.nullcontext():
            if not self.sample(p, latency):
                self.route.guard._trace_healthy(p.tracer, self.permit, self.t0)

    def sample(self, p: Pipeline, latency: float) -> bool:
        """Whether the answer was sampled, and then its record (its input: the body, if the
        endpoint read it all)."""
        if not (p.sample_rate and random() < p.sample_rate):
            return False
        first = self.first
        done = first is None or not first.get("more_body") or (self.rest and self.rest.done)
        x = self.parsed_body() if done else None
        self.route.guard._healthy_record(
            p, x, None, None, self.permit, None, latency, self.t0, True
        )
        return True

    async def request_input(self) -> Any:
        """The request body as parsed JSON (None when absent, too large, not JSON, or not all
        read within what is left of the time budget): read on no further than max_body."""
        budget = self.route.guard._p.timeout_s
        if budget is None:
            await self._read_rest()
        else:
            try:
                async with asyncio.timeout(max(0.0, self.t0 + budget - perf_counter())):
                    await self._read_rest()
            except TimeoutError:
                return None
        return self.parsed_body()

    async def _read_rest(self) -> None:
        first = self.first
        if first is None:  # the endpoint did not run, or read nothing
            first = self.first = await self.receive()
        if first["type"] == "http.request" and first.get("more_body"):
            limit = self.route.max_body - len(first.get("body", b""))
            while limit >= 0 and not (self.rest and (self.rest.done or self.rest.size > limit)):
                self._keep(await self.receive())

    def parsed_body(self) -> Any:
        """The body read so far as parsed JSON (None when absent, too large or not JSON)."""
        first = self.first
        if first is None or first["type"] != "http.request":
            return None
        rest = self.rest
        body = first.get("body", b"")
        size = len(body)
        if rest is not None:
            size += rest.size
            if rest.chunks and size <= self.route.max_body:
                body = b"".join([body, *rest.chunks])
        if size > self.route.max_body:
            return None
        try:
            return loads_json(body) if body else None
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            return None

    async def fall_back(self, d: Degradation, notices: list[RawReason] | None) -> None:
        """Walk the guard's fallbacks with the parsed body; answer 200 JSON, else 503."""
        guard = self.route.guard
        try:
            d.args = (await self.request_input(),)
        except (Exception, asyncio.CancelledError):  # reading it failed (an outer body limit's
            self.unanswered(d, notices)  # 413 answers) or was cancelled (the client went away)
            raise
        if not self.noted:
            self.noted = []
        encoded: list[bytes] = []

        def encodable(value: Any) -> None:  # else the fallback failed, and the next one answers
            encoded.append(encode_answer(value))

        token = _set_noted(self.noted)  # the guard notes how it answered
        try:
            await guard._fallback_async(d, self.t0, False, notices, check=encodable)
        except NoFallbackAvailable:
            retry_after = max(1, math.ceil(guard.breaker.retry_after_s()))
            body = {"error": "unavailable", "policy": guard.name}
            content = json.dumps(body, separators=(",", ":")).encode()
            extra = [(b"retry-after", str(retry_after).encode())]
            await self.respond(503, content, [*_UNAVAILABLE, *extra])
            return
        except asyncio.CancelledError:  # cut off mid-walk (the client went away, say)
            self.unanswered(d, None)  # its notices are on it already
            raise
        finally:
            _reset_noted(token)
        await self.respond(200, encoded[-1], _noted_headers(self.noted[-1:]))

    def unanswered(self, d: Degradation, notices: list[RawReason] | None) -> None:
        """No fallback answers after all: the call keeps its record, served by none."""
        with contextlib.suppress(NoFallbackAvailable):
            self.route.guard._finish(d, None, None, self.t0, False, notices)

    async def respond(self, status: int, content: bytes, headers: Headers) -> None:
        length = (b"content-length", str(len(content)).encode())
        start = {"type": "http.response.start", "status": status}
        await self.send({**start, "headers": [_JSON, length, *headers]})
        await self.send({"type": "http.response.body", "body": content})

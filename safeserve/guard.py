"""The guard: a guarded function, running each call through its pipeline.

validate → admit (breaker, bulkhead) → primary under deadline and retries → check output and
confidence → on any degradation walk the fallbacks → record the decision.

The guard *is* the wrapper the user calls, so a call costs one Python frame before the model.
A healthy call runs straight through `__call__` and builds nothing; everything a degradation
needs is made on the degraded branch only (`degrade.py`). `Guard.__call__` and
`AsyncGuard.__call__` are the two drivers, identical but for the awaits.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import itertools
import threading
from collections import deque
from collections.abc import Callable
from math import isfinite
from time import perf_counter
from typing import Any

from safeserve import context, registry
from safeserve.breaker import Breaker, BreakerEvent
from safeserve.confidence import first_non_finite
from safeserve.context import HEALTHY as _HEALTHY
from safeserve.context import current_get as _noted
from safeserve.deadlines import await_watched
from safeserve.decisions import Decision, RawAttempt, RawReason, Record
from safeserve.degrade import Degradation, DegradationPath, failed_attempt, ms
from safeserve.errors import Overloaded, PolicyError
from safeserve.histograms import Histograms
from safeserve.logwriter import LogWriter
from safeserve.pipeline import Pipeline
from safeserve.policy import Policy
from safeserve.validation import Invalid


def _tally(
    healthy_count: itertools.count[int],
    lock: threading.Lock,
    served: dict[str, int],
    reasons: dict[str, int],
    counts: dict[str, int],
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """A guard's counts: served_by (healthy calls in), reasons, and the rest with "healthy"."""
    healthy = int(repr(healthy_count)[6:-1])  # itertools.count: read without a lock
    with lock:
        served = dict(served)
        reasons = dict(reasons)
        counts = dict(counts)
    healthy += counts.pop("healthy_in_batches")
    if healthy:
        served["primary"] = served.get("primary", 0) + healthy
    counts["healthy"] = healthy
    return served, reasons, counts


class Guard(DegradationPath):
    """A guarded sync function: call it for the answer, `.call()` for the `Outcome`."""

    # What every call reads, in slots: Python 3.11 always specializes a slot's read, and not
    # always one from the instance dict (`functools.update_wrapper` fills it); the rest of the
    # guard's state stays in that dict
    __slots__ = ("_healthy_count", "_p", "breaker", "forced")

    # Whether code other than safeserve's may call it (inside an endpoint, say): such a guard
    # arms the middleware's collection of outcomes (`context.armed`).
    endpoint_callable = True

    def __init__(self, fn: Callable[..., Any], policy: Policy) -> None:
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.name = policy.name
        self.is_async = inspect.iscoroutinefunction(fn)
        self.forced: str | None = None
        self._p = Pipeline(fn, policy, self.is_async, None)
        self.breaker = self._new_breaker(policy)
        log = policy.log
        self._ring: deque[Record] = deque(maxlen=log.ring_size if log else 1000)
        # counters: healthy calls on a lock-free counter, the rest under a lock
        self._healthy_count = itertools.count()
        self._lock = threading.Lock()
        self._served: dict[str, int] = {}
        self._reasons: dict[str, int] = {}
        self._counts = {"degraded": 0, "flagged": 0, "failed": 0, "rejected": 0}
        self._counts["dropped_records"] = 0
        self._counts["healthy_in_batches"] = 0  # healthy batch rows, counted in one step
        self.ok_latency_s = 0.0  # running mean of healthy primary latency, for retry planning
        # its counters (shared with its twins, `with_stages`), read without the guard
        tally = functools.partial(
            _tally, self._healthy_count, self._lock, self._served, self._reasons, self._counts
        )
        self.remains = registry.Remains(self.name, tally)
        registry.register(self)
        if self.endpoint_callable:
            context.armed = True
        if registry.histograms_everywhere:
            self.collect_histograms()

    @staticmethod
    def _keyword_input(
        p: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any], offset: int
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A call that passes its input by keyword (`predict(x=...)`) with it moved among the
        positional arguments, where validation, records and redaction look for it."""
        names, positional_only = p.parameters()
        if positional_only <= offset < len(names) and names[offset] in kwargs:
            kwargs = dict(kwargs)
            args = (*args, kwargs.pop(names[offset]))
        return args, kwargs

    def collect_histograms(self) -> Histograms:
        """The guard's latency and confidence histograms, kept from now on (a call pays for
        them only from then): for the metrics route, which starts them."""
        p = self._p
        if p.hist is None:
            p.hist = Histograms()
            p.timed = True
            if self.remains.histograms is None:  # a twin's pipeline may not have the guard's
                self.remains.histograms = p.hist
        return p.hist

    @property
    def histograms(self) -> Histograms | None:
        """The histograms, if something has started them (`collect_histograms`)."""
        return self._p.hist

    # -- the sync driver ---------------------------------------------------------------------
    def __call__(
        self, *args: Any, _ss_offset: int = 0, _ss_want: bool = False, **kwargs: Any
    ) -> Any:
        t0 = perf_counter()
        p = self._p
        offset = _ss_offset
        if kwargs and len(args) == offset:
            args, kwargs = self._keyword_input(p, args, kwargs, offset)
        if self.forced is not None:
            return self._fallback_sync(self._drill(p, args, kwargs, offset), t0, _ss_want)
        notices: list[RawReason] | None = None
        if p.inspects_input:
            if p.profile_add is not None:
                p.profile_add(args[offset] if offset < len(args) else None)
            if p.validating:
                try:
                    args = p.validate(args, offset)
                except Invalid as inv:
                    invalid = self._invalid(p, inv, args, kwargs, offset, t0)
                    if not p.flag_invalid:
                        return self._fallback_sync(invalid, t0, _ss_want)
                    args, notices = inv.call_args, invalid.reasons  # served, but recorded
        breaker = self.breaker
        permit = breaker.fast_permit
        if not permit or p.bulkhead is not None:
            permit, notices, refused = self._admit(p, args, kwargs, offset, notices)
            if refused is not None:
                return self._fallback_sync(refused, t0, _ss_want)
        attempts: list[RawAttempt] | None = None
        try:
            if p.pool is None:
                value = p.fn(*args, **kwargs)
            else:
                value = p.pool.run(p.fn, args, kwargs, p.first_timeout(t0), p.slot_release)
        except Exception as exc:
            value, attempts, failure = self._retry_sync(p, exc, args, kwargs, offset, permit, t0)
            if failure is not None:
                return self._fallback_sync(failure, t0, _ss_want, notices)
        finally:
            if p.inline_slot:
                p.bulkhead.release()  # type: ignore[union-attr]
        # -- checks, inline: this is the path every healthy call takes
        # (an untimed call reads the clock only on its way to a record: `latency or ...`)
        latency = perf_counter() - t0 if p.timed else 0.0
        if (p.check_finite and first_non_finite(value) is not None) or p.checks_output:
            latency = latency or perf_counter() - t0
            d = self._bad_output(p, value, args, kwargs, offset, permit, latency, attempts)
            if d is not None:
                return self._fallback_sync(d, t0, _ss_want, notices)
        if latency >= breaker.quiet_below:
            breaker.on_success(permit, latency)
        check = p.confidence
        if check is not None:
            conf = check.extract(value)
            if p.hist is not None and conf is not None and isfinite(conf):
                p.hist.confidence.add(conf)
            if conf is None or not check.threshold <= conf <= 1.0:
                d = self._low_confidence(
                    p, check, conf, args, kwargs, offset, permit, latency, attempts
                )
                if d.flagged:
                    return self._finish(d, value, "primary", t0, _ss_want, notices)
                return self._fallback_sync(d, t0, _ss_want, notices)
        if p.plain_healthy and notices is None and not _ss_want:
            next(self._healthy_count)
            if p.hist is not None:
                p.hist.latency.add(latency)
            noted = _noted()  # a healthy call, noted once (see context)
            if noted is not None and not noted:
                noted.append(_HEALTHY)
            return value
        latency = latency or perf_counter() - t0
        return self._healthy(
            p, value, args, kwargs, offset, t0, latency, permit, attempts, _ss_want, notices
        )

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """The answer and its `Decision` as an `ss.Outcome` (built for healthy calls too)."""
        return self(*args, _ss_want=True, **kwargs)

    def batch(self, rows: Any, *, feature_names: list[str] | None = None) -> Any:
        """Many rows at once: an `ss.BatchOutcome` with an answer (or None) per row, in order."""
        from safeserve.batch import run_batch

        return run_batch(self, rows, feature_names)

    def with_stages(self, **changes: Any) -> Guard:
        """This guard, sharing every piece of state (breaker, counters, ring, bulkhead), on a
        copy of its current pipeline with `changes` made (e.g. `writer=...`, `fn=...`)."""
        p = copy.copy(self._p)
        for name, value in changes.items():
            setattr(p, name, value)
        twin = copy.copy(self)
        twin._p = p
        return twin

    def check_answers(self, check: Callable[[Any], object]) -> None:
        """Hold every answer to `check`, which raises for one the caller cannot use (`safeserve
        serve`'s: the answer has a JSON form). The model's answer failing it is
        `invalid_output`, as with an output schema; a fallback's counts as that fallback
        failing, and the next answers. Its message goes on the record: it should name types,
        not values. Kept over reloads."""
        p = copy.copy(self._p)  # swapped whole, as a reload swaps it
        p.check_answers_with(check)
        self._p = p

    def bound_to(self, obj: Any) -> Guard:
        """This guard with `obj` as the model's first argument (a method's `self`): what
        `.batch` of a guarded method runs on."""
        return self.with_stages(fn=functools.partial(self._p.fn, obj))

    def _retry_sync(
        self,
        p: Pipeline,
        exc: Exception,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        offset: int,
        permit: int,
        t0: float,
    ) -> tuple[Any, list[RawAttempt], Degradation | None]:
        """Retry when the policy says so; a Degradation when the primary finally failed."""
        attempts = [failed_attempt(exc, perf_counter() - t0)]
        if p.retry is not None and p.retry.retries(exc):
            deadline = p.deadline(t0)

            def attempt() -> Any:
                t = perf_counter()
                try:
                    if p.pool is None:
                        value = p.fn(*args, **kwargs)
                    else:
                        if p.bulkhead is not None and not p.bulkhead.acquire(blocking=False):
                            raise Overloaded("max_concurrent reached: no slot for a retry")
                        limit = p.attempt_limit(deadline)
                        value = p.pool.run(p.fn, args, kwargs, limit, p.slot_release)
                except Exception as failure:
                    attempts.append(failed_attempt(failure, perf_counter() - t))
                    raise
                attempts.append(RawAttempt("primary", True, ms(perf_counter() - t)))
                return value

            try:
                return p.retry.run_sync(exc, attempt, deadline, self, attempts), attempts, None
            except Exception as final:
                exc = final
        return (
            None,
            attempts,
            self._primary_failed(p, exc, args, kwargs, offset, permit, t0, attempts),
        )

    # -- methods -----------------------------------------------------------------------------
    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else _Bound(self, obj)

    @property
    def guard(self) -> Guard:
        """The guard itself (kept for code written against a separate engine object)."""
        return self

    @property
    def policy(self) -> Policy:
        """The effective policy (frozen)."""
        return self._p.policy

    # -- control -----------------------------------------------------------------------------
    def open(self) -> None:
        """Open the breaker for `open_s`, then half-open as usual."""
        self.breaker.open()

    def force_open(self) -> None:
        """Open the breaker until `close()` or `reset()`."""
        self.breaker.force_open()

    def close(self) -> None:
        """Close the breaker and clear its window."""
        self.breaker.close()

    def reset(self) -> None:
        """Closed, with fresh metrics."""
        self.breaker.reset()

    def disable(self) -> None:
        """The breaker never blocks again until `reset()`."""
        self.breaker.disable()

    def reload(self, policy: Policy) -> None:
        """Swap in a new policy atomically; calls in flight finish on the old one.

        The breaker (and its state) survives unless the breaker settings changed.
        """
        if not isinstance(policy, Policy):
            raise PolicyError([f"reload: expected an ss.Policy, got {type(policy).__name__}"])
        if policy.name != self.name:
            raise PolicyError([f"name: a reload cannot rename {self.name!r} to {policy.name!r}"])
        fn = policy.model if policy.model is not None else self.fn
        if inspect.iscoroutinefunction(fn) != self.is_async:
            raise PolicyError(["model: a reload cannot switch between sync and async"])
        old = self._p
        new = Pipeline(fn, policy, self.is_async, old)
        if policy.breaker != old.policy.breaker:
            self.breaker = self._new_breaker(policy)
        else:  # a new owner is named on the breaker's records; its state stays (an open by hand)
            self.breaker.owner = policy.owner
        self.fn = fn
        self._p = new
        if old.profiler is not None:
            old.profiler.emit()  # what the old stages profiled is written, not lost

    def _new_breaker(self, policy: Policy) -> Breaker:
        return Breaker(policy.breaker, policy.name, policy.owner, [self._on_breaker_event])

    def _on_breaker_event(self, event: BreakerEvent) -> None:
        writer = self._p.writer
        if writer is not None:
            writer.submit(event)

    # -- introspection -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts since the guard was created: calls, served_by, reasons and the rest."""
        served, reasons, counts = self.remains.tally()
        pool = self._p.pool
        writer = self._p.writer
        counts["log_write_failures"] = writer.failed if writer is not None else 0  # per sink
        out: dict[str, Any] = {
            "calls": counts.pop("healthy") + counts["degraded"] + counts["rejected"],
            "served_by": served,
            "reasons": reasons,
            **counts,
            "abandoned": pool.abandoned_total if pool is not None else 0,
            "breaker_state": self.breaker.state,
        }
        store = self.breaker.store_status
        if store is not None:
            out["store"] = store
        return out

    def calls_total(self) -> int:
        """Calls so far (for the retry budget)."""
        healthy = int(repr(self._healthy_count)[6:-1]) + self._counts["healthy_in_batches"]
        return healthy + self._counts["degraded"] + self._counts["rejected"]

    def add_healthy(self, n: int) -> None:
        """Count `n` healthy calls at once (the rows of a batch the primary served)."""
        with self._lock:
            self._counts["healthy_in_batches"] += n

    def decisions(self) -> list[Decision]:
        """The most recent decision records (in-memory ring, oldest first)."""
        return [r.decision() for r in list(self._ring)]

    def flush(self) -> None:
        """Hand records held back (open-breaker aggregate, pending profile) to the log."""
        p = self._p
        if p.open_aggregate is not None:
            p.open_aggregate.flush()
        if p.profiler is not None:
            p.profiler.emit()

    def policy_writer(self) -> LogWriter | None:
        """The decision-log writer of the current policy (None without a sink)."""
        return self._p.writer

    def profile(self) -> dict[str, Any] | None:
        """The feature profile since the last profile record (None without a baseline)."""
        return self._p.profiler.snapshot() if self._p.profiler is not None else None

    def __repr__(self) -> str:
        return f"<safeserve guard {self.name!r} of {self.fn!r}>"


class AsyncGuard(Guard):
    """A guarded `async def`: calling it, or `.call()`, returns an awaitable."""

    def __init__(self, fn: Callable[..., Any], policy: Policy) -> None:
        super().__init__(fn, policy)
        # asyncio.iscoroutinefunction() (and frameworks) see an async callable
        self._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
        mark = getattr(inspect, "markcoroutinefunction", None)
        if mark is not None:  # Python >= 3.12: inspect.iscoroutinefunction() too
            mark(self)

    async def __call__(
        self, *args: Any, _ss_offset: int = 0, _ss_want: bool = False, **kwargs: Any
    ) -> Any:
        t0 = perf_counter()
        p = self._p
        offset = _ss_offset
        if kwargs and len(args) == offset:
            args, kwargs = self._keyword_input(p, args, kwargs, offset)
        if self.forced is not None:
            drill = self._drill(p, args, kwargs, offset)
            return await self._fallback_async(drill, t0, _ss_want)
        notices: list[RawReason] | None = None
        if p.inspects_input:
            if p.profile_add is not None:
                p.profile_add(args[offset] if offset < len(args) else None)
            if p.validating:
                try:
                    args = p.validate(args, offset)
                except Invalid as inv:
                    invalid = self._invalid(p, inv, args, kwargs, offset, t0)
                    if not p.flag_invalid:
                        return await self._fallback_async(invalid, t0, _ss_want)
                    args, notices = inv.call_args, invalid.reasons  # served, but recorded
        breaker = self.breaker
        permit = breaker.fast_permit
        if not permit or p.bulkhead is not None:
            permit, notices, refused = self._admit(p, args, kwargs, offset, notices)
            if refused is not None:
                return await self._fallback_async(refused, t0, _ss_want)
        attempts: list[RawAttempt] | None = None
        try:
            if p.has_deadline:
                value = await await_watched(p.deadlines, p.fn(*args, **kwargs), p.first_timeout(t0))
            else:
                value = await p.fn(*args, **kwargs)
        except asyncio.CancelledError:
            # the caller went away (e.g. a client disconnected): no outcome, but give the
            # permit back, or a cancelled half-open probe would hold the breaker half-open
            breaker.release(permit)
            raise
        except Exception as exc:
            value, attempts, failure = await self._retry_async(
                p, exc, args, kwargs, offset, permit, t0
            )
            if failure is not None:
                return await self._fallback_async(failure, t0, _ss_want, notices)
        finally:
            if p.bulkhead is not None:
                p.bulkhead.release()
        latency = perf_counter() - t0 if p.timed else 0.0
        if (p.check_finite and first_non_finite(value) is not None) or p.checks_output:
            latency = latency or perf_counter() - t0
            d = self._bad_output(p, value, args, kwargs, offset, permit, latency, attempts)
            if d is not None:
                return await self._fallback_async(d, t0, _ss_want, notices)
        if latency >= breaker.quiet_below:
            breaker.on_success(permit, latency)
        check = p.confidence
        if check is not None:
            conf = check.extract(value)
            if p.hist is not None and conf is not None and isfinite(conf):
                p.hist.confidence.add(conf)
            if conf is None or not check.threshold <= conf <= 1.0:
                d = self._low_confidence(
                    p, check, conf, args, kwargs, offset, permit, latency, attempts
                )
                if d.flagged:
                    return self._finish(d, value, "primary", t0, _ss_want, notices)
                return await self._fallback_async(d, t0, _ss_want, notices)
        latency = latency or perf_counter() - t0
        return self._healthy(
            p, value, args, kwargs, offset, t0, latency, permit, attempts, _ss_want, notices
        )

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        """The answer and its `Decision` as an `ss.Outcome` (built for healthy calls too)."""
        return await self(*args, _ss_want=True, **kwargs)

    async def batch(self, rows: Any, *, feature_names: list[str] | None = None) -> Any:
        """The async twin of `Guard.batch`."""
        from safeserve.batch import run_batch_async

        return await run_batch_async(self, rows, feature_names)

    async def _retry_async(
        self,
        p: Pipeline,
        exc: Exception,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        offset: int,
        permit: int,
        t0: float,
    ) -> tuple[Any, list[RawAttempt], Degradation | None]:
        """The async twin of `_retry_sync`."""
        attempts = [failed_attempt(exc, perf_counter() - t0)]
        if p.retry is not None and p.retry.retries(exc):
            deadline = p.deadline(t0)

            async def attempt() -> Any:
                t = perf_counter()
                limit = p.attempt_limit(deadline)
                try:
                    value = await await_watched(p.deadlines, p.fn(*args, **kwargs), limit)
                except Exception as failure:
                    attempts.append(failed_attempt(failure, perf_counter() - t))
                    raise
                attempts.append(RawAttempt("primary", True, ms(perf_counter() - t)))
                return value

            try:
                value = await p.retry.run_async(exc, attempt, deadline, self, attempts)
                return value, attempts, None
            except Exception as final:
                exc = final
        return (
            None,
            attempts,
            self._primary_failed(p, exc, args, kwargs, offset, permit, t0, attempts),
        )


class _Bound:
    """A guard bound to an instance (methods): prepends `self`, forwards the rest."""

    __slots__ = ("_guard", "_obj")

    def __init__(self, guard: Guard, obj: Any) -> None:
        self._guard = guard
        self._obj = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(self._obj, *args, _ss_offset=1, **kwargs)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(self._obj, *args, _ss_offset=1, _ss_want=True, **kwargs)

    def batch(self, rows: Any, *, feature_names: list[str] | None = None) -> Any:
        return self._guard.bound_to(self._obj).batch(rows, feature_names=feature_names)

    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self._guard)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._guard, name)

"""The degradation path: what a guard does once a call cannot be served by a healthy primary.

Everything here runs only when a call degrades (or is flagged, sampled, or asked for its
record): walking the fallbacks, building the reasons and attempts, counting, and recording.
`DegradationPath` is the part of `Guard` that holds it; `Degradation` is what one degraded
call knows.
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable
from random import random
from time import perf_counter
from typing import Any

from safeserve.breaker import REJECTED, Breaker
from safeserve.confidence import ConfidenceCheck
from safeserve.context import HEALTHY as _HEALTHY
from safeserve.context import current_get as _noted
from safeserve.context import note
from safeserve.decisions import Outcome, RawAttempt, RawReason, Record, describe_error
from safeserve.errors import InputRejected, NoFallbackAvailable, Overloaded, PolicyError
from safeserve.fallbacks import FallbackStep, NoAnswer
from safeserve.pipeline import Pipeline, other_arguments
from safeserve.tracing import SpanAnnotator
from safeserve.validation import Invalid

_CALL = "call"


class Degradation:
    """What is known about one degraded call: its stages, input, reasons and attempts."""

    __slots__ = (
        "args",
        "attempts",
        "confidence",
        "flagged",
        "kwargs",
        "offset",
        "p",
        "reasons",
        "state",
    )

    def __init__(
        self,
        p: Pipeline,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        offset: int,
        state: str,
        reasons: list[RawReason],
        attempts: list[RawAttempt] | None = None,
        confidence: float | None = None,
    ) -> None:
        self.p = p
        self.args = args
        self.kwargs = kwargs
        self.offset = offset
        self.state = state
        self.reasons = reasons
        self.attempts = attempts if attempts is not None else []
        self.confidence = confidence
        self.flagged = False

    @property
    def x(self) -> Any:
        """The input: the validated one where validation passed, else the raw one."""
        return input_of(self.args, self.offset)


class DegradationPath:
    """Fallbacks, records and counters of a guard (mixed into `Guard`)."""

    name: str
    is_async: bool
    breaker: Breaker
    forced: str | None
    ok_latency_s: float
    _healthy_count: itertools.count[int]
    _lock: threading.Lock
    _served: dict[str, int]
    _reasons: dict[str, int]
    _counts: dict[str, int]
    _ring: deque[Record]

    # -- why a call degrades -----------------------------------------------------------------
    def _invalid(
        self,
        p: Pipeline,
        inv: Invalid,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        offset: int,
        t0: float,
    ) -> Degradation:
        detail = "; ".join(f"{q.loc}: {q.message}" for q in inv.problems)[:300]
        reasons = [RawReason("invalid_input", "validate", detail)]
        d = Degradation(p, args, kwargs, offset, self.breaker.state, reasons)
        if p.reject_invalid:
            reasons.append(RawReason("rejected", "validate"))
            self._count(None, ["invalid_input", "rejected"], rejected=True)
            self._record(d, None, None, t0)
            raise InputRejected(self.name, inv.problems)
        return d

    def _drill(
        self, p: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any], offset: int
    ) -> Degradation:
        reasons = [RawReason("forced", "drill", self.forced)]
        if self.forced != "forced":
            reasons.insert(0, RawReason(str(self.forced), "drill", "forced"))
        return Degradation(p, args, kwargs, offset, self.breaker.state, reasons)

    def _admit(
        self,
        p: Pipeline,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        offset: int,
        notices: list[RawReason] | None,
        may_block: bool = True,
    ) -> tuple[int, list[RawReason] | None, Degradation | None]:
        """Admission off the fast path: breaker permit, pending notice, bulkhead slot (waited
        for up to `max_wait_s` only by a sync guard's call, `may_block`, off any event loop)."""
        breaker = self.breaker
        permit = breaker.fast_permit or breaker.admit()
        notice = breaker.take_notice()
        if notice is not None:
            notices = [notice] if notices is None else [*notices, notice]
        if permit == REJECTED:
            reason = RawReason("breaker_open", "admit")
        elif p.bulkhead is not None and not p.enter_bulkhead(may_block and not self.is_async):
            breaker.release(permit)
            reason = RawReason("overloaded", "admit", "max_concurrent reached")
        else:
            return permit, notices, None
        reasons = [reason, *(notices or ())]
        return REJECTED, None, Degradation(p, args, kwargs, offset, breaker.state, reasons)

    def _primary_failed(
        self,
        p: Pipeline,
        exc: Exception,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        offset: int,
        permit: int,
        started: float,
        attempts: list[RawAttempt],
    ) -> Degradation:
        latency = perf_counter() - started
        if isinstance(exc, Overloaded):
            self.breaker.release(permit)
            reason = RawReason("overloaded", _CALL, str(exc))
        else:
            is_timeout = isinstance(exc, TimeoutError)
            self.breaker.on_failure(permit, latency, exc, timeout=is_timeout)
            reason = RawReason("timeout" if is_timeout else "error", _CALL, describe_error(exc))
        state = self.breaker.state_of(permit)
        return Degradation(p, args, kwargs, offset, state, [reason], attempts)

    def _bad_output(
        self,
        p: Pipeline,
        value: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        offset: int,
        permit: int,
        latency: float,
        attempts: list[RawAttempt] | None,
    ) -> Degradation | None:
        """A Degradation when the answer holds non-finite numbers or fails the output schema."""
        bad = p.output_check(value)
        if bad is None:
            return None
        self.breaker.on_failure(permit, latency)
        state = self.breaker.state_of(permit)
        tried = primary_attempts(attempts, latency, bad.detail)
        return Degradation(p, args, kwargs, offset, state, [bad], tried)

    def _low_confidence(
        self,
        p: Pipeline,
        check: ConfidenceCheck,
        conf: float | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        offset: int,
        permit: int,
        latency: float,
        attempts: list[RawAttempt] | None,
    ) -> Degradation:
        low = check.judge(conf)
        d = Degradation(
            p,
            args,
            kwargs,
            offset,
            self.breaker.state_of(permit),
            [low],
            primary_attempts(attempts, latency, None),
            None if conf is None or math.isnan(conf) else conf,
        )
        d.flagged = not check.degrades and low.code == "low_confidence"
        return d

    # -- the fallback walk -------------------------------------------------------------------
    def _fallback_sync(
        self, d: Degradation, t0: float, want: bool, notices: list[RawReason] | None = None
    ) -> Any:
        _check_not_decorating(d)
        if notices:
            d.reasons.extend(notices)
        fb_args = d.args[d.offset :]
        answer_check = d.p.answer_check
        for step in d.p.steps:
            t = perf_counter()
            try:
                value = step.answer(d.x, fb_args, d.kwargs, None)
                if answer_check is not None:
                    answer_check(value)
            except Exception as exc:
                self._fallback_failed(d, step, exc, perf_counter() - t)
                continue
            if self._fallback_ok(d, step, value, perf_counter() - t):
                return self._finish(d, value, step.name, t0, want)
        return self._finish(d, None, None, t0, want)

    async def _fallback_async(
        self,
        d: Degradation,
        t0: float,
        want: bool,
        notices: list[RawReason] | None = None,
        check: Callable[[Any], object] | None = None,
    ) -> Any:
        """Walk the fallbacks; the guard's check of its answers (`Guard.check_answers`) or
        `check` (the middleware's: the answer has a JSON form) raising for an answer counts as
        that fallback failing."""
        if notices:
            d.reasons.extend(notices)
        fb_args = d.args[d.offset :]
        answer_check = d.p.answer_check
        for step in d.p.steps:
            t = perf_counter()
            try:
                value = await step.answer_async(d.x, fb_args, d.kwargs, None)
                if answer_check is not None:
                    answer_check(value)
                if check is not None:
                    check(value)
            except Exception as exc:
                self._fallback_failed(d, step, exc, perf_counter() - t)
                continue
            if self._fallback_ok(d, step, value, perf_counter() - t):
                return self._finish(d, value, step.name, t0, want)
        return self._finish(d, None, None, t0, want)

    def _fallback_failed(
        self, d: Degradation, step: FallbackStep, exc: Exception, latency: float
    ) -> None:
        error = str(exc) if isinstance(exc, NoAnswer) else describe_error(exc)
        d.attempts.append(RawAttempt(step.name, False, ms(latency), error))
        d.reasons.append(RawReason("fallback_failed", "fallback", f"{step.name}: {error}"[:200]))

    def _fallback_ok(self, d: Degradation, step: FallbackStep, value: Any, latency: float) -> bool:
        low = step.below_threshold(value)
        if low is None:
            d.attempts.append(RawAttempt(step.name, True, ms(latency)))
            return True
        error = f"confidence {low:.4g} < {step.threshold}"
        d.attempts.append(RawAttempt(step.name, False, ms(latency), error))
        d.reasons.append(RawReason("fallback_failed", "fallback", f"{step.name}: low confidence"))
        return False

    # -- ending a call -----------------------------------------------------------------------
    def _finish(
        self,
        d: Degradation,
        value: Any,
        served_by: str | None,
        t0: float,
        want: bool,
        notices: list[RawReason] | None = None,
        timed: bool = True,
    ) -> Any:
        """Count, record and note an answer that is not a plain healthy one (`timed`: its
        latency goes into the histogram, unless the caller put it there)."""
        if notices:
            d.reasons.extend(notices)
        codes = [r.code for r in d.reasons]
        if d.flagged:
            next(self._healthy_count)
            self._count(None, codes, flagged=True)
        else:
            self._count(served_by, codes, failed=served_by is None)
        record = self._record(d, value, served_by, t0, timed)
        note(served_by, not d.flagged)
        if served_by is None:
            # raised while the model's exception is handled: `from None` keeps that exception,
            # whose message may quote the input, out of tracebacks and error trackers (the
            # decision carries its type and scrubbed message; `__context__` still holds it)
            raise NoFallbackAvailable(record.decision()) from None
        return Outcome(value, record) if want else value

    def _healthy(
        self,
        p: Pipeline,
        value: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        offset: int,
        t0: float,
        latency: float,
        permit: int,
        attempts: list[RawAttempt] | None,
        want: bool,
        notices: list[RawReason] | None,
    ) -> Any:
        """Bookkeeping of a healthy call beyond the count: cache, retry stats, a record."""
        if p.retry is not None and attempts is None:
            # a running mean of healthy latency: retries never start an attempt it won't fit
            self.ok_latency_s += (latency - self.ok_latency_s) * 0.1
        x = input_of(args, offset)
        for cache in p.caches:
            cache.remember(x, value)
        if notices:  # flagged invalid input, store_unavailable: on this call's record
            state = self.breaker.state_of(permit)
            tried = primary_attempts(attempts, latency, None)
            d = Degradation(p, args, kwargs, offset, state, [], tried)
            d.flagged = True
            return self._finish(d, value, "primary", t0, want, notices)
        next(self._healthy_count)
        if p.hist is not None:
            p.hist.latency.add(latency)
        noted = _noted()  # a healthy call, noted once (see context)
        if noted is not None and not noted:
            noted.append(_HEALTHY)
        sampled = bool(p.sample_rate) and random() < p.sample_rate
        if not (sampled or want):
            if p.tracer is not None:
                conf = p.confidence.extract(value) if p.confidence is not None else None
                self._trace_healthy(p.tracer, permit, t0, conf)
            return value
        conf = p.confidence.extract(value) if p.confidence is not None else None
        others = other_arguments(p, args, offset, kwargs)
        record = self._healthy_record(
            p, x, value, conf, permit, attempts, latency, t0, sampled, others
        )
        return Outcome(value, record) if want else value

    def _healthy_record(
        self,
        p: Pipeline,
        x: Any,
        value: Any,
        confidence: float | None,
        permit: int,
        attempts: list[RawAttempt] | None,
        latency: float,
        t0: float,
        logged: bool,
        others: Any = None,
    ) -> Record:
        """The record of a healthy call (sampled, or asked for), and its span annotated."""
        record = Record(
            self.name,
            p.policy.owner,
            p.policy.model_version,
            "primary",
            False,
            False,
            [],
            primary_attempts(attempts, latency, None),
            confidence,
            self.breaker.state_of(permit),
            ms(perf_counter() - t0),
        )
        self._emit(p, record, x, value, logged, others)  # an answer may quote `token`
        if p.tracer is not None:
            p.tracer.record(record)
        return record

    def _trace_healthy(
        self, tracer: SpanAnnotator, permit: int, t0: float, confidence: float | None = None
    ) -> None:
        """Annotate the current span for a healthy call that builds no record."""
        tracer.healthy(self.breaker.state_of(permit), ms(perf_counter() - t0), confidence)

    def _record(
        self, d: Degradation, value: Any, served_by: str | None, t0: float, timed: bool = True
    ) -> Record:
        p = d.p
        latency = perf_counter() - t0
        if p.hist is not None and timed:
            p.hist.latency.add(latency)
        logged = True
        if p.open_aggregate is not None and d.reasons[0].code == "breaker_open":
            p.open_aggregate.add(served_by)  # one record per second, not one per call
            logged = False
        record = Record(
            self.name,
            p.policy.owner,
            p.policy.model_version,
            served_by,
            not d.flagged,
            d.flagged,
            d.reasons,
            d.attempts,
            d.confidence,
            d.state,
            ms(latency),
        )
        self._emit(p, record, d.x, value, logged, other_arguments(p, d.args, d.offset, d.kwargs))
        if p.tracer is not None:
            p.tracer.record(record)
        return record

    def _emit(
        self,
        p: Pipeline,
        record: Record,
        x: Any,
        value: Any,
        logged: bool,
        others: Any = None,
    ) -> Record:
        # the input is always read for what the record's text must be scrubbed of, and so are
        # the call's other arguments (`token`), which an error message may quote too
        recorder = p.recorder
        recorder.attach(record, x, value, p.include_inputs, p.include_outputs)
        if others and recorder.keys:
            record.keep(recorder.secrets_in(others))
        if not logged:
            return record
        self._ring.append(record)
        if p.writer is not None and not p.writer.submit(record):
            with self._lock:
                self._counts["dropped_records"] += 1
        return record

    def _count(
        self,
        served_by: str | None,
        codes: list[str],
        *,
        flagged: bool = False,
        failed: bool = False,
        rejected: bool = False,
    ) -> None:
        with self._lock:
            c = self._counts
            if flagged:
                c["flagged"] += 1
            elif rejected:
                c["rejected"] += 1
            else:
                c["degraded"] += 1
                if failed:
                    c["failed"] += 1
                elif served_by is not None:
                    self._served[served_by] = self._served.get(served_by, 0) + 1
            for code in set(codes):  # calls per reason, not reasons per call
                self._reasons[code] = self._reasons.get(code, 0) + 1


def _check_not_decorating(d: Degradation) -> None:
    """`@ss.guard(policy)` over a function, where the policy names its own model: the guard
    of that model was returned, and the decorator line called it with the function as the
    input. Said plainly here (a degraded call is the only place it can surface) instead of
    binding the function's name to a fallback's answer."""
    model = d.p.policy.model
    if model is not None and d.offset == 0 and len(d.args) == 1 and not d.kwargs:
        fn = d.args[0]
        if inspect.isfunction(fn) and fn is not model:
            raise PolicyError(
                [
                    f"{d.p.policy.name}.model: this policy names its model"
                    f" ({getattr(model, '__qualname__', model)!r}), so ss.guard(policy) is the"
                    f" guard itself, not a decorator; to guard {fn.__qualname__!r} instead,"
                    " drop `model` from the policy or pass ss.guard(policy, model=None)"
                ]
            )


def input_of(args: tuple[Any, ...], offset: int) -> Any:
    """The call's input: the first positional argument after `self` (None when absent)."""
    return args[offset] if offset < len(args) else None


def ms(seconds: float) -> float:
    """Seconds as milliseconds, to the microsecond."""
    return round(seconds * 1000.0, 3)


def failed_attempt(exc: BaseException, latency: float) -> RawAttempt:
    """A failed try of the primary."""
    return RawAttempt("primary", False, ms(latency), describe_error(exc))


def primary_attempts(
    attempts: list[RawAttempt] | None, latency: float, error: str | None
) -> list[RawAttempt]:
    """The primary's attempts: the retries made, else the one call."""
    if attempts is not None:
        return list(attempts)
    return [RawAttempt("primary", error is None, ms(latency), error)]

"""The guard: the per-call pipeline, built once at decoration time.

validate → admit (breaker, bulkhead) → primary under deadline and retries → check output and
confidence → on any degradation walk the fallbacks → record the decision.

A healthy call runs straight through and builds nothing; everything a degradation needs (the
reasons, the attempts, the record) is made on the degraded branch only. `Guard` holds the
stages and the shared logic; `run_sync` and `run_async` are the two drivers, identical but for
the awaits.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable
from random import random
from time import perf_counter
from typing import Any

from safeserve import registry
from safeserve.breaker import REJECTED, Breaker, BreakerEvent
from safeserve.confidence import ConfidenceCheck, OutputCheck, first_non_finite
from safeserve.decisions import (
    Decision,
    InputRecorder,
    OpenAggregate,
    Outcome,
    RawAttempt,
    RawReason,
    Record,
    describe_error,
    json_safe,
)
from safeserve.errors import AttemptTimeout, InputRejected, NoFallbackAvailable, Overloaded
from safeserve.fallbacks import CacheStep, FallbackStep, NoAnswer, build_steps
from safeserve.logwriter import LogWriter, writer_for
from safeserve.policy import Policy
from safeserve.retry import RetryRunner
from safeserve.timeouts import WorkerPool
from safeserve.validation import Invalid, SchemaValidator

_CALL_STAGE = "call"


class Degradation:
    """What is known about a degraded call; made only when a call degrades."""

    __slots__ = ("args", "attempts", "confidence", "flagged", "kwargs", "reasons", "state", "x")

    def __init__(
        self,
        x: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        state: str,
        reasons: list[RawReason],
        attempts: list[RawAttempt] | None = None,
        confidence: float | None = None,
    ) -> None:
        self.x = x
        self.args = args
        self.kwargs = kwargs
        self.state = state
        self.reasons = reasons
        self.attempts = attempts if attempts is not None else []
        self.confidence = confidence
        self.flagged = False


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class Guard:
    """One guarded model: its stages, breaker, fallbacks, counters and decision log."""

    def __init__(self, fn: Callable[..., Any], policy: Policy) -> None:
        self.fn = fn
        self.policy = policy
        self.name = policy.name
        self.is_async = inspect.iscoroutinefunction(fn)
        self.forced: str | None = None
        # -- stages, each present only when configured
        val = policy.validation
        validators: list[Callable[[Any], Any]] = []
        if val is not None and val.schema is not None:
            validators.append(SchemaValidator(val.schema, fn))
        self._validators = validators
        self._reject_invalid = val is not None and val.on_invalid == "reject"
        self._output_schema = val.output_schema if val is not None else None
        self._output_check = OutputCheck(self._output_schema)
        self._nonfinite = first_non_finite
        self._confidence = ConfidenceCheck(policy.confidence) if policy.confidence else None
        self._steps: list[FallbackStep] = build_steps(policy.fallbacks, policy.name)
        self._caches = [s for s in self._steps if isinstance(s, CacheStep)]
        self._timeout_s = policy.timeout_s
        self._retry = RetryRunner(policy.retry) if policy.retry else None
        attempt_timeout = policy.retry.attempt_timeout_s if policy.retry else None
        self._pool = (
            WorkerPool(policy.name, policy.workers, policy.max_abandoned)
            if not self.is_async and (self._timeout_s or attempt_timeout)
            else None
        )
        self._attempt_timeout = attempt_timeout
        self._has_deadline = bool(self._timeout_s or attempt_timeout)
        self._bulkhead = (
            threading.BoundedSemaphore(policy.max_concurrent) if policy.max_concurrent else None
        )
        # With a worker pool, a call's slot is freed by its worker when the call really ends
        # (an abandoned call keeps it), not when the caller gives up.
        self._slot_release = self._bulkhead.release if self._bulkhead is not None else None
        # -- records
        log = policy.log
        self._writer: LogWriter | None = (
            writer_for(log.sink, log.queue_size)
            if log is not None and log.sink is not None
            else None
        )
        self._sample_rate = log.sample_rate if log is not None else 0.0
        self._include_inputs = log.include_inputs if log is not None else True
        self._include_outputs = log.include_outputs if log is not None else False
        self._recorder = InputRecorder(
            log.redact if log else [], log.hash if log else [], log.hash_salt if log else None
        )
        self._ring: deque[Record] = deque(maxlen=log.ring_size if log else 1000)
        self._open_aggregate = (
            OpenAggregate(self._writer, policy.name, policy.owner)
            if log is not None and log.open_breaker == "aggregate"
            else None
        )
        self.breaker = Breaker(
            policy.breaker, policy.name, policy.owner, listeners=[self._on_breaker_event]
        )
        # -- counters: healthy calls on a lock-free counter, the rest under a lock
        self._healthy_count = itertools.count()
        self._lock = threading.Lock()
        self._served: dict[str, int] = {}
        self._reasons: dict[str, int] = {}
        self._counts = {
            "degraded": 0,
            "flagged": 0,
            "failed": 0,
            "rejected": 0,
            "dropped_records": 0,
        }
        self.ok_latency_s = 0.0  # running mean of healthy primary latency, for retry planning
        registry.register(self)

    # -- the sync driver ---------------------------------------------------------------------
    def run_sync(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], offset: int, want: bool
    ) -> Any:
        """One guarded sync call; returns the answer, or an `Outcome` when `want`."""
        t0 = perf_counter()
        if self.forced is not None:
            return self._fallback_sync(self._drill(args, kwargs, offset), offset, t0, want)
        x = args[offset] if offset < len(args) else None
        if self._validators:
            try:
                x, args = self._validate(x, args, offset)
            except Invalid as inv:
                return self._fallback_sync(
                    self._invalid(inv, x, args, kwargs, t0), offset, t0, want
                )
        breaker = self.breaker
        permit = breaker.fast_permit
        notice: RawReason | None = None
        if not permit or self._bulkhead is not None:
            permit, notice, refused = self._admit(x, args, kwargs)
            if refused is not None:
                return self._fallback_sync(refused, offset, t0, want)
        attempts: list[RawAttempt] | None = None
        try:
            if self._pool is None:
                value = self.fn(*args, **kwargs)
            else:
                value = self._pool.run(
                    self.fn, args, kwargs, self._first_timeout(t0), self._slot_release
                )
        except Exception as exc:
            value, attempts, d = self._after_failure_sync(exc, x, args, kwargs, permit, t0)
            if d is not None:
                return self._fallback_sync(d, offset, t0, want, notice)
        finally:
            if self._bulkhead is not None and self._pool is None:
                self._bulkhead.release()
        latency = perf_counter() - t0
        # -- checks, inline: this is the path every healthy call takes
        if self._nonfinite(value) is not None or self._output_schema is not None:
            d = self._bad_output(value, x, args, kwargs, permit, latency, attempts)
            if d is not None:
                return self._fallback_sync(d, offset, t0, want, notice)
        if latency >= breaker.quiet_below:
            breaker.on_success(permit, latency)
        check = self._confidence
        if check is not None:
            conf = check.extract(value)
            if conf is not None and not conf >= check.threshold:
                d = self._low_confidence(check, conf, x, args, kwargs, permit, latency, attempts)
                if d.flagged:
                    return self._finish(d, value, "primary", offset, t0, want, notice)
                return self._fallback_sync(d, offset, t0, want, notice)
        return self._healthy(value, x, args, kwargs, t0, latency, permit, attempts, want, notice)

    def _healthy(
        self,
        value: Any,
        x: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        t0: float,
        latency: float,
        permit: int,
        attempts: list[RawAttempt] | None,
        want: bool,
        notice: RawReason | None,
    ) -> Any:
        """Bookkeeping of a healthy call: the cache, the counter, a sampled record."""
        if self._retry is not None and attempts is None:
            # a running mean of healthy latency: retries never start an attempt it won't fit
            self.ok_latency_s += (latency - self.ok_latency_s) * 0.1
        if self._caches:
            for cache in self._caches:
                cache.remember(x, value)
        if notice is not None:  # e.g. store_unavailable: recorded on this call, flagged
            d = Degradation(
                x,
                args,
                kwargs,
                self.breaker.state_of(permit),
                [],
                _primary_attempts(attempts, latency, None),
            )
            d.flagged = True
            return self._finish(d, value, "primary", 0, t0, want, notice)
        next(self._healthy_count)
        if self._sample_rate and random() < self._sample_rate:
            return self._healthy_record(value, x, t0, latency, permit, attempts, want, logged=True)
        if want:
            return self._healthy_record(value, x, t0, latency, permit, attempts, want, logged=False)
        return value

    def _first_timeout(self, t0: float) -> float:
        return self._attempt_limit(None if self._timeout_s is None else t0 + self._timeout_s)

    def _after_failure_sync(
        self,
        exc: Exception,
        x: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        permit: int,
        t0: float,
    ) -> tuple[Any, list[RawAttempt], Degradation | None]:
        """Retry when the policy says so; a Degradation when the primary finally failed."""
        attempts = [self._attempt_of(exc, perf_counter() - t0)]
        if self._retry is not None and self._retry.retries(exc):
            deadline = t0 + self._timeout_s if self._timeout_s is not None else None
            try:
                value = self._retry.run_sync(
                    exc,
                    self._attempt_sync(args, kwargs, deadline, attempts),
                    deadline,
                    self,
                    attempts,
                )
            except Exception as final:
                exc = final
            else:
                return value, attempts, None
        return None, attempts, self._primary_failed(exc, x, args, kwargs, permit, t0, attempts)

    def _attempt_sync(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
        attempts: list[RawAttempt],
    ) -> Callable[[], Any]:
        def attempt() -> Any:
            t = perf_counter()
            try:
                if self._pool is None:
                    value = self.fn(*args, **kwargs)
                else:
                    if self._bulkhead is not None and not self._bulkhead.acquire(False):
                        raise Overloaded("max_concurrent reached: no slot for a retry")
                    value = self._pool.run(
                        self.fn, args, kwargs, self._attempt_limit(deadline), self._slot_release
                    )
            except Exception as exc:
                attempts.append(self._attempt_of(exc, perf_counter() - t))
                raise
            attempts.append(RawAttempt(name="primary", ok=True, latency_ms=_ms(perf_counter() - t)))
            return value

        return attempt

    def _attempt_limit(self, deadline: float | None) -> float:
        """An attempt's time: min(attempt_timeout_s, time left); inf when neither is set."""
        left = float("inf") if deadline is None else deadline - perf_counter()
        return left if self._attempt_timeout is None else min(left, self._attempt_timeout)

    def _fallback_sync(
        self, d: Degradation, offset: int, t0: float, want: bool, notice: RawReason | None = None
    ) -> Any:
        if notice is not None:
            d.reasons.append(notice)
        fb_args = d.args[offset:]
        for step in self._steps:
            t = perf_counter()
            try:
                value = step.answer(d.x, fb_args, d.kwargs, None)
            except Exception as exc:
                self._fallback_failed(d, step, exc, perf_counter() - t)
                continue
            if self._fallback_ok(d, step, value, perf_counter() - t):
                return self._finish(d, value, step.name, offset, t0, want)
        return self._finish(d, None, None, offset, t0, want)

    # -- the async driver: the same steps, awaiting the model and the sleeps ------------------
    async def run_async(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], offset: int, want: bool
    ) -> Any:
        """One guarded async call; returns the answer, or an `Outcome` when `want`."""
        t0 = perf_counter()
        if self.forced is not None:
            return await self._fallback_async(self._drill(args, kwargs, offset), offset, t0, want)
        x = args[offset] if len(args) > offset else None
        if self._validators:
            try:
                x, args = self._validate(x, args, offset)
            except Invalid as inv:
                return await self._fallback_async(
                    self._invalid(inv, x, args, kwargs, t0), offset, t0, want
                )
        breaker = self.breaker
        permit = breaker.fast_permit
        notice: RawReason | None = None
        if not permit or self._bulkhead is not None:
            permit, notice, refused = self._admit(x, args, kwargs)
            if refused is not None:
                return await self._fallback_async(refused, offset, t0, want)
        attempts: list[RawAttempt] | None = None
        try:
            if self._has_deadline:
                value = await _await_within(self.fn(*args, **kwargs), self._first_timeout(t0))
            else:
                value = await self.fn(*args, **kwargs)
        except asyncio.CancelledError:
            # the caller went away (e.g. a client disconnected): no outcome, but give the
            # permit back, or a cancelled half-open probe would hold the breaker half-open
            self.breaker.release(permit)
            raise
        except Exception as exc:
            attempts = [self._attempt_of(exc, perf_counter() - t0)]
            failed: Exception | None = exc
            if self._retry is not None and self._retry.retries(exc):
                deadline = t0 + self._timeout_s if self._timeout_s is not None else None
                try:
                    value = await self._retry.run_async(
                        exc,
                        self._attempt_async(args, kwargs, deadline, attempts),
                        deadline,
                        self,
                        attempts,
                    )
                    failed = None
                except Exception as final:
                    failed = final
            if failed is not None:
                failure = self._primary_failed(failed, x, args, kwargs, permit, t0, attempts)
                return await self._fallback_async(failure, offset, t0, want, notice)
        finally:
            if self._bulkhead is not None:
                self._bulkhead.release()
        latency = perf_counter() - t0
        if self._nonfinite(value) is not None or self._output_schema is not None:
            d = self._bad_output(value, x, args, kwargs, permit, latency, attempts)
            if d is not None:
                return await self._fallback_async(d, offset, t0, want, notice)
        if latency >= breaker.quiet_below:
            breaker.on_success(permit, latency)
        check = self._confidence
        if check is not None:
            conf = check.extract(value)
            if conf is not None and not conf >= check.threshold:
                d = self._low_confidence(check, conf, x, args, kwargs, permit, latency, attempts)
                if d.flagged:
                    return self._finish(d, value, "primary", offset, t0, want, notice)
                return await self._fallback_async(d, offset, t0, want, notice)
        return self._healthy(value, x, args, kwargs, t0, latency, permit, attempts, want, notice)

    def _attempt_async(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline: float | None,
        attempts: list[RawAttempt],
    ) -> Callable[[], Any]:
        async def attempt() -> Any:
            t = perf_counter()
            limit = self._attempt_limit(deadline)
            try:
                if limit == float("inf"):
                    value = await self.fn(*args, **kwargs)
                else:
                    value = await _await_within(self.fn(*args, **kwargs), limit)
            except Exception as exc:
                attempts.append(self._attempt_of(exc, perf_counter() - t))
                raise
            attempts.append(RawAttempt(name="primary", ok=True, latency_ms=_ms(perf_counter() - t)))
            return value

        return attempt

    async def _fallback_async(
        self, d: Degradation, offset: int, t0: float, want: bool, notice: RawReason | None = None
    ) -> Any:
        if notice is not None:
            d.reasons.append(notice)
        fb_args = d.args[offset:]
        for step in self._steps:
            t = perf_counter()
            try:
                value = await step.answer_async(d.x, fb_args, d.kwargs, None)
            except Exception as exc:
                self._fallback_failed(d, step, exc, perf_counter() - t)
                continue
            if self._fallback_ok(d, step, value, perf_counter() - t):
                return self._finish(d, value, step.name, offset, t0, want)
        return self._finish(d, None, None, offset, t0, want)

    # -- steps shared by both drivers --------------------------------------------------------
    def _validate(self, x: Any, args: tuple[Any, ...], offset: int) -> tuple[Any, tuple[Any, ...]]:
        for validator in self._validators:
            x = validator(x)
        return x, (*args[:offset], x, *args[offset + 1 :])

    def _invalid(
        self, inv: Invalid, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], t0: float
    ) -> Degradation:
        if self._reject_invalid:
            self._count(None, ["invalid_input", "rejected"], rejected=True)
            d = Degradation(
                x,
                args,
                kwargs,
                self.breaker.state,
                [
                    RawReason(code="invalid_input", stage="validate", detail=_problems_detail(inv)),
                    RawReason(code="rejected", stage="validate"),
                ],
            )
            self._finish_record(d, None, None, t0)
            raise InputRejected(self.name, inv.problems)
        return Degradation(
            x,
            args,
            kwargs,
            self.breaker.state,
            [RawReason(code="invalid_input", stage="validate", detail=_problems_detail(inv))],
        )

    def _drill(self, args: tuple[Any, ...], kwargs: dict[str, Any], offset: int) -> Degradation:
        x = args[offset] if len(args) > offset else None
        reasons = [RawReason(code="forced", stage="drill", detail=self.forced)]
        if self.forced != "forced":
            reasons.insert(0, RawReason(code=str(self.forced), stage="drill", detail="forced"))
        return Degradation(x, args, kwargs, self.breaker.state, reasons)

    def _primary_failed(
        self,
        exc: Exception,
        x: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        permit: int,
        started: float,
        attempts: list[RawAttempt],
    ) -> Degradation:
        latency = perf_counter() - started
        if isinstance(exc, Overloaded):
            self.breaker.release(permit)
            reason = RawReason(code="overloaded", stage=_CALL_STAGE, detail=str(exc))
        else:
            is_timeout = isinstance(exc, TimeoutError)
            self.breaker.on_failure(permit, latency, exc, timeout=is_timeout)
            reason = RawReason(
                code="timeout" if is_timeout else "error",
                stage=_CALL_STAGE,
                detail=describe_error(exc),
            )
        return Degradation(x, args, kwargs, self.breaker.state_of(permit), [reason], attempts)

    def _attempt_of(self, exc: BaseException, latency: float) -> RawAttempt:
        return RawAttempt(
            name="primary", ok=False, latency_ms=_ms(latency), error=describe_error(exc)
        )

    def _bad_output(
        self,
        value: Any,
        x: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        permit: int,
        latency: float,
        attempts: list[RawAttempt] | None,
    ) -> Degradation | None:
        """A Degradation when the answer holds non-finite numbers or fails the output schema."""
        bad = self._output_check(value)
        if bad is None:
            return None
        self.breaker.on_failure(permit, latency)
        return Degradation(
            x,
            args,
            kwargs,
            self.breaker.state_of(permit),
            [bad],
            _primary_attempts(attempts, latency, bad.detail),
        )

    def _low_confidence(
        self,
        check: ConfidenceCheck,
        conf: float,
        x: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        permit: int,
        latency: float,
        attempts: list[RawAttempt] | None,
    ) -> Degradation:
        low = check.judge(conf)
        d = Degradation(
            x,
            args,
            kwargs,
            self.breaker.state_of(permit),
            [low],
            _primary_attempts(attempts, latency, None),
            None if math.isnan(conf) else conf,
        )
        d.flagged = not check.degrades and low.code == "low_confidence"
        return d

    def _admit(
        self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[int, RawReason | None, Degradation | None]:
        """Admission off the fast path: breaker permit, pending notice, bulkhead slot."""
        breaker = self.breaker
        permit = breaker.fast_permit or breaker.admit()
        notice = breaker.take_notice()
        if permit == REJECTED:
            reason = RawReason(code="breaker_open", stage="admit")
        elif self._bulkhead is not None and not self._enter_bulkhead():
            breaker.release(permit)
            reason = RawReason(code="overloaded", stage="admit", detail="max_concurrent reached")
        else:
            return permit, notice, None
        d = Degradation(x, args, kwargs, breaker.state, [reason])
        if notice is not None:
            d.reasons.append(notice)
        return REJECTED, None, d

    def _enter_bulkhead(self) -> bool:
        assert self._bulkhead is not None
        wait = self.policy.max_wait_s
        return self._bulkhead.acquire(timeout=wait) if wait else self._bulkhead.acquire(False)

    def _fallback_failed(
        self, d: Degradation, step: FallbackStep, exc: Exception, latency: float
    ) -> None:
        error = str(exc) if isinstance(exc, NoAnswer) else describe_error(exc)
        detail = f"{step.name}: {error}"
        d.attempts.append(
            RawAttempt(name=step.name, ok=False, latency_ms=_ms(latency), error=error)
        )
        d.reasons.append(RawReason(code="fallback_failed", stage="fallback", detail=detail[:200]))

    def _fallback_ok(self, d: Degradation, step: FallbackStep, value: Any, latency: float) -> bool:
        low = step.below_threshold(value)
        if low is None:
            d.attempts.append(RawAttempt(name=step.name, ok=True, latency_ms=_ms(latency)))
            return True
        d.attempts.append(
            RawAttempt(
                name=step.name,
                ok=False,
                latency_ms=_ms(latency),
                error=f"confidence {low:.4g} < {step.threshold}",
            )
        )
        d.reasons.append(
            RawReason(
                code="fallback_failed", stage="fallback", detail=f"{step.name}: low confidence"
            )
        )
        return False

    # -- records ------------------------------------------------------------------------------
    def _finish(
        self,
        d: Degradation,
        value: Any,
        served_by: str | None,
        offset: int,
        t0: float,
        want: bool,
        notice: RawReason | None = None,
    ) -> Any:
        if notice is not None:
            d.reasons.append(notice)
        codes = [r.code for r in d.reasons]
        if d.flagged:
            next(self._healthy_count)
            self._count(None, codes, flagged=True)
        else:
            self._count(served_by, codes, failed=served_by is None)
        record = self._finish_record(d, value, served_by, t0)
        if served_by is None:
            raise NoFallbackAvailable(record.decision())
        return Outcome(value, record) if want else value

    def _finish_record(
        self, d: Degradation, value: Any, served_by: str | None, t0: float
    ) -> Record:
        logged = True
        if self._open_aggregate is not None and d.reasons[0].code == "breaker_open":
            self._open_aggregate.add(served_by)  # one record per second, not one per call
            logged = False
        p = self.policy
        record = Record(
            self.name,
            p.owner,
            p.model_version,
            served_by,
            not d.flagged,
            d.flagged,
            d.reasons,
            d.attempts,
            d.confidence,
            d.state,
            _ms(perf_counter() - t0),
        )
        return self._emit(record, d.x, value, logged)

    def _healthy_record(
        self,
        value: Any,
        x: Any,
        t0: float,
        latency: float,
        permit: int,
        attempts: list[RawAttempt] | None,
        want: bool,
        logged: bool,
    ) -> Any:
        """A healthy call's record: logged when sampled, else only returned to `.call()`."""
        conf = self._confidence.extract(value) if self._confidence is not None else None
        p = self.policy
        record = Record(
            self.name,
            p.owner,
            p.model_version,
            "primary",
            False,
            False,
            [],
            _primary_attempts(attempts, latency, None),
            conf,
            self.breaker.state_of(permit),
            _ms(perf_counter() - t0),
        )
        self._emit(record, x, value, logged)
        return Outcome(value, record) if want else value

    def _emit(self, record: Record, x: Any, value: Any, logged: bool = True) -> Record:
        if self._include_inputs:
            record.inputs = self._recorder(x)
        if self._include_outputs:
            record.output = json_safe(value)
        if not logged:
            return record
        self._ring.append(record)
        if self._writer is not None and not self._writer.submit(record):
            with self._lock:
                self._counts["dropped_records"] += 1
        return record

    def _on_breaker_event(self, event: BreakerEvent) -> None:
        if self._writer is not None:
            self._writer.submit(event)

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

    # -- introspection and control -----------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts since the guard was created: calls, served_by, reasons and the rest."""
        healthy = int(repr(self._healthy_count)[6:-1])  # itertools.count: read without a lock
        with self._lock:
            served = dict(self._served)
            reasons = dict(self._reasons)
            counts = dict(self._counts)
        if healthy:
            served["primary"] = served.get("primary", 0) + healthy
        out: dict[str, Any] = {
            "calls": healthy + counts["degraded"] + counts["rejected"],
            "served_by": served,
            "reasons": reasons,
            **counts,
            "abandoned": self._pool.abandoned_total if self._pool is not None else 0,
            "breaker_state": self.breaker.state,
        }
        store = self.breaker.store_status
        if store is not None:
            out["store"] = store
        return out

    def calls_total(self) -> int:
        """Calls so far (for the retry budget)."""
        healthy = int(repr(self._healthy_count)[6:-1])
        return healthy + self._counts["degraded"] + self._counts["rejected"]

    def decisions(self) -> list[Decision]:
        """The most recent decision records (in-memory ring, oldest first)."""
        return [r.decision() for r in list(self._ring)]

    def flush(self) -> None:
        """Hand records held back (the open-breaker aggregate) to the log."""
        if self._open_aggregate is not None:
            self._open_aggregate.flush()


async def _await_within(coro: Any, timeout: float) -> Any:
    if timeout <= 0:
        coro.close()
        raise AttemptTimeout("no time left for the call")
    try:
        async with asyncio.timeout(timeout):
            return await coro
    except TimeoutError:
        raise AttemptTimeout(f"no answer within {timeout * 1000:.0f} ms") from None


def _problems_detail(inv: Invalid) -> str:
    return "; ".join(f"{p.loc}: {p.message}" for p in inv.problems)[:300]


def _primary_attempts(
    attempts: list[RawAttempt] | None, latency: float, error: str | None
) -> list[RawAttempt]:
    """The primary's attempts: the retries made, else the one call."""
    if attempts is not None:
        return list(attempts)
    return [RawAttempt(name="primary", ok=error is None, latency_ms=_ms(latency), error=error)]

"""Batches: many rows through one guard, degrading row by row (SPEC 8).

Validation runs over blocks of rows with numpy; the valid rows reach a `batch=True` primary in one
call; invalid, non-finite, low-confidence and poison rows (found by bisection when the primary
raises on a batch) walk the fallbacks one row at a time (a `batch=True` model fallback takes
them in one call), each with its own decision record. A plain guard is called row by row
(`batch_plain.py`).

`BatchRun` (`batch_engine.py`) decides; `run_batch` and `run_batch_async` are the drivers,
identical but for the awaits. A sync primary runs on the guard's worker pool when the policy
has a deadline and takes a `max_concurrent` slot per call, as a single call does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeVar

from safeserve.batch_engine import BatchRun, Call, Tried
from safeserve.batch_fallbacks import Answered, FallbackCall
from safeserve.batch_plain import row_by_row, row_by_row_async
from safeserve.batch_rows import BatchOutcome
from safeserve.breaker import REJECTED
from safeserve.deadlines import await_watched
from safeserve.decisions import RawAttempt, RawReason
from safeserve.degrade import failed_attempt, ms
from safeserve.errors import Overloaded
from safeserve.fallbacks import ModelStep

if TYPE_CHECKING:
    from safeserve.guard import Guard
    from safeserve.pipeline import Pipeline

__all__ = ["BatchOutcome", "run_batch", "run_batch_async"]

_BREAKER_OPEN = RawReason("breaker_open", "admit")
_NO_SLOT = RawReason("overloaded", "admit", "max_concurrent reached")

Sent = TypeVar("Sent")
Got = TypeVar("Got")


# -- sync ----------------------------------------------------------------------------------
def run_batch(guard: Guard, rows: Any, feature_names: list[str] | None) -> BatchOutcome:
    """`predict.batch(rows)` on a sync guard."""
    p = guard._p
    if not p.policy.batch:
        out = row_by_row(guard, rows, feature_names)  # each row a call, in the histogram too
    else:
        t0 = perf_counter()
        b = BatchRun(guard, rows, feature_names)
        _drive(b.primary(b.valid_rows()), lambda call: _call_sync(b, call))
        _drive(b.fallbacks(), _answer_sync)
        out = b.outcome()
        if p.hist is not None:  # the model's call is the batch: one latency
            p.hist.latency.add(perf_counter() - t0)
    if p.tracer is not None:
        p.tracer.batch(out)  # the batch's summary on the current span
    return out


def _drive(plan: Generator[Sent, Got, None], run: Callable[[Sent], Got]) -> None:
    """Make each call a plan asks for and send it what came of it, until the plan ends."""
    try:
        call = next(plan)
        while True:
            call = plan.send(run(call))
    except StopIteration:
        pass


def _call_sync(b: BatchRun, call: Call) -> Tried | RawReason:
    batch = b.rows.take(call.idx, b.validated)
    permit = b.admit()
    if permit == REJECTED:
        return _BREAKER_OPEN
    p, guard = b.p, b.guard
    if p.bulkhead is not None and not p.enter_bulkhead():
        guard.breaker.release(permit)
        return _NO_SLOT
    t = perf_counter()
    try:
        try:
            value = _primary_sync(p, batch, b.deadline, retry=False)
        except Exception as exc:
            attempts = [failed_attempt(exc, perf_counter() - t)]
            if call.retry and p.retry is not None and p.retry.retries(exc):

                def attempt() -> Any:
                    ta = perf_counter()
                    try:
                        answer = _primary_sync(p, batch, b.deadline, retry=True)
                    except Exception as failure:
                        attempts.append(failed_attempt(failure, perf_counter() - ta))
                        raise
                    attempts.append(RawAttempt("primary", True, ms(perf_counter() - ta)))
                    return answer

                try:
                    value = p.retry.run_sync(exc, attempt, b.deadline, guard, attempts)
                    return _succeeded(b, permit, value, perf_counter() - t, attempts)
                except Exception as final:
                    exc = final
            tried = Tried(None, exc, perf_counter() - t, attempts)
            b.fail(permit, tried)
            return tried
    finally:
        if p.inline_slot:
            p.bulkhead.release()  # type: ignore[union-attr]
    latency = perf_counter() - t
    return _succeeded(b, permit, value, latency, [RawAttempt("primary", True, ms(latency))])


def _primary_sync(p: Pipeline, batch: Any, deadline: float | None, retry: bool) -> Any:
    """One call of the primary: on the worker pool within the time left when the policy has a
    deadline (the call's slot is freed when it really ends), else inline."""
    if p.pool is None:
        return p.fn(batch)
    if retry and p.bulkhead is not None and not p.bulkhead.acquire(blocking=False):
        raise Overloaded("max_concurrent reached: no slot for a retry")
    return p.pool.run(p.fn, (batch,), {}, p.attempt_limit(deadline), p.slot_release)


def _succeeded(
    b: BatchRun, permit: int, value: Any, latency: float, attempts: list[RawAttempt]
) -> Tried:
    b.guard.breaker.on_success(permit, latency)
    return Tried(value, None, latency, attempts)


def _answer_sync(call: FallbackCall) -> Answered:
    t = perf_counter()
    try:
        if call.batch:
            assert isinstance(call.step, ModelStep)
            value = call.step.answer_batch(call.args[0], None)
        else:
            value = call.step.answer(call.x, call.args, {}, None)
    except Exception as exc:
        return Answered(None, exc, perf_counter() - t)
    return Answered(value, None, perf_counter() - t)


# -- async ---------------------------------------------------------------------------------
async def run_batch_async(guard: Guard, rows: Any, feature_names: list[str] | None) -> BatchOutcome:
    """`await predict.batch(rows)` on an async guard."""
    p = guard._p
    if not p.policy.batch:
        out = await row_by_row_async(guard, rows, feature_names)
    else:
        t0 = perf_counter()
        out = await _batch_async(guard, rows, feature_names)
        if p.hist is not None:
            p.hist.latency.add(perf_counter() - t0)
    if p.tracer is not None:
        p.tracer.batch(out)
    return out


async def _batch_async(guard: Guard, rows: Any, feature_names: list[str] | None) -> BatchOutcome:
    b = BatchRun(guard, rows, feature_names)
    plan = b.primary(b.valid_rows())
    try:
        call = next(plan)
        while True:
            call = plan.send(await _call_async(b, call))
    except StopIteration:
        pass
    walk = b.fallbacks()
    try:
        ask = next(walk)
        while True:
            ask = walk.send(await _answer_async(ask))
    except StopIteration:
        pass
    return b.outcome()


async def _call_async(b: BatchRun, call: Call) -> Tried | RawReason:
    batch = b.rows.take(call.idx, b.validated)
    permit = b.admit()
    if permit == REJECTED:
        return _BREAKER_OPEN
    p, guard = b.p, b.guard
    if p.bulkhead is not None and not p.enter_bulkhead(may_block=False):
        guard.breaker.release(permit)
        return _NO_SLOT
    t = perf_counter()
    try:
        value = await await_watched(p.deadlines, p.fn(batch), p.attempt_limit(b.deadline))
    except asyncio.CancelledError:
        guard.breaker.release(permit)
        raise
    except Exception as exc:
        attempts = [failed_attempt(exc, perf_counter() - t)]
        if call.retry and p.retry is not None and p.retry.retries(exc):

            async def attempt() -> Any:
                ta = perf_counter()
                try:
                    answer = await await_watched(
                        p.deadlines, p.fn(batch), p.attempt_limit(b.deadline)
                    )
                except Exception as failure:
                    attempts.append(failed_attempt(failure, perf_counter() - ta))
                    raise
                attempts.append(RawAttempt("primary", True, ms(perf_counter() - ta)))
                return answer

            try:
                value = await p.retry.run_async(exc, attempt, b.deadline, guard, attempts)
                return _succeeded(b, permit, value, perf_counter() - t, attempts)
            except Exception as final:
                exc = final
        tried = Tried(None, exc, perf_counter() - t, attempts)
        b.fail(permit, tried)
        return tried
    finally:
        if p.bulkhead is not None:
            p.bulkhead.release()
    latency = perf_counter() - t
    return _succeeded(b, permit, value, latency, [RawAttempt("primary", True, ms(latency))])


async def _answer_async(call: FallbackCall) -> Answered:
    t = perf_counter()
    try:
        if call.batch:
            assert isinstance(call.step, ModelStep)
            value = await call.step.answer_batch_async(call.args[0], None)
        else:
            value = await call.step.answer_async(call.x, call.args, {}, None)
    except Exception as exc:
        return Answered(None, exc, perf_counter() - t)
    return Answered(value, None, perf_counter() - t)

"""Batches: many rows through one guard, degrading row by row (SPEC 8).

Validation runs over columns with numpy; the valid rows reach a `batch=True` primary in one
call; invalid, non-finite, low-confidence and poison rows (found by bisection when the primary
raises on a batch) walk the fallbacks one row at a time, each with its own decision record.
A plain guard is called row by row. `_Batch` decides; `run_batch` and `run_batch_async` are the
drivers, identical but for the awaits.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable, Generator
from time import perf_counter
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from safeserve.batch_rows import (
    Rows,
    as_plain,
    assemble,
    failing_rows,
    profile_rows,
)
from safeserve.breaker import REJECTED
from safeserve.confidence import auto_extract
from safeserve.decisions import Decision, RawAttempt, RawReason, Record, describe_error, new_id
from safeserve.degrade import Degradation, failed_attempt, ms
from safeserve.errors import InputRejected, NoFallbackAvailable
from safeserve.fallbacks import ModelStep
from safeserve.validation import BaselineChecks, Invalid

if TYPE_CHECKING:
    from safeserve.guard import Guard

_INDEX = np.intp


class BatchOutcome:
    """What `predict.batch(rows)` returns: per row, in order, the answer (or None), who served
    it and whether it degraded; and the `Decision` of every degraded or flagged row.

    `values` is assembled on first read: the primary's answers stay in the array it returned
    until then, so a caller that reads `degraded` and the decisions pays nothing for a list.
    """

    __slots__ = ("_build", "_values", "batch_id", "decisions", "degraded", "served_by")

    def __init__(
        self,
        values: list[Any] | Callable[[], list[Any]],
        served_by: list[str | None],
        degraded: np.ndarray,
        decisions: list[Decision],
        batch_id: str,
    ) -> None:
        self._values = values if isinstance(values, list) else None
        self._build = None if isinstance(values, list) else values
        self.served_by = served_by
        self.degraded = degraded
        self.decisions = decisions
        self.batch_id = batch_id

    @property
    def values(self) -> list[Any]:
        """The answers in row order (None where nothing served)."""
        if self._values is None:
            assert self._build is not None
            self._values, self._build = self._build(), None
        return self._values

    def __len__(self) -> int:
        return len(self.served_by)

    def __repr__(self) -> str:
        return (
            f"BatchOutcome(rows={len(self)}, degraded={int(self.degraded.sum())}, "
            f"batch_id={self.batch_id!r})"
        )


# -- input forms ---------------------------------------------------------------------------
class Tried(NamedTuple):
    """One call of the primary on some rows: its answer or its error, and its attempts."""

    value: Any
    error: Exception | None
    latency: float
    attempts: list[RawAttempt]


class Call(NamedTuple):
    """A call the engine asks its driver to make: these rows, retried per policy or not."""

    idx: np.ndarray
    retry: bool


class _Batch:
    """The state of one batch, and every decision about it; the drivers only call and await."""

    def __init__(self, guard: Guard, data: Any, feature_names: list[str] | None) -> None:
        self.guard = guard
        self.p = guard._p
        self.t0 = perf_counter()
        self.rows = Rows(data, feature_names)
        self.batch_id = new_id()
        n = self.rows.n
        # the primary's answers stay as returned (rows, answers, positions) until `values` is read
        self.segments: list[tuple[np.ndarray, Any, np.ndarray]] = []
        self.fixed: dict[int, Any] = {}  # answers of the rows that fell back
        self.served_by: list[str | None] = ["primary"] * n
        self.degraded = np.zeros(n, dtype=bool)
        self.validated: dict[int, Any] = {}
        self.pending: dict[int, Degradation] = {}  # rows waiting for the fallbacks
        self.notices: dict[int, list[RawReason]] = {}  # served, but recorded (flagged)
        self.records: dict[int, Record] = {}
        self.rejected: list[int] = []
        self.deadline = None if self.p.timeout_s is None else self.t0 + self.p.timeout_s

    # -- validation
    def valid_rows(self) -> np.ndarray:
        """The rows that may reach the primary; the others are pending or rejected."""
        p, rows = self.p, self.rows
        profile_rows(p, rows)
        if not p.validating:
            return np.arange(rows.n, dtype=_INDEX)
        vectorized = [c for c in p.checks if isinstance(c, BaselineChecks)]
        if p.schema is None and len(vectorized) == len(p.checks):
            suspect = np.zeros(rows.n, dtype=bool)
            for check in vectorized:
                suspect |= failing_rows(check, rows)
            to_check = np.flatnonzero(suspect)
        else:  # a schema or a per-row check (freshness): every row, one at a time
            suspect = np.ones(rows.n, dtype=bool)
            to_check = np.arange(rows.n, dtype=_INDEX)
        for i in to_check.tolist():
            x = rows.row(i)
            try:
                (checked,) = p.validate((x,), 0)
            except Invalid as inv:
                if self._invalid(i, x, inv):
                    continue
                checked = inv.call_args[0] if inv.call_args else x
            suspect[i] = False
            if checked is not x:
                self.validated[i] = checked
        return np.flatnonzero(~suspect)

    def _invalid(self, i: int, x: Any, inv: Invalid) -> bool:
        """Whether an invalid row stays away from the primary (it does unless flagged)."""
        detail = "; ".join(f"{q.loc}: {q.message}" for q in inv.problems)[:300]
        reasons = [RawReason("invalid_input", "validate", detail)]
        p = self.p
        if p.flag_invalid:
            self.notices[i] = reasons
            return False
        d = Degradation(p, (x,), {}, 0, self.guard.breaker.state, reasons)
        if p.reject_invalid:
            reasons.append(RawReason("rejected", "validate"))
            self.rejected.append(i)
            self._record(i, d, None, None)
            self.guard._count(None, ["invalid_input", "rejected"], rejected=True)
        else:
            self.pending[i] = d
        return True

    # -- the primary
    def primary(self, idx: np.ndarray) -> Generator[Call, Tried | None, None]:
        """Calls the primary on the valid rows; when it raises, isolates the poison rows by
        bisection (each failing half split again), serving every other row from the primary.
        The driver answers each `Call` with a `Tried`, or None when the breaker refused it."""
        if not len(idx):
            return
        tried = yield Call(idx, True)
        if tried is None or tried.error is None:
            self._settle(idx, tried)
            return
        if len(idx) == 1:
            self._poison(idx, tried)
            return
        failing = [idx]  # batches of two rows or more that raised
        while failing:
            bad = failing.pop()
            for half in np.array_split(bad, 2):
                if self.deadline is not None and perf_counter() > self.deadline:
                    self._out_of_time(half)
                    continue
                tried = yield Call(half, False)
                if tried is None or tried.error is None:
                    self._settle(half, tried)
                elif len(half) == 1:
                    self._poison(half, tried)
                else:
                    failing.append(half)

    def admit(self) -> int:
        breaker = self.guard.breaker
        return breaker.fast_permit or breaker.admit()

    def fail(self, permit: int, tried: Tried) -> None:
        """The breaker's outcome for a call that raised."""
        assert tried.error is not None
        timeout = isinstance(tried.error, TimeoutError)
        self.guard.breaker.on_failure(permit, tried.latency, tried.error, timeout=timeout)

    def _settle(self, idx: np.ndarray, tried: Tried | None) -> None:
        """Rows the primary answered (or the breaker refused): check each answer."""
        state = self.guard.breaker.state
        if tried is None:
            for i in idx.tolist():
                self._degrade(i, state, RawReason("breaker_open", "admit"), [])
            return
        value = tried.value
        value = value.to_numpy() if hasattr(value, "to_numpy") else value
        try:
            count = len(value)
        except TypeError:
            count = -1
        attempts = tried.attempts
        if count != len(idx):
            reason = RawReason("invalid_output", "output", f"{count} answers for {len(idx)} rows")
            for i in idx.tolist():
                self._degrade(i, state, reason, attempts)
            return
        good = self._check_answers(idx, value, state, attempts)
        self.segments.append((idx[good], value, good))
        self.healthy_rows(idx[good], value, good, tried)

    def _check_answers(
        self, idx: np.ndarray, value: Any, state: str, attempts: list[RawAttempt]
    ) -> np.ndarray:
        """Positions (into `idx`) whose answer is finite and confident enough."""
        p = self.p
        n = len(idx)
        ok = np.ones(n, dtype=bool)
        bad_output: dict[int, RawReason] = {}
        if isinstance(value, np.ndarray) and value.dtype.kind in "fc" and p.output_schema is None:
            # one reduction says "all finite" (a sum overflowing to inf only costs the slow way)
            clean = not n or bool(np.isfinite(value.sum()))
            finite = ok if clean else np.isfinite(value.reshape(n, -1)).all(axis=1)
            for j in np.flatnonzero(~finite).tolist():
                bad_output[j] = RawReason("invalid_output", "output", "non-finite at $[...]")
        elif not (isinstance(value, np.ndarray) and value.dtype.kind in "iub"):
            for j in range(n):
                reason = p.output_check(value[j])
                if reason is not None:
                    bad_output[j] = reason
        for j, reason in bad_output.items():
            ok[j] = False
            self._degrade(int(idx[j]), state, reason, attempts)
        check = p.confidence
        if check is None:
            return np.flatnonzero(ok)
        read = _confidences(value, n, check.extract)
        if read is None:
            return np.flatnonzero(ok)
        conf, seen = read
        for j in np.flatnonzero(ok & seen & ~(conf >= check.threshold)).tolist():
            c = float(conf[j])
            reason = check.judge(c)
            i = int(idx[j])
            if not check.degrades and reason.code == "low_confidence":
                self.notices.setdefault(i, []).append(reason)
                continue
            ok[j] = False
            self._degrade(i, state, reason, attempts, None if math.isnan(c) else c)
        return np.flatnonzero(ok)

    def healthy_rows(self, idx: np.ndarray, answers: Any, pos: np.ndarray, tried: Tried) -> None:
        """Count the rows the primary served; record the flagged ones and a sample."""
        p, guard = self.p, self.guard
        state = guard.breaker.state
        flagged = 0
        if self.notices:
            for j, i in enumerate(idx.tolist()):
                notices = self.notices.get(i)
                if notices is None:
                    continue
                attempts = list(tried.attempts)
                d = Degradation(p, (self._x(i),), {}, 0, state, notices, attempts)
                d.flagged = True
                self._record(i, d, as_plain(answers[pos[j]]), "primary")
                next(guard._healthy_count)
                guard._count(None, [r.code for r in d.reasons], flagged=True)
                flagged += 1
        guard.add_healthy(len(idx) - flagged)
        if p.caches:
            for j, i in enumerate(idx.tolist()):
                for cache in p.caches:
                    cache.remember(self._x(i), as_plain(answers[pos[j]]))
        if p.sample_rate:
            for j in np.flatnonzero(np.random.random(len(idx)) < p.sample_rate).tolist():
                i = int(idx[j])
                if i in self.notices:
                    continue
                record = Record(
                    guard.name,
                    p.policy.owner,
                    p.policy.model_version,
                    "primary",
                    False,
                    False,
                    [],
                    list(tried.attempts),
                    None,
                    state,
                    ms(perf_counter() - self.t0),
                )
                record.row, record.batch_id = i, self.batch_id
                guard._emit(p, record, self._x(i), as_plain(answers[pos[j]]), logged=True)

    def _poison(self, idx: np.ndarray, tried: Tried) -> None:
        assert tried.error is not None
        reason = RawReason("error", "call", describe_error(tried.error))
        state = self.guard.breaker.state
        for i in idx.tolist():
            self._degrade(i, state, reason, list(tried.attempts))

    def _out_of_time(self, idx: np.ndarray) -> None:
        reason = RawReason("timeout", "call", "the batch's time budget ran out while bisecting")
        for i in idx.tolist():
            self._degrade(i, self.guard.breaker.state, reason, [])

    def _degrade(
        self,
        i: int,
        state: str,
        reason: RawReason,
        attempts: list[RawAttempt],
        confidence: float | None = None,
    ) -> None:
        reasons = [reason, *self.notices.pop(i, ())]
        x = self._x(i)
        self.pending[i] = Degradation(
            p=self.p,
            args=(x,),
            kwargs={},
            offset=0,
            state=state,
            reasons=reasons,
            attempts=list(attempts),
            confidence=confidence,
        )

    def _x(self, i: int) -> Any:
        return self.validated.get(i, self.rows.row(i))

    # -- the fallbacks, one row at a time
    def fallback_args(self, step: Any, i: int, d: Degradation) -> tuple[Any, ...]:
        """A batch guard's model fallback takes a batch too: a batch of this one row."""
        if self.p.policy.batch and isinstance(step, ModelStep):
            return (self.rows.take(np.array([i], dtype=_INDEX), self.validated),)
        return d.args

    def answered(self, step: Any, value: Any) -> Any:
        if self.p.policy.batch and isinstance(step, ModelStep):
            if isinstance(value, np.ndarray):
                value = value.tolist()
            (value,) = value  # one answer for the one row
        return value

    def finish_row(self, i: int, d: Degradation, value: Any, served_by: str | None) -> None:
        self.fixed[i] = value
        self.served_by[i] = served_by
        self.degraded[i] = True
        self._record(i, d, value, served_by)
        self.guard._count(served_by, [r.code for r in d.reasons], failed=served_by is None)

    def _record(self, i: int, d: Degradation, value: Any, served_by: str | None) -> None:
        p = self.p
        record = Record(
            self.guard.name,
            p.policy.owner,
            p.policy.model_version,
            served_by,
            not d.flagged,
            d.flagged,
            d.reasons,
            d.attempts,
            d.confidence,
            d.state,
            ms(perf_counter() - self.t0),
        )
        record.row, record.batch_id = i, self.batch_id
        self.records[i] = record
        self.guard._emit(p, record, d.x, value, logged=True)

    def outcome(self) -> BatchOutcome:
        for i in self.rejected:
            self.served_by[i] = None
            self.degraded[i] = True
        decisions = [self.records[i].decision() for i in sorted(self.records)]
        n, segments, fixed = self.rows.n, self.segments, self.fixed
        return BatchOutcome(
            lambda: assemble(n, segments, fixed),
            self.served_by,
            self.degraded,
            decisions,
            self.batch_id,
        )


def _confidences(
    value: Any, n: int, extract: Callable[[Any], float | None]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Each row's confidence and whether one was read; vectorized for probability arrays."""
    if extract is auto_extract and isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiu" or not n:
            return None
        conf = value.astype(float, copy=False)
        if conf.ndim == 2 and conf.shape[1] <= 16:  # a few classes: column by column is faster
            conf = functools.reduce(np.maximum, [conf[:, k] for k in range(conf.shape[1])])
        elif conf.ndim > 1:
            conf = conf.max(axis=-1)
        while conf.ndim > 1:
            conf = conf.min(axis=-1)  # as `as_confidence`: a row is as sure as its least sure part
        return conf, np.ones(n, dtype=bool)
    conf = np.full(n, np.nan)
    seen = np.zeros(n, dtype=bool)
    for j in range(n):
        c = extract(value[j])
        if c is not None:
            conf[j], seen[j] = c, True
    return conf, seen


# -- the drivers ---------------------------------------------------------------------------
def run_batch(guard: Guard, rows: Any, feature_names: list[str] | None) -> BatchOutcome:
    """`predict.batch(rows)` on a sync guard."""
    if not guard._p.policy.batch:
        return _row_by_row(guard, rows, feature_names)
    b = _Batch(guard, rows, feature_names)
    plan = b.primary(b.valid_rows())
    try:
        call = next(plan)
        while True:
            call = plan.send(_call_sync(b, call))
    except StopIteration:
        pass
    for i in sorted(b.pending):
        _fallbacks_sync(b, i, b.pending[i])
    return b.outcome()


def _call_sync(b: _Batch, call: Call) -> Tried | None:
    permit = b.admit()
    if permit == REJECTED:
        return None
    p, guard = b.p, b.guard
    batch = b.rows.take(call.idx, b.validated)
    t = perf_counter()
    try:
        value = p.fn(batch)
    except Exception as exc:
        attempts = [failed_attempt(exc, perf_counter() - t)]
        if call.retry and p.retry is not None and p.retry.retries(exc):

            def attempt() -> Any:
                ta = perf_counter()
                try:
                    answer = p.fn(batch)
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
    latency = perf_counter() - t
    return _succeeded(b, permit, value, latency, [RawAttempt("primary", True, ms(latency))])


def _succeeded(
    b: _Batch, permit: int, value: Any, latency: float, attempts: list[RawAttempt]
) -> Tried:
    b.guard.breaker.on_success(permit, latency)
    return Tried(value, None, latency, attempts)


def _fallbacks_sync(b: _Batch, i: int, d: Degradation) -> None:
    guard = b.guard
    for step in b.p.steps:
        t = perf_counter()
        try:
            value = b.answered(step, step.answer(d.x, b.fallback_args(step, i, d), {}, None))
        except Exception as exc:
            guard._fallback_failed(d, step, exc, perf_counter() - t)
            continue
        if guard._fallback_ok(d, step, value, perf_counter() - t):
            b.finish_row(i, d, value, step.name)
            return
    b.finish_row(i, d, None, None)


async def run_batch_async(guard: Guard, rows: Any, feature_names: list[str] | None) -> BatchOutcome:
    """`await predict.batch(rows)` on an async guard."""
    if not guard._p.policy.batch:
        return await _row_by_row_async(guard, rows, feature_names)
    b = _Batch(guard, rows, feature_names)
    plan = b.primary(b.valid_rows())
    try:
        call = next(plan)
        while True:
            call = plan.send(await _call_async(b, call))
    except StopIteration:
        pass
    for i in sorted(b.pending):
        await _fallbacks_async(b, i, b.pending[i])
    return b.outcome()


async def _call_async(b: _Batch, call: Call) -> Tried | None:
    permit = b.admit()
    if permit == REJECTED:
        return None
    p, guard = b.p, b.guard
    batch = b.rows.take(call.idx, b.validated)
    t = perf_counter()
    try:
        value = await _within(p.fn(batch), b.deadline)
    except asyncio.CancelledError:
        guard.breaker.release(permit)
        raise
    except Exception as exc:
        attempts = [failed_attempt(exc, perf_counter() - t)]
        if call.retry and p.retry is not None and p.retry.retries(exc):

            async def attempt() -> Any:
                ta = perf_counter()
                try:
                    answer = await _within(p.fn(batch), b.deadline)
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
    latency = perf_counter() - t
    return _succeeded(b, permit, value, latency, [RawAttempt("primary", True, ms(latency))])


async def _within(coro: Any, deadline: float | None) -> Any:
    if deadline is None:
        return await coro
    from safeserve.guard import _await_within

    return await _await_within(coro, deadline - perf_counter())


async def _fallbacks_async(b: _Batch, i: int, d: Degradation) -> None:
    guard = b.guard
    for step in b.p.steps:
        t = perf_counter()
        try:
            answer = await step.answer_async(d.x, b.fallback_args(step, i, d), {}, None)
            value = b.answered(step, answer)
        except Exception as exc:
            guard._fallback_failed(d, step, exc, perf_counter() - t)
            continue
        if guard._fallback_ok(d, step, value, perf_counter() - t):
            b.finish_row(i, d, value, step.name)
            return
    b.finish_row(i, d, None, None)


# -- plain guards: row by row --------------------------------------------------------------
def _row_by_row(guard: Guard, data: Any, feature_names: list[str] | None) -> BatchOutcome:
    rows = Rows(data, feature_names)
    collect = _Collector(guard, rows.n)
    for i in range(rows.n):
        try:
            collect.add(i, guard.call(rows.row(i)))
        except (NoFallbackAvailable, InputRejected) as err:
            collect.failed(i, err)
    return collect.outcome()


async def _row_by_row_async(
    guard: Guard, data: Any, feature_names: list[str] | None
) -> BatchOutcome:
    rows = Rows(data, feature_names)
    collect = _Collector(guard, rows.n)
    for i in range(rows.n):
        try:
            collect.add(i, await guard.call(rows.row(i)))
        except (NoFallbackAvailable, InputRejected) as err:
            collect.failed(i, err)
    return collect.outcome()


class _Collector:
    """Gathers the outcomes of a plain guard called once per row."""

    def __init__(self, guard: Guard, n: int) -> None:
        self.guard = guard
        self.batch_id = new_id()
        self.values: list[Any] = [None] * n
        self.served_by: list[str | None] = [None] * n
        self.degraded = np.zeros(n, dtype=bool)
        self.decisions: list[Decision] = []

    def add(self, i: int, outcome: Any) -> None:
        record = outcome._record  # a `Record`: the pydantic Decision only for rows that need one
        self.values[i] = outcome.value
        self.served_by[i] = record.served_by
        self.degraded[i] = record.degraded
        if record.degraded or record.flagged:
            record.row, record.batch_id = i, self.batch_id
            self.decisions.append(record.decision())

    def failed(self, i: int, err: NoFallbackAvailable | InputRejected) -> None:
        self.degraded[i] = True
        if isinstance(err, NoFallbackAvailable):
            decision = err.decision
        else:
            detail = "; ".join(f"{q.loc}: {q.message}" for q in err.problems)[:300]
            p = self.guard._p
            decision = Record(
                self.guard.name,
                p.policy.owner,
                p.policy.model_version,
                None,
                True,
                False,
                [RawReason("invalid_input", "validate", detail), RawReason("rejected", "validate")],
                [],
                None,
                self.guard.breaker.state,
                0.0,
            ).decision()
        self.decisions.append(decision.model_copy(update={"row": i, "batch_id": self.batch_id}))

    def outcome(self) -> BatchOutcome:
        return BatchOutcome(
            self.values, self.served_by, self.degraded, self.decisions, self.batch_id
        )

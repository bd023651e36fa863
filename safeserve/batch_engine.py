"""The decisions of one batch: which rows reach the primary, how its answers are checked, how
poison rows are isolated (and, in `batch_fallbacks.py`, which fallback serves each row that
degraded).

`BatchRun` never calls anything itself: its plans (`primary`, `fallbacks`) are generators that
yield the calls to make and receive what came of them, so the sync and async drivers
(`batch.py`) share every decision and differ only in the awaits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Generator
from time import perf_counter
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from safeserve.batch_fallbacks import FallbackWalk
from safeserve.batch_rows import BatchOutcome, Rows, as_plain, assemble, failing_rows, profile_rows
from safeserve.batch_schema import column_rules, suspect_rows
from safeserve.confidence import auto_extract
from safeserve.decisions import RawAttempt, RawReason, Record, describe_error, new_id
from safeserve.degrade import Degradation, ms
from safeserve.errors import Overloaded
from safeserve.validation import BaselineChecks, Invalid

if TYPE_CHECKING:
    from safeserve.guard import Guard

_INDEX = np.intp


class Call(NamedTuple):
    """A call of the primary the engine asks its driver to make: these rows, retried per policy
    or not."""

    idx: np.ndarray
    retry: bool


class Tried(NamedTuple):
    """One call of the primary on some rows: its answer or its error, and its attempts."""

    value: Any
    error: Exception | None
    latency: float
    attempts: list[RawAttempt]


class BatchRun(FallbackWalk):
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
        # the policy's time budget bounds the whole batch: validation, calls, bisection
        self.deadline = None if self.p.timeout_s is None else self.t0 + self.p.timeout_s

    # -- validation
    def valid_rows(self) -> np.ndarray:
        """The rows that may reach the primary; the others are pending or rejected.

        The vectorized mask only finds the suspect rows; each is then validated as a single
        call would be, so its problems (and whether it is invalid at all) read the same."""
        p, rows = self.p, self.rows
        if self.guard.forced is not None:  # an outage drill: no row reaches the primary
            drill = self.guard._drill(p, (), {}, 0).reasons
            state = self.guard.breaker.state
            for i in range(rows.n):
                self.notices.setdefault(i, []).extend(drill[1:])
                self._degrade(i, state, drill[0], [])
            return np.empty(0, dtype=_INDEX)
        profile_rows(p, rows)
        if not p.validating:
            return np.arange(rows.n, dtype=_INDEX)
        vectorized = [c for c in p.checks if isinstance(c, BaselineChecks)]
        rules = column_rules(p.schema.schema) if p.schema is not None else []
        if rules is not None and len(vectorized) == len(p.checks):
            suspect = suspect_rows(rules, rows) if rules else np.zeros(rows.n, dtype=bool)
            for check in vectorized:
                suspect |= failing_rows(check, rows)
            to_check = np.flatnonzero(suspect)
        else:  # a schema beyond column tests, or a per-row check (freshness): row by row
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
            self.record_row(i, d, None, None)
            self.guard._count(None, ["invalid_input", "rejected"], rejected=True)
        else:
            self.pending[i] = d
        return True

    # -- the primary
    def primary(self, idx: np.ndarray) -> Generator[Call, Tried | RawReason, None]:
        """Calls the primary on the valid rows; when it raises, isolates the poison rows by
        bisection (each failing half split again), serving every other row from the primary.

        The driver answers each `Call` with a `Tried`, or with the reason it was refused
        (breaker open, no bulkhead slot). A timeout or an overload is not bisected: it says
        nothing about the rows, and splitting would only add calls to a struggling model.
        """
        if not len(idx):
            return
        failing: list[np.ndarray] = []  # batches of two rows or more that raised
        self._took(idx, (yield Call(idx, True)), failing)
        while failing:
            bad = failing.pop()
            for half in np.array_split(bad, 2):
                if self.deadline is not None and perf_counter() > self.deadline:
                    reason = RawReason("timeout", "call", "the batch's time budget ran out")
                    self._degrade_all(half, reason, [])
                    continue
                self._took(half, (yield Call(half, False)), failing)

    def _took(self, idx: np.ndarray, tried: Tried | RawReason, failing: list[np.ndarray]) -> None:
        if isinstance(tried, RawReason):
            self._degrade_all(idx, tried, [])
        elif tried.error is None:
            self._settle(idx, tried)
        elif len(idx) == 1 or isinstance(tried.error, TimeoutError | Overloaded):
            self._degrade_all(idx, _failure_reason(tried.error), tried.attempts)
        else:
            failing.append(idx)

    def admit(self) -> int:
        breaker = self.guard.breaker
        permit: int = breaker.fast_permit or breaker.admit()
        return permit

    def fail(self, permit: int, tried: Tried) -> None:
        """The breaker's outcome for a call that raised (an overload is none: the permit goes
        back, as for a single call)."""
        assert tried.error is not None
        breaker = self.guard.breaker
        if isinstance(tried.error, Overloaded):
            breaker.release(permit)
            return
        timeout = isinstance(tried.error, TimeoutError)
        breaker.on_failure(permit, tried.latency, tried.error, timeout=timeout)

    def _settle(self, idx: np.ndarray, tried: Tried) -> None:
        """Rows the primary answered: check each answer."""
        state = self.guard.breaker.state
        value = tried.value
        value = value.to_numpy() if hasattr(value, "to_numpy") else value
        try:
            count = len(value)
        except TypeError:
            count = -1
        attempts = tried.attempts
        if count != len(idx):
            reason = RawReason("invalid_output", "output", f"{count} answers for {len(idx)} rows")
            self._degrade_all(idx, reason, attempts)
            return
        good = self._check_answers(idx, value, state, attempts)
        if good is None:  # every answer passed: no index arrays to gather
            served, good = idx, np.arange(len(idx), dtype=_INDEX)
        else:
            served = idx[good]
        self.segments.append((served, value, good))
        self.healthy_rows(served, value, good, tried)

    def _check_answers(
        self, idx: np.ndarray, value: Any, state: str, attempts: list[RawAttempt]
    ) -> np.ndarray | None:
        """Positions (into `idx`) whose answer is finite and confident enough (None: all)."""
        p = self.p
        n = len(idx)
        bad_output: dict[int, RawReason] = {}
        if not p.check_finite and not p.checks_output:
            pass  # nothing to check in an answer
        elif isinstance(value, np.ndarray) and value.dtype.kind in "fc" and not p.checks_output:
            # one reduction says "all finite" (a sum overflowing to inf only costs the slow way)
            if n and not np.isfinite(value.sum()):
                finite = np.isfinite(value.reshape(n, -1)).all(axis=1)
                for j in np.flatnonzero(~finite).tolist():
                    bad_output[j] = RawReason("invalid_output", "output", "non-finite at $[...]")
        elif p.checks_output or not (isinstance(value, np.ndarray) and value.dtype.kind in "iub"):
            for j in range(n):
                reason = p.output_check(value[j])
                if reason is not None:
                    bad_output[j] = reason
        dropped = list(bad_output)
        for j, reason in bad_output.items():
            self._degrade(int(idx[j]), state, reason, attempts)
        check = p.confidence
        read = _confidences(value, n, check.extract) if check is not None else None
        if check is not None and read is not None:
            conf, seen = read
            sure = (conf >= check.threshold) & (conf <= 1.0)  # False for NaN (and unread) too
            low = [] if sure.all() else np.flatnonzero(~sure).tolist()
            for j in low:
                if j in bad_output:
                    continue
                c = float(conf[j]) if seen is None or seen[j] else None
                reason = check.judge(c)
                i = int(idx[j])
                if not check.degrades and reason.code == "low_confidence":
                    self.notices.setdefault(i, []).append(reason)
                    continue
                dropped.append(j)
                self._degrade(i, state, reason, attempts, None if c is None or math.isnan(c) else c)
        if not dropped:
            return None
        ok = np.ones(n, dtype=bool)
        ok[dropped] = False
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
                self.record_row(i, d, as_plain(answers[pos[j]]), "primary")
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
                answer = as_plain(answers[pos[j]])
                record = Record(
                    guard.name,
                    p.policy.owner,
                    p.policy.model_version,
                    "primary",
                    False,
                    False,
                    [],
                    list(tried.attempts),
                    p.confidence.extract(answer) if p.confidence is not None else None,
                    state,
                    ms(perf_counter() - self.t0),
                )
                record.row, record.batch_id = i, self.batch_id
                self.keep_batch_secrets(record)
                guard._emit(p, record, self._x(i), answer, logged=True)

    def _degrade_all(self, idx: np.ndarray, reason: RawReason, attempts: list[RawAttempt]) -> None:
        state = self.guard.breaker.state
        for i in idx.tolist():
            self._degrade(i, state, reason, attempts)

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


def _failure_reason(error: Exception) -> RawReason:
    if isinstance(error, Overloaded):
        return RawReason("overloaded", "call", str(error))
    code = "timeout" if isinstance(error, TimeoutError) else "error"
    return RawReason(code, "call", describe_error(error))


def _confidences(
    value: Any, n: int, extract: Callable[[Any], float | None]
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Each row's confidence and whether one was read (None: for every row); vectorized for
    probability arrays."""
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
        return conf, None
    conf = np.full(n, np.nan)
    seen = np.zeros(n, dtype=bool)
    for j in range(n):
        c = extract(value[j])
        if c is not None:
            conf[j], seen[j] = c, True
    return conf, seen

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
from collections.abc import Callable, Generator, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from safeserve.breaker import REJECTED
from safeserve.confidence import auto_extract
from safeserve.decisions import Decision, RawAttempt, RawReason, Record, describe_error, new_id
from safeserve.degrade import Degradation, failed_attempt, ms
from safeserve.errors import InputRejected, NoFallbackAvailable
from safeserve.fallbacks import ModelStep
from safeserve.profile import _category, _number
from safeserve.validation import BaselineChecks, Invalid, _numeric_problem, category_key

if TYPE_CHECKING:
    from safeserve.guard import Guard
    from safeserve.pipeline import Pipeline

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
class Rows:
    """One batch in any input form: columns for the checks, rows for the fallbacks, and
    sub-batches in the form the caller gave (`take`) for a batch primary."""

    def __init__(self, data: Any, feature_names: list[str] | None) -> None:
        self.data = data
        self.form, self.n, self.names = _form_of(data, feature_names)
        self._made: dict[int, dict[str, Any]] = {}

    def column(self, name: str) -> np.ndarray:
        """A feature's values (float where the input allows, else object; None when absent)."""
        data = self.data
        if self.form == "array":
            if name not in self.names:
                return np.full(self.n, None, dtype=object)
            return np.asarray(data[:, self.names.index(name)])
        if self.form in ("columns", "frame"):
            if name not in data:
                return np.full(self.n, None, dtype=object)
            col = data[name]
            col = col.to_numpy() if hasattr(col, "to_numpy") else col
            if isinstance(col, np.ndarray):
                return col
            return _array_of(list(col))
        return _array_of([r.get(name) for r in data])

    def row(self, i: int) -> dict[str, Any]:
        """Row `i` as a dict of plain values (what a fallback and the records see); built only
        for the rows that need one, so a million-row batch never becomes a million dicts."""
        if self.form == "records":
            given = self.data[i]
            return given if isinstance(given, dict) else dict(given)
        row = self._made.get(i)
        if row is None:
            if self.form == "array":
                row = dict(zip(self.names, self.data[i].tolist(), strict=True))
            elif self.form == "frame":
                row = {str(k): _item(v) for k, v in self.data.iloc[i].items()}
            else:
                row = {k: _item(self.data[k][i]) for k in self.names}
            self._made[i] = row
        return row

    def take(self, idx: np.ndarray, validated: dict[int, Any] | None) -> Any:
        """The rows `idx` in the caller's form (the batch itself when `idx` is every row)."""
        every = len(idx) == self.n
        if self.form == "records":
            if validated:
                return [validated.get(i, self.data[i]) for i in idx.tolist()]
            return self.data if every else [self.data[i] for i in idx.tolist()]
        if every:
            return self.data
        if self.form == "array":
            return self.data[idx]
        if self.form == "frame":
            return self.data.iloc[idx]
        return {k: _take_column(v, idx) for k, v in self.data.items()}


def _form_of(data: Any, feature_names: list[str] | None) -> tuple[str, int, list[str]]:
    if isinstance(data, np.ndarray):
        if data.ndim != 2:
            raise TypeError(f"a numpy batch must be 2-D (rows x features), not {data.ndim}-D")
        if feature_names is None or len(feature_names) != data.shape[1]:
            raise TypeError(f"a numpy batch needs feature_names=[...] ({data.shape[1]} names)")
        return "array", data.shape[0], list(feature_names)
    if hasattr(data, "iloc") and hasattr(data, "columns"):  # a pandas DataFrame
        return "frame", len(data), [str(c) for c in data.columns]
    if isinstance(data, Mapping):
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise TypeError("the columns of a batch must all have the same length")
        return "columns", lengths.pop() if lengths else 0, [str(k) for k in data]
    if isinstance(data, list | tuple):
        if not all(isinstance(r, Mapping) for r in data):
            raise TypeError("a list batch holds one dict per row")
        return "records", len(data), []
    raise TypeError(
        "a batch is a list of dicts, a dict of columns, a 2-D numpy array with feature_names, "
        f"or a pandas DataFrame, not {type(data).__name__}"
    )


def _array_of(values: list[Any]) -> np.ndarray:
    if all(type(v) is float or type(v) is int for v in values):
        return np.array(values, dtype=float)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _plain(value: Any) -> Any:
    """One answer as plain Python values (a row of a numpy answer becomes a list)."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def _assemble(
    n: int, segments: list[tuple[np.ndarray, Any, np.ndarray]], fixed: dict[int, Any]
) -> list[Any]:
    """The answers in row order: the primary's, scattered by runs of rows, then the fallbacks'."""
    if len(segments) == 1 and not fixed:
        idx, answers, pos = segments[0]
        if len(idx) == n == len(answers):
            return _plain(answers) if isinstance(answers, np.ndarray) else list(answers)
    values: list[Any] = [None] * n
    for idx, answers, pos in segments:
        if not len(idx):
            continue
        plain = _plain(answers) if isinstance(answers, np.ndarray) else list(answers)
        # runs where both the row and the answer position advance by one: one slice copy each
        breaks = np.flatnonzero((np.diff(idx) != 1) | (np.diff(pos) != 1)) + 1
        starts = [0, *breaks.tolist()]
        ends = [*breaks.tolist(), len(idx)]
        rows, at = idx.tolist(), pos.tolist()
        for a, b in zip(starts, ends, strict=True):
            values[rows[a] : rows[a] + b - a] = plain[at[a] : at[a] + b - a]
    for i, value in fixed.items():
        values[i] = value
    return values


def _item(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _take_column(column: Any, idx: np.ndarray) -> Any:
    if isinstance(column, np.ndarray):
        return column[idx]
    return [column[i] for i in idx.tolist()]


# -- vectorized validation -----------------------------------------------------------------
def failing_rows(checks: BaselineChecks, rows: Rows) -> np.ndarray:
    """A bool per row: True where some baseline check (range, null, category) fails."""
    bad = np.zeros(rows.n, dtype=bool)
    numeric = list(checks.numeric)
    data = rows.data
    if rows.form == "array" and data.dtype.kind in "fiu" and numeric:
        present = [c for c in numeric if c[0] in rows.names]
        if present:  # the whole matrix at once: one pass per comparison, no column copies
            cols = [rows.names.index(c[0]) for c in present]
            bad |= _out_of_range(data, cols, present)
            numeric = [c for c in numeric if c[0] not in rows.names]
    for name, lo_, hi_, allow_null in numeric:
        bad |= _numeric_fails(rows.column(name), lo_, hi_, allow_null)
    for name, known, allow_null in checks.categorical:
        col = rows.column(name)
        bad |= np.fromiter(
            (
                (not allow_null)
                if v is None
                else (known is not None and category_key(v) not in known)
                for v in col.tolist()
            ),
            dtype=bool,
            count=rows.n,
        )
    return bad


_CHUNK = 16384  # rows per pass: the bool temporaries stay in cache


def _out_of_range(data: np.ndarray, cols: list[int], checks: list[Any]) -> np.ndarray:
    """Rows of a numeric matrix with a value outside its range (or a null where none is allowed),
    a chunk of rows at a time; NaN compares False, so it fails unless the feature allows nulls."""
    lo = np.array([c[1] for c in checks])
    hi = np.array([c[2] for c in checks])
    nullable = [j for j, c in enumerate(checks) if c[3]] if data.dtype.kind == "f" else []
    whole = cols == list(range(data.shape[1]))
    width = len(cols)
    bad = np.zeros(len(data), dtype=bool)
    for start in range(0, len(data), _CHUNK):
        chunk = data[start : start + _CHUNK]
        m = chunk if whole else chunk[:, cols]
        ok = m >= lo
        ok &= m <= hi
        if nullable:
            ok[:, nullable] |= np.isnan(m[:, nullable])
        failed = np.flatnonzero(~ok.ravel())
        if len(failed):
            bad[start + failed // width] = True
    return bad


def _numeric_fails(col: np.ndarray, lo: float, hi: float, allow_null: bool) -> np.ndarray:
    if col.dtype.kind in "fiu":
        ok = (col >= lo) & (col <= hi)
        if allow_null and col.dtype.kind == "f":
            ok |= np.isnan(col)
        return ~ok
    return np.fromiter(
        (_numeric_problem(v, lo, hi, allow_null) is not None for v in col.tolist()),
        dtype=bool,
        count=len(col),
    )


def _profile(p: Pipeline, rows: Rows) -> None:
    """Every row into the guard's feature profile, binned by column."""
    profiler = p.profiler
    if profiler is None or not rows.n:
        return
    columns = {}
    for name, f in profiler.features.items():
        col = rows.column(name)
        if f.kind == "numeric":
            if col.dtype.kind not in "fiu":
                col = np.array([_number(v) for v in col.tolist()], dtype=float)
        else:
            col = np.array([_category(v) for v in col.tolist()], dtype=object)
        columns[name] = col
    with profiler._lock:
        profiler._n += rows.n
        for name, col in columns.items():
            profiler._add(name, col)


# -- the engine ----------------------------------------------------------------------------
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
        _profile(p, rows)
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
                self._record(i, d, _plain(answers[pos[j]]), "primary")
                next(guard._healthy_count)
                guard._count(None, [r.code for r in d.reasons], flagged=True)
                flagged += 1
        guard.add_healthy(len(idx) - flagged)
        if p.caches:
            for j, i in enumerate(idx.tolist()):
                for cache in p.caches:
                    cache.remember(self._x(i), _plain(answers[pos[j]]))
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
                guard._emit(p, record, self._x(i), _plain(answers[pos[j]]), logged=True)

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
            lambda: _assemble(n, segments, fixed),
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

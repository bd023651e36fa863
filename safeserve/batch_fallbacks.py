"""The fallback walk of a batch: every row that degraded goes through the policy's fallbacks
in order, a row fallback one row at a time, a `batch=True` model once with every row still
waiting; and the record of each such row.

`FallbackWalk` is the part of `BatchRun` (`batch_engine.py`) that holds it. Like the primary's
plan, the walk is a generator: it yields each `FallbackCall` and receives what it `Answered`,
so the sync and async drivers share it.
"""

from __future__ import annotations

from collections.abc import Generator
from time import perf_counter
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from safeserve.batch_rows import Rows, as_plain
from safeserve.confidence import first_non_finite
from safeserve.decisions import Record
from safeserve.degrade import Degradation, ms
from safeserve.fallbacks import FallbackStep, ModelStep, NoAnswer
from safeserve.recording import Recorded

if TYPE_CHECKING:
    from safeserve.guard import Guard
    from safeserve.pipeline import Pipeline

_INDEX = np.intp


class FallbackCall(NamedTuple):
    """A fallback to ask: one row (`x`, `args`), or for a batch model every row still waiting
    (`rows`, the batch in `args[0]`)."""

    step: FallbackStep
    rows: list[int]
    x: Any
    args: tuple[Any, ...]
    batch: bool


class Answered(NamedTuple):
    """What came of a `FallbackCall`."""

    value: Any
    error: Exception | None
    latency: float


def is_batch_step(step: FallbackStep) -> bool:
    """Whether the fallback takes every waiting row of a batch in one call."""
    return isinstance(step, ModelStep) and step.batch


class FallbackWalk:
    """The fallbacks and records of a batch's degraded rows (mixed into `BatchRun`)."""

    guard: Guard
    p: Pipeline
    t0: float
    rows: Rows
    batch_id: str
    fixed: dict[int, Any]
    served_by: list[str | None]
    degraded: np.ndarray
    validated: dict[int, Any]
    pending: dict[int, Degradation]
    records: dict[int, Record]
    _batch_secrets: Recorded | None = None

    def keep_batch_secrets(self, record: Record) -> None:
        """An error of a whole (sub)batch may quote any of its rows: a record of one row is
        scrubbed of the redacted and hashed values of every row (read once per batch, from
        those fields only, and only when the policy has such fields and a record is made)."""
        recorder = self.p.recorder
        if not recorder.keys:
            return
        if self._batch_secrets is None:
            rows = self.rows
            if rows.form == "records":
                everything: Any = list(rows.data)
            else:
                columns = {k: rows.column(k).tolist() for k in sorted(recorder.keys)}
                everything = [
                    dict(zip(columns, values, strict=True))
                    for values in zip(*columns.values(), strict=True)
                ]
            self._batch_secrets = recorder(everything)
        record.keep(self._batch_secrets)

    def fallbacks(self) -> Generator[FallbackCall, Answered, None]:
        """Walks the fallbacks for every row that degraded, in the policy's order: a row
        fallback is asked one row at a time; a batch model once, with every row still
        waiting. A row goes on to the next fallback when one fails it."""
        waiting = sorted(self.pending)
        batch_guard = self.p.policy.batch
        for step in self.p.steps:
            if not waiting:
                return
            if is_batch_step(step):
                batch = self.rows.take(np.array(waiting, dtype=_INDEX), self.validated)
                answered = yield FallbackCall(step, waiting, None, (batch,), True)
                waiting = self._answered_batch(step, waiting, answered)
                continue
            still = []
            for i in waiting:
                d = self.pending[i]
                args = d.args
                if batch_guard and isinstance(step, ModelStep):  # a batch of this one row
                    args = (self.rows.take(np.array([i], dtype=_INDEX), self.validated),)
                answered = yield FallbackCall(step, [i], d.x, args, False)
                if not self._answered_row(step, i, answered, batch_guard):
                    still.append(i)
            waiting = still
        for i in waiting:
            self.finish_row(i, self.pending[i], None, None)

    def _answered_row(
        self, step: FallbackStep, i: int, answered: Answered, batch_guard: bool
    ) -> bool:
        d, guard = self.pending[i], self.guard
        value, error = answered.value, answered.error
        if error is None and batch_guard and isinstance(step, ModelStep) and not step.batch:
            try:
                (value,) = value.tolist() if isinstance(value, np.ndarray) else value
            except (TypeError, ValueError) as exc:  # not one answer for the one row
                error = exc
        if error is None:
            error = _refused(d, value)
        if error is not None:
            guard._fallback_failed(d, step, error, answered.latency)
            return False
        if not guard._fallback_ok(d, step, value, answered.latency):
            return False
        self.finish_row(i, d, value, step.name)
        return True

    def _answered_batch(self, step: FallbackStep, rows: list[int], answered: Answered) -> list[int]:
        """The rows a batch fallback did not serve: all of them when the call failed, else
        those it answered with None, a non-finite value or too little confidence."""
        guard, latency = self.guard, answered.latency
        value, error = answered.value, answered.error
        if error is None:
            value = value.to_numpy() if hasattr(value, "to_numpy") else value
            try:
                count = len(value)
            except TypeError:
                count = -1
            if count != len(rows):
                error = NoAnswer(f"{count} answers for {len(rows)} rows")
        if error is not None:
            for i in rows:
                guard._fallback_failed(self.pending[i], step, error, latency)
            return rows
        still = []
        for j, i in enumerate(rows):
            d = self.pending[i]
            answer = as_plain(value[j])
            refused = None if answer is None else _refused(d, answer)
            if answer is None or first_non_finite(answer) is not None:
                missing = "no answer" if answer is None else "a non-finite answer"
                guard._fallback_failed(d, step, NoAnswer(f"{missing} for this row"), latency)
                still.append(i)
            elif refused is not None:
                guard._fallback_failed(d, step, refused, latency)
                still.append(i)
            elif guard._fallback_ok(d, step, answer, latency):
                self.finish_row(i, d, answer, step.name)
            else:
                still.append(i)
        return still

    def finish_row(self, i: int, d: Degradation, value: Any, served_by: str | None) -> None:
        self.fixed[i] = value
        self.served_by[i] = served_by
        self.degraded[i] = True
        self.record_row(i, d, value, served_by)
        self.guard._count(served_by, [r.code for r in d.reasons], failed=served_by is None)

    def record_row(self, i: int, d: Degradation, value: Any, served_by: str | None) -> None:
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
        self.keep_batch_secrets(record)
        self.guard._emit(p, record, d.x, value, logged=True)


def _refused(d: Degradation, answer: Any) -> Exception | None:
    """What the guard's check of its answers (`Guard.check_answers`) raised for `answer`."""
    check = d.p.answer_check
    if check is None:
        return None
    try:
        check(answer)
    except Exception as exc:
        return exc
    return None

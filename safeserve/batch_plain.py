"""`predict.batch` on a plain guard: the function takes one row, so each row is one guarded
call, gathered into a `BatchOutcome`.

Every record such a call writes (degraded, flagged, or a sampled healthy row) must carry its
row and the batch id when it reaches the log; the guard writes it before the call returns. So
the batch runs on a shallow copy of the guard (the same breaker, counters, ring and bulkhead)
whose pipeline hands records to `RowStamp`, which stamps them, then to the real log writer.
Calls made outside the batch, concurrently, are untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from safeserve.batch_rows import BatchOutcome, Rows
from safeserve.decisions import Decision, RawReason, Record, new_id
from safeserve.errors import InputRejected, NoFallbackAvailable

if TYPE_CHECKING:
    from safeserve.guard import Guard
    from safeserve.logwriter import LogWriter


class RowStamp:
    """Stands in for a pipeline's log writer during a batch: each record it is handed gets the
    row being served and the batch id, then goes on to the real writer (if any)."""

    __slots__ = ("batch_id", "row", "writer")

    def __init__(self, writer: LogWriter | None, batch_id: str) -> None:
        self.writer = writer
        self.batch_id = batch_id
        self.row = 0

    def submit(self, record: Record) -> bool:
        record.row, record.batch_id = self.row, self.batch_id
        return self.writer.submit(record) if self.writer is not None else True


def row_by_row(guard: Guard, data: Any, feature_names: list[str] | None) -> BatchOutcome:
    """`predict.batch(rows)` on a plain sync guard."""
    rows = Rows(data, feature_names)
    collect = _Collector(guard, rows.n)
    stamp = RowStamp(guard._p.writer, collect.batch_id)
    # the pipeline in force now, logging through `stamp` (a reload applies to the next batch)
    twin = guard.with_stages(writer=stamp)
    for i in range(rows.n):
        stamp.row = i
        try:
            collect.add(i, twin.call(rows.row(i)))
        except (NoFallbackAvailable, InputRejected) as err:
            collect.failed(i, err)
    guard.ok_latency_s = twin.ok_latency_s
    return collect.outcome()


async def row_by_row_async(
    guard: Guard, data: Any, feature_names: list[str] | None
) -> BatchOutcome:
    """`await predict.batch(rows)` on a plain async guard."""
    rows = Rows(data, feature_names)
    collect = _Collector(guard, rows.n)
    stamp = RowStamp(guard._p.writer, collect.batch_id)
    # the pipeline in force now, logging through `stamp` (a reload applies to the next batch)
    twin = guard.with_stages(writer=stamp)
    for i in range(rows.n):
        stamp.row = i
        try:
            collect.add(i, await twin.call(rows.row(i)))
        except (NoFallbackAvailable, InputRejected) as err:
            collect.failed(i, err)
    guard.ok_latency_s = twin.ok_latency_s
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

"""Batch rows: the input forms `predict.batch` accepts, the vectorized baseline checks, and the
`BatchOutcome` the answers are assembled into.

Rows stay in the form they came in (columns, a matrix, a DataFrame's arrays); a row becomes a
dict only when a fallback or a record needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from safeserve.profile import category_or_null, number_or_nan
from safeserve.validation import BaselineChecks, category_key, numeric_problem

if TYPE_CHECKING:
    from safeserve.decisions import Decision
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


def as_plain(value: Any) -> Any:
    """One answer as plain Python values (a row of a numpy answer becomes a list)."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def assemble(
    n: int, segments: list[tuple[np.ndarray, Any, np.ndarray]], fixed: dict[int, Any]
) -> list[Any]:
    """The answers in row order: the primary's, scattered by runs of rows, then the fallbacks'."""
    if len(segments) == 1 and not fixed:
        idx, answers, pos = segments[0]
        if len(idx) == n == len(answers):
            return as_plain(answers) if isinstance(answers, np.ndarray) else list(answers)
    values: list[Any] = [None] * n
    for idx, answers, pos in segments:
        if not len(idx):
            continue
        plain = as_plain(answers) if isinstance(answers, np.ndarray) else list(answers)
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
            bad |= out_of_range(data, cols, present)
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


_BLOCK = 4096  # rows per pass: the block, its bounds and the bool buffers stay in L2


def out_of_range(data: np.ndarray, cols: list[int], checks: list[Any]) -> np.ndarray:
    """Rows of a numeric matrix with a value outside its range (or a null where none is allowed).

    A block of rows at a time, flattened, against the bounds tiled to the block's length: two
    contiguous comparisons per block, with no per-row broadcasting loop (which cost twice as
    much). NaN compares False, so it fails unless the feature allows nulls.
    """
    lo = np.array([c[1] for c in checks], dtype=float)
    hi = np.array([c[2] for c in checks], dtype=float)
    nullable = [j for j, c in enumerate(checks) if c[3]] if data.dtype.kind == "f" else []
    n = len(data)
    bad = np.zeros(n, dtype=bool)
    if not n:
        return bad
    if data.flags.f_contiguous and not data.flags.c_contiguous:  # columns are contiguous
        for j, col in enumerate(cols):
            bad |= _numeric_fails(data[:, col], lo[j], hi[j], j in nullable)
        return bad
    whole = cols == list(range(data.shape[1])) and data.flags.c_contiguous
    width = len(cols)
    block = min(_BLOCK, n)
    low, high = np.tile(lo, block), np.tile(hi, block)
    ok = np.empty(block * width, dtype=bool)
    spare = np.empty(block * width, dtype=bool)
    for start in range(0, n, block):
        rows = data[start : start + block]
        k = len(rows)
        m = rows.reshape(-1) if whole else np.ascontiguousarray(rows[:, cols]).reshape(-1)
        size = k * width
        inside, outside = ok[:size], spare[:size]
        np.greater_equal(m, low[:size], out=inside)
        np.less_equal(m, high[:size], out=outside)
        np.logical_and(inside, outside, out=inside)
        if nullable:
            grid = inside.reshape(k, width)
            grid[:, nullable] |= np.isnan(m.reshape(k, width)[:, nullable])
        np.logical_not(inside, out=outside)
        failed = np.flatnonzero(outside)
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
        (numeric_problem(v, lo, hi, allow_null) is not None for v in col.tolist()),
        dtype=bool,
        count=len(col),
    )


def profile_rows(p: Pipeline, rows: Rows) -> None:
    """Every row into the guard's feature profile, binned by column."""
    profiler = p.profiler
    if profiler is None or not rows.n:
        return
    columns = {}
    for name, f in profiler.features.items():
        col = rows.column(name)
        if f.kind == "numeric":
            if col.dtype.kind not in "fiu":
                col = np.array([number_or_nan(v) for v in col.tolist()], dtype=float)
        else:
            col = np.array([category_or_null(v) for v in col.tolist()], dtype=object)
        columns[name] = col
    with profiler._lock:
        profiler._n += rows.n
        for name, col in columns.items():
            profiler._add(name, col)

"""Batches (SPEC 8): every input form, per-row degradation, poison-row bisection, records."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import tracemalloc
from typing import Any, Literal
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, field_validator

import safeserve as ss
from safeserve import batch_rows, batch_schema
from safeserve.batch import BatchOutcome
from safeserve.validation import BaselineChecks

NAMES = ["a", "b"]
RNG = np.random.default_rng(3)
TRAIN = {"a": RNG.uniform(0.0, 1.0, 500).tolist(), "b": RNG.uniform(0.0, 10.0, 500).tolist()}
POISON_B = 5.0  # the model raises on any batch holding such a row
NAN_B = 3.0  # the model answers NaN for such a row
FALLBACK = [0.5, 0.5]

# one row of each kind; "low": confidence max(a, 1-a) = 0.55 < 0.7
KINDS: dict[str, list[float]] = {
    "valid": [0.9, 1.0],
    "invalid": [7.0, 1.0],
    "nan": [0.9, NAN_B],
    "low": [0.55, 1.0],
    "poison": [0.9, POISON_B],
}
EXPECTED_REASON = {
    "invalid": "invalid_input",
    "nan": "invalid_output",
    "low": "low_confidence",
    "poison": "error",
}


@pytest.fixture(scope="module")
def baseline() -> ss.Baseline:
    return ss.Baseline.from_data(TRAIN)


@pytest.fixture(autouse=True)
def _testing() -> Any:
    with ss.testing():
        yield


def matrix(batch: Any) -> np.ndarray:
    """Any input form as a rows x features float matrix (what a real batch model does)."""
    if isinstance(batch, np.ndarray):
        return batch
    if hasattr(batch, "to_numpy"):
        return np.asarray(batch[NAMES].to_numpy(), dtype=float)
    if isinstance(batch, dict):
        return np.column_stack([np.asarray(batch[n], dtype=float) for n in NAMES])
    return np.array([[r[n] for n in NAMES] for r in batch], dtype=float).reshape(-1, 2)


class Model:
    """A batch model: class probabilities per row; raises on poison rows; counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, batch: Any) -> np.ndarray:
        x = matrix(batch)
        self.calls.append(len(x))
        if (x[:, 1] == POISON_B).any():
            raise ValueError("poison row in the batch")
        p = np.clip(x[:, 0], 0.0, 1.0)
        out = np.stack([p, 1.0 - p], axis=1)
        out[x[:, 1] == NAN_B] = np.nan
        return out


def batch_guard(
    baseline: ss.Baseline | None, model: Any, fallbacks: bool = True, **fields: Any
) -> Any:
    validation = ss.ValidationConfig(baseline=baseline) if baseline is not None else None
    return ss.guard(
        name=f"batch-{time.monotonic_ns()}",
        batch=True,
        validation=validation,
        confidence=ss.ConfidenceConfig(threshold=0.7),
        fallbacks=[ss.Fallback.static("default", FALLBACK)] if fallbacks else [],
        **fields,
    )(model)


def in_form(rows: list[list[float]], form: str) -> tuple[Any, list[str] | None]:
    """The same rows as a list of dicts, an array, a dict of columns or a DataFrame."""
    arr = np.array(rows, dtype=float).reshape(-1, 2)
    if form == "records":
        return [dict(zip(NAMES, r, strict=True)) for r in rows], None
    if form == "array":
        return arr, NAMES
    if form == "columns":
        return {"a": arr[:, 0], "b": arr[:, 1].tolist()}, None
    pd = pytest.importorskip("pandas")
    return pd.DataFrame(arr, columns=NAMES), None


FORMS = ["records", "array", "columns", "frame"]


def call_batch(predict: Any, rows: list[list[float]], form: str) -> Any:
    """`predict.batch` on the rows in the given form."""
    data, names = in_form(rows, form)
    return predict.batch(data, feature_names=names)


def check_records_match(out: BatchOutcome) -> None:
    """One decision per degraded row, with its row index and the batch id."""
    degraded_rows = {i for i, d in enumerate(out.degraded.tolist()) if d}
    recorded = [d.row for d in out.decisions if d.degraded]
    assert sorted(recorded) == sorted(degraded_rows)
    assert all(d.batch_id == out.batch_id for d in out.decisions)
    for d in out.decisions:
        assert d.served_by == out.served_by[d.row]


class TestMixedBatches:
    """Valid rows are served by one primary call; each bad row falls back on its own."""

    @pytest.mark.parametrize("form", FORMS)
    def test_each_kind_of_bad_row_falls_back_alone(self, baseline: ss.Baseline, form: str) -> None:
        kinds = ["valid", "invalid", "nan", "valid", "low", "poison", "valid"]
        model = Model()
        predict = batch_guard(baseline, model)
        data, names = in_form([KINDS[k] for k in kinds], form)
        out = predict.batch(data, feature_names=names)
        assert isinstance(out, BatchOutcome)
        assert len(out) == len(kinds)
        for i, kind in enumerate(kinds):
            if kind == "valid":
                assert out.served_by[i] == "primary"
                assert out.values[i] == pytest.approx([0.9, 0.1])
                assert not out.degraded[i]
            else:
                assert out.served_by[i] == "default"
                assert out.values[i] == FALLBACK
                assert out.degraded[i]
        assert out.degraded.dtype == bool
        check_records_match(out)
        codes = {d.row: d.reasons[0].code for d in out.decisions}
        assert codes == {i: EXPECTED_REASON[k] for i, k in enumerate(kinds) if k != "valid"}
        assert model.calls[0] == 6  # every valid-input row in one call, the invalid one not

    def test_stats_count_every_row_once(self, baseline: ss.Baseline) -> None:
        kinds = ["valid", "invalid", "nan", "low", "poison", "valid"]
        predict = batch_guard(baseline, Model())
        call_batch(predict, [KINDS[k] for k in kinds], "array")
        stats = predict.stats()
        assert stats["calls"] == 6
        assert stats["served_by"] == {"primary": 2, "default": 4}
        assert stats["reasons"] == {
            "invalid_input": 1,
            "invalid_output": 1,
            "low_confidence": 1,
            "error": 1,
        }

    def test_the_records_reach_the_ring_and_the_log(self, baseline: ss.Baseline) -> None:
        lines: list[dict[str, Any]] = []
        predict = batch_guard(baseline, Model(), log=ss.DecisionLogConfig(sink=lines.append))
        out = call_batch(predict, [KINDS["valid"], KINDS["invalid"]], "array")
        ss.flush_logs()
        assert [(d.row, d.batch_id) for d in predict.decisions()] == [(1, out.batch_id)]
        decisions = [r for r in lines if r.get("kind") == "decision"]
        assert [(r["row"], r["batch_id"]) for r in decisions] == [(1, out.batch_id)]

    def test_profile_counts_every_row(self, baseline: ss.Baseline) -> None:
        predict = batch_guard(baseline, Model())
        call_batch(predict, [KINDS["valid"]] * 5 + [KINDS["invalid"]], "array")
        profile = predict.profile()
        assert profile is not None
        assert profile["n"] == 6
        assert sum(profile["features"]["a"]["counts"]) == 6
        assert profile["features"]["a"]["out_of_range"] == 1


class TestPlainGuards:
    """A guard on a one-row function is called row by row, with the same outcome shape."""

    @pytest.mark.parametrize("form", FORMS)
    def test_rows_are_served_one_at_a_time(self, baseline: ss.Baseline, form: str) -> None:
        predict = ss.guard(
            name=f"plain-{time.monotonic_ns()}",
            validation=ss.ValidationConfig(baseline=baseline),
            fallbacks=[ss.Fallback.static("default", -1.0)],
        )(lambda x: x["a"] * 2)
        data, names = in_form([KINDS["valid"], KINDS["invalid"], [0.25, 2.0]], form)
        out = predict.batch(data, feature_names=names)
        assert out.values == pytest.approx([1.8, -1.0, 0.5])
        assert out.served_by == ["primary", "default", "primary"]
        check_records_match(out)
        assert predict.stats()["calls"] == 3

    def test_a_row_nothing_serves_is_none_with_its_record(self) -> None:
        def model(x: dict[str, Any]) -> float:
            if x["a"] < 0:
                raise ValueError("negative")
            return float(x["a"])

        predict = ss.guard(name=f"plain-{time.monotonic_ns()}")(model)
        out = predict.batch([{"a": 1.0}, {"a": -1.0}])
        assert out.values == [1.0, None]
        assert out.served_by == ["primary", None]
        check_records_match(out)

    def test_async_plain_guard(self) -> None:
        async def model(x: dict[str, Any]) -> float:
            return float(x["a"]) + 1

        predict = ss.guard(name=f"plain-{time.monotonic_ns()}")(model)
        out = asyncio.run(predict.batch([{"a": 1.0}, {"a": 2.0}]))
        assert out.values == [2.0, 3.0]


class TestDrills:
    """`ss.force_degradation` drills batches as it drills calls: no row reaches the primary."""

    @pytest.mark.parametrize("batch", [True, False])
    def test_every_row_falls_back_with_the_drill_reasons(self, batch: bool) -> None:
        reached: list[Any] = []

        def model(x: Any) -> Any:
            reached.append(x)
            return [1.0] * len(x) if batch else 1.0

        predict = ss.guard(
            name=f"drill-{batch}-{time.monotonic_ns()}",
            batch=batch,
            fallbacks=[ss.Fallback.static("static", -1.0)],
        )(model)
        with ss.force_degradation(reason="timeout"):
            out = predict.batch([{"a": 1.0}, {"a": 2.0}, {"a": 3.0}])
        assert reached == []
        assert out.values == [-1.0, -1.0, -1.0]
        assert out.served_by == ["static"] * 3
        assert [sorted(r.code for r in d.reasons) for d in out.decisions] == [
            ["forced", "timeout"]
        ] * 3
        assert predict.batch([{"a": 1.0}]).served_by == ["primary"]  # drill over


class TestMethods:
    """`.batch` of a guarded method passes the instance to the model, as a call does."""

    def test_plain_method(self) -> None:
        class Model:
            def __init__(self, scale: float) -> None:
                self.scale = scale

            @ss.guard(name=f"method-{time.monotonic_ns()}", fallbacks=[ss.Fallback.static("s", -1)])
            def predict(self, x: dict[str, Any]) -> float:
                return float(x["a"]) * self.scale

        model = Model(2.0)
        out = model.predict.batch([{"a": 1.0}, {"a": 2.0}])
        assert (out.values, out.served_by) == ([2.0, 4.0], ["primary", "primary"])
        assert Model.predict.stats()["calls"] == 2  # counted on the one guard

    def test_batch_method(self) -> None:
        class Model:
            offset = 10.0

            @ss.guard(name=f"bmethod-{time.monotonic_ns()}", batch=True)
            def predict(self, rows: list[dict[str, Any]]) -> list[float]:
                return [float(r["a"]) + self.offset for r in rows]

        out = Model().predict.batch([{"a": 1.0}, {"a": 2.0}])
        assert out.values == [11.0, 12.0]

    def test_async_method(self) -> None:
        class Model:
            @ss.guard(name=f"amethod-{time.monotonic_ns()}")
            async def predict(self, x: dict[str, Any]) -> float:
                return float(x["a"]) + 1

        out = asyncio.run(Model().predict.batch([{"a": 1.0}]))
        assert out.values == [2.0]


class TestPrimaryFailures:
    """Retries, bisection to the poison rows, the breaker, the time budget."""

    @pytest.mark.parametrize(("n", "poison"), [(64, [5]), (64, [0, 63]), (100, [3, 50, 51, 97])])
    def test_bisection_finds_the_poison_rows_in_k_log_n_calls(
        self, n: int, poison: list[int]
    ) -> None:
        rows = [[0.9, 1.0]] * n
        for i in poison:
            rows[i] = [0.9, POISON_B]
        model = Model()
        out = call_batch(batch_guard(None, model), rows, "array")
        assert [i for i in range(n) if out.degraded[i]] == poison
        assert {d.row for d in out.decisions} == set(poison)
        assert all(d.reasons[0].code == "error" for d in out.decisions)
        assert len(model.calls) <= 1 + 2 * len(poison) * math.ceil(math.log2(n))
        assert sum(out.served_by[i] == "primary" for i in range(n)) == n - len(poison)

    def test_a_transient_error_is_retried_on_the_whole_batch(self) -> None:
        model = Model()
        failures = iter([ConnectionError("blip")])

        def flaky(batch: Any) -> np.ndarray:
            for exc in failures:
                raise exc
            return model(batch)

        retry = ss.RetryConfig(attempts=3, retry_on=[ConnectionError])
        predict = batch_guard(None, flaky, retry=retry)
        out = call_batch(predict, [KINDS["valid"]] * 10, "array")
        assert out.served_by == ["primary"] * 10
        assert model.calls == [10]

    def test_an_open_breaker_sends_every_row_to_the_fallbacks(self) -> None:
        model = Model()
        predict = batch_guard(None, model)
        predict.force_open()
        out = call_batch(predict, [KINDS["valid"]] * 3, "records")
        assert out.served_by == ["default"] * 3
        assert {d.reasons[0].code for d in out.decisions} == {"breaker_open"}
        assert model.calls == []

    def test_one_breaker_outcome_per_primary_call(self) -> None:
        model = Model()
        predict = batch_guard(None, model)
        call_batch(predict, [KINDS["valid"]] * 7 + [KINDS["poison"]], "array")
        figures = predict.breaker.figures()
        assert figures["calls"] == len(model.calls)
        assert figures["failures"] == sum(1 for _ in model.calls) - 3  # three halves succeeded

    def test_a_wrong_number_of_answers_is_invalid_output_for_every_row(self) -> None:
        predict = batch_guard(None, lambda batch: [[0.9, 0.1]])
        out = call_batch(predict, [KINDS["valid"]] * 3, "array")
        assert out.served_by == ["default"] * 3
        assert {d.reasons[0].code for d in out.decisions} == {"invalid_output"}

    def test_without_fallbacks_a_failed_row_is_none(self) -> None:
        predict = batch_guard(None, Model(), fallbacks=False)
        out = call_batch(predict, [KINDS["valid"], KINDS["poison"]], "array")
        assert out.values[1] is None
        assert out.served_by == ["primary", None]
        assert predict.stats()["failed"] == 1

    def test_a_model_fallback_of_a_batch_guard_takes_a_batch(self) -> None:
        seen: list[Any] = []

        def v2(batch: Any) -> np.ndarray:
            seen.append(batch)
            return np.array([[0.8, 0.2]] * len(batch))

        predict = ss.guard(
            name=f"batch-{time.monotonic_ns()}",
            batch=True,
            fallbacks=[ss.Fallback.model("v2", v2)],
        )(Model())
        out = call_batch(predict, [KINDS["valid"], KINDS["poison"]], "array")
        assert out.served_by == ["primary", "v2"]
        assert out.values[1] == [0.8, 0.2]
        assert seen[0].shape == (1, 2)


class TestInvalidInputModes:
    """`on_invalid` applies per row: reject gives None, flag serves and records."""

    def test_reject(self, baseline: ss.Baseline) -> None:
        predict = ss.guard(
            name=f"batch-{time.monotonic_ns()}",
            batch=True,
            validation=ss.ValidationConfig(baseline=baseline, on_invalid="reject"),
            fallbacks=[ss.Fallback.static("default", FALLBACK)],
        )(Model())
        out = call_batch(predict, [KINDS["valid"], KINDS["invalid"]], "records")
        assert out.served_by == ["primary", None]
        assert out.values[1] is None
        assert [r.code for r in out.decisions[0].reasons] == ["invalid_input", "rejected"]
        assert predict.stats()["rejected"] == 1

    def test_flag(self, baseline: ss.Baseline) -> None:
        predict = ss.guard(
            name=f"batch-{time.monotonic_ns()}",
            batch=True,
            validation=ss.ValidationConfig(baseline=baseline, on_invalid="flag"),
        )(Model())
        out = call_batch(predict, [KINDS["valid"], [0.95, 20.0]], "records")
        assert out.served_by == ["primary", "primary"]
        assert not out.degraded.any()
        (decision,) = out.decisions
        assert (decision.row, decision.flagged) == (1, True)
        assert predict.stats()["flagged"] == 1


def test_a_schema_is_checked_per_row_and_the_primary_gets_validated_rows() -> None:
    """With a pydantic schema, each row is validated; the batch holds the coerced rows."""
    from pydantic import BaseModel

    class Row(BaseModel):
        a: float
        b: float

    seen: list[Any] = []

    def model(batch: list[dict[str, Any]]) -> list[float]:
        seen.extend(batch)
        return [r["a"] for r in batch]

    predict = ss.guard(
        name=f"batch-{time.monotonic_ns()}",
        batch=True,
        validation=ss.ValidationConfig(schema=Row),
        fallbacks=[ss.Fallback.static("default", -1.0)],
    )(model)
    out = predict.batch([{"a": "0.5", "b": 1}, {"a": "nope", "b": 1}, {"a": 2, "b": 3}])
    assert out.values == [0.5, -1.0, 2.0]
    assert seen == [{"a": 0.5, "b": 1.0}, {"a": 2.0, "b": 3.0}]
    (decision,) = out.decisions
    assert (decision.row, decision.reasons[0].code) == (1, "invalid_input")


class TestInputForms:
    """Forms that cannot be read fail loudly, naming what is expected."""

    def test_array_without_names(self) -> None:
        with pytest.raises(TypeError, match="feature_names"):
            batch_guard(None, Model()).batch(np.zeros((2, 2)))

    def test_not_a_batch(self) -> None:
        with pytest.raises(TypeError, match="a list of dicts"):
            batch_guard(None, Model()).batch("rows")

    def test_empty_batch(self) -> None:
        out = batch_guard(None, Model()).batch([])
        assert (out.values, out.served_by, len(out.degraded)) == ([], [], 0)

    def test_async_batch_guard(self, baseline: ss.Baseline) -> None:
        model = Model()

        async def predict_batch(batch: Any) -> np.ndarray:
            return model(batch)

        predict = batch_guard(baseline, predict_batch)
        kinds = ["valid", "invalid", "poison", "valid"]
        out = asyncio.run(call_batch(predict, [KINDS[k] for k in kinds], "array"))
        assert out.served_by == ["primary", "default", "default", "primary"]
        check_records_match(out)


ROW_KINDS = st.sampled_from(sorted(KINDS))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(ROW_KINDS, max_size=40),
    form=st.sampled_from(["records", "array", "columns"]),
    with_fallback=st.booleans(),
)
def test_every_row_gets_one_answer_or_none_with_a_record(
    kinds: list[str], form: str, with_fallback: bool
) -> None:
    """Property: an answer per row, None only when nothing served, a record per degraded row."""
    baseline = ss.Baseline.from_data(TRAIN)
    with ss.testing():
        predict = batch_guard(baseline, Model(), fallbacks=with_fallback)
        out = call_batch(predict, [KINDS[k] for k in kinds], form)
    assert len(out.values) == len(out.served_by) == len(out.degraded) == len(kinds)
    for i, kind in enumerate(kinds):
        if kind == "valid":
            assert (out.served_by[i], bool(out.degraded[i])) == ("primary", False)
        elif with_fallback:
            assert (out.served_by[i], out.values[i]) == ("default", FALLBACK)
        else:
            assert (out.served_by[i], out.values[i]) == (None, None)
    check_records_match(out)
    assert {d.row: d.reasons[0].code for d in out.decisions} == {
        i: EXPECTED_REASON[k] for i, k in enumerate(kinds) if k != "valid"
    }
    assert predict.stats()["calls"] == len(kinds)


def test_a_million_rows_fit_in_a_few_copies_of_the_input(baseline: ss.Baseline) -> None:
    """1M rows x 20 features through a batch guard: peak traced memory under 3x the input."""
    n = 1_000_000
    x = RNG.uniform(1.0, 9.0, (n, 20))
    x[:, 0] /= 10.0  # "a" within its training range
    names = [*NAMES, *(f"f{j}" for j in range(2, 20))]
    x[123_456, 0] = 99.0  # one invalid row

    def model(batch: np.ndarray) -> np.ndarray:
        return batch[:, 0] * 0.5 + 0.25

    predict = ss.guard(
        name=f"batch-{time.monotonic_ns()}",
        batch=True,
        validation=ss.ValidationConfig(baseline=baseline, profile=False),
        fallbacks=[ss.Fallback.static("default", 0.0)],
    )(model)
    tracemalloc.start()
    try:
        out = predict.batch(x, feature_names=names)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(out.values) == n
    assert out.served_by[123_456] == "default"
    assert int(out.degraded.sum()) == 1
    assert peak < 3 * x.nbytes, f"peak {peak / 1e6:.0f} MB for a {x.nbytes / 1e6:.0f} MB input"


CHECKED: dict[str, list[float | None]] = {
    "a": [0.0, 0.5, 1.0, 0.25],
    "b": [None, -2.0, 2.0, 1.0],  # nulls allowed
    "c": [-5.0, 5.0, 0.0, 1.0],
}
CELLS = [0.0, 0.5, 1.0, -0.1, 1.5, -2.0, 2.0, 5.0, -5.0, 6.0, math.nan, math.inf, -math.inf]


class Plain(BaseModel):
    """A schema made only of what column tests can judge."""

    amount: float = Field(ge=0, lt=1000)
    count: int = Field(gt=0)
    country: Literal["DE", "FR"]
    note: str | None = None
    vip: bool = False


SCHEMA_CELLS: dict[str, list[Any]] = {
    "amount": [0.0, 5.5, 999.9, 1000.0, -1.0, math.nan, math.inf, "12", None, True, 3],
    "count": [1, 2, 0, -4, 2.0, 2.5, math.inf, "3", None],
    "country": ["DE", "FR", "IT", 1, None],
    "note": ["x", None, 4, b"x"],
    "vip": [True, False, 1, "yes", None],
}


class TestVectorizedSchema:
    """A schema's simple constraints are tested on whole columns: every row the mask passes,
    pydantic accepts as it is (the mask is sound); the suspects are validated row by row."""

    @settings(max_examples=150, deadline=None)
    @given(
        rows=st.lists(
            st.fixed_dictionaries(
                {k: st.sampled_from(v) for k, v in SCHEMA_CELLS.items()},
            ).flatmap(
                lambda r: st.sets(st.sampled_from(sorted(r))).map(
                    lambda drop: {k: v for k, v in r.items() if k not in drop or k == "amount"}
                )
            ),
            max_size=12,
        ),
        form=st.sampled_from(["records", "columns"]),
    )
    def test_passed_rows_are_valid_as_they_are(self, rows: list[dict[str, Any]], form: str) -> None:
        rules = batch_schema.column_rules(Plain)
        assert rules is not None
        if form == "columns":
            if any(set(r) != set(rows[0]) for r in rows):
                return  # columns need the same keys in every row
            data: Any = {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}
        else:
            data = rows
        if not rows:
            return
        mask = batch_schema.suspect_rows(rules, batch_rows.Rows(data, None))
        for row, suspect in zip(rows, mask.tolist(), strict=True):
            if not suspect:
                Plain.model_validate(row)  # raises if the mask passed an invalid row

    @settings(max_examples=100, deadline=None)
    @given(
        cells=st.lists(
            st.tuples(
                st.sampled_from([0.0, 5.5, 999.9, 1000.0, -1.0, math.nan, math.inf, 3.0]),
                st.sampled_from([1.0, 2.0, 0.0, -4.0, 2.5, math.inf, math.nan]),
            ),
            max_size=10,
        ),
        dtype=st.sampled_from([float, np.float32]),
    )
    def test_a_numeric_matrix_is_judged_soundly(
        self, cells: list[tuple[float, float]], dtype: Any
    ) -> None:
        class Numbers(BaseModel):
            amount: float = Field(ge=0, lt=1000)
            count: int = Field(gt=0)

        rules = batch_schema.column_rules(Numbers)
        assert rules is not None
        x = np.array(cells, dtype=dtype).reshape(len(cells), 2)
        mask = batch_schema.suspect_rows(rules, batch_rows.Rows(x, ["amount", "count"]))
        for row, suspect in zip(x.tolist(), mask.tolist(), strict=True):
            if not suspect:
                Numbers.model_validate({"amount": row[0], "count": row[1]})
        clean = [0.0 <= a < 1000.0 and c in (1.0, 2.0) for a, c in x.tolist()]
        assert mask.tolist() == [not ok for ok in clean]  # and no valid row is suspect here

    def test_batch_results_match_single_calls(self) -> None:
        """Through a batch guard: which rows are invalid, and their problems, as single calls."""
        rows = [
            {"amount": 1.0, "count": 2, "country": "DE"},
            {"amount": "7", "count": 2, "country": "FR"},  # coerced by pydantic: valid
            {"amount": -1.0, "count": 2, "country": "DE"},
            {"amount": 1.0, "count": 2.5, "country": "DE"},
            {"amount": 1.0, "count": 1, "country": "IT"},
            {"amount": 1.0, "count": 1},
        ]
        fields: dict[str, Any] = {
            "validation": ss.ValidationConfig(schema=Plain),
            "fallbacks": [ss.Fallback.static("default", -1.0)],
        }
        batch = ss.guard(name=f"vs-{time.monotonic_ns()}", batch=True, **fields)(
            lambda b: [float(r["amount"]) for r in b]
        )
        single = ss.guard(name=f"vs1-{time.monotonic_ns()}", **fields)(lambda r: float(r["amount"]))
        out = batch.batch(rows)
        singles = [single.call(r) for r in rows]
        assert out.values == [s.value for s in singles] == [1.0, 7.0, -1.0, -1.0, -1.0, -1.0]
        by_row = {d.row: [r.detail for r in d.reasons] for d in out.decisions}
        assert by_row == {
            i: [r.detail for r in s.decision.reasons]
            for i, s in enumerate(singles)
            if s.decision.degraded
        }

    def test_schemas_beyond_columns_are_validated_row_by_row(self) -> None:
        class Checked(BaseModel):
            amount: float

            @field_validator("amount")
            @classmethod
            def _even(cls, v: float) -> float:
                if v % 2:
                    raise ValueError("odd")
                return v

        class Nested(BaseModel):
            inner: Plain

        assert batch_schema.column_rules(Checked) is None
        assert batch_schema.column_rules(Nested) is None
        predict = ss.guard(
            name=f"vs2-{time.monotonic_ns()}",
            batch=True,
            validation=ss.ValidationConfig(schema=Checked),
            fallbacks=[ss.Fallback.static("default", -1.0)],
        )(lambda b: [r["amount"] for r in b])
        assert predict.batch([{"amount": 2.0}, {"amount": 3.0}]).values == [2.0, -1.0]


class TestVectorizedChecks:
    """The vectorized mask finds exactly the rows the per-row baseline checks reject."""

    @settings(max_examples=80, deadline=None)
    @given(
        data=st.data(),
        names=st.permutations(["a", "b", "c", "z"]).flatmap(
            lambda p: st.integers(1, 4).map(lambda k: p[:k])
        ),
        order=st.sampled_from(["C", "F", "strided"]),
        block=st.sampled_from([1, 3, 4096]),
    )
    def test_same_rows_as_the_per_row_checks(
        self, data: st.DataObject, names: list[str], order: str, block: int
    ) -> None:
        n = data.draw(st.integers(0, 12))
        cells = data.draw(st.lists(st.sampled_from(CELLS), min_size=n * len(names)))
        x = np.array(cells[: n * len(names)], dtype=float).reshape(n, len(names))
        if order == "F":
            x = np.asfortranarray(x)
        elif order == "strided":
            x = np.repeat(x, 2, axis=1)[:, ::2]
        checks = BaselineChecks(ss.Baseline.from_data(CHECKED), 0.0, frozenset())
        with mock.patch.object(batch_rows, "_BLOCK", block):
            mask = batch_rows.failing_rows(checks, batch_rows.Rows(x, names))
        per_row = [bool(checks(dict(zip(names, r, strict=True)))) for r in x.tolist()]
        assert mask.tolist() == per_row

    def test_integer_matrix(self) -> None:
        checks = BaselineChecks(ss.Baseline.from_data(CHECKED), 0.0, frozenset())
        x = np.array([[0, 1, 5], [2, 0, 0], [1, -3, -5], [1, 2, 6]], dtype=np.int64)
        mask = batch_rows.failing_rows(checks, batch_rows.Rows(x, ["a", "b", "c"]))
        assert mask.tolist() == [False, True, True, True]

    def test_problems_of_invalid_rows_are_the_per_row_ones(self, baseline: ss.Baseline) -> None:
        """Only flagged rows get detailed problems, and they read as a single call's would."""
        predict = batch_guard(baseline, Model())
        single = ss.guard(
            name=f"single-{time.monotonic_ns()}",
            validation=ss.ValidationConfig(baseline=baseline),
            fallbacks=[ss.Fallback.static("default", FALLBACK)],
        )(lambda x: [0.9, 0.1])
        rows = [[0.9, 1.0], [7.0, 1.0], [math.nan, 20.0], [0.9, -1.0]]
        out = call_batch(predict, rows, "array")
        details = {d.row: d.reasons[0].detail for d in out.decisions}
        assert sorted(details) == [1, 2, 3]
        for i, row in enumerate(rows):
            one = single.call(dict(zip(NAMES, row, strict=True)))
            if one.decision.degraded:
                assert details[i] == one.decision.reasons[0].detail
            else:
                assert i not in details


class TestBatchFallbacks:
    """`Fallback.model(..., batch=True)` gets the degraded rows of a batch in one call."""

    def test_the_degraded_rows_reach_it_in_one_call_in_the_primary_form(
        self, baseline: ss.Baseline
    ) -> None:
        seen: list[Any] = []

        def v2(batch: np.ndarray) -> np.ndarray:
            seen.append(batch)
            return np.stack([np.full(len(batch), 0.8), np.full(len(batch), 0.2)], axis=1)

        predict = ss.guard(
            name=f"batch-{time.monotonic_ns()}",
            batch=True,
            validation=ss.ValidationConfig(baseline=baseline),
            confidence=ss.ConfidenceConfig(threshold=0.7),
            fallbacks=[ss.Fallback.model("v2", v2, batch=True)],
        )(Model())
        kinds = ["valid", "invalid", "nan", "valid", "low", "poison"]
        out = call_batch(predict, [KINDS[k] for k in kinds], "array")
        assert len(seen) == 1
        np.testing.assert_array_equal(seen[0], np.array([KINDS[k] for k in kinds[1:3] + kinds[4:]]))
        assert out.served_by == ["primary", "v2", "v2", "primary", "v2", "v2"]
        assert out.values[1] == out.values[5] == [0.8, 0.2]
        check_records_match(out)
        assert {d.row: [a.name for a in d.attempts][-1] for d in out.decisions} == {
            1: "v2",
            2: "v2",
            4: "v2",
            5: "v2",
        }

    @pytest.mark.parametrize("form", ["records", "columns"])
    def test_it_gets_the_form_the_primary_gets(self, form: str) -> None:
        seen: list[Any] = []

        def v2(batch: Any) -> list[list[float]]:
            seen.append(batch)
            return [[0.8, 0.2]] * len(matrix(batch))

        predict = ss.guard(
            name=f"batch-{time.monotonic_ns()}",
            batch=True,
            fallbacks=[ss.Fallback.model("v2", v2, batch=True)],
        )(Model())
        out = call_batch(predict, [KINDS["poison"], KINDS["valid"], KINDS["poison"]], form)
        assert out.served_by == ["v2", "primary", "v2"]
        (batch,) = seen
        assert type(batch) is (list if form == "records" else dict)
        assert matrix(batch).tolist() == [KINDS["poison"], KINDS["poison"]]

    def test_rows_it_answers_with_none_or_nan_go_on_to_the_next_fallback(self) -> None:
        def v2(batch: list[dict[str, float]]) -> list[Any]:
            return [None, math.nan, [0.8, 0.2], [math.nan, 0.5]][: len(batch)]

        predict = ss.guard(
            name=f"batch-{time.monotonic_ns()}",
            batch=True,
            fallbacks=[ss.Fallback.model("v2", v2, batch=True), ss.Fallback.static("default", 0)],
        )(Model())
        out = call_batch(predict, [KINDS["poison"]] * 4, "records")
        assert out.served_by == ["default", "default", "v2", "default"]
        assert out.values == [0, 0, [0.8, 0.2], 0]
        failed = {d.row: d.reasons[1].detail for d in out.decisions if len(d.reasons) > 1}
        assert failed == {
            0: "v2: no answer for this row",
            1: "v2: a non-finite answer for this row",
            3: "v2: a non-finite answer for this row",
        }

    @pytest.mark.parametrize("broken", ["raises", "wrong_count"])
    def test_a_failed_call_sends_every_row_on_row_by_row(self, broken: str) -> None:
        rows_seen: list[Any] = []

        def v2(batch: Any) -> list[float]:
            if broken == "raises":
                raise RuntimeError("v2 is down")
            return [0.1]

        def per_row(x: Any) -> list[list[float]]:  # a batch of one row, one answer
            rows_seen.append(x)
            return [[0.3, 0.7]]

        predict = ss.guard(
            name=f"batch-{time.monotonic_ns()}",
            batch=True,
            fallbacks=[
                ss.Fallback.model("v2", v2, batch=True),
                ss.Fallback.model("per_row", per_row),
            ],
        )(Model())
        out = call_batch(predict, [KINDS["poison"], KINDS["valid"], KINDS["poison"]], "array")
        assert out.served_by == ["per_row", "primary", "per_row"]
        assert [matrix(x).tolist() for x in rows_seen] == [[KINDS["poison"]]] * 2
        for d in out.decisions:
            assert [(a.name, a.ok) for a in d.attempts][-2:] == [("v2", False), ("per_row", True)]
            assert d.reasons[1].code == "fallback_failed"

    def test_its_timeout_bounds_the_one_call(self) -> None:
        release = threading.Event()

        def hangs(batch: Any) -> list[list[float]]:
            release.wait(5)
            return [[0.8, 0.2]] * len(batch)

        predict = ss.guard(
            name=f"batch-{time.monotonic_ns()}",
            batch=True,
            fallbacks=[
                ss.Fallback.model("v2", hangs, batch=True, timeout_s=0.1),
                ss.Fallback.static("default", FALLBACK),
            ],
        )(Model())
        t = time.perf_counter()
        try:
            out = call_batch(predict, [KINDS["poison"]] * 3, "array")
        finally:
            release.set()
        assert time.perf_counter() - t < 2.0
        assert out.served_by == ["default"] * 3
        assert all("AttemptTimeout" in d.reasons[1].detail for d in out.decisions)

    def test_its_threshold_applies_per_row(self) -> None:
        def v2(batch: Any) -> np.ndarray:
            return np.array([[0.95, 0.05], [0.6, 0.4]])

        predict = ss.guard(
            name=f"batch-{time.monotonic_ns()}",
            batch=True,
            fallbacks=[
                ss.Fallback.model("v2", v2, batch=True, threshold=0.9),
                ss.Fallback.static("default", FALLBACK),
            ],
        )(Model())
        out = call_batch(predict, [KINDS["poison"]] * 2, "array")
        assert out.served_by == ["v2", "default"]
        assert out.values == [[0.95, 0.05], FALLBACK]

    def test_async_guard_with_an_async_batch_fallback(self) -> None:
        calls: list[int] = []
        model = Model()

        async def primary(batch: Any) -> np.ndarray:
            return model(batch)

        async def v2(batch: Any) -> list[list[float]]:
            calls.append(len(batch))
            return [[0.8, 0.2]] * len(batch)

        predict = ss.guard(
            name=f"batch-{time.monotonic_ns()}",
            batch=True,
            fallbacks=[ss.Fallback.model("v2", v2, batch=True)],
        )(primary)
        rows = [KINDS["poison"], KINDS["valid"], KINDS["poison"], KINDS["poison"]]
        out = asyncio.run(call_batch(predict, rows, "records"))
        assert out.served_by == ["v2", "primary", "v2", "v2"]
        assert calls == [3]

    def test_a_plain_guard_hands_it_a_batch_of_one_row(self) -> None:
        seen: list[Any] = []

        def v2(rows: list[dict[str, float]]) -> list[float]:
            seen.append(rows)
            return [-r["a"] for r in rows]

        def model(x: dict[str, float]) -> float:
            if x["a"] < 0:
                raise ValueError("negative")
            return x["a"]

        predict = ss.guard(
            name=f"plain-{time.monotonic_ns()}",
            fallbacks=[ss.Fallback.model("v2", v2, batch=True)],
        )(model)
        assert predict({"a": -2.0}) == 2.0
        out = predict.batch([{"a": 1.0}, {"a": -3.0}])
        assert out.values == [1.0, 3.0]
        assert seen == [[{"a": -2.0}], [{"a": -3.0}]]

    def test_with_a_batch_primary_a_single_call_hands_it_the_arguments_as_they_are(self) -> None:
        """When the primary takes batches, a call's input already is a batch."""
        from safeserve.fallbacks import build_steps

        config = ss.Fallback.model("v2", lambda batch: [len(batch)] * len(batch), batch=True)
        (batch_primary,) = build_steps([config], "p", batch_primary=True)
        (row_primary,) = build_steps([config], "p")
        rows = [{"a": 1.0}, {"a": 2.0}]
        assert batch_primary.answer(rows, (rows,), {}, None) == [2, 2]
        assert row_primary.answer(rows[0], (rows[0],), {}, None) == 1

    def test_only_a_model_fallback_takes_batches(self) -> None:
        with pytest.raises(ss.PolicyError, match="only a model fallback"):
            ss.Fallback(name="x", kind="static", value=1, batch=True)

    def test_a_policy_file_declares_it(self, tmp_path: Any) -> None:
        from safeserve.config import file_json_schema

        path = tmp_path / "policies.yaml"
        path.write_text(
            "policies:\n"
            "  scoring:\n"
            "    model: math:fsum\n"
            "    batch: true\n"
            "    fallbacks:\n"
            "      - {name: v2, model: 'math:fsum', batch: true}\n"
            "      - {name: default, static: 0}\n"
        )
        policy = ss.load_policies(path)["scoring"]
        assert [(f.name, f.batch) for f in policy.fallbacks] == [("v2", True), ("default", False)]
        path.write_text(
            "policies:\n  scoring:\n    model: math:fsum\n"
            "    fallbacks:\n      - {name: default, static: 0, batch: true}\n"
        )
        with pytest.raises(ss.PolicyError) as info:
            ss.load_policies(path)
        assert any("`batch` belongs to a model fallback" in p for p in info.value.problems)
        schema = json.dumps(file_json_schema())
        assert "predict.batch's rows in one call" in schema


class TestBulkheadAndTimeBudget:
    """A batch's primary call takes a `max_concurrent` slot and runs within `timeout_s`."""

    def test_with_the_slot_taken_every_row_degrades_overloaded(self) -> None:
        model = Model()
        started, release = threading.Event(), threading.Event()

        def slow(batch: Any) -> np.ndarray:
            started.set()
            release.wait(5)
            return model(batch)

        predict = batch_guard(None, slow, max_concurrent=1)
        first: list[Any] = []
        busy = threading.Thread(
            target=lambda: first.append(call_batch(predict, [KINDS["valid"]] * 2, "array"))
        )
        busy.start()
        try:
            assert started.wait(5)
            out = call_batch(predict, [KINDS["valid"]] * 3, "records")
        finally:
            release.set()
            busy.join(5)
        assert out.served_by == ["default"] * 3
        assert {d.reasons[0].code for d in out.decisions} == {"overloaded"}
        assert first[0].served_by == ["primary"] * 2
        assert model.calls == [2]
        # the slot is back once the first batch is done
        assert call_batch(predict, [KINDS["valid"]], "array").served_by == ["primary"]

    def test_a_batch_waits_up_to_max_wait_s_for_a_slot(self) -> None:
        started, release = threading.Event(), threading.Event()
        model = Model()

        def slow(batch: Any) -> np.ndarray:
            started.set()
            release.wait(5)
            return model(batch)

        predict = batch_guard(None, slow, max_concurrent=1, max_wait_s=5.0)
        busy = threading.Thread(target=lambda: call_batch(predict, [KINDS["valid"]], "array"))
        busy.start()
        try:
            assert started.wait(5)
            threading.Timer(0.05, release.set).start()
            out = call_batch(predict, [KINDS["valid"]] * 2, "array")
        finally:
            release.set()
            busy.join(5)
        assert out.served_by == ["primary"] * 2

    def test_rows_not_served_in_time_degrade_with_timeout(self) -> None:
        release = threading.Event()

        def hangs(batch: Any) -> np.ndarray:
            release.wait(5)
            return Model()(batch)

        predict = batch_guard(None, hangs, timeout_s=0.2)
        t = time.perf_counter()
        try:
            out = call_batch(predict, [KINDS["valid"]] * 4, "array")
        finally:
            release.set()
        assert time.perf_counter() - t < 2.0
        assert out.served_by == ["default"] * 4
        assert {d.reasons[0].code for d in out.decisions} == {"timeout"}
        assert predict.breaker.figures()["timeouts"] == 1

    def test_the_time_budget_bounds_the_bisection(self) -> None:
        model = Model()

        def slow(batch: Any) -> np.ndarray:
            time.sleep(0.1)
            return model(batch)

        n = 256
        rows = [KINDS["valid"]] * n
        rows[200] = KINDS["poison"]
        predict = batch_guard(None, slow, timeout_s=0.35)
        t = time.perf_counter()
        out = call_batch(predict, rows, "array")
        elapsed = time.perf_counter() - t
        assert elapsed < 1.2, f"{elapsed:.2f} s: bisection ran past the 0.35 s budget"
        assert len(model.calls) < 1 + 2 * math.ceil(math.log2(n))  # it stopped early
        assert out.served_by[200] == "default"
        assert all(s in ("primary", "default") for s in out.served_by)
        codes = {d.reasons[0].code for d in out.decisions}
        assert "timeout" in codes
        check_records_match(out)

    def test_a_timed_out_call_keeps_its_slot_until_it_really_ends(self) -> None:
        release, ended = threading.Event(), threading.Event()

        def hangs(batch: Any) -> np.ndarray:
            release.wait(5)
            ended.set()
            return Model()(batch)

        predict = batch_guard(None, hangs, timeout_s=0.1, max_concurrent=1)
        try:
            first = call_batch(predict, [KINDS["valid"]], "array")
            second = call_batch(predict, [KINDS["valid"]], "array")
        finally:
            release.set()
        assert first.decisions[0].reasons[0].code == "timeout"
        assert second.decisions[0].reasons[0].code == "overloaded"
        assert ended.wait(5)
        served: list[str | None] = []
        deadline = time.monotonic() + 5  # the worker frees the slot right after the call ends
        while served != ["primary"] and time.monotonic() < deadline:
            served = call_batch(predict, [KINDS["valid"]], "array").served_by
        assert served == ["primary"]

    def test_a_retry_on_the_worker_pool_takes_the_slot_again(self) -> None:
        """With a deadline the batch runs on the worker pool; a retry gets the freed slot."""
        model = Model()
        failures = iter([ConnectionError("blip")])

        def flaky(batch: Any) -> np.ndarray:
            for exc in failures:
                raise exc
            return model(batch)

        retry = ss.RetryConfig(attempts=2, backoff_s=0.0, retry_on=[ConnectionError])
        predict = batch_guard(None, flaky, retry=retry, timeout_s=5.0, max_concurrent=1)
        out = call_batch(predict, [KINDS["valid"]] * 3, "array")
        assert out.served_by == ["primary"] * 3
        assert model.calls == [3]
        assert call_batch(predict, [KINDS["valid"]], "array").served_by == ["primary"]

    def test_async_timeout_and_bulkhead(self) -> None:
        model = Model()
        gate = asyncio.Event()

        async def slow(batch: Any) -> np.ndarray:
            await gate.wait()
            return model(batch)

        async def scenario() -> tuple[Any, Any, Any]:
            predict = batch_guard(None, slow, max_concurrent=1, timeout_s=0.3)
            first = asyncio.ensure_future(call_batch(predict, [KINDS["valid"]] * 2, "array"))
            await asyncio.sleep(0.05)
            second = await call_batch(predict, [KINDS["valid"]], "records")
            timed_out = await first
            gate.set()
            served = await call_batch(predict, [KINDS["valid"]] * 2, "array")
            return timed_out, second, served

        t = time.perf_counter()
        timed_out, second, served = asyncio.run(scenario())
        assert time.perf_counter() - t < 2.0
        assert timed_out.served_by == ["default"] * 2
        assert {d.reasons[0].code for d in timed_out.decisions} == {"timeout"}
        assert [d.reasons[0].code for d in second.decisions] == ["overloaded"]
        assert served.served_by == ["primary"] * 2


class TestSampledRows:
    """Sampled healthy rows are recorded with their row index and the batch id."""

    def test_a_batch_guard_records_a_sample_of_healthy_rows(self) -> None:
        lines: list[dict[str, Any]] = []
        log = ss.DecisionLogConfig(sink=lines.append, sample_rate=1.0)
        predict = batch_guard(None, Model(), log=log)
        out = call_batch(predict, [KINDS["valid"], KINDS["poison"], KINDS["valid"]], "array")
        ss.flush_logs()
        decisions = [r for r in lines if r.get("kind") == "decision"]
        assert sorted((r["row"], r["served_by"], r["degraded"]) for r in decisions) == [
            (0, "primary", False),
            (1, "default", True),
            (2, "primary", False),
        ]
        assert {r["batch_id"] for r in decisions} == {out.batch_id}

    @pytest.mark.parametrize("is_async", [False, True])
    def test_a_plain_guard_stamps_every_record_it_writes(
        self, baseline: ss.Baseline, is_async: bool
    ) -> None:
        lines: list[dict[str, Any]] = []

        def model(x: dict[str, float]) -> list[float]:
            return [x["a"], 1 - x["a"]]

        async def model_async(x: dict[str, float]) -> list[float]:
            return model(x)

        predict = ss.guard(
            name=f"plain-{time.monotonic_ns()}",
            validation=ss.ValidationConfig(baseline=baseline),
            fallbacks=[ss.Fallback.static("default", FALLBACK)],
            log=ss.DecisionLogConfig(sink=lines.append, sample_rate=1.0),
        )(model_async if is_async else model)
        rows = [dict(zip(NAMES, KINDS[k], strict=True)) for k in ("valid", "invalid", "valid")]
        if is_async:
            out = asyncio.run(predict.batch(rows))
            asyncio.run(predict(rows[0]))
        else:
            out = predict.batch(rows)
            predict(rows[0])  # outside the batch: no row, no batch id
        ss.flush_logs()
        decisions = [r for r in lines if r.get("kind") == "decision"]
        assert [(r["row"], r["batch_id"], r["served_by"]) for r in decisions] == [
            (0, out.batch_id, "primary"),
            (1, out.batch_id, "default"),
            (2, out.batch_id, "primary"),
            (None, None, "primary"),
        ]
        assert [d.row for d in predict.decisions()] == [0, 1, 2, None]


def test_check_finite_off_serves_nan_answers_from_the_primary() -> None:
    """`Policy.check_finite=False` holds for batches too: a NaN answer is served, not checked."""
    predict = ss.guard(
        name=f"batch-{time.monotonic_ns()}",
        batch=True,
        check_finite=False,
        fallbacks=[ss.Fallback.static("default", FALLBACK)],
    )(Model())
    out = call_batch(predict, [KINDS["valid"], KINDS["nan"]], "array")
    assert out.served_by == ["primary", "primary"]
    assert math.isnan(out.values[1][0])

"""Training baselines: every input form, statistics, the binning contract, files and the CLI."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safeserve.baseline import (
    FORMAT_VERSION,
    QUANTILES,
    Baseline,
    BaselineError,
    FeatureBaseline,
)
from safeserve.baseline_cli import add_baseline_parser

N = 200
RNG = np.random.default_rng(6)
X = RNG.normal(50.0, 10.0, N)
X[[3, 17, 90]] = np.nan
COUNT = RNG.integers(0, 40, N)
COLOR = RNG.choice(["red", "green", "blue", "teal"], N, p=[0.4, 0.3, 0.2, 0.1])
FLAG = RNG.random(N) < 0.3


def _num(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def _rows() -> list[dict[str, Any]]:
    return [
        {"x": _num(X[i]), "count": int(COUNT[i]), "color": str(COLOR[i]), "flag": bool(FLAG[i])}
        for i in range(N)
    ]


def _structured() -> np.ndarray:
    arr = np.zeros(N, dtype=[("x", "f8"), ("count", "i8"), ("color", "U8"), ("flag", "?")])
    arr["x"], arr["count"], arr["color"], arr["flag"] = X, COUNT, COLOR, FLAG
    return arr


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    def cell(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "true" if v else "false"
        return repr(v) if isinstance(v, float) else str(v)

    lines = [",".join(rows[0])] + [",".join(cell(v) for v in r.values()) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _forms(tmp_path: Path) -> dict[str, Any]:
    """The same four columns in every input form."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows()
    columns = {"x": X, "count": COUNT, "color": COLOR, "flag": FLAG}
    np.save(tmp_path / "data.npy", _structured())
    np.savez(tmp_path / "data.npz", x=X, count=COUNT, color=COLOR, flag=FLAG)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    return {
        "dict of arrays": columns,
        "dict of lists": {k: [r[k] for r in rows] for k in rows[0]},
        "list of rows": rows,
        "structured array": _structured(),
        "csv": _write_csv(tmp_path / "data.csv", rows),
        "jsonl": _write_jsonl(tmp_path / "data.jsonl", rows),
        "npy": tmp_path / "data.npy",
        "npz": tmp_path / "data.npz",
        "parquet": tmp_path / "data.parquet",
        "pandas": pd.DataFrame(columns),
        "csv as str path": str(tmp_path / "data.csv"),
    }


class TestInputForms:
    def test_every_form_gives_equal_statistics(self, tmp_path: Path) -> None:
        """Dict, rows, numpy, CSV, JSONL, .npy, .npz, Parquet and pandas agree exactly."""
        reference = Baseline.from_data({"x": X, "count": COUNT, "color": COLOR, "flag": FLAG})
        for form, data in _forms(tmp_path).items():
            assert Baseline.from_data(data) == reference, form

    def test_2d_array_with_feature_names(self) -> None:
        """A plain 2-D array gives the same numeric statistics as its columns."""
        grid = np.column_stack([X, COUNT])
        got = Baseline.from_data(grid, feature_names=["x", "count"])
        assert got == Baseline.from_data({"x": X, "count": COUNT})

    def test_categorical_nulls_agree_across_forms(self, tmp_path: Path) -> None:
        """None (dict, rows, JSONL, Parquet), NaN (pandas) and an empty CSV cell are nulls."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [{"c": v} for v in ["a", None, "b", "a", None, "c"]]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
        forms = [
            {"c": [r["c"] for r in rows]},
            rows,
            _write_csv(tmp_path / "c.csv", rows),
            _write_jsonl(tmp_path / "c.jsonl", rows),
            tmp_path / "c.parquet",
            pd.DataFrame({"c": [r["c"] for r in rows]}),
        ]
        built = [Baseline.from_data(f).features["c"] for f in forms]
        assert all(b == built[0] for b in built)
        assert (built[0].null_count, built[0].count, built[0].categories) == (2, 4, ["a", "b", "c"])

    def test_kinds_inferred(self) -> None:
        """Numbers are numeric, strings categorical, booleans boolean ("true"/"false")."""
        got = Baseline.from_data({"x": X, "count": COUNT, "color": COLOR, "flag": FLAG})
        kinds = {n: f.kind for n, f in got.features.items()}
        assert kinds == {
            "x": "numeric",
            "count": "numeric",
            "color": "categorical",
            "flag": "boolean",
        }
        assert set(got.features["flag"].categories) == {"true", "false"}
        assert list(got.features) == ["x", "count", "color", "flag"]

    def test_csv_quoted_crlf_and_null_tokens(self, tmp_path: Path) -> None:
        """Quoted cells, CRLF line ends and NA/null cells read as a person would expect."""
        path = tmp_path / "q.csv"
        path.write_bytes(b'a,b\r\n1.5,"x, y"\r\nNA,z\r\n2.5,null\r\n')
        got = Baseline.from_data(path)
        a, b = got.features["a"], got.features["b"]
        assert (a.kind, a.count, a.null_count, a.min, a.max) == ("numeric", 2, 1, 1.5, 2.5)
        assert (b.kind, b.categories, b.null_count) == ("categorical", ["x, y", "z"], 1)

    def test_csv_with_empty_numeric_cells_takes_the_general_reader(self, tmp_path: Path) -> None:
        """A numeric file with holes gives the same numbers as one without."""
        path = tmp_path / "holes.csv"
        path.write_text("a,b\n1,2\n,3\n4,\n")
        got = Baseline.from_data(path)
        assert got.features["a"].null_count == 1
        assert got.features["b"].null_count == 1
        assert got.features["a"].mean == 2.5


class TestStatistics:
    def test_numeric_statistics_are_exact(self) -> None:
        """count, nulls, exact min/max, mean and population std of the non-null values."""
        f = Baseline.from_data({"x": X}).features["x"]
        finite = X[~np.isnan(X)]
        assert (f.count, f.null_count) == (N - 3, 3)
        assert f.null_rate == 3 / N
        assert (f.min, f.max) == (finite.min(), finite.max())
        assert f.mean == pytest.approx(finite.mean(), rel=1e-12)
        assert f.std == pytest.approx(finite.std(), rel=1e-12)

    def test_edges_are_quantiles_from_min_to_max(self) -> None:
        """B+1 strictly increasing edges, first = min, last = max; shares near 1/B."""
        f = Baseline.from_data({"x": X}, bins=4).features["x"]
        assert len(f.edges) == 5
        assert f.edges[0] == f.min
        assert f.edges[-1] == f.max
        assert all(a < b for a, b in zip(f.edges, f.edges[1:], strict=False))
        assert sum(f.proportions) == pytest.approx(1.0)
        assert all(abs(p - 0.25) < 0.02 for p in f.proportions)

    def test_duplicate_edges_are_collapsed(self) -> None:
        """Mostly-zero data keeps fewer, still strictly increasing, bins."""
        values = np.r_[np.zeros(90), np.arange(1.0, 11.0)]
        f = Baseline.from_data({"v": values}, bins=10).features["v"]
        assert f.edges[0] == 0.0
        assert len(f.edges) == len(set(f.edges)) < 11
        assert f.proportions[0] == 0.9

    def test_constant_feature_has_one_bin(self) -> None:
        """A constant has one edge, one bin holding everything."""
        f = Baseline.from_data({"v": [3.0] * 10}).features["v"]
        assert (f.edges, f.proportions, f.std) == ([3.0], [1.0], 0.0)
        counts, nulls, out = f.bin_counts(np.array([3.0, 2.0, 4.0, np.nan]))
        assert (counts.tolist(), nulls, out) == ([3], 1, 2)

    def test_top_k_by_frequency_ties_broken_by_value(self) -> None:
        """Most frequent first; equal counts ordered by value; the rest is "other"."""
        values = ["b", "a", "c", "c", "d", "d", "e"]
        f = Baseline.from_data({"c": values}, top_k=3).features["c"]
        assert f.categories == ["c", "d", "a"]
        assert f.proportions == [2 / 7, 2 / 7, 1 / 7, 2 / 7]

    def test_infinite_values_are_nulls_in_a_baseline(self) -> None:
        """A baseline's statistics stay finite: +-inf are counted with the nulls."""
        f = Baseline.from_data({"v": [1.0, np.inf, 2.0, -np.inf]}).features["v"]
        assert (f.count, f.null_count, f.min, f.max) == (2, 2, 1.0, 2.0)

    def test_owners_prediction_and_confidence(self) -> None:
        """Owners tag features; prediction/confidence are taken by name or given as values."""
        data = {"x": X, "label": COLOR, "score": RNG.random(N)}
        got = Baseline.from_data(
            data, owners={"x": "feature-team"}, prediction="label", confidence=data["score"]
        )
        assert list(got.features) == ["x", "score"]
        assert got.features["x"].owner == "feature-team"
        assert got.prediction is not None
        assert got.prediction.kind == "categorical"
        assert got.prediction.name == "label"
        assert got.confidence is not None
        assert got.confidence.name == "confidence"
        assert got.confidence.kind == "numeric"

    def test_kinds_override_keeps_codes_as_text(self, tmp_path: Path) -> None:
        """kinds= reads a column as categorical, keeping its text ("007", not 7.0)."""
        path = tmp_path / "zip.csv"
        path.write_text("zip,n\n007,1\n75001,2\nN1,3\n")
        got = Baseline.from_data(path, kinds={"zip": "categorical"})
        assert sorted(got.features["zip"].categories) == ["007", "75001", "N1"]
        mixed = Baseline.from_data({"m": [1, "a", 2]}, kinds={"m": "categorical"})
        assert sorted(mixed.features["m"].categories) == ["1", "2", "a"]

    def test_progress_called_per_feature(self) -> None:
        """progress(done, total) reports each feature."""
        seen: list[tuple[int, int]] = []
        Baseline.from_data({"a": [1.0], "b": ["x"]}, progress=lambda d, t: seen.append((d, t)))
        assert seen == [(1, 2), (2, 2)]


class TestBinningContract:
    @pytest.fixture
    def feature(self) -> FeatureBaseline:
        return Baseline.from_data({"v": np.arange(0.0, 101.0)}, bins=4).features["v"]

    def test_edges(self, feature: FeatureBaseline) -> None:
        """Sanity: the fixture's quantile edges are 0, 25, 50, 75, 100."""
        assert feature.edges == [0.0, 25.0, 50.0, 75.0, 100.0]

    def test_below_min_and_above_max(self, feature: FeatureBaseline) -> None:
        """Below min: bin 0; above max: last bin; both out of range."""
        counts, nulls, out = feature.bin_counts(np.array([-5.0, 1e9, -np.inf, np.inf]))
        assert (counts.tolist(), nulls, out) == ([2, 0, 0, 2], 0, 4)

    def test_values_on_edges(self, feature: FeatureBaseline) -> None:
        """A value on an inner edge goes to the bin on its right; min and max are in range."""
        counts, nulls, out = feature.bin_counts(np.array([0.0, 25.0, 50.0, 75.0, 100.0]))
        assert (counts.tolist(), nulls, out) == ([1, 1, 1, 2], 0, 0)

    def test_nan_and_none_are_nulls(self, feature: FeatureBaseline) -> None:
        """NaN and None count as nulls, in no bin."""
        counts, nulls, _ = feature.bin_counts(np.array([np.nan, None, 30.0], dtype=object))
        assert (counts.tolist(), nulls) == ([0, 1, 0, 0], 2)

    def test_non_numbers_in_a_numeric_feature_are_nulls(self, feature: FeatureBaseline) -> None:
        """A string or a bool cannot be placed in numeric bins: it counts as a null."""
        counts, nulls, _ = feature.bin_counts(np.array(["a", True, 10], dtype=object))
        assert (counts.tolist(), nulls) == ([1, 0, 0, 0], 2)

    def test_agrees_with_searchsorted(self, feature: FeatureBaseline) -> None:
        """The vectorized counts equal the contract's searchsorted formula."""
        values = RNG.uniform(-20, 120, 5000)
        counts, _, out = feature.bin_counts(values)
        expected = np.searchsorted(np.array(feature.edges[1:-1]), values, side="right")
        assert counts.tolist() == np.bincount(expected, minlength=4).tolist()
        assert out == int(np.sum((values < 0) | (values > 100)))

    def test_categories_unseen_and_null(self) -> None:
        """A known category counts in its slot, an unseen one in "other", None and NaN as null."""
        f = Baseline.from_data({"c": ["a", "a", "b"]}).features["c"]
        values = np.array(["a", "b", "zzz", None, float("nan"), "a"], dtype=object)
        counts, nulls, out = f.bin_counts(values)
        assert (counts.tolist(), nulls, out) == ([2, 1, 1], 2, 0)

    def test_boolean_from_bools_or_strings(self) -> None:
        """A boolean feature counts numpy bools, Python bools and "true"/"false" alike."""
        f = Baseline.from_data({"b": [True, True, False]}).features["b"]
        assert f.categories == ["true", "false"]
        assert f.bin_counts(np.array([True, False, True]))[0].tolist() == [2, 1, 0]
        assert f.bin_counts(np.array([True, "false", None], dtype=object))[0].tolist() == [1, 1, 0]

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=60))
    def test_counts_account_for_every_value(self, values: list[float]) -> None:
        """Property: each value is counted exactly once, in a bin or as a null."""
        f = Baseline.from_data({"v": np.arange(10.0)}, bins=3).features["v"]
        counts, nulls, out = f.bin_counts(np.array(values))
        assert int(counts.sum()) + nulls == len(values)
        assert out == sum(1 for v in values if v < 0 or v > 9)

    def test_ten_shards_sum_to_the_whole(self) -> None:
        """Counts of 10 shards added up equal the counts of the whole (profiles merge)."""
        baseline = Baseline.from_data({"x": X, "color": COLOR, "flag": FLAG})
        serving = {
            "x": np.r_[RNG.normal(55.0, 15.0, 997), [np.nan, -1e6, 1e6]],
            "color": np.array([*RNG.choice(["red", "blue", "pink"], 999), None], dtype=object),
            "flag": RNG.random(1000) < 0.5,
        }
        for name, f in baseline.features.items():
            whole = f.bin_counts(serving[name])
            shards = [f.bin_counts(part) for part in np.array_split(serving[name], 10)]
            assert np.sum([s[0] for s in shards], axis=0).tolist() == whole[0].tolist(), name
            assert sum(s[1] for s in shards) == whole[1], name
            assert sum(s[2] for s in shards) == whole[2], name

    def test_profile_of_data(self) -> None:
        """Baseline.profile gives each feature's counts in the profile record's shape."""
        baseline = Baseline.from_data({"x": X, "color": COLOR})
        got = baseline.profile({"x": [1.0, None, 1e9]})
        assert got["x"]["nulls"] == 1
        assert got["x"]["out_of_range"] == 2
        assert got["color"] == {
            "counts": [0] * baseline.features["color"].slots,
            "nulls": 3,
            "out_of_range": 0,
        }


class TestFiles:
    def test_save_load_round_trip_is_exact(self, tmp_path: Path) -> None:
        """Every float survives the JSON file bit for bit."""
        original = Baseline.from_data(
            {"x": X, "count": COUNT, "color": COLOR, "flag": FLAG},
            owners={"color": "paint"},
            prediction=RNG.random(N),
        )
        path = tmp_path / "baseline.json"
        original.save(path)
        loaded = Baseline.load(path)
        assert loaded == original
        assert loaded.features["x"].edges == original.features["x"].edges
        assert loaded.features["x"].quantiles == original.features["x"].quantiles
        assert json.loads(path.read_text())["format_version"] == FORMAT_VERSION

    def test_save_honours_the_umask_and_keeps_a_replaced_files_mode(self, tmp_path: Path) -> None:
        """A new file is 0666 less the umask (not mkstemp's 0600); a replaced one keeps its mode;
        no temporary file is left behind."""
        baseline = Baseline.from_data({"x": X[:100]})
        old = os.umask(0o022)
        try:
            baseline.save(tmp_path / "new.json")
            os.umask(0o077)
            baseline.save(tmp_path / "private.json")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
        (tmp_path / "new.json").chmod(0o640)
        baseline.save(tmp_path / "new.json")
        assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o640
        assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json", "private.json"]

    def test_save_into_a_missing_directory_creates_nothing(self, tmp_path: Path) -> None:
        """A mistyped directory is an error naming it; no directory is created."""
        with pytest.raises(FileNotFoundError) as info:
            Baseline.from_data({"x": X[:100]}).save(tmp_path / "typo" / "b.json")
        assert info.value.filename == str(tmp_path / "typo")
        assert not (tmp_path / "typo").exists()

    def test_quantiles_are_a_fine_reference_cdf(self) -> None:
        """QUANTILES + 1 values from min to max at evenly spaced levels; none for categories."""
        f = Baseline.from_data({"x": X, "color": COLOR}).features
        q = np.asarray(f["x"].quantiles)
        assert q.size == QUANTILES + 1
        assert (q[0], q[-1]) == (f["x"].min, f["x"].max)
        finite = X[np.isfinite(X)]
        np.testing.assert_allclose(
            q[1:-1], np.quantile(finite, np.linspace(0, 1, QUANTILES + 1))[1:-1]
        )
        assert f["color"].quantiles == []

    def test_a_file_without_quantiles_still_loads(self, tmp_path: Path) -> None:
        """Baselines written before `quantiles` existed load (the skew report then bins)."""
        raw = Baseline.from_data({"x": X[:100]}).model_dump(mode="json")
        del raw["features"]["x"]["quantiles"]
        (tmp_path / "old.json").write_text(json.dumps(raw))
        assert Baseline.load(tmp_path / "old.json").features["x"].quantiles == []

    def test_loaded_baseline_bins_like_the_original(self, tmp_path: Path) -> None:
        """bin_counts works on a loaded baseline (its bins are rebuilt on load)."""
        original = Baseline.from_data({"x": X})
        original.save(tmp_path / "b.json")
        f = Baseline.load(tmp_path / "b.json").features["x"]
        assert f.bin_counts(X)[0].tolist() == original.features["x"].bin_counts(X)[0].tolist()

    def test_unknown_format_version_is_refused(self, tmp_path: Path) -> None:
        """A file from another format version is a BaselineError, not a guess."""
        path = tmp_path / "b.json"
        Baseline.from_data({"x": X}).save(path)
        raw = json.loads(path.read_text())
        raw["format_version"] = 99
        path.write_text(json.dumps(raw))
        with pytest.raises(BaselineError, match="format_version 99"):
            Baseline.load(path)

    def test_malformed_files_are_baseline_errors(self, tmp_path: Path) -> None:
        """Not JSON, inconsistent bins: a BaselineError naming the file and field."""
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        with pytest.raises(BaselineError, match="not a baseline JSON"):
            Baseline.load(bad)
        Baseline.from_data({"x": X}).save(bad)
        raw = json.loads(bad.read_text())
        raw["features"]["x"]["edges"].reverse()
        bad.write_text(json.dumps(raw))
        with pytest.raises(BaselineError, match=r"features\.x"):
            Baseline.load(bad)

    def test_missing_file_is_an_os_error(self, tmp_path: Path) -> None:
        """An absent baseline file raises OSError (FileNotFoundError)."""
        with pytest.raises(FileNotFoundError):
            Baseline.load(tmp_path / "absent.json")


class TestBadInput:
    @pytest.mark.parametrize(
        ("data", "column"),
        [
            ({"x": [1.0, 2.0], "empty": [None, None]}, "empty"),
            ({"x": [1.0, 2.0], "nan": [np.nan, np.nan]}, "nan"),
            ({"mixed": [1, "a", 2.5]}, "mixed"),
            ({"mixed": [1, True]}, "mixed"),
        ],
    )
    def test_bad_column_names_the_column(self, data: dict[str, Any], column: str) -> None:
        """An all-null or mixed column is a BaselineError whose problem names it."""
        with pytest.raises(BaselineError) as info:
            Baseline.from_data(data)
        assert any(p.startswith(f"{column}:") for p in info.value.problems)
        assert isinstance(info.value, ValueError)

    def test_every_bad_column_is_reported_at_once(self) -> None:
        """Problems of several columns come in one error."""
        with pytest.raises(BaselineError) as info:
            Baseline.from_data({"a": [None, None], "b": [1, "x"]})
        assert [p.split(":")[0] for p in info.value.problems] == ["a", "b"]

    def test_csv_mixed_and_all_null_columns(self, tmp_path: Path) -> None:
        """In a CSV too: numbers mixed with text, or only empty cells, name the column."""
        path = tmp_path / "bad.csv"
        path.write_text("ok,mixed,blank\n1,2,\n2,x,\n")
        with pytest.raises(BaselineError) as info:
            Baseline.from_data(path)
        assert [p.split(":")[0] for p in info.value.problems] == ["mixed", "blank"]

    @pytest.mark.parametrize(
        ("name", "content", "message"),
        [
            ("empty.csv", "", "empty file"),
            ("header.csv", "a,b\n", "no rows"),
            ("ragged.csv", "a,b\n1,2\n3\n", "row 2"),
            ("dup.csv", "a,a\n1,2\n", "duplicate column"),
            ("empty.jsonl", "\n\n", "no rows"),
            ("bad.jsonl", '{"a": 1}\nnope\n', "bad.jsonl:2"),
            ("list.jsonl", "[1, 2]\n", "not a JSON object"),
            ("data.xlsx", "x", "unknown file type"),
        ],
    )
    def test_bad_files(self, tmp_path: Path, name: str, content: str, message: str) -> None:
        """Each unreadable file is one clear BaselineError, never a traceback."""
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(BaselineError, match=message):
            Baseline.from_data(path)

    @pytest.mark.parametrize(
        ("data", "kwargs", "message"),
        [
            (42, {}, "unsupported input int"),
            (np.zeros((3, 2)), {}, "needs feature_names"),
            ({"a": [1, 2], "b": [1]}, {}, "differ in length"),
            ({}, {}, "no columns"),
            ({"a": []}, {}, "no rows"),
            ({"a": [1.0]}, {"bins": 0}, "bins"),
            ({"a": [1.0]}, {"owners": {"zz": "t"}}, "owners: zz"),
            ({"a": [1.0]}, {"kinds": {"zz": "numeric"}}, "kinds: zz"),
            ({"a": [1.0]}, {"prediction": "zz"}, "prediction: no column"),
            ({"a": [1.0]}, {"confidence": [0.1, 0.2]}, "confidence: 2 values for 1 rows"),
            ({"a": [1.0]}, {"kinds": {"a": "text"}}, "unknown kind"),
            ({"a": ["x"]}, {"kinds": {"a": "numeric"}}, "cannot be numeric"),
        ],
    )
    def test_bad_arguments(self, data: Any, kwargs: dict[str, Any], message: str) -> None:
        """Wrong data shapes and options are BaselineErrors that say what to fix."""
        with pytest.raises(BaselineError, match=message):
            Baseline.from_data(data, **kwargs)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A data path that does not exist is a BaselineError naming it."""
        with pytest.raises(BaselineError, match="no such file"):
            Baseline.from_data(tmp_path / "nope.csv")

    def test_a_directory_is_not_reported_as_missing(self, tmp_path: Path) -> None:
        """A directory given as the data says so, not "no such file"."""
        with pytest.raises(BaselineError, match="is a directory, not a data file"):
            Baseline.from_data(tmp_path)

    def test_an_all_null_column_names_the_way_to_leave_it_out(self) -> None:
        """An empty column stays an error (a baseline cannot describe it), and says how to
        leave it out; with exclude= the baseline is built without it."""
        data = {"x": [1.0, 2.0], "empty": [None, None]}
        with pytest.raises(BaselineError, match=re.escape("exclude=['empty']")):
            Baseline.from_data(data)
        assert list(Baseline.from_data(data, exclude=["empty"]).features) == ["x"]


class TestExclude:
    def test_an_excluded_column_leaves_no_trace_in_the_file(self, tmp_path: Path) -> None:
        """A PII column given to exclude= is not read into any statistic or bin edge."""
        cards = [f"4242-{i:04d}" for i in range(N)]
        baseline = Baseline.from_data({"x": X, "card": cards}, exclude=["card"])
        baseline.save(tmp_path / "b.json")
        text = (tmp_path / "b.json").read_text()
        assert "card" not in text
        assert "4242" not in text
        assert list(baseline.features) == ["x"]

    def test_a_single_name_is_one_column(self) -> None:
        """exclude="card" means the column card, not the letters c, a, r, d."""
        got = Baseline.from_data({"x": [1.0, 2.0], "card": ["a", "b"]}, exclude="card")
        assert list(got.features) == ["x"]

    def test_an_unknown_excluded_column_is_an_error(self) -> None:
        """A typo in exclude= would let the column in: it is an error naming it."""
        with pytest.raises(BaselineError, match="exclude: crad: no such column"):
            Baseline.from_data({"x": [1.0, 2.0], "card": ["a", "b"]}, exclude=["crad"])

    def test_parquet_without_pyarrow_says_what_to_install(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without pyarrow, a Parquet file gives an install hint."""
        path = tmp_path / "d.parquet"
        path.write_bytes(b"PAR1")
        monkeypatch.setitem(sys.modules, "pyarrow", None)
        with pytest.raises(BaselineError, match="needs pyarrow"):
            Baseline.from_data(path)


class TestCli:
    @staticmethod
    def run(*argv: str) -> int:
        parser = argparse.ArgumentParser(prog="safeserve")
        add_baseline_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["baseline", *argv])
        code: int = args.handler(args)
        return code

    def test_writes_a_baseline(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """`safeserve baseline DATA -o OUT` writes a loadable file and says what it did."""
        data = _write_csv(tmp_path / "d.csv", _rows())
        out = tmp_path / "b.json"
        code = self.run(str(data), "-o", str(out), "--bins", "5", "--owner", "x=team-x")
        assert code == 0
        got = Baseline.load(out)
        assert got == Baseline.from_data(data, bins=5, owners={"x": "team-x"})
        assert "4 features" in capsys.readouterr().out

    def test_bad_data_exits_2_with_the_problem(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Bad input: exit 2, one line per problem naming the column, no traceback."""
        data = tmp_path / "d.csv"
        data.write_text("a,b\n1,\n2,\n")
        assert self.run(str(data), "-o", str(tmp_path / "b.json")) == 2
        err = capsys.readouterr().err
        assert (
            "safeserve baseline: b: no non-null value; leave the column out with --exclude b" in err
        )
        assert "Traceback" not in err

    def test_exclude_flag_leaves_columns_out(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--exclude (repeatable) drops a PII column and an empty one; the output says so."""
        data = tmp_path / "d.csv"
        data.write_text("a,b,card\n1,,4242-0001\n2,,4242-0002\n")
        out = tmp_path / "b.json"
        assert self.run(str(data), "-o", str(out), "--exclude", "b", "--exclude", "card") == 0
        assert list(Baseline.load(out).features) == ["a"]
        assert "4242" not in out.read_text()
        assert "left out: b, card" in capsys.readouterr().out

    def test_problems_name_the_cli_flags(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """From the CLI, fixes are spelled as flags (--kind m=categorical), never as Python."""
        data = tmp_path / "d.csv"
        data.write_text("m,z\n1,1\nx,2\n")
        out = str(tmp_path / "b.json")
        assert self.run(str(data), "-o", out, "--kind", "q=numeric", "--exclude", "w") == 2
        err = capsys.readouterr().err
        assert "--kind m=categorical" in err
        assert "--kind q: no such feature" in err
        assert "--exclude w: no such column" in err
        assert "kinds=" not in err
        assert "exclude=" not in err
        assert self.run(str(data), "-o", out, "--bins", "0") == 2
        assert "--bins: must be >= 1" in capsys.readouterr().err
        # the Python spelling is back outside the CLI
        with pytest.raises(BaselineError, match=re.escape("kinds={'m': 'categorical'}")):
            Baseline.from_data(data)

    def test_a_directory_as_data_and_a_missing_output_directory(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Exit 2 with what is wrong: a directory is not "no such file"; -o into a missing
        directory creates nothing."""
        data = _write_csv(tmp_path / "d.csv", _rows())
        assert self.run(str(tmp_path), "-o", str(tmp_path / "b.json")) == 2
        assert "is a directory, not a data file" in capsys.readouterr().err
        assert self.run(str(data), "-o", str(tmp_path / "no" / "dir" / "b.json")) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path / 'no' / 'dir'}: no such directory" in err
        assert not (tmp_path / "no").exists()

    def test_bad_owner_option_exits_2(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--owner without '=' is a usage problem."""
        data = _write_csv(tmp_path / "d.csv", _rows())
        assert self.run(str(data), "-o", str(tmp_path / "b.json"), "--owner", "x") == 2
        assert "expected NAME=VALUE" in capsys.readouterr().err

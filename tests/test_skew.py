"""The skew report: statistics against reference formulas, flagging, log reading, the CLI."""

from __future__ import annotations

import argparse
import gzip
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats
from scipy.spatial import distance

from safeserve.baseline import QUANTILES, Baseline
from safeserve.skew import analyze
from safeserve.skew_cli import add_skew_parser
from safeserve.skew_report import chart_count, render_html
from safeserve.skew_stats import (
    PSI_EPS,
    headline_method,
    js_divergence,
    ks_from_counts,
    ks_statistic,
    linf,
    psi,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
NAMES = [f"f{i}" for i in range(10)]
SHIFTED = ("f2", "f5", "f7")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="safeserve")
    add_skew_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["skew", *map(str, argv)])
    code: int = args.handler(args)
    return code


def _decision(i: int, inputs: dict[str, Any], *, degraded: bool = False, **extra: Any) -> dict:
    record = {
        "kind": "decision",
        "schema_version": 1,
        "id": f"d{i}",
        "ts": (T0 + timedelta(seconds=i)).isoformat(),
        "policy": "fraud",
        "owner": "risk",
        "served_by": "rules" if degraded else "primary",
        "degraded": degraded,
        "flagged": False,
        "reasons": [{"code": "timeout", "stage": "call", "detail": None}] if degraded else [],
        "inputs": inputs,
    }
    record.update(extra)
    return record


def _profile(baseline: Baseline, rows: list[dict[str, Any]], start: int) -> dict[str, Any]:
    return {
        "kind": "profile",
        "schema_version": 1,
        "id": f"p{start}",
        "ts": (T0 + timedelta(seconds=start + 60)).isoformat(),
        "policy": "fraud",
        "owner": "risk",
        "start": (T0 + timedelta(seconds=start)).isoformat(),
        "end": (T0 + timedelta(seconds=start + 60)).isoformat(),
        "n": len(rows),
        "features": baseline.profile(rows),
    }


def _write(path: Path, records: list[Any]) -> Path:
    text = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _rows(n: int, seed: int, shifted: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, 1.0, (n, len(NAMES)))
    for name in shifted:
        data[:, NAMES.index(name)] += 0.5
    return [dict(zip(NAMES, map(float, row), strict=True)) for row in data.tolist()]


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    rng = np.random.default_rng(1)
    columns = {n: rng.normal(0.0, 1.0, 20000) for n in NAMES}
    owners = {"f2": "payments", "f5": "geo", "f7": "payments"}
    return Baseline.from_data(columns, owners=owners)


@pytest.fixture(scope="module")
def serving() -> list[dict[str, Any]]:
    return _rows(5000, seed=2, shifted=SHIFTED)


@pytest.fixture
def baseline_file(tmp_path: Path, baseline: Baseline) -> Path:
    path = tmp_path / "baseline.json"
    baseline.save(path)
    return path


class TestStatistics:
    """Each statistic against its reference implementation or formula."""

    @pytest.mark.parametrize("seed", range(5))
    def test_ks_equals_scipy_on_raw_values(self, seed: int) -> None:
        """Exact two-sample KS matches scipy.stats.ks_2samp to 1e-9, ties included."""
        rng = np.random.default_rng(seed)
        a = rng.normal(0, 1, 500 + seed * 97)
        b = rng.normal(0.2, 1.3, 800)
        if seed % 2:
            a, b = np.round(a, 1), np.round(b, 1)  # many ties
        assert abs(ks_statistic(a, b) - stats.ks_2samp(a, b).statistic) < 1e-9

    def test_psi_matches_numpy_formula(self) -> None:
        """PSI = sum((a - e) ln(a / e)) over shares, a zero share replaced by PSI_EPS."""
        e = np.array([0.1, 0.2, 0.3, 0.4])
        a = np.array([30, 0, 50, 20])
        ash = np.maximum(a / a.sum(), PSI_EPS)
        assert psi(e, a) == pytest.approx(np.sum((ash - e) * np.log(ash / e)), abs=1e-12)

    def test_js_matches_numpy_formula_and_scipy(self) -> None:
        """JS divergence (base 2) equals the direct formula and scipy's distance squared."""
        p, q = np.array([0.5, 0.3, 0.2, 0.0]), np.array([0.1, 0.2, 0.3, 0.4])
        m = (p + q) / 2
        kl = lambda x: np.sum(np.where(x > 0, x * np.log2(np.where(x > 0, x, 1) / m), 0))  # noqa: E731
        assert js_divergence(p, q) == pytest.approx((kl(p) + kl(q)) / 2, abs=1e-12)
        assert js_divergence(p, q) == pytest.approx(distance.jensenshannon(p, q, base=2) ** 2)

    def test_linf_on_a_known_categorical_shift(self) -> None:
        """Moving 25 points of share from one category to another gives L-inf 0.25."""
        assert linf(np.array([0.5, 0.3, 0.2]), np.array([50, 55, 95]) / 2) == pytest.approx(0.275)
        assert linf(np.array([0.5, 0.5]), np.array([25, 75])) == pytest.approx(0.25)

    def test_ks_against_a_baseline_is_taken_at_its_edges(self) -> None:
        """KS from counts equals the exact KS evaluated at the baseline's quantile edges."""
        rng = np.random.default_rng(3)
        ref = rng.normal(0, 1, 5000)
        b = Baseline.from_data({"x": ref}).features["x"]
        cur = rng.normal(0.3, 1, 3000)
        counts, _, _ = b.bin_counts(cur)
        inner = np.asarray(b.edges[1:-1])
        at_edges = np.abs(
            np.searchsorted(np.sort(ref), inner, "left") / ref.size
            - np.searchsorted(np.sort(cur), inner, "left") / cur.size
        ).max()
        assert ks_from_counts(np.asarray(b.proportions), counts) == pytest.approx(at_edges)
        assert at_edges <= stats.ks_2samp(ref, cur).statistic + 1e-12

    def test_auto_method_follows_reference_size(self) -> None:
        """auto: KS / chi-square up to 1000 reference rows, Wasserstein / JS above."""
        assert headline_method("auto", "numeric", 1000) == "ks"
        assert headline_method("auto", "numeric", 1001) == "wasserstein"
        assert headline_method("auto", "categorical", 50) == "chi2"
        assert headline_method("auto", "boolean", 5000) == "js"
        assert headline_method("ks", "categorical", 5000) == "chi2"


class TestFlagging:
    """A synthetic shift of 3 features out of 10 is found, and only it."""

    @pytest.mark.parametrize("method", ["auto", "psi", "ks", "js", "wasserstein"])
    def test_exactly_the_shifted_features_from_inputs(
        self, baseline: Baseline, serving: list[dict[str, Any]], tmp_path: Path, method: Any
    ) -> None:
        """Decision inputs: exactly f2, f5, f7 drift, grouped by their owners."""
        log = _write(tmp_path / "d.jsonl", [_decision(i, r) for i, r in enumerate(serving)])
        report = analyze([log], baseline, method=method)
        flagged = {f["name"] for f in report["features"] if f["severity"] != "none"}
        assert flagged == set(SHIFTED)
        assert report["by_owner"] == {"payments": ["f2", "f7"], "geo": ["f5"]}
        assert all(f["source"] == "inputs" for f in report["features"])

    def test_exactly_the_shifted_features_from_profiles(
        self, baseline: Baseline, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """Profiles: the same features flagged; sampled decision inputs are not added in."""
        records: list[Any] = [
            _profile(baseline, serving[i : i + 1000], i) for i in range(0, 5000, 1000)
        ]
        records += [_decision(i, serving[i]) for i in range(0, 5000, 50)]
        report = analyze([_write(tmp_path / "p.jsonl", records)], baseline)
        flagged = {f["name"] for f in report["features"] if f["severity"] != "none"}
        assert flagged == set(SHIFTED)
        assert {f["n"] for f in report["features"]} == {5000}
        assert all(f["source"] == "profiles" for f in report["features"])
        assert report["degradation"]["calls"] == 5000
        assert report["degradation"]["calls_source"] == "profiles"

    def test_statistics_of_inapplicable_kinds_are_null(self, tmp_path: Path) -> None:
        """Categorical features have no KS or out-of-range rate; numeric ones no L-inf."""
        rng = np.random.default_rng(4)
        b = Baseline.from_data(
            {"x": rng.normal(0, 1, 3000), "c": rng.choice(["a", "b", "c"], 3000).astype(object)}
        )
        rows = [{"x": float(v), "c": "a"} for v in rng.normal(0, 1, 500)]
        report = analyze(
            [_write(tmp_path / "l.jsonl", [_decision(i, r) for i, r in enumerate(rows)])], b
        )
        x, c = report["features"]
        assert x["linf"] is None
        assert x["ks"] is not None
        assert x["severity"] == "none"
        assert c["ks"] is None
        assert c["out_of_range_rate"] is None
        assert c["wasserstein"] is None
        assert c["linf"] == pytest.approx(2 / 3, abs=0.05)
        assert c["severity"] == "major"


class TestLogs:
    """Reading: many files, gzip, replicas merging, bad lines, degradation, outcomes."""

    def test_two_replicas_equal_one_log_of_all_calls(
        self, baseline: Baseline, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """Profiles and inputs split over two logs (one gzipped) give the very same report."""
        for use_profiles in (False, True):
            if use_profiles:
                records = [_profile(baseline, serving[i : i + 500], i) for i in range(0, 5000, 500)]
            else:
                records = [_decision(i, r, degraded=i % 7 == 0) for i, r in enumerate(serving)]
            one = analyze([_write(tmp_path / "all.jsonl", records)], baseline)
            two = analyze(
                [
                    _write(tmp_path / "a.jsonl", records[0::2]),
                    _write(tmp_path / "b.jsonl.gz", records[1::2]),
                ],
                baseline,
            )
            assert one["features"] == two["features"]  # counts add exactly: no tolerance
            assert one["degradation"] == two["degradation"]

    def test_bad_lines_are_counted_as_skipped(
        self, baseline_file: Path, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """Non-JSON, non-records, unknown versions and malformed records: counted, never fatal."""
        records: list[Any] = [_decision(i, r) for i, r in enumerate(serving[:100])]
        records += ["not json\n", "[1, 2]\n", '{"kind": "decision", "schema_version": 99}\n']
        records += [{"kind": "decision", "schema_version": 1, "policy": "fraud", "ts": "bad"}]
        log = _write(tmp_path / "bad.jsonl", records)
        out = tmp_path / "r.json"
        assert _run([log, "--baseline", baseline_file, "--json", out, "-q"]) == 0
        report = json.loads(out.read_text())
        assert report["skipped"] == 4
        assert report["skipped_by"] == {
            "not_json": 1,
            "not_a_record": 1,
            "unknown_schema_version": 1,
            "malformed": 1,
        }
        assert report["records"]["decision"] == 100

    def test_degradation_by_reason_fallback_and_time(
        self, baseline: Baseline, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """Rates by reason and fallback, aggregates of open-breaker rejections, time buckets."""
        records: list[Any] = [
            _decision(i, r, degraded=i < 100) for i, r in enumerate(serving[:400])
        ]
        records.append(
            {
                "kind": "rejected_while_open",
                "schema_version": 1,
                "id": "agg",
                "ts": (T0 + timedelta(seconds=50)).isoformat(),
                "policy": "fraud",
                "count": 30,
                "served_by": {"static": 30},
            }
        )
        d = analyze([_write(tmp_path / "g.jsonl", records)], baseline)["degradation"]
        assert (d["calls"], d["degraded"]) == (430, 130)
        assert d["by_reason"] == {"timeout": 100, "breaker_open": 30}
        assert d["by_fallback"] == {"rules": 100, "static": 30}
        assert sum(b["calls"] for b in d["by_time"]) == 430
        assert sum(b["degraded"] for b in d["by_time"]) == 130
        assert d["calls_source"] == "decisions"

    def test_degraded_inputs_ranked_against_healthy_ones(
        self, baseline: Baseline, tmp_path: Path
    ) -> None:
        """The feature whose values differ on degraded calls comes first."""
        rows = _rows(2000, seed=5)
        for r in rows[:500]:
            r["f4"] += 3.0
        records = [_decision(i, r, degraded=i < 500) for i, r in enumerate(rows)]
        report = analyze([_write(tmp_path / "h.jsonl", records)], baseline)
        ranked = report["degradation"]["features_degraded_vs_healthy"]
        assert ranked[0]["name"] == "f4"
        assert ranked[0]["js"] > 10 * ranked[1]["js"]

    def test_outcomes_give_quality_by_served_by(
        self, baseline_file: Path, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """Outcome records join their decisions by id; the HTML gains a quality chart."""
        records: list[Any] = [
            _decision(i, r, degraded=i % 2 == 1) for i, r in enumerate(serving[:200])
        ]
        records += [
            {"kind": "outcome", "schema_version": 1, "decision_id": f"d{i}", "outcome": i % 4 == 0}
            for i in range(200)
        ]
        html, out = tmp_path / "r.html", tmp_path / "r.json"
        log = _write(tmp_path / "o.jsonl", records)
        assert _run([log, "--baseline", baseline_file, "--json", out, "--html", html, "-q"]) == 0
        report = json.loads(out.read_text())
        q = report["outcomes"]["by_served_by"]
        assert q["primary"] == {"n": 100, "mean": 0.5}
        assert q["rules"] == {"n": 100, "mean": 0.0}
        assert html.read_text().count("<svg") == chart_count(report) == len(NAMES) + 2


class TestCli:
    """Exit codes, the JSON contract and the HTML file."""

    def test_exit_codes(
        self, baseline_file: Path, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """0 clean, 1 when the gate trips, 2 for unreadable logs, baselines or bad options."""
        clean = _write(
            tmp_path / "c.jsonl", [_decision(i, r) for i, r in enumerate(_rows(3000, 9))]
        )
        drifted = _write(tmp_path / "d.jsonl", [_decision(i, r) for i, r in enumerate(serving)])
        assert _run([clean, "--baseline", baseline_file, "--fail-on", "moderate", "-q"]) == 0
        assert _run([drifted, "--baseline", baseline_file, "-q"]) == 0  # no gate asked for
        assert _run([drifted, "--baseline", baseline_file, "--fail-on", "major", "-q"]) == 1
        assert _run([drifted, "--baseline", baseline_file, "--fail-share", "0.5", "-q"]) == 0
        assert _run([drifted, "--baseline", baseline_file, "--fail-share", "0.3", "-q"]) == 1
        assert _run([tmp_path / "missing.jsonl", "--baseline", baseline_file]) == 2
        assert _run([clean, "--baseline", tmp_path / "missing.json"]) == 2
        (tmp_path / "bad.json").write_text("{")
        assert _run([clean, "--baseline", tmp_path / "bad.json"]) == 2
        assert _run([clean, "--baseline", baseline_file, "--threshold", "psi=x"]) == 2
        with pytest.raises(SystemExit) as usage:
            _run([clean])
        assert usage.value.code == 2

    def test_json_has_the_contract_shape(
        self, baseline_file: Path, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """SPEC 5's keys are all there; thresholds can be overridden."""
        log = _write(tmp_path / "d.jsonl", [_decision(i, r) for i, r in enumerate(serving)])
        out = tmp_path / "r.json"
        argv = [log, "--baseline", baseline_file, "--json", out, "--method", "psi", "-q"]
        assert _run([*argv, "--threshold", "psi=5,6"]) == 0
        report = json.loads(out.read_text())
        keys = {"name", "kind", "n", "psi", "js", "ks", "linf", "null_rate_delta"}
        keys |= {"out_of_range_rate", "severity"}
        assert all(keys <= f.keys() for f in report["features"])
        assert all(f["severity"] == "none" for f in report["features"])
        assert {"calls", "degraded", "rate", "by_reason", "by_fallback", "by_time"} <= report[
            "degradation"
        ].keys()
        assert "features_degraded_vs_healthy" in report["degradation"]
        assert isinstance(report["skipped"], int)

    def test_html_is_self_contained_with_one_chart_per_feature_and_the_timeline(
        self, baseline: Baseline, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """No network reference; N feature histograms plus the degradation timeline."""
        records = [_decision(i, r, degraded=i % 3 == 0) for i, r in enumerate(serving)]
        report = analyze([_write(tmp_path / "d.jsonl", records)], baseline)
        html = render_html(report)
        assert not re.search(r"(src|href)\s*=\s*['\"]?\s*(https?:)?//", html)
        assert "http://" not in html
        assert "https://" not in html
        assert html.count("<svg") == len(NAMES) + 1 == chart_count(report)
        # two series per histogram (reference, serving); the timeline: degraded and timeout
        assert html.count("data-series='2'") == len(NAMES) + 1
        assert html.count("<g class='series'") == 2 * len(NAMES) + 2

    def test_terminal_summary_names_top_features_and_reasons(
        self,
        baseline_file: Path,
        serving: list[dict[str, Any]],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The summary lists drifted features first and degradation by reason."""
        records = [_decision(i, r, degraded=i % 3 == 0) for i, r in enumerate(serving)]
        assert _run([_write(tmp_path / "d.jsonl", records), "--baseline", baseline_file]) == 0
        text = capsys.readouterr().out
        table = [line.split()[0] for line in text.splitlines() if re.match(r"  f\d ", line)]
        assert set(table[:3]) == set(SHIFTED)
        assert "by reason: timeout 1667" in text


def test_p_values_are_null_without_scipy(
    baseline: Baseline,
    serving: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """scipy is optional at run time: statistics and severities stay, p-values become null."""
    import sys

    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    log = _write(tmp_path / "d.jsonl", [_decision(i, r) for i, r in enumerate(serving)])
    report = analyze([log], baseline, method="ks")
    assert all(f["p_value"] is None for f in report["features"])
    assert {f["name"] for f in report["features"] if f["severity"] != "none"} == set(SHIFTED)


class TestExactStatistics:
    """Logged inputs are exact serving values: KS and Wasserstein are computed from them."""

    @pytest.mark.parametrize(
        ("draw", "seed"), [("lognormal", 0), ("lognormal", 1), ("normal", 2), ("integers", 3)]
    )
    def test_wasserstein_from_inputs_matches_scipy_on_the_raw_values(
        self, draw: str, seed: int, tmp_path: Path
    ) -> None:
        """Against scipy's two-sample W1 on the raw training values: within 0.01 (the 10-bin
        estimate from profiles is off by up to 0.1 on a heavy tail)."""
        rng = np.random.default_rng(seed)

        def sample(n: int) -> np.ndarray:
            if draw == "lognormal":
                return rng.lognormal(3.5, 1.3, n)
            if draw == "integers":
                return rng.integers(0, 24, n).astype(float)
            return rng.normal(0, 1, n)

        train, served = sample(5000), sample(300)
        b = Baseline.from_data({"x": train})
        log = _write(
            tmp_path / "x.jsonl", [_decision(i, {"x": float(v)}) for i, v in enumerate(served)]
        )
        (x,) = analyze([log], b)["features"]
        expected = stats.wasserstein_distance(train, served) / train.std()
        assert x["exact"] is True
        assert x["wasserstein"] == pytest.approx(expected, abs=0.01)
        # the reference CDF is known at its quantiles: exact to one quantile step
        assert x["ks"] <= stats.ks_2samp(train, served).statistic + 1 / QUANTILES

    def test_values_beyond_the_training_range_count_their_whole_distance(
        self, tmp_path: Path
    ) -> None:
        """A shift past the maximum is measured, not clipped into the last bin."""
        rng = np.random.default_rng(4)
        train = rng.uniform(0, 1, 4000)
        b = Baseline.from_data({"x": train})
        served = train[:1000] + 5.0
        log = _write(tmp_path / "x.jsonl", [_decision(i, {"x": v}) for i, v in enumerate(served)])
        (x,) = analyze([log], b)["features"]
        expected = stats.wasserstein_distance(train, served) / train.std()
        assert x["wasserstein"] == pytest.approx(expected, rel=0.01)
        assert x["ks"] == pytest.approx(1.0)

    def test_profiles_and_old_baselines_stay_binned(
        self, baseline: Baseline, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """Profiles hold bin counts only; a baseline without quantiles bins inputs too."""
        profiles = [_profile(baseline, serving[i : i + 1000], i) for i in range(0, 5000, 1000)]
        report = analyze([_write(tmp_path / "p.jsonl", profiles)], baseline)
        assert not any(f["exact"] for f in report["features"])
        raw = baseline.model_dump()
        for f in raw["features"].values():
            f["quantiles"] = []
        old = Baseline.model_validate(raw)
        log = _write(tmp_path / "d.jsonl", [_decision(i, r) for i, r in enumerate(serving)])
        report = analyze([log], old)
        assert not any(f["exact"] for f in report["features"])
        assert {f["name"] for f in report["features"] if f["severity"] != "none"} == set(SHIFTED)


class TestWhy:
    """The statistic that set a feature's severity is on screen, in the JSON and the HTML."""

    def test_why_names_the_deciding_statistic_with_value_and_threshold(
        self,
        baseline_file: Path,
        serving: list[dict[str, Any]],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A Wasserstein-decided feature shows its w1 column and `wasserstein X >= 0.1`."""
        log = _write(tmp_path / "d.jsonl", [_decision(i, r) for i, r in enumerate(serving)])
        out, html = tmp_path / "r.json", tmp_path / "r.html"
        assert _run([log, "--baseline", baseline_file, "--json", out, "--html", html]) == 0
        text = capsys.readouterr().out
        report = json.loads(out.read_text())
        f2 = next(f for f in report["features"] if f["name"] == "f2")
        assert f2["method"] == "wasserstein"
        assert re.fullmatch(r"wasserstein [\d.]+ >= 0\.[12]", f2["why"])
        assert " w1 " in text.splitlines()[2]
        row = next(line for line in text.splitlines() if line.startswith("  f2 "))
        assert f"{f2['wasserstein']:.3f}" in row
        assert f2["why"] in row
        assert "why (the deciding statistic)" in html.read_text()
        assert f2["why"].replace(">", "&gt;") in html.read_text()

    def test_a_null_rate_change_names_itself(self, baseline: Baseline, tmp_path: Path) -> None:
        """When the null rate sets the severity, `why` says so, not the headline test."""
        rows = _rows(2000, seed=8)
        for r in rows[:1000]:
            r["f1"] = None
        report = analyze(
            [_write(tmp_path / "n.jsonl", [_decision(i, r) for i, r in enumerate(rows)])],
            baseline,
        )
        f1 = next(f for f in report["features"] if f["name"] == "f1")
        assert f1["severity"] == "major"
        assert f1["why"] == "null rate delta 0.5 >= 0.2"


class TestReadingOnce:
    """A record is counted once; profiles of another baseline are named as such."""

    def test_the_same_log_twice_counts_once(
        self, baseline: Baseline, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """Given twice, a log gives the report of once; the repeats are counted as duplicates."""
        records = [_decision(i, r, degraded=i % 5 == 0) for i, r in enumerate(serving[:1000])]
        records += [_profile(baseline, serving[:1000], 0)]
        records[-1]["policy"] = "other"
        log = _write(tmp_path / "d.jsonl", records)
        once, twice = analyze([log], baseline), analyze([log, log], baseline)
        assert twice["features"] == once["features"]
        assert twice["degradation"] == once["degradation"]
        assert twice["records"] == once["records"]
        assert twice["skipped_by"] == {"duplicate": 1001}

    def test_outcomes_join_duplicated_decisions_once(
        self, baseline: Baseline, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """The outcome join reads each decision once too."""
        records: list[Any] = [_decision(i, r) for i, r in enumerate(serving[:10])]
        records += [
            {"kind": "outcome", "schema_version": 1, "decision_id": f"d{i}", "outcome": 1}
            for i in range(10)
        ]
        log = _write(tmp_path / "o.jsonl", records)
        outcomes = analyze([log, log], baseline)["outcomes"]
        assert outcomes["by_served_by"]["primary"] == {"n": 10, "mean": 1.0}

    def test_a_profile_of_another_baseline_is_skipped_not_malformed(
        self, baseline: Baseline, serving: list[dict[str, Any]], tmp_path: Path
    ) -> None:
        """Bins that differ: its counts are left out, its calls still count; said in words."""
        other = Baseline.from_data(
            {n: np.random.default_rng(9).normal(0, 1, 1000) for n in NAMES}, bins=4
        )
        records = [_profile(baseline, serving[:1000], 0), _profile(other, serving[1000:1500], 60)]
        records[1]["id"] = "p-other"
        log = _write(tmp_path / "p.jsonl", records)
        report = analyze([log], baseline)
        assert report["skipped"] == 0
        assert report["profiles_other_baseline"] == 1
        assert {f["n"] for f in report["features"]} == {1000}
        assert report["degradation"]["calls"] == 1500

    def test_the_cli_says_another_baseline(
        self,
        baseline: Baseline,
        baseline_file: Path,
        serving: list[dict[str, Any]],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """The terminal names the cause in words, never "malformed"."""
        other = Baseline.from_data({n: np.arange(100.0) for n in NAMES}, bins=4)
        log = _write(tmp_path / "p.jsonl", [_profile(other, serving[:100], 0)])
        assert _run([log, "--baseline", baseline_file, "-q"]) == 0
        err = capsys.readouterr().err
        assert "1 profile record(s) made against another baseline (bins differ): skipped" in err
        assert "malformed" not in err


class TestNothingToJudge:
    """A gate that judged nothing does not pass; -q still says why a gate tripped."""

    def test_an_empty_log_exits_2(
        self, baseline_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        assert _run([empty, "--baseline", baseline_file, "--fail-on", "major"]) == 2
        assert "nothing to judge: no decision or profile records" in capsys.readouterr().err

    def test_a_policy_with_no_records_names_the_policies_there_are(
        self,
        baseline_file: Path,
        serving: list[dict[str, Any]],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """--policy frad (a typo) exits 2 and lists the log's policies."""
        log = _write(tmp_path / "d.jsonl", [_decision(i, r) for i, r in enumerate(serving[:50])])
        assert _run([log, "--baseline", baseline_file, "--policy", "frad", "-q"]) == 2
        err = capsys.readouterr().err
        assert "for policy 'frad'" in err
        assert "policies in the logs: fraud" in err
        assert _run([log, "--baseline", baseline_file, "--policy", "fraud", "-q"]) == 0

    def test_a_gate_with_no_feature_values_exits_2(
        self,
        baseline_file: Path,
        serving: list[dict[str, Any]],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Decisions without inputs and no profiles: the report runs, a gate cannot pass."""
        records = [_decision(i, r) for i, r in enumerate(serving[:50])]
        for r in records:
            del r["inputs"]
        log = _write(tmp_path / "d.jsonl", records)
        assert _run([log, "--baseline", baseline_file, "-q"]) == 0
        assert _run([log, "--baseline", baseline_file, "--fail-on", "major", "-q"]) == 2
        assert "no feature has serving values" in capsys.readouterr().err

    def test_quiet_still_says_why_the_gate_tripped(
        self,
        baseline_file: Path,
        serving: list[dict[str, Any]],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """-q prints nothing on stdout but one line on stderr naming the features."""
        log = _write(tmp_path / "d.jsonl", [_decision(i, r) for i, r in enumerate(serving)])
        assert _run([log, "--baseline", baseline_file, "--fail-on", "major", "-q"]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        (line,) = captured.err.splitlines()
        assert line.startswith("safeserve skew: gate tripped: ")
        assert all(name in line for name in SHIFTED)
        assert "--fail-on major" in line
        assert _run([log, "--baseline", baseline_file, "--fail-share", "0.3", "-q"]) == 1
        assert "30% of features drifted (--fail-share 0.3)" in capsys.readouterr().err

"""The skew report on logs written by real guards: redacted and hashed features are never
judged, and drill calls count as calls the way `stats()` counts them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safeserve as ss
from safeserve.baseline import Baseline
from safeserve.skew import analyze
from safeserve.skew_cli import add_skew_parser

COUNTRIES = ["US", "GB", "DE", "FR"]


def _run(argv: list[Any]) -> int:
    parser = argparse.ArgumentParser(prog="safeserve")
    add_skew_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["skew", *map(str, argv)])
    code: int = args.handler(args)
    return code


def _transactions(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "amount": float(rng.lognormal(3.5, 1.3)),
            "country": str(rng.choice(COUNTRIES, p=[0.5, 0.2, 0.2, 0.1])),
            "card_number": f"4242-4242-{int(rng.integers(10_000)):04d}",
            "hour": int(rng.integers(0, 24)),
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def baseline() -> Baseline:
    return Baseline.from_data(_transactions(5000, seed=1))


def _serve(
    log: Path,
    baseline: Baseline,
    *,
    profile: bool,
    calls: int = 300,
    drills: int = 0,
    name: str = "fraud",
) -> dict[str, Any]:
    """`calls` transactions drawn like training through a guard that redacts card_number and
    hashes country, then `drills` calls inside a drill; returns the guard's stats()."""
    policy = ss.Policy(
        name=name,
        validation=ss.ValidationConfig(baseline=baseline, profile=profile, on_invalid="flag"),
        fallbacks=[ss.Fallback.static("static", {"label": "review"})],
        log=ss.DecisionLogConfig(
            sink=str(log), sample_rate=1.0, redact=["card_number"], hash=["country"]
        ),
    )
    predict = ss.guard(policy)(lambda x: {"label": "ok"})
    rows = _transactions(calls + drills, seed=2)
    for x in rows[:calls]:
        predict(x)
    with ss.force_degradation(reason="timeout", policy=name):
        for x in rows[calls:]:
            predict(x)
    ss.flush_logs()
    stats: dict[str, Any] = predict.stats()
    return stats


class TestRedactedAndHashed:
    """Features the log cannot show are listed as not compared, never as drift."""

    @pytest.mark.parametrize("profile", [False, True], ids=["inputs", "profiles"])
    def test_not_compared_and_the_gate_passes(
        self,
        baseline: Baseline,
        tmp_path: Path,
        profile: bool,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Data drawn like training: no drift; card_number and country are not compared."""
        log = tmp_path / "decisions.jsonl"
        _serve(log, baseline, profile=profile)
        text = log.read_text()
        assert "4242-4242" not in text  # the guard did redact
        report = analyze([log], baseline)
        by_name = {f["name"]: f for f in report["features"]}
        for name in ("card_number", "country"):
            assert by_name[name]["compared"] is False
            assert by_name[name]["not_compared"] == "redacted/hashed in the log"
            assert by_name[name]["severity"] == "none"
        assert {f["name"] for f in report["features"] if f["severity"] != "none"} == set()
        assert report["not_compared"] == [
            {"name": "country", "reason": "redacted/hashed in the log"},
            {"name": "card_number", "reason": "redacted/hashed in the log"},
        ]
        ranked = report["degradation"]["features_degraded_vs_healthy"]
        assert {r["name"] for r in ranked} <= {"amount", "hour"}
        baseline_file = tmp_path / "b.json"
        baseline.save(baseline_file)
        capsys.readouterr()
        assert _run([log, "--baseline", baseline_file, "--fail-on", "moderate"]) == 0
        out = capsys.readouterr().out
        assert "not compared (redacted/hashed in the log): card_number, country" in out
        assert not any(line.startswith("  country ") for line in out.splitlines())

    def test_profiles_list_what_they_leave_out(self, baseline: Baseline, tmp_path: Path) -> None:
        """A profile record names the features it did not profile."""
        log = tmp_path / "decisions.jsonl"
        _serve(log, baseline, profile=True, calls=20)
        profiles = [
            r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "profile"
        ]
        assert profiles
        assert all(p["redacted_or_hashed"] == ["card_number", "country"] for p in profiles)
        assert all(set(p["features"]) == {"amount", "hour"} for p in profiles)

    def test_a_policy_that_logs_a_feature_plainly_is_still_judged(
        self, baseline: Baseline, tmp_path: Path
    ) -> None:
        """Redaction is per policy: another policy's plain values of the feature are compared."""
        hashed = tmp_path / "hashed.jsonl"
        _serve(hashed, baseline, profile=False, calls=50)
        plain = tmp_path / "plain.jsonl"
        rows = _transactions(2000, seed=3)
        plain.write_text(
            "".join(
                json.dumps(
                    {
                        "kind": "decision",
                        "schema_version": 1,
                        "id": f"plain{i}",
                        "ts": "2026-01-01T00:00:00+00:00",
                        "policy": "other",
                        "degraded": False,
                        "reasons": [],
                        "inputs": {**x, "country": "BR"},
                    }
                )
                + "\n"
                for i, x in enumerate(rows)
            )
        )
        report = analyze([hashed, plain], baseline)
        country = next(f for f in report["features"] if f["name"] == "country")
        assert country["compared"] is True
        assert country["n"] == 2000  # only the plain policy's values
        assert country["severity"] == "major"  # all "BR": real drift, still found

    def test_a_category_list_of_hex_strings_is_data(self, tmp_path: Path) -> None:
        """Where the training values themselves look like hashes, they are compared."""
        rng = np.random.default_rng(5)
        ids = [f"{i:032x}" for i in range(5)]
        b = Baseline.from_data({"device": list(rng.choice(ids, 2000))})
        log = tmp_path / "d.jsonl"
        log.write_text(
            "".join(
                json.dumps(
                    {
                        "kind": "decision",
                        "schema_version": 1,
                        "id": f"d{i}",
                        "ts": "2026-01-01T00:00:00+00:00",
                        "policy": "p",
                        "degraded": False,
                        "reasons": [],
                        "inputs": {"device": str(v)},
                    }
                )
                + "\n"
                for i, v in enumerate(rng.choice(ids, 500))
            )
        )
        (device,) = analyze([log], b)["features"]
        assert device["compared"] is True
        assert device["severity"] == "none"


def _decisions(path: Path, inputs: list[dict[str, Any]]) -> Path:
    path.write_text(
        "".join(
            json.dumps(
                {
                    "kind": "decision",
                    "schema_version": 1,
                    "id": f"{path.stem}{i}",
                    "ts": "2026-01-01T00:00:00+00:00",
                    "policy": "p",
                    "degraded": False,
                    "reasons": [],
                    "inputs": x,
                }
            )
            + "\n"
            for i, x in enumerate(inputs)
        )
    )
    return path


class TestMarkers:
    """Redaction markers and hash formats in values; keys missing from only some inputs."""

    def test_markers_and_bracketed_hashes_are_not_compared(
        self, baseline: Baseline, tmp_path: Path
    ) -> None:
        rows = _transactions(400, seed=6)
        for x in rows:
            x["card_number"] = "[redacted]"
            x["country"] = f"[hash:{'ab12' * 8}]"
        report = analyze([_decisions(tmp_path / "m.jsonl", rows)], baseline)
        assert {f["name"] for f in report["features"] if not f["compared"]} == {
            "card_number",
            "country",
        }
        assert all(f["severity"] == "none" for f in report["features"] if not f["compared"])

    def test_a_key_missing_from_some_inputs_is_still_judged_as_nulls(
        self, baseline: Baseline, tmp_path: Path
    ) -> None:
        """Only a key no logged input holds is taken for redacted; one that comes and goes is
        data (nulls), and a null-rate jump is drift."""
        rows = _transactions(400, seed=7)
        for x in rows[:200]:
            del x["hour"]
        report = analyze([_decisions(tmp_path / "k.jsonl", rows)], baseline)
        hour = next(f for f in report["features"] if f["name"] == "hour")
        assert hour["compared"] is True
        assert hour["null_rate"] == pytest.approx(0.5)
        assert hour["severity"] == "major"


class TestDrillCalls:
    """Drill calls skip profiling; the report still counts them, as stats() does."""

    def test_the_report_counts_the_calls_stats_counts(
        self, baseline: Baseline, tmp_path: Path
    ) -> None:
        log = tmp_path / "decisions.jsonl"
        stats = _serve(log, baseline, profile=True, calls=200, drills=50, name="drilled")
        d = analyze([log], baseline)["degradation"]
        assert stats["calls"] == 250
        assert d["calls"] == stats["calls"]
        assert d["calls_source"] == "profiles"
        assert d["degraded"] == stats["degraded"]
        assert d["by_reason"]["forced"] == 50
        assert sum(b["calls"] for b in d["by_time"]) == stats["calls"]

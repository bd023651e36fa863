"""`safeserve demo` runs end to end, in-process and as a command, and writes a valid log."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from safeserve.cli import main
from safeserve.demo import LOG_NAME, PHASES

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("kind", "schema_version", "policy")
DECISION_REQUIRED = ("served_by", "reasons")


def _records(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines, "the decision log is empty"
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, Path]:
    """One in-process run of the demo: exit code, printed output, output directory."""
    out = tmp_path_factory.mktemp("demo")
    capture = tmp_path_factory.mktemp("stdout") / "out.txt"
    with capture.open("w", encoding="utf-8") as stream, contextlib.redirect_stdout(stream):
        code = main(["demo", "--out", str(out), "--seed", "3"])
    return code, capture.read_text(encoding="utf-8"), out


class TestDemoInProcess:
    """`main(["demo", ...])` called from Python."""

    def test_exits_zero(self, demo_run: tuple[int, str, Path]) -> None:
        """The demo reports success."""
        assert demo_run[0] == 0

    def test_log_has_one_valid_record_per_line(self, demo_run: tuple[int, str, Path]) -> None:
        """Every line is a JSON record with the contract's fields."""
        records = _records(demo_run[2] / LOG_NAME)
        for record in records:
            assert all(key in record for key in REQUIRED), record
            assert record["policy"] == "fraud"
            if record["kind"] == "decision":
                assert all(key in record for key in DECISION_REQUIRED), record
        assert any(r["kind"] == "decision" for r in records)

    def test_output_names_fallbacks_and_reasons(self, demo_run: tuple[int, str, Path]) -> None:
        """The summary names every fallback that served and every reason in the log."""
        _, output, out = demo_run
        decisions = [r for r in _records(out / LOG_NAME) if r["kind"] == "decision"]
        served = {r["served_by"] for r in decisions} - {"primary", None}
        codes = {reason["code"] for r in decisions for reason in r["reasons"]}
        assert served, "no fallback served in the demo"
        assert {"breaker_open", "invalid_input", "timeout", "error"} <= codes
        summary = output[output.index("summary") :]
        for name in served:
            assert name in summary
        for code in codes:
            assert code in summary
        assert str(out / LOG_NAME) in summary

    def test_every_phase_appears(self, demo_run: tuple[int, str, Path]) -> None:
        """Each phase has its row in the table."""
        rows = demo_run[1].splitlines()
        for phase in PHASES:
            assert any(row.startswith(phase.name + " ") for row in rows), phase.name

    def test_card_numbers_never_reach_the_log(self, demo_run: tuple[int, str, Path]) -> None:
        """The redacted field is absent from every record."""
        assert "4242-4242" not in (demo_run[2] / LOG_NAME).read_text(encoding="utf-8")


def test_demo_runs_as_a_module(tmp_path: Path) -> None:
    """`python -m safeserve.cli demo --out DIR` exits 0 and writes the log."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "safeserve.cli", "demo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert _records(tmp_path / LOG_NAME)
    assert "summary" in proc.stdout


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse rejects it with exit code 2 and a usage line."""
    assert main(["no-such-command"]) == 2
    assert "usage: safeserve" in capsys.readouterr().err


def test_an_unknown_option_is_reported_with_its_subcommands_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The usage shown is the subcommand's, which lists the options it does take."""
    assert main(["check", "--bogus", "policies.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: safeserve check ")
    assert "safeserve check: error: unrecognized arguments: --bogus" in err


def test_an_unknown_option_before_the_subcommand_is_reported_by_safeserve(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An option on `safeserve`'s part of the line is not blamed on the subcommand."""
    assert main(["--bogus", "check", "policies.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: safeserve [-h]")
    assert "safeserve: error: unrecognized arguments: --bogus" in err
    assert main(["--bogus", "demo", "check"]) == 2  # one of each: the first part's is reported
    assert "safeserve: error: unrecognized arguments: --bogus\n" in capsys.readouterr().err


def test_a_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    """Running `safeserve` alone is a usage error too."""
    assert main([]) == 2
    assert "usage: safeserve" in capsys.readouterr().err

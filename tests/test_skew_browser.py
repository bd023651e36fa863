"""The skew report as a person sees it: the demo's HTML opened in a real headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from safeserve.baseline import Baseline
from safeserve.cli import main
from safeserve.skew import analyze
from safeserve.skew_report import chart_count

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    """Debian's Chromium (installed by ./scripts/test); a missing browser fails, never skips."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise RuntimeError("chromium is not installed: `apt-get install chromium`")
    return found


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def test_charts_render_in_chromium(demo_out: Path, tmp_path: Path) -> None:
    """Chromium's rendered DOM holds every chart with its series, and the page is not blank."""
    html = demo_out / "skew.html"
    report = analyze([demo_out / "decisions.jsonl"], Baseline.load(demo_out / "baseline.json"))
    dom = run_chromium(tmp_path, "--dump-dom", html.as_uri()).stdout
    charts = re.findall(r"<svg[^>]*class=\"chart\"[^>]*data-series=\"(\d+)\"", dom)
    assert len(charts) == chart_count(report)
    series = dom.count('class="series"')
    assert series == sum(int(n) for n in charts)
    assert all(int(n) >= 1 for n in charts)

    shot = tmp_path / "report.png"
    run_chromium(tmp_path, "--window-size=1200,1600", f"--screenshot={shot}", html.as_uri())
    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None
    # text, tables and filled bars: a rendered report has many colours, a blank page one
    assert len(colors) > 50
    non_white = sum(n for n, rgb in colors if rgb != (255, 255, 255))
    assert non_white > 0.05 * image.width * image.height


def test_report_is_self_contained(demo_out: Path) -> None:
    """No script, stylesheet or image is fetched from anywhere."""
    text = (demo_out / "skew.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", text)
    assert "<script" not in text.lower() or "src=" not in text.lower()

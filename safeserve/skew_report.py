"""The skew report as one self-contained HTML file: inline SVG charts, inline CSS, no script,
no network. Charts: each feature's reference vs serving distribution, the degradation rate
over time by reason, and quality by `served_by` when outcomes were logged. Every chart is an
`<svg class="chart" data-series="N">` whose series are `<g class="series">` groups, so a test
(or a headless browser) can check what rendered.
"""

from __future__ import annotations

import itertools
from html import escape
from typing import Any

__all__ = ["chart_count", "render_html"]

_COLORS = ("#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#9d755d")
_SEVERITY_COLORS = {"none": "#54a24b", "moderate": "#eeca3b", "major": "#e45756"}
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 8px;border-bottom:1px solid #eee;
text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.sev{padding:1px 6px;border-radius:3px}.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #eee;padding:6px}figcaption{font-size:12px;color:#555}
.legend span{margin-right:10px;font-size:12px}.muted{color:#777}
"""


def chart_count(report: dict[str, Any]) -> int:
    """How many `<svg>` charts `render_html(report)` draws."""
    timeline = 1 if report["degradation"]["by_time"] else 0
    return len(_compared(report)) + timeline + (1 if _outcome_groups(report) else 0)


def _compared(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The features compared with the baseline (not the redacted or hashed ones), ranked."""
    return sorted((f for f in report["features"] if f.get("compared", True)), key=rank_key)


def render_html(report: dict[str, Any], title: str = "safeserve skew report") -> str:
    """The whole report as an HTML document (a string; write it with UTF-8)."""
    ranked = _compared(report)
    d = report["degradation"]
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}"
        f"</title><style>{_CSS}</style></head><body><h1>{escape(title)}</h1>",
        _summary(report),
        "<h2>Features, most drifted first</h2>",
        _feature_table(ranked),
        _not_compared(report),
        "<h2>Degradation</h2>",
        _degradation(d),
        "<h2>Reference vs serving distributions</h2><div class='grid'>",
        *(_histogram(f) for f in ranked),
        "</div>",
    ]
    groups = _outcome_groups(report)
    if groups:
        parts += ["<h2>Quality by served_by (outcomes joined by decision id)</h2>"]
        parts += [_bars(groups, "mean outcome")]
    parts.append("</body></html>")
    return "".join(parts)


def rank_key(f: dict[str, Any]) -> tuple[int, float, str]:
    """Most severe first, then by the headline statistic (a p-value test by its effect size)."""
    order = {"major": 0, "moderate": 1, "none": 2}[f["severity"]]
    head = {"chi2": "linf"}.get(f["method"], f["method"])
    value = f.get(head)
    return order, -(value if isinstance(value, int | float) else 0.0), f["name"]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "<span class='muted'>-</span>"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    return escape(str(value))


def _summary(report: dict[str, Any]) -> str:
    sev = dict.fromkeys(("major", "moderate", "none"), 0)
    for f in report["features"]:
        sev[f["severity"]] += 1
    owners = "".join(
        f"<li><b>{escape(o)}</b>: {escape(', '.join(names))}</li>"
        for o, names in report["by_owner"].items()
    )
    d = report["degradation"]
    rate = f"{d['rate']:.1%}" if d["rate"] is not None else "-"
    return (
        f"<p>{len(report['features'])} features: <b>{sev['major']} major</b>, "
        f"{sev['moderate']} moderate, {sev['none']} none (method {escape(report['method'])}). "
        f"Degraded calls: {d['degraded']} of {d['calls']} ({rate}, calls counted from "
        f"{escape(d['calls_source'])}). Skipped log lines: {report['skipped']}.</p>"
        + (f"<p>Drifted features by owner:</p><ul>{owners}</ul>" if owners else "")
    )


def _not_compared(report: dict[str, Any]) -> str:
    items = [f for f in report["features"] if not f.get("compared", True)]
    if not items:
        return ""
    cells = "".join(
        f"<li>{escape(f['name'])}: not compared ({escape(f['not_compared'])})</li>" for f in items
    )
    return f"<p>Not compared with the baseline, never counted as drift:</p><ul>{cells}</ul>"


def _feature_table(ranked: list[dict[str, Any]]) -> str:
    cols = ("psi", "js", "ks", "wasserstein", "linf", "p_value")
    head = "".join(f"<th>{c}</th>" for c in cols)
    rows = []
    for f in ranked:
        color = _SEVERITY_COLORS[f["severity"]]
        source = f["source"] + (" (exact)" if f.get("exact") else "")
        cells = "".join(f"<td>{_fmt(f.get(c))}</td>" for c in cols)
        rows.append(
            f"<tr><td>{escape(f['name'])}</td><td>{f['kind']}</td><td>{f['n']}</td>{cells}"
            f"<td>{_fmt(f['null_rate_delta'])}</td><td>{_fmt(f['out_of_range_rate'])}</td>"
            f"<td>{escape(f['method'])}</td><td><span class='sev' style='background:{color}'>"
            f"{f['severity']}</span></td><td>{escape(f.get('why') or '-')}</td>"
            f"<td>{escape(f['owner'] or '-')}</td><td>{escape(source)}</td></tr>"
        )
    return (
        f"<table><tr><th>feature</th><th>kind</th><th>n</th>{head}<th>null rate &Delta;</th>"
        "<th>out of range</th><th>test</th><th>severity</th><th>why (the deciding statistic)</th>"
        "<th>owner</th><th>source</th></tr>" + "".join(rows) + "</table>"
    )


def _degradation(d: dict[str, Any]) -> str:
    def counts(title: str, items: dict[str, int]) -> str:
        cells = "".join(f"<tr><td>{escape(k)}</td><td>{v}</td></tr>" for k, v in items.items())
        return f"<table><tr><th>{title}</th><th>calls</th></tr>{cells}</table>"

    diff = "".join(
        f"<tr><td>{escape(r['name'])}</td><td>{_fmt(r['js'])}</td><td>{_fmt(r['psi'])}</td>"
        f"<td>{_fmt(r['null_rate_degraded'])}</td><td>{_fmt(r['null_rate_healthy'])}</td>"
        f"<td>{r['n_degraded']}</td><td>{r['n_healthy']}</td></tr>"
        for r in d["features_degraded_vs_healthy"]
    )
    return (
        "<div class='grid'>"
        + counts("reason", d["by_reason"])
        + counts("served by (degraded)", d["by_fallback"])
        + "</div>"
        + (_timeline(d["by_time"]) if d["by_time"] else "")
        + "<p>Features that differ most between degraded and healthy calls:</p>"
        + "<table><tr><th>feature</th><th>JS</th><th>PSI</th><th>null rate (degraded)</th>"
        + f"<th>null rate (healthy)</th><th>n degraded</th><th>n healthy</th></tr>{diff}</table>"
    )


def _svg(width: int, height: int, series: int, body: str, label: str) -> str:
    return (
        f"<svg class='chart' data-series='{series}' "
        f"width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' "
        f"aria-label='{escape(label)}'>{body}</svg>"
    )


def _histogram(f: dict[str, Any]) -> str:
    """Grouped bars: the baseline's share per bin (blue) and serving's (orange)."""
    bins = f["bins"]
    reference = [float(x) for x in bins["reference"]]
    total = sum(bins["serving"])
    serving = [c / total if total else 0.0 for c in bins["serving"]]
    labels = _bin_labels(bins)
    w, h, pad = 360, 180, 24
    k = max(len(reference), 1)
    top = max([*reference, *serving, 1e-9])
    slot = (w - 2 * pad) / k
    series = []
    scale = (h - 2 * pad) / top
    for s, (values, color) in enumerate(((reference, _COLORS[0]), (serving, _COLORS[1]))):
        rects = "".join(
            f"<rect x='{pad + i * slot + s * slot / 2:.1f}' y='{h - pad - v * scale:.1f}'"
            f" width='{slot / 2 - 1:.1f}' height='{v * scale:.1f}' fill='{color}'>"
            f"<title>{escape(labels[i])}: {v:.3f}</title></rect>"
            for i, v in enumerate(values)
        )
        series.append(f"<g class='series' data-name='{('reference', 'serving')[s]}'>{rects}</g>")
    axis = f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='#999'/>"
    text = (
        f"<text x='{pad}' y='14' font-size='12'>{escape(f['name'])} ({f['severity']}, "
        f"{escape(f['method'])})</text>"
        f"<text x='{pad}' y='{h - 6}' font-size='10' fill='#555'>{escape(labels[0])}</text>"
        f"<text x='{w - pad}' y='{h - 6}' font-size='10' fill='#555' text-anchor='end'>"
        f"{escape(labels[-1])}</text>"
    )
    chart = _svg(w, h, 2, axis + "".join(series) + text, f"{f['name']} distribution")
    legend = (
        f"<span style='color:{_COLORS[0]}'>&#9632; reference</span>"
        f"<span style='color:{_COLORS[1]}'>&#9632; serving</span>"
    )
    return f"<figure>{chart}<figcaption class='legend'>{legend}</figcaption></figure>"


def _bin_labels(bins: dict[str, Any]) -> list[str]:
    if "categories" in bins:
        return [*map(str, bins["categories"]), "other"]
    edges = bins["edges"]
    if len(edges) < 2:
        return [f"{edges[0]:.4g}" if edges else "-"]
    return [f"[{a:.4g}, {b:.4g})" for a, b in itertools.pairwise(edges)]


def _timeline(buckets: list[dict[str, Any]]) -> str:
    """One line per reason (calls with that reason / calls), plus the overall degraded rate."""
    reasons = sorted({r for b in buckets for r in b["by_reason"]})
    names = ["degraded", *reasons]
    w, h, pad = 760, 240, 32
    n = len(buckets)
    step = (w - 2 * pad) / max(n - 1, 1)

    def rate(b: dict[str, Any], name: str) -> float:
        count = b["degraded"] if name == "degraded" else b["by_reason"].get(name, 0)
        return min(1.0, count / b["calls"]) if b["calls"] else 0.0

    series = []
    for s, name in enumerate(names):
        pts = " ".join(
            f"{pad + i * step:.1f},{h - pad - rate(b, name) * (h - 2 * pad):.1f}"
            for i, b in enumerate(buckets)
        )
        color = "#222" if s == 0 else _COLORS[(s - 1) % len(_COLORS)]
        width = 2.5 if s == 0 else 1.5
        series.append(
            f"<g class='series' data-name='{escape(name)}'><polyline points='{pts}' fill='none'"
            f" stroke='{color}' stroke-width='{width}'><title>{escape(name)}</title></polyline>"
            f"</g>"
        )
    axes = (
        f"<line x1='{pad}' y1='{h - pad}' x2='{w - pad}' y2='{h - pad}' stroke='#999'/>"
        f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{h - pad}' stroke='#999'/>"
        f"<text x='4' y='{pad + 4}' font-size='10'>100%</text>"
        f"<text x='4' y='{h - pad}' font-size='10'>0%</text>"
        f"<text x='{pad}' y='{h - 8}' font-size='10'>{escape(buckets[0]['start'])}</text>"
        f"<text x='{w - pad}' y='{h - 8}' font-size='10' text-anchor='end'>"
        f"{escape(buckets[-1]['start'])} ({buckets[0]['seconds']} s buckets)</text>"
    )
    legend = "".join(
        f"<span style='color:{'#222' if i == 0 else _COLORS[(i - 1) % len(_COLORS)]}'>"
        f"&#9632; {escape(name)}</span>"
        for i, name in enumerate(names)
    )
    chart = _svg(w, h, len(names), axes + "".join(series), "degradation rate over time")
    return (
        f"<figure>{chart}<figcaption class='legend'>Share of calls per time bucket, by reason: "
        f"{legend}</figcaption></figure>"
    )


def _outcome_groups(report: dict[str, Any]) -> dict[str, float]:
    outcomes = report.get("outcomes") or {}
    return {
        k: v["mean"]
        for k, v in (outcomes.get("by_served_by") or {}).items()
        if v.get("mean") is not None
    }


def _bars(groups: dict[str, float], label: str) -> str:
    w, pad, row = 560, 8, 24
    h = pad * 2 + row * len(groups)
    top = max([abs(v) for v in groups.values()] + [1e-9])
    bars = "".join(
        f"<text x='{pad}' y='{pad + i * row + 16}' font-size='12'>{escape(k)}</text>"
        f"<rect x='160' y='{pad + i * row + 4}' width='{abs(v) / top * (w - 240):.1f}' height='16'"
        f" fill='{_COLORS[i % len(_COLORS)]}'><title>{escape(k)}: {v:.4g}</title></rect>"
        f"<text x='{165 + abs(v) / top * (w - 240):.1f}' y='{pad + i * row + 16}' "
        f"font-size='12'>{v:.4g}</text>"
        for i, (k, v) in enumerate(groups.items())
    )
    return _svg(w, h, 1, f"<g class='series' data-name='{escape(label)}'>{bars}</g>", label)

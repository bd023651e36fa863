"""Drift statistics between a training baseline and serving data, and their severity.

Every function takes numpy arrays and returns plain floats, so the same code serves the exact
path (raw serving values from logged inputs) and the approximate one (counts from profiles).
Conventions, chosen to match the tools users compare against:

- PSI as banks compute it: `sum((a - e) * ln(a / e))` over the bins, a zero share replaced by
  `PSI_EPS` so an empty bin costs a large but finite amount. Severity 0.1 / 0.25.
- `js`: the Jensen-Shannon *divergence*, base 2 (in [0, 1]). Its square root is the JS distance
  that Evidently thresholds at 0.1; the default thresholds here are that distance's 0.1 / 0.2,
  squared: 0.01 / 0.04.
- KS: `ks_statistic` is the exact two-sample statistic of raw values (as `scipy.stats.ks_2samp`).
  A baseline keeps bins, not values, and its CDF is known exactly only at its quantile edges, so
  KS against a baseline is taken at those edges (`ks_from_counts`): the serving side is exact
  there whether the counts come from logged inputs or profiles; between edges nothing is known
  (interpolating within the tail bins invents drift). More bins, a finer KS. p-values only when
  scipy is importable (else None).
- Wasserstein (W1), normalized by the baseline's standard deviation as Evidently does. From
  profiles: between the two binned distributions (uniform within each bin on both sides).
  From logged inputs (exact serving values, `ExactSide`), when the baseline keeps its fine
  `quantiles`: the area between the reference CDF (linear between 257 quantiles) and the serving
  values counted between those quantiles, plus the exact distance of every value beyond the
  training range. On data drawn like the training data this agrees with scipy's two-sample
  `wasserstein_distance` on the raw training values to about 1e-3; the 10-bin estimate was off
  by up to 0.1 on a heavy-tailed feature (its wide tail bin). KS from logged inputs is then taken
  at the 257 quantiles too, not only at the bin edges.
- L-infinity: the largest change of one category's share (TFDV's categorical skew measure).
- `auto` picks the headline test by reference size as Evidently does: up to 1000 reference
  rows KS (numeric) / chi-square (categorical), above that normalized Wasserstein / JS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

if TYPE_CHECKING:
    from safeserve.baseline import FeatureBaseline

__all__ = [
    "PSI_EPS",
    "SEVERITIES",
    "Counts",
    "ExactSide",
    "Method",
    "Severity",
    "Thresholds",
    "chi2_p_value",
    "evaluate_feature",
    "headline_method",
    "js_divergence",
    "ks_exact",
    "ks_from_counts",
    "ks_p_value",
    "ks_statistic",
    "level",
    "linf",
    "psi",
    "wasserstein_exact",
    "wasserstein_from_counts",
]

PSI_EPS = 1e-4
"""A bin share of 0 counts as this in PSI (the usual banking convention)."""

Severity = Literal["none", "moderate", "major"]
SEVERITIES: tuple[Severity, ...] = ("none", "moderate", "major")
Method = Literal["auto", "psi", "ks", "js", "wasserstein"]
SMALL_REFERENCE = 1000
"""Reference rows up to which `auto` uses KS / chi-square (Evidently's rule)."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """(moderate, major) levels per statistic; a value at or above a level reaches it.

    `alpha`: a test whose p-value is known and at least alpha is not significant, and its
    statistic then raises no severity (small samples). `null_rate_delta` and
    `out_of_range_rate` flag data-quality changes whatever the headline test says.
    """

    psi: tuple[float, float] = (0.1, 0.25)
    js: tuple[float, float] = (0.01, 0.04)
    ks: tuple[float, float] = (0.1, 0.2)
    wasserstein: tuple[float, float] = (0.1, 0.2)
    linf: tuple[float, float] = (0.1, 0.2)
    null_rate_delta: tuple[float, float] = (0.05, 0.2)
    out_of_range_rate: tuple[float, float] = (0.05, 0.2)
    alpha: float = 0.05


def level(value: float | None, bounds: tuple[float, float]) -> Severity:
    """The severity `value` reaches under (moderate, major) `bounds`; None reaches none."""
    if value is None or math.isnan(value):
        return "none"
    if value >= bounds[1]:
        return "major"
    return "moderate" if value >= bounds[0] else "none"


def headline_method(method: Method, kind: str, reference_n: int) -> str:
    """The statistic that decides a feature's drift: psi, ks, wasserstein, js, chi2 or linf.

    For a categorical feature, ks maps to chi2 and wasserstein to linf (their categorical
    counterparts); auto follows Evidently's choice by reference size.
    """
    numeric = kind == "numeric"
    if method == "auto":
        small = reference_n <= SMALL_REFERENCE
        if numeric:
            return "ks" if small else "wasserstein"
        return "chi2" if small else "js"
    if numeric or method in ("psi", "js"):
        return method
    return "chi2" if method == "ks" else "linf"


def _shares(counts: np.ndarray) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return c / total if total > 0 else c


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two share (or count) vectors over the same bins."""
    e = np.maximum(_shares(expected), PSI_EPS)
    a = np.maximum(_shares(actual), PSI_EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two share (or count) vectors."""
    p, q = _shares(p), _shares(q)
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return max(0.0, (kl(p) + kl(q)) / 2)


def linf(p: np.ndarray, q: np.ndarray) -> float:
    """L-infinity distance: the largest absolute change of one slot's share."""
    return float(np.max(np.abs(_shares(p) - _shares(q)))) if len(p) else 0.0


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sample KS statistic of raw values (NaNs dropped), as `scipy.stats.ks_2samp`."""
    a = np.sort(a[~np.isnan(a)])
    b = np.sort(b[~np.isnan(b)])
    if not a.size or not b.size:
        return math.nan
    both = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, both, side="right") / a.size
    cdf_b = np.searchsorted(b, both, side="right") / b.size
    return float(np.max(np.abs(cdf_a - cdf_b)))


def _reference_cdf(edges: np.ndarray, shares: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(_shares(shares))])


def ks_from_counts(expected: np.ndarray, actual: np.ndarray) -> float:
    """KS statistic evaluated at the bin edges only: a lower bound of the true one."""
    diff = np.cumsum(_shares(expected)) - np.cumsum(_shares(actual))
    return float(np.max(np.abs(diff))) if diff.size else 0.0


def wasserstein_from_counts(
    edges: np.ndarray, expected: np.ndarray, actual: np.ndarray, scale: float
) -> float:
    """W1 of two binned distributions (uniform within bins): the area between the CDFs,
    linear between the edges, divided by `scale`. Values outside the range are lost."""
    if edges.size < 2:
        return 0.0
    gap = np.abs(_reference_cdf(edges, expected) - _reference_cdf(edges, actual))
    area = float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(edges)))
    return area / (scale if scale > 0 else 1.0)


class ExactSide:
    """Exact serving values of one numeric feature, summarized against its baseline's fine
    quantile grid: counts between grid points, and the count and total distance of the values
    below the training minimum and above the maximum. Adds up across chunks, logs and policies.
    """

    __slots__ = ("_inner", "above", "above_sum", "below", "below_sum", "counts", "grid", "levels")

    def __init__(self, f: FeatureBaseline) -> None:
        q = np.asarray(f.quantiles, dtype=np.float64)
        # a repeated quantile (an atom) keeps its first level: the reference then spreads the
        # atom over the segment that starts at it, as the serving counts below do
        self.grid, first = np.unique(q, return_index=True)
        self.levels = first / (q.size - 1)
        self.levels[-1] = 1.0
        self._inner = self.grid[1:-1]
        self.counts = np.zeros(max(1, self.grid.size - 1), dtype=np.int64)
        self.below = self.above = 0
        self.below_sum = self.above_sum = 0.0

    def add(self, x: np.ndarray) -> None:
        """Count non-null float values (NaN are nulls, left out)."""
        # sorting the values and then placing the few grid points among them is 10x faster
        # than placing every value among the grid points
        x = np.sort(x[~np.isnan(x)])
        lo, hi = self.grid[0], self.grid[-1]
        first = int(np.searchsorted(x, lo, side="left"))  # values below the range
        last = int(np.searchsorted(x, hi, side="right"))  # ... and up to its end
        if first:
            self.below += first
            self.below_sum += float(first * lo - x[:first].sum())
        if last < x.size:
            self.above += x.size - last
            self.above_sum += float(x[last:].sum() - (x.size - last) * hi)
        # a value v is in segment j when inner[j - 1] <= v < inner[j] (the binning contract)
        cuts = np.searchsorted(x, self._inner, side="left")
        self.counts += np.diff(np.concatenate(([first], cuts, [last])))

    def merge(self, other: ExactSide) -> None:
        self.counts += other.counts
        self.below += other.below
        self.above += other.above
        self.below_sum += other.below_sum
        self.above_sum += other.above_sum

    @property
    def n(self) -> int:
        return int(self.counts.sum()) + self.below + self.above

    def gap(self) -> np.ndarray:
        """|F_reference - F_serving| at each grid point (both as P(X < point))."""
        cdf = (self.below + np.concatenate([[0], np.cumsum(self.counts)])) / self.n
        if self.grid.size == 1:  # a constant feature: one point, F jumps to 1 there
            cdf = np.array([self.below / self.n])
            return np.abs(cdf)
        return np.abs(self.levels - cdf)


def wasserstein_exact(side: ExactSide, scale: float) -> float:
    """W1 between the reference (its quantiles, linear between) and exact serving values, over
    `scale`: the area between the CDFs inside the training range plus every value's distance
    beyond it."""
    n = side.n
    if not n:
        return math.nan
    gap = side.gap()
    inside = float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(side.grid))) if gap.size > 1 else 0.0
    area = inside + (side.below_sum + side.above_sum) / n
    return area / (scale if scale > 0 else 1.0)


def ks_exact(side: ExactSide) -> float:
    """KS at every reference quantile (and beyond the range) from exact serving values."""
    if not side.n:
        return math.nan
    return float(max(np.max(side.gap()), side.above / side.n))


def ks_p_value(statistic: float, n: int, m: int) -> float | None:
    """Asymptotic two-sample KS p-value (scipy's `kstwobign`); None without scipy or data."""
    if not n or not m or math.isnan(statistic):
        return None
    try:
        from scipy.stats import kstwobign  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return None
    en = n * m / (n + m)
    return float(min(1.0, max(0.0, kstwobign.sf(statistic * math.sqrt(en)))))


def chi2_p_value(expected_shares: np.ndarray, observed: np.ndarray) -> float | None:
    """Chi-square goodness-of-fit p-value of observed counts against the baseline's shares
    (Evidently's categorical test for small references); None without scipy or data."""
    total = float(np.sum(observed))
    if total <= 0 or len(observed) < 2:
        return None
    try:
        from scipy.stats import chisquare  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return None
    e = np.maximum(_shares(expected_shares), PSI_EPS)
    expected = e / e.sum() * total
    return float(chisquare(np.asarray(observed, dtype=np.float64), expected).pvalue)


class Counts(Protocol):
    """Serving counts of one feature in its baseline's slots."""

    counts: np.ndarray
    nulls: int
    out_of_range: int
    n: int


def evaluate_feature(
    f: FeatureBaseline,
    serving: Counts,
    source: str,
    *,
    method: Method = "auto",
    thresholds: Thresholds | None = None,
    exact: ExactSide | None = None,
) -> dict[str, Any]:
    """One feature's drift record: every statistic that applies (None otherwise), the headline
    test, the severity and why (`flags`, and `why` naming the statistic that set it with its
    value and threshold); `source` says where the counts came from. `exact` (numeric, from
    logged inputs) gives KS and Wasserstein from exact serving values."""
    t = thresholds or Thresholds()
    numeric = f.kind == "numeric"
    reference = np.asarray(f.proportions, dtype=np.float64)
    counts = serving.counts
    present = int(counts.sum())
    out: dict[str, Any] = {
        "name": f.name,
        "kind": f.kind,
        "n": serving.n,
        "psi": None,
        "js": None,
        "ks": None,
        "linf": None,
        "null_rate_delta": None,
        "out_of_range_rate": None,
        "severity": "none",
        "wasserstein": None,
        "p_value": None,
        "method": headline_method(method, f.kind, f.count),
        "source": source,
        "owner": f.owner,
        "null_rate": serving.nulls / serving.n if serving.n else None,
        "reference_null_rate": f.null_rate,
        "reference_n": f.count,
        "flags": [],
        "why": None,
        "exact": False,
        "bins": {
            ("edges" if numeric else "categories"): f.edges if numeric else f.categories,
            "reference": f.proportions,
            "serving": counts.tolist(),
        },
    }
    if not serving.n:
        return out
    out["null_rate_delta"] = serving.nulls / serving.n - f.null_rate
    if present:
        out["psi"] = psi(reference, counts)
        out["js"] = js_divergence(reference, counts)
        if numeric:
            _numeric_stats(out, f, reference, counts, exact)
            out["out_of_range_rate"] = serving.out_of_range / present
        else:
            out["linf"] = linf(reference, counts)
            out["p_value"] = chi2_p_value(reference, counts)
    _judge(out, t)
    return out


def _numeric_stats(
    out: dict[str, Any],
    f: FeatureBaseline,
    reference: np.ndarray,
    counts: np.ndarray,
    exact: ExactSide | None,
) -> None:
    if exact is not None and exact.n:
        out["ks"] = ks_exact(exact)
        out["wasserstein"] = wasserstein_exact(exact, f.std or 0.0)
        out["exact"] = True
    else:
        edges = np.asarray(f.edges, dtype=np.float64)
        out["ks"] = ks_from_counts(reference, counts)
        out["wasserstein"] = wasserstein_from_counts(edges, reference, counts, f.std or 0.0)
    out["p_value"] = ks_p_value(out["ks"], int(counts.sum()), f.count)


def _judge(out: dict[str, Any], t: Thresholds) -> None:
    """Severity: the headline test's level (None when its p-value is not significant), raised
    by a null-rate or out-of-range change; `flags` says which statistic set it, `why` says it
    in one line with the deciding value and threshold."""
    head = out["method"]
    p = out["p_value"]
    found: list[tuple[Severity, str, str]] = []
    if head == "chi2":
        drifted = p < t.alpha if p is not None else level(out["linf"], t.linf) != "none"
        sev = level(out["linf"], t.linf)
        sev = max(sev, "moderate", key=SEVERITIES.index) if drifted else "none"
        test = f"p {_num(p)} {'<' if drifted else '>='} {t.alpha}" if p is not None else ""
        text = ", ".join(x for x in (test, _versus("linf", out["linf"], t.linf)) if x)
        found.append((sev, "chi2", f"chi2 {text}"))
    else:
        key = "wasserstein" if head == "wasserstein" else head
        value = out[key]
        sev = level(value, getattr(t, key))
        text = _versus(head, value, getattr(t, key))
        if head == "ks" and p is not None and p >= t.alpha:
            sev = "none"
            text += f", p {_num(p)} >= {t.alpha}: not significant"
        found.append((sev, head, text))
    delta = out["null_rate_delta"]
    size = abs(delta) if delta is not None else None
    found.append(
        (
            level(size, t.null_rate_delta),
            "null_rate",
            _versus("null rate delta", size, t.null_rate_delta),
        )
    )
    rate = out["out_of_range_rate"]
    found.append(
        (
            level(rate, t.out_of_range_rate),
            "out_of_range",
            _versus("out of range", rate, t.out_of_range_rate),
        )
    )
    worst = max((s for s, _, _ in found), key=SEVERITIES.index)
    out["severity"] = worst
    out["flags"] = [f"{name}: {sev}" for sev, name, _ in found if sev != "none"]
    out["why"] = next(text for sev, _, text in found if sev == worst)


def _num(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3g}"


def _versus(name: str, value: float | None, bounds: tuple[float, float]) -> str:
    """`wasserstein 0.47 >= 0.2`: the value against the level it reached (or the first one)."""
    if value is None or math.isnan(value):
        return f"{name} -"
    if value >= bounds[1]:
        return f"{name} {_num(value)} >= {bounds[1]:g}"
    if value >= bounds[0]:
        return f"{name} {_num(value)} >= {bounds[0]:g}"
    return f"{name} {_num(value)} < {bounds[0]:g}"

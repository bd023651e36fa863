"""OpenTelemetry: each guarded call annotates the current span with what its decision says.

Used only when a policy sets `DecisionLogConfig(trace=True)`; `opentelemetry` is imported here,
when the pipeline is built, never by `import safeserve`. Only the record's codes, names, states
and numbers go on the span: never inputs, outputs, reason details or error messages (they may
hold the values the decision log redacts).
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from safeserve.decisions import Record
from safeserve.errors import PolicyError

if TYPE_CHECKING:
    from safeserve.batch_rows import BatchOutcome

DEGRADED_EVENT = "safeserve.degraded"
MAX_BATCH_EVENTS = 100  # a batch's span gets one event per degraded row, up to this many


OTEL_MISSING = (
    "log.trace: needs opentelemetry-api, which is not installed (pip install safeserve[otel])"
)


def flush_spans(timeout_s: float = 5.0) -> None:
    """Export the spans the global tracer provider still holds, when OpenTelemetry is in use
    (never importing it), waiting at most `timeout_s`: for an ASGI app's shutdown, since
    uvicorn ends a SIGTERM by raising the signal again, before the SDK's exit hook would export
    them. The export runs on a thread of its own: the SDK's `force_flush` does not keep to its
    timeout (it exports every queued batch, each as slow as the collector), and a shutdown must
    end within the orchestrator's grace period. An exporter's failure stops nothing."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return
    flush = getattr(trace.get_tracer_provider(), "force_flush", None)
    if flush is None:
        return

    def export() -> None:
        with contextlib.suppress(Exception):
            flush(int(timeout_s * 1000))

    exporting = threading.Thread(target=export, name="safeserve-span-flush", daemon=True)
    exporting.start()
    exporting.join(timeout_s)


class SpanAnnotator:
    """Sets `safeserve.*` attributes on the current span, and a `safeserve.degraded` event for a
    degraded call; does nothing when the current span is not recording."""

    __slots__ = ("_current_span", "_static", "_use_span")

    def __init__(self, policy: str, owner: str | None, model_version: str | None) -> None:
        try:
            from opentelemetry import trace
        except ImportError:
            raise PolicyError([OTEL_MISSING]) from None
        self._current_span: Callable[[], Any] = trace.get_current_span
        self._use_span = trace.use_span
        static = {"safeserve.policy": policy}
        if owner is not None:
            static["safeserve.owner"] = owner
        if model_version is not None:
            static["safeserve.model_version"] = model_version
        self._static = static

    def current_span(self) -> Any:
        """The span current now, for `annotating` to come back to."""
        return self._current_span()

    def annotating(self, span: Any) -> AbstractContextManager[Any]:
        """Makes `span` current (not ended on exit), so what is noted meanwhile lands on it."""
        return self._use_span(span, end_on_exit=False)

    def healthy(self, breaker_state: str, latency_ms: float, confidence: float | None) -> None:
        """A healthy call that built no record: served by the primary, not degraded."""
        span = self._current_span()
        if not span.is_recording():
            return
        span.set_attributes(
            {
                **self._static,
                "safeserve.served_by": "primary",
                "safeserve.degraded": False,
                "safeserve.flagged": False,
                "safeserve.reasons": (),
                "safeserve.breaker_state": breaker_state,
                "safeserve.latency_ms": latency_ms,
            }
        )
        if confidence is not None and math.isfinite(confidence):
            span.set_attribute("safeserve.confidence", confidence)

    def batch(self, outcome: BatchOutcome) -> None:
        """A batch: its summary on the span (rows, degraded rows, rows by source) and a
        `safeserve.degraded` event for each degraded row, up to `MAX_BATCH_EVENTS`."""
        span = self._current_span()
        if not span.is_recording():
            return
        sources = Counter("none" if s is None else s for s in outcome.served_by)
        degraded = int(outcome.degraded.sum())
        span.set_attributes(
            {
                **self._static,
                "safeserve.batch_id": outcome.batch_id,
                "safeserve.batch.rows": len(outcome.served_by),
                "safeserve.batch.degraded_rows": degraded,
                "safeserve.degraded": degraded > 0,
                **{f"safeserve.batch.served_by.{name}": n for name, n in sources.items()},
            }
        )
        shown = [d for d in outcome.decisions if d.degraded][:MAX_BATCH_EVENTS]
        for d in shown:
            event = {
                "safeserve.policy": self._static["safeserve.policy"],
                "safeserve.row": -1 if d.row is None else d.row,
                "safeserve.served_by": "none" if d.served_by is None else d.served_by,
                "safeserve.reasons": [r.code for r in d.reasons],
                "safeserve.decision_id": d.id,
            }
            span.add_event(DEGRADED_EVENT, event)
        if degraded > len(shown):
            span.set_attribute("safeserve.batch.events_omitted", degraded - len(shown))

    def record(self, record: Record) -> None:
        """A call with a decision record: degraded, flagged, sampled or asked for."""
        span = self._current_span()
        if not span.is_recording():
            return
        served_by = "none" if record.served_by is None else record.served_by
        reasons = [r.code for r in record.reasons]
        span.set_attributes(
            {
                **self._static,
                "safeserve.served_by": served_by,
                "safeserve.degraded": record.degraded,
                "safeserve.flagged": record.flagged,
                "safeserve.reasons": reasons,
                "safeserve.breaker_state": record.breaker_state,
                "safeserve.latency_ms": record.latency_ms,
                "safeserve.decision_id": record.id,
            }
        )
        if record.confidence is not None and math.isfinite(record.confidence):
            span.set_attribute("safeserve.confidence", record.confidence)
        if record.degraded:
            tried = [a.name for a in record.attempts if a.name != "primary"]
            event = {
                "safeserve.policy": self._static["safeserve.policy"],
                "safeserve.served_by": served_by,
                "safeserve.reasons": reasons,
                "safeserve.fallbacks_tried": tried,
                "safeserve.decision_id": record.id,
            }
            span.add_event(DEGRADED_EVENT, event)

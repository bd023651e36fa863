"""OpenTelemetry: with `DecisionLogConfig(trace=True)` each guarded call annotates the current span
with its decision (served_by, degraded, reasons, breaker_state), through a real SDK
TracerProvider and in-memory exporter; off by default, and then opentelemetry is never imported."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_app import SECRET, Model, build_app, rules_fallback
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn_server import free_port

import safeserve as ss
from safeserve.config import file_json_schema
from safeserve.fastapi import SafeServeMiddleware

ROOT = Path(__file__).resolve().parent.parent
CARD = "4000-0000-0000-0002"
EMAIL = "someone@example.com"
TRACED = ss.DecisionLogConfig(trace=True)


class Spans:
    """A real SDK tracer whose finished spans are kept in memory (no global provider is set)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = provider.get_tracer("tests")

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def only(self) -> ReadableSpan:
        """The one span a test made: safeserve annotates it and starts none of its own."""
        spans = self.finished()
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]


@pytest.fixture
def spans() -> Iterator[Spans]:
    s = Spans()
    yield s
    s.exporter.shutdown()


def plain(attributes: Any) -> dict[str, Any]:
    """Span or event attributes as a dict, sequences as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in (attributes or {}).items()}


def attrs(span: ReadableSpan) -> dict[str, Any]:
    """The span's `safeserve.*` attributes."""
    return {k: v for k, v in plain(span.attributes).items() if k.startswith("safeserve.")}


def events(span: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
    return [(e.name, plain(e.attributes)) for e in span.events]


def everything_on(spans: list[ReadableSpan]) -> str:
    """All attribute and event text of the spans, to search for leaks."""
    parts = []
    for span in spans:
        parts.append(repr(dict(span.attributes or {})))
        parts.extend(repr((e.name, dict(e.attributes or {}))) for e in span.events)
    return "\n".join(parts)


def crash(x: Any) -> Any:
    raise RuntimeError(SECRET)


def policy(name: str, **fields: Any) -> ss.Policy:
    fields.setdefault("log", TRACED)
    return ss.Policy(name=name, owner="risk-ml-oncall", **fields)


class TestGuardedCall:
    def test_healthy_call_marks_the_span_served_by_primary(self, spans: Spans) -> None:
        """A healthy call sets served_by=primary, degraded=False and the breaker state."""
        guarded = ss.guard(policy("healthy"))(lambda x: {"label": "ok"})
        with spans.tracer.start_as_current_span("request"):
            assert guarded({"amount": 1}) == {"label": "ok"}
        span = spans.only()
        got = attrs(span)
        assert got["safeserve.policy"] == "healthy"
        assert got["safeserve.owner"] == "risk-ml-oncall"
        assert got["safeserve.served_by"] == "primary"
        assert got["safeserve.degraded"] is False
        assert got["safeserve.flagged"] is False
        assert got["safeserve.reasons"] == []
        assert got["safeserve.breaker_state"] == "closed"
        assert got["safeserve.latency_ms"] >= 0
        assert "safeserve.decision_id" not in got  # a healthy call builds no record
        assert span.events == ()

    def test_a_call_with_a_record_names_its_decision(self, spans: Spans) -> None:
        """`.call()` builds a record; the span carries its id and confidence."""
        conf = ss.ConfidenceConfig(threshold=0.5)
        guarded = ss.guard(policy("outcome", confidence=conf))(lambda x: {"confidence": 0.9})
        with spans.tracer.start_as_current_span("request"):
            outcome = guarded.call(1)
        got = attrs(spans.only())
        assert got["safeserve.decision_id"] == outcome.decision.id
        assert got["safeserve.served_by"] == "primary"
        assert got["safeserve.confidence"] == pytest.approx(0.9)

    def test_crash_served_by_fallback_marks_the_span_degraded(self, spans: Spans) -> None:
        """A crash names the fallback, the reason codes, and adds a safeserve.degraded event."""
        fallbacks = [ss.Fallback.static("static", {"label": "review"})]
        guarded = ss.guard(policy("crash", fallbacks=fallbacks))(crash)
        with spans.tracer.start_as_current_span("request"):
            assert guarded({"amount": 1}) == {"label": "review"}
        span = spans.only()
        got = attrs(span)
        decision = guarded.decisions()[-1]
        assert got["safeserve.served_by"] == "static"
        assert got["safeserve.degraded"] is True
        assert got["safeserve.reasons"] == ["error"]
        assert got["safeserve.decision_id"] == decision.id
        assert got["safeserve.latency_ms"] == decision.latency_ms
        assert events(span) == [
            (
                "safeserve.degraded",
                {
                    "safeserve.policy": "crash",
                    "safeserve.served_by": "static",
                    "safeserve.reasons": ["error"],
                    "safeserve.fallbacks_tried": ["static"],
                    "safeserve.decision_id": decision.id,
                },
            )
        ]

    def test_every_fallback_tried_is_in_the_event(self, spans: Spans) -> None:
        """A failing fallback is listed before the one that answered."""
        fallbacks = [ss.Fallback.model("backup", crash), ss.Fallback.static("static", 0)]
        guarded = ss.guard(policy("chain", fallbacks=fallbacks))(crash)
        with spans.tracer.start_as_current_span("request"):
            guarded(1)
        span = spans.only()
        assert attrs(span)["safeserve.reasons"] == ["error", "fallback_failed"]
        [(_, event)] = events(span)
        assert event["safeserve.fallbacks_tried"] == ["backup", "static"]

    def test_no_fallback_marks_the_span_served_by_none(self, spans: Spans) -> None:
        """When nothing answers, the span still says so before the error propagates."""
        guarded = ss.guard(policy("bare"))(crash)
        with (
            spans.tracer.start_as_current_span("request"),
            pytest.raises(ss.NoFallbackAvailable),
        ):
            guarded(1)
        got = attrs(spans.only())
        assert (got["safeserve.served_by"], got["safeserve.degraded"]) == ("none", True)

    def test_flagged_low_confidence_is_not_degraded(self, spans: Spans) -> None:
        """action="flag" serves the primary: flagged, not degraded, no degraded event."""
        conf = ss.ConfidenceConfig(threshold=0.5, action="flag")
        guarded = ss.guard(policy("flag", confidence=conf))(lambda x: {"confidence": 0.2})
        with spans.tracer.start_as_current_span("request"):
            guarded(1)
        span = spans.only()
        got = attrs(span)
        assert (got["safeserve.served_by"], got["safeserve.degraded"]) == ("primary", False)
        assert got["safeserve.flagged"] is True
        assert got["safeserve.reasons"] == ["low_confidence"]
        assert got["safeserve.confidence"] == pytest.approx(0.2)
        assert span.events == ()

    def test_async_guard_annotates_the_span(self, spans: Spans) -> None:
        """The async driver annotates healthy and degraded calls the same way."""

        async def ok(x: Any) -> str:
            return "ok"

        async def broken(x: Any) -> str:
            raise RuntimeError(SECRET)

        fallbacks = [ss.Fallback.static("static", "fallback")]
        healthy = ss.guard(policy("async-ok"))(ok)
        degraded = ss.guard(policy("async-crash", fallbacks=fallbacks))(broken)

        async def both() -> None:
            with spans.tracer.start_as_current_span("healthy"):
                await healthy(1)
            with spans.tracer.start_as_current_span("degraded"):
                await degraded(1)

        asyncio.run(both())
        by_name = {s.name: attrs(s) for s in spans.finished()}
        assert by_name["healthy"]["safeserve.served_by"] == "primary"
        assert by_name["degraded"]["safeserve.served_by"] == "static"
        assert by_name["degraded"]["safeserve.reasons"] == ["error"]

    def test_reload_turns_tracing_on_and_off(self, spans: Spans) -> None:
        """A hot reload to `trace=True` annotates the next calls; back to False stops it."""
        guarded = ss.guard(ss.Policy(name="reloaded"))(lambda x: x)
        for trace in (True, False):
            guarded.reload(ss.Policy(name="reloaded", log=ss.DecisionLogConfig(trace=trace)))
            with spans.tracer.start_as_current_span(f"trace={trace}"):
                guarded(1)
        by_name = {s.name: attrs(s) for s in spans.finished()}
        assert by_name["trace=True"]["safeserve.served_by"] == "primary"
        assert by_name["trace=False"] == {}

    def test_no_recording_span_means_nothing_is_set(self, spans: Spans) -> None:
        """Outside any span a traced guard works and records nothing."""
        guarded = ss.guard(policy("outside", fallbacks=[ss.Fallback.static("s", 0)]))(crash)
        assert guarded(1) == 0
        assert spans.finished() == []


class TestBatches:
    @pytest.mark.parametrize("batch", [True, False])
    def test_a_batch_puts_its_summary_and_one_event_per_degraded_row(
        self, spans: Spans, batch: bool
    ) -> None:
        def one(x: dict[str, Any]) -> float:
            if x["a"] < 0:
                raise ValueError(SECRET)
            return float(x["a"])

        def model(x: Any) -> Any:
            return [one(r) for r in x] if batch else one(x)

        fallbacks = [ss.Fallback.static("static", -1.0)]
        guarded = ss.guard(policy(f"batch-{batch}", fallbacks=fallbacks, batch=batch))(model)
        with spans.tracer.start_as_current_span("scoring"):
            out = guarded.batch([{"a": 1.0}, {"a": -1.0}, {"a": 2.0}, {"a": -2.0}])
        span = spans.only()
        got = attrs(span)
        assert got["safeserve.batch_id"] == out.batch_id
        assert got["safeserve.batch.rows"] == 4
        assert got["safeserve.batch.degraded_rows"] == 2
        assert got["safeserve.degraded"] is True
        assert got["safeserve.batch.served_by.primary"] == 2
        assert got["safeserve.batch.served_by.static"] == 2
        row_events = [e for name, e in events(span) if "safeserve.row" in e]
        assert sorted(e["safeserve.row"] for e in row_events) == [1, 3]
        assert all(e["safeserve.served_by"] == "static" for e in row_events)
        assert SECRET not in everything_on([span])


class TestRedaction:
    def test_inputs_redacted_fields_and_error_messages_never_reach_the_span(
        self, spans: Spans
    ) -> None:
        """Span attributes and events carry codes and names only: no input value, no redacted or
        hashed field, no exception message, no reason detail."""
        log = ss.DecisionLogConfig(
            trace=True, redact=["card"], hash=["email"], include_outputs=True
        )
        fallbacks = [ss.Fallback.model("backup", crash), ss.Fallback.static("static", {"a": 1})]
        guarded = ss.guard(policy("private", log=log, fallbacks=fallbacks))(crash)
        ok = ss.guard(policy("private-ok", log=log))(lambda x: {"echo": x["card"]})
        row = {"amount": 9876.54321, "card": CARD, "email": EMAIL}
        with spans.tracer.start_as_current_span("degraded"):
            guarded(row)
        with spans.tracer.start_as_current_span("healthy"):
            ok.call(row)
        text = everything_on(spans.finished())
        assert "safeserve.served_by" in text
        for leak in (CARD, EMAIL, "9876.54321", SECRET, "RuntimeError", "card", "email", "echo"):
            assert leak not in text
        assert guarded.decisions()[-1].inputs["amount"] == 9876.54321  # the log keeps what it may


class TestDisabled:
    def test_off_by_default_leaves_the_span_alone(self, spans: Spans) -> None:
        """Without `trace=True`, healthy and degraded calls set nothing on the span."""
        fallbacks = [ss.Fallback.static("static", 0)]
        quiet = ss.guard(ss.Policy(name="quiet", fallbacks=fallbacks))(crash)
        logged = ss.guard(ss.Policy(name="logged", log=ss.DecisionLogConfig(sample_rate=1.0)))(
            lambda x: x
        )
        with spans.tracer.start_as_current_span("request"):
            quiet(1)
            logged.call(1)
        span = spans.only()
        assert attrs(span) == {}
        assert span.events == ()

    def test_safeserve_never_imports_opentelemetry_when_off(self) -> None:
        """`import safeserve` and untraced guards, healthy or degraded, leave opentelemetry out."""
        code = (
            "import sys, safeserve as ss\n"
            "log = ss.DecisionLogConfig(sample_rate=1.0)\n"
            "fb = [ss.Fallback.static('s', 0)]\n"
            "ok = ss.guard(ss.Policy(name='ok', log=log))(lambda x: x)\n"
            "def crash(x): raise RuntimeError('boom')\n"
            "bad = ss.guard(ss.Policy(name='bad', fallbacks=fb))(crash)\n"
            "ok(1); ok.call(1); bad(1)\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        )
        assert out.stdout.strip() == "[]"

    def test_enabled_without_the_extra_fails_at_guard_construction(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """trace=True without opentelemetry-api is a PolicyError naming the extra to install."""
        monkeypatch.setitem(sys.modules, "opentelemetry", None)
        with pytest.raises(ss.PolicyError, match=r"pip install safeserve\[otel\]") as err:
            ss.guard(policy("no-otel"))(lambda x: x)
        assert err.value.problems[0].startswith("log.trace:")


class TestConfigFile:
    def test_trace_in_a_policy_file_turns_tracing_on(self, tmp_path: Path, spans: Spans) -> None:
        """`log: {trace: true}` loads from YAML and TOML, and the guard annotates spans."""
        (tmp_path / "p.yaml").write_text(
            "policies:\n  traced:\n    log:\n      trace: true\n    fallbacks:\n"
            "      - {name: default, static: {label: review}}\n"
        )
        (tmp_path / "p.toml").write_text(
            "[policies.traced.log]\ntrace = true\n"
            '[[policies.traced.fallbacks]]\nname = "default"\nstatic = "x"\n'
        )
        from_yaml = ss.load_policies(tmp_path / "p.yaml")["traced"]
        from_toml = ss.load_policies(tmp_path / "p.toml")["traced"]
        assert from_yaml.log == from_toml.log == ss.DecisionLogConfig(trace=True)
        guarded = ss.guard(from_yaml)(crash)
        with spans.tracer.start_as_current_span("request"):
            assert guarded(1) == {"label": "review"}
        assert attrs(spans.only())["safeserve.degraded"] is True

    def test_schema_lists_trace(self) -> None:
        """`safeserve schema` documents the field, so editors complete and check it."""
        log = file_json_schema()["$defs"]["FileLog"]["properties"]
        assert log["trace"] == {"default": False, "title": "Trace", "type": "boolean"}
        out = subprocess.run(
            [sys.executable, "-m", "safeserve.cli", "schema"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert json.loads(out.stdout)["$defs"]["FileLog"]["properties"]["trace"] == log["trace"]


def server_spans(app: ASGIApp, spans: Spans) -> ASGIApp:
    """OpenTelemetry's own ASGI middleware (what `opentelemetry-instrument` and
    `FastAPIInstrumentor` put around an app): a server span per request, current while the app
    runs; none for each message sent or received."""
    return OpenTelemetryMiddleware(app, tracer=spans.tracer, exclude_spans=["receive", "send"])


class SpanPerRequest:
    """A span around each HTTP request, current while the app runs: an endpoint's own."""

    def __init__(self, app: ASGIApp, tracer: Tracer, name: str = "") -> None:
        self.app = app
        self.tracer = tracer
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.tracer.start_as_current_span(f"{self.name}{scope['method']} {scope['path']}"):
            await self.app(scope, receive, send)


def post_all(
    app: Any, *bodies: dict[str, Any], url: str = "/predict", raise_app_exceptions: bool = True
) -> list[httpx.Response]:
    async def send_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post(url, json=body) for body in bodies]

    return asyncio.run(send_all())


class TestFastAPIMiddleware:
    def traced_app(self, spans: Spans, model: Model, **fields: Any) -> Any:
        fields.setdefault("fallbacks", [rules_fallback()])
        guard = ss.guard(policy(f"route-{model.mode}", **fields))(model.answer)
        return server_spans(build_app(model, {"/predict": guard}), spans)

    @pytest.mark.parametrize("timeout_s", [None, 1.0])
    def test_healthy_route_annotates_the_request_span(
        self, spans: Spans, timeout_s: float | None
    ) -> None:
        """A healthy guarded route marks its request span served_by=primary, not degraded."""
        app = self.traced_app(spans, Model(), timeout_s=timeout_s)
        [r] = post_all(app, {"amount": 12.0, "card_number": CARD})
        assert r.headers["x-safeserve-served-by"] == "primary"
        got = attrs(spans.only())
        assert got["safeserve.served_by"] == "primary"
        assert got["safeserve.degraded"] is False
        assert got["safeserve.breaker_state"] == "closed"

    def test_crash_on_a_route_marks_the_request_span_degraded(self, spans: Spans) -> None:
        """A crashing endpoint served by the rules fallback: degraded attributes and event, and
        neither the body nor the exception message on the span."""
        app = self.traced_app(spans, Model("crash"))
        [r] = post_all(app, {"amount": 5432.1, "card_number": CARD})
        assert r.json() == {"label": "review"}
        span = spans.only()
        got = attrs(span)
        assert got["safeserve.served_by"] == "rules"
        assert got["safeserve.degraded"] is True
        assert got["safeserve.reasons"] == ["error"]
        [(name, event)] = events(span)
        assert (name, event["safeserve.fallbacks_tried"]) == ("safeserve.degraded", ["rules"])
        text = everything_on([span])
        for leak in (CARD, "5432.1", SECRET, "RuntimeError"):
            assert leak not in text

    def test_no_fallback_503_marks_the_request_span(self, spans: Spans) -> None:
        """A 503 without a fallback leaves served_by=none on the request span."""
        app = self.traced_app(spans, Model("crash"), fallbacks=[])
        [r] = post_all(app, {"amount": 1.0})
        assert r.status_code == 503
        got = attrs(spans.only())
        assert (got["safeserve.served_by"], got["safeserve.degraded"]) == ("none", True)

    def test_each_request_annotates_its_own_span(self, spans: Spans) -> None:
        """Spans of healthy and degraded requests on one route each describe their own call."""
        model = Model()
        app = self.traced_app(spans, model)
        post_all(app, {"amount": 1.0}, {"amount": 2.0, "mode": "crash"}, {"amount": 3.0})
        served = [attrs(s)["safeserve.served_by"] for s in spans.finished()]
        assert served == ["primary", "rules", "primary"]

    def test_the_request_span_is_annotated_when_the_endpoint_has_a_span_of_its_own(
        self, spans: Spans
    ) -> None:
        """A framework that opens a span around its endpoint (FastAPI does) has it current
        while the response starts: healthy and degraded requests alike still annotate the
        request's span, where a dashboard of server spans looks."""
        model = Model()
        guard = ss.guard(policy("route-inner", fallbacks=[rules_fallback()]))(model.answer)
        endpoint_app = build_app(model, {})
        inner = SpanPerRequest(endpoint_app, spans.tracer, name="endpoint ")
        app = server_spans(SafeServeMiddleware(inner, {"/predict": guard}), spans)
        # the whole app is wrapped: its error middleware answers 500, then raises for the log
        post_all(app, {"amount": 1.0}, {"amount": 2.0, "mode": "crash"}, raise_app_exceptions=False)
        by_name = {}
        for span in spans.finished():
            by_name.setdefault(span.name, []).append(attrs(span))
        served = [a["safeserve.served_by"] for a in by_name["POST /predict"]]
        assert served == ["primary", "rules"]
        assert all(a == {} for a in by_name["endpoint POST /predict"])


class TestServe:
    def test_serve_predictions_annotate_the_server_span(
        self, tmp_path: Path, spans: Spans, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`safeserve serve`'s app under OpenTelemetry's ASGI middleware (as
        `opentelemetry-instrument` runs it): each prediction of a policy with `log: {trace:
        true}` marks its server span, a crash served by the fallback as degraded, with neither
        the input nor the error on the span."""
        from safeserve.serve import build_app as serve_app

        (tmp_path / "traced_models.py").write_text(
            f"def score(x):\n    if x.get('crash'):\n        raise RuntimeError({SECRET!r})\n"
            "    return {'label': 'approve'}\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        (tmp_path / "policies.yaml").write_text(
            "policies:\n  fraud:\n    model: traced_models:score\n    log: {trace: true}\n"
            "    fallbacks:\n      - {name: default, static: {label: review}}\n"
        )
        app = server_spans(serve_app(tmp_path / "policies.yaml"), spans)
        bodies = [{"card": CARD}, {"card": CARD, "crash": True}]
        answers = post_all(app, *bodies, url="/v1/models/fraud/predict")
        assert [r.json() for r in answers] == [{"label": "approve"}, {"label": "review"}]
        healthy, degraded = (attrs(s) for s in spans.finished())
        marks = "safeserve.served_by", "safeserve.degraded"
        assert [healthy[k] for k in marks] == ["primary", False]
        assert [degraded[k] for k in marks] == ["default", True]
        assert degraded["safeserve.reasons"] == ["error"]
        assert degraded["safeserve.policy"] == "fraud"
        text = everything_on(spans.finished())
        for leak in (CARD, SECRET, "RuntimeError"):
            assert leak not in text
        sys.modules.pop("traced_models", None)


ROUTE_APP = f"""
from fastapi import FastAPI

import safeserve as ss
from safeserve.fastapi import SafeServeMiddleware

app = FastAPI()


@app.post("/predict")
async def predict(body: dict) -> dict:
    if body.get("crash"):
        raise RuntimeError({SECRET!r})
    return {{"label": "approve"}}


policy = ss.Policy(
    name="route",
    log=ss.DecisionLogConfig(trace=True),
    fallbacks=[ss.Fallback.static("default", {{"label": "review"}})],
)
app.add_middleware(SafeServeMiddleware, routes={{"/predict": policy}})
"""


class TestOpenTelemetryInstrument:
    """What most users run: `opentelemetry-instrument` (auto-instrumentation, with FastAPI's
    instrumentor and the console exporter) around a real server. The server span of each
    request carries its decision; neither the input nor the error reaches it."""

    def served_spans(self, tmp_path: Path, command: list[str], url: str) -> list[dict[str, Any]]:
        """Start `command` under opentelemetry-instrument, post a healthy and a crashing body,
        stop the server at once (SIGTERM) and return the server spans (the console exporter's
        JSON). The SDK exports a span up to 5 s after it ends, and its exit hook never runs
        (uvicorn re-raises SIGTERM once shut down): the app's shutdown exports them."""
        port = free_port()
        out = tmp_path / "spans.txt"
        instrument = "from opentelemetry.instrumentation.auto_instrumentation import run; run()"
        args = [sys.executable, "-c", instrument, "--traces_exporter", "console"]
        args += ["--metrics_exporter", "none", "--logs_exporter", "none"]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
            "OTEL_SERVICE_NAME": "safeserve-tests",
            "OTEL_BSP_SCHEDULE_DELAY": "30000",  # nothing exported before the shutdown
        }
        with out.open("wb") as stdout, tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen(
                [*args, sys.executable, "-m", *command, "--port", str(port)],
                cwd=tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
            try:
                answers = post_when_up(proc, f"http://127.0.0.1:{port}{url}")
                assert [r.json() for r in answers] == [{"label": "approve"}, {"label": "review"}]
            finally:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:  # its shutdown hung: fail, but free the port
                    proc.kill()
                    proc.wait()
                stderr.seek(0)
                log = stderr.read().decode(errors="replace")
        assert proc.returncode == -signal.SIGTERM, log  # ended by the signal, not killed
        assert "Traceback" not in log, log
        spans = server_spans_in(out.read_text(), url)
        assert len(spans) == 2, out.read_text()[-3000:]
        return spans

    def check(self, spans: list[dict[str, Any]], policy: str) -> None:
        healthy, degraded = (span["attributes"] for span in spans)
        marks = "safeserve.policy", "safeserve.served_by", "safeserve.degraded"
        assert [healthy[k] for k in marks] == [policy, "primary", False]
        assert [degraded[k] for k in marks] == [policy, "default", True]
        assert degraded["safeserve.reasons"] == ["error"]
        [event] = spans[1]["events"]
        assert event["name"] == "safeserve.degraded"
        text = json.dumps(spans)
        for leak in (CARD, SECRET, "RuntimeError"):
            assert leak not in text

    def test_safeserve_serve(self, tmp_path: Path) -> None:
        (tmp_path / "traced_models.py").write_text(
            f"def score(x):\n    if x.get('crash'):\n        raise RuntimeError({SECRET!r})\n"
            "    return {'label': 'approve'}\n"
        )
        (tmp_path / "policies.yaml").write_text(
            "policies:\n  fraud:\n    model: traced_models:score\n    log: {trace: true}\n"
            "    fallbacks:\n      - {name: default, static: {label: review}}\n"
        )
        command = ["safeserve.cli", "serve", "policies.yaml"]
        self.check(self.served_spans(tmp_path, command, "/v1/models/fraud/predict"), "fraud")

    def test_uvicorn_and_a_guarded_route(self, tmp_path: Path) -> None:
        (tmp_path / "traced_app.py").write_text(ROUTE_APP)
        command = ["uvicorn", "traced_app:app", "--no-access-log"]
        self.check(self.served_spans(tmp_path, command, "/predict"), "route")


def post_when_up(proc: subprocess.Popen[bytes], url: str) -> list[httpx.Response]:
    """A healthy and a crashing prediction, once the server listens."""
    deadline = time.monotonic() + 30
    while True:
        try:
            healthy = httpx.post(url, json={"card": CARD})
            break
        except httpx.TransportError:
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
    return [healthy, httpx.post(url, json={"card": CARD, "crash": True})]


def server_spans_in(text: str, url: str) -> list[dict[str, Any]]:
    """The server spans of POST `url` among the console exporter's JSON objects, in order."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) != -1:
        try:
            span, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:  # not a span (a line of other output)
            at += 1
            continue
        if span.get("name") == f"POST {url}" and span.get("kind") == "SpanKind.SERVER":
            found.append(span)
    return found


class TestSpansAtShutdown:
    """The app's lifespan shutdown exports the spans the global tracer provider still queues,
    within a bound: uvicorn's SIGTERM ends the process before the SDK's own exit hook."""

    def shut_down(self) -> list[Message]:
        """Run `FlushLogsAtShutdown`'s lifespan shutdown around a minimal app; what it sent."""
        from safeserve.integrations.middleware import FlushLogsAtShutdown

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await receive()
            await send({"type": "lifespan.shutdown.complete"})

        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "lifespan.shutdown"}

        async def send(message: Message) -> None:
            sent.append(message)

        asyncio.run(FlushLogsAtShutdown(app)({"type": "lifespan"}, receive, send))
        return sent

    def provider(self, monkeypatch: pytest.MonkeyPatch, flush: Callable[[int], bool]) -> None:
        from opentelemetry import trace

        class Provider:
            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return flush(timeout_millis)

        monkeypatch.setattr(trace, "get_tracer_provider", Provider)

    def test_the_queued_spans_are_exported(self, monkeypatch: pytest.MonkeyPatch) -> None:
        flushed: list[int] = []
        self.provider(monkeypatch, lambda timeout: flushed.append(timeout) or True)
        assert self.shut_down() == [{"type": "lifespan.shutdown.complete"}]
        assert flushed == [5000]

    def test_a_failing_export_does_not_stop_the_shutdown(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def fail(timeout: int) -> bool:
            raise RuntimeError("collector unreachable")

        self.provider(monkeypatch, fail)
        assert self.shut_down() == [{"type": "lifespan.shutdown.complete"}]

    def test_an_export_that_never_ends_is_given_up_on(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The SDK's `force_flush` does not keep to its timeout (it exports every queued batch,
        each as slow as the collector): waiting for it could outlast a pod's grace period."""
        from safeserve.tracing import flush_spans

        stuck = threading.Event()
        self.provider(monkeypatch, lambda timeout: stuck.wait(60))
        started = time.monotonic()
        flush_spans(timeout_s=0.2)
        assert time.monotonic() - started < 5  # generous: the bound is 0.2 s
        stuck.set()

"""FastAPI integration: the guarding middleware and the admin routes, through the real ASGI stack
(httpx.ASGITransport) and a real uvicorn process."""

from __future__ import annotations

import asyncio
import gc
import importlib
import inspect
import json
import sys
import time
import uuid
import weakref
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_app import SECRET, STREAM_CHUNKS, Model, Txn, build_app, rules_fallback
from fastapi import FastAPI, Request
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import ClientDisconnect
from uvicorn_server import UvicornServer, uvicorn_server  # noqa: F401 (fixture)

import safeserve as ss
from safeserve import context, registry
from safeserve.decisions import RawReason
from safeserve.fastapi import SafeServeMiddleware, admin_router, install_error_handlers

TOKEN = "s3cret-admin-token"
BODY = {"amount": 12.0, "card_number": "4000-0000-0000-0002"}
BIG = {"amount": 5000.0, "card_number": "4000-0000-0000-0002"}
TRIP = ss.BreakerConfig(window_size=4, min_calls=2, failure_rate_threshold=0.5, open_s=30)


def policy(name: str, **fields: Any) -> ss.Policy:
    fields.setdefault("fallbacks", [rules_fallback()])
    return ss.Policy(name=name, owner="risk-ml-oncall", **fields)


def run(
    app: FastAPI, *calls: tuple[str, str, dict[str, Any]], raise_app_exceptions: bool = True
) -> list[httpx.Response]:
    """Send requests concurrently to `app` through httpx.ASGITransport (an exception the app
    lets through: raised, or as a server answers it, `raise_app_exceptions=False`)."""

    async def send_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            jobs = [client.request(method, url, **kw) for method, url, kw in calls]
            return list(await asyncio.gather(*jobs))

    return asyncio.run(send_all())


def post(app: FastAPI, url: str = "/predict", body: Any = BODY, **kw: Any) -> httpx.Response:
    return run(app, ("POST", url, {"json": body, **kw}))[0]


def headers_of(r: httpx.Response) -> tuple[str | None, str | None]:
    return r.headers.get("x-safeserve-served-by"), r.headers.get("x-safeserve-degraded")


def assert_clean(r: httpx.Response) -> None:
    """No trace, exception message or input value in an error body."""
    text = r.text
    for leak in ("Traceback", "RuntimeError", SECRET, "4000-0000", "12.0", "5000"):
        assert leak not in text


class TestGuardedRoute:
    def test_healthy_call_is_served_by_the_endpoint_with_headers(self) -> None:
        """A healthy call passes through untouched and says it was served by the primary."""
        model = Model()
        guard = ss.guard(policy("healthy"))(model.answer)
        r = post(build_app(model, {"/predict": guard}))
        assert r.status_code == 200
        assert r.json() == {"label": "approve", "amount": 12.0, "served": "endpoint"}
        assert headers_of(r) == ("primary", "false")
        stats = guard.stats()
        assert stats["calls"] == 1
        assert stats["served_by"] == {"primary": 1}

    def test_crash_falls_back_with_the_parsed_body(self) -> None:
        """An exception in the endpoint serves the rules fallback, which sees the JSON body."""
        model = Model("crash")
        guard = ss.guard(policy("crash"))(model.answer)
        app = build_app(model, {"/predict": guard})
        small, big = post(app), post(app, body=BIG)
        assert (small.status_code, small.json()) == (200, {"label": "approve-by-rule"})
        assert big.json() == {"label": "review"}
        assert big.headers["content-type"] == "application/json"
        assert headers_of(big) == ("rules", "true")
        decision = guard.decisions()[-1]
        assert decision.served_by == "rules"
        assert [r.code for r in decision.reasons] == ["error"]
        assert "card_number" in (decision.inputs or {})
        assert guard.breaker.figures()["failures"] == 2

    def test_5xx_response_falls_back(self) -> None:
        """A 5xx answer from the endpoint is replaced by a fallback's answer."""
        model = Model("http500")
        app = build_app(model, {"/predict": policy("http500")})
        r = post(app, body=BIG)
        assert (r.status_code, r.json()) == (200, {"label": "review"})
        assert headers_of(r) == ("rules", "true")

    def test_healthy_requests_are_sampled_with_their_input(self) -> None:
        """`log.sample_rate` samples a route's healthy requests as it does a function's calls:
        a record served by the primary, with the request body as input, redacted."""
        log = ss.DecisionLogConfig(sample_rate=1.0, redact=["card_number"])
        guard = ss.guard(policy("sampled-route", log=log))(Model().answer)
        app = build_app(Model(), {"/predict": guard})
        assert post(app).status_code == 200
        [record] = guard.decisions()
        assert (record.served_by, record.degraded, record.reasons) == ("primary", False, [])
        assert record.inputs == {"amount": 12.0}
        assert [a.name for a in record.attempts] == ["primary"]
        unsampled = ss.guard(policy("unsampled-route"))(Model().answer)
        assert post(build_app(Model(), {"/predict": unsampled})).status_code == 200
        assert unsampled.decisions() == []

    def test_a_request_with_a_breaker_notice_has_one_record_and_counts_once(self) -> None:
        """A notice pending at admission (e.g. the shared store was unreachable) goes on the
        request's one record, flagged, as for a function's call; sampling adds no second one."""
        log = ss.DecisionLogConfig(sample_rate=1.0)
        guard = ss.guard(policy("noticed-route", log=log))(Model().answer)
        app = build_app(Model(), {"/predict": guard})
        guard.breaker.post_notice(RawReason("store_unavailable", "admit", "store down"))
        assert headers_of(post(app)) == ("primary", "false")
        [record] = guard.decisions()
        assert (record.served_by, record.flagged) == ("primary", True)
        assert [r.code for r in record.reasons] == ["store_unavailable"]
        assert guard.stats()["calls"] == 1

    @pytest.mark.parametrize("url", ["/predict", "/predict_sync"])
    def test_slow_endpoint_times_out_and_falls_back(self, url: str) -> None:
        """No response start within timeout_s serves a fallback at the deadline (async and sync)."""
        model = Model("slow", slow_s=1.0)
        guard = ss.guard(policy("slow", timeout_s=0.1))(model.answer)
        app = build_app(model, {url: guard})
        t = time.perf_counter()
        r = post(app, url, body=BIG)
        assert time.perf_counter() - t < 0.6
        assert (r.status_code, r.json()) == (200, {"label": "review"})
        assert headers_of(r) == ("rules", "true")
        assert guard.decisions()[-1].reasons[0].code == "timeout"

    def test_time_budget_holds_on_every_loop_that_serves_the_app(self) -> None:
        """One app served by successive event loops, and by one in another thread meanwhile:
        each loop's requests time out on that loop."""
        model = Model("slow", slow_s=2.0)
        guard = ss.guard(policy("loops", timeout_s=0.1))(model.answer)
        app = build_app(model, {"/predict": guard})
        t = time.perf_counter()
        answers = [post(app, body=BIG)]
        with ThreadPoolExecutor(1) as pool:
            elsewhere = pool.submit(post, app, "/predict", BIG)
            answers += [post(app, body=BIG), elsewhere.result(timeout=5)]
        answers.append(post(app, body=BIG))  # the thread and its loop are gone
        assert time.perf_counter() - t < 1.9  # each served at its deadline, none after the model
        assert [(r.json(), headers_of(r)) for r in answers] == [
            ({"label": "review"}, ("rules", "true"))
        ] * 4
        assert [d.reasons[0].code for d in guard.decisions()] == ["timeout"] * 4

    @pytest.mark.parametrize("mode", ["ok", "crash"])
    def test_answered_request_is_let_go_before_its_deadline(self, mode: str) -> None:
        """Under a long time budget, a request is let go once it is answered (by the endpoint or
        a fallback): its body, and the server's request object that `receive` and `send` belong
        to, are not held until the budget ends."""

        class Message(dict[str, Any]):  # a dict that can be weakly referenced
            pass

        class Cycle:
            """A server's request object (as uvicorn's): its own `receive` and `send`."""

            def __init__(self, message: Message) -> None:
                self.messages = [message]
                self.start: MutableMapping[str, Any] = {}

            async def receive(self) -> dict[str, Any]:
                return self.messages.pop() if self.messages else {"type": "http.disconnect"}

            async def send(self, message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    self.start = message

        model = Model(mode)
        app = build_app(model, {"/predict": policy(f"let-go-{mode}", timeout_s=60.0)})
        scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/predict"}
        scope |= {"query_string": b"", "root_path": "", "http_version": "1.1"}
        scope["headers"] = [(b"content-type", b"application/json")]

        async def serve_one() -> tuple[weakref.ref[Message], weakref.ref[Cycle], Any]:
            message = Message(type="http.request", body=json.dumps(BIG).encode())
            cycle = Cycle(message)
            await app(scope, cycle.receive, cycle.send)
            return weakref.ref(message), weakref.ref(cycle), cycle.start

        async def main() -> tuple[bool, bool, Any]:
            body, cycle, start = await serve_one()
            gc.collect()  # asked while the budget's timer is still pending
            return body() is None, cycle() is None, start

        body_gone, cycle_gone, start = asyncio.run(main())
        assert (body_gone, cycle_gone) == (True, True)
        assert start["status"] == 200
        degraded = dict(start["headers"])[b"x-safeserve-degraded"]
        assert degraded == (b"true" if mode == "crash" else b"false")

    @pytest.mark.parametrize(("limit", "expected"), [(1 << 20, BIG), (40, None)])
    @pytest.mark.parametrize("mode", ["crash", "slow"])
    def test_body_sent_in_parts_reaches_the_fallback_whole(
        self, mode: str, limit: int, expected: Any
    ) -> None:
        """A body in several messages (read by the endpoint, or not read before the deadline)
        reaches the fallback joined and parsed; over max_body_bytes it reaches it as None."""
        seen: list[Any] = []

        def fallback(body: Any) -> dict[str, Any]:
            seen.append(body)
            return {"label": "from-fallback"}

        model = Model(mode, slow_s=5.0)
        fallbacks = [ss.Fallback.model("seen", fallback)]
        guard = ss.guard(policy(f"parts-{mode}-{limit}", timeout_s=0.2, fallbacks=fallbacks))
        app = FastAPI()

        @app.post("/predict")
        async def predict(txn: Txn) -> dict[str, Any]:
            return model.answer(txn)

        @app.post("/predict_unread")
        async def predict_unread() -> dict[str, Any]:
            await asyncio.sleep(5.0)  # never reads the body: the fallback does
            return {}

        routes = {"/predict": guard(model.answer), "/predict_unread": guard(model.answer)}
        app.add_middleware(SafeServeMiddleware, routes=routes, max_body_bytes=limit)
        body = json.dumps(BIG).encode()
        url = "/predict" if mode == "crash" else "/predict_unread"

        async def main() -> dict[str, Any]:
            parts = [body[:10], body[10:30], body[30:]]
            started: dict[str, Any] = {}

            async def receive() -> dict[str, Any]:
                if parts:
                    return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}
                await asyncio.sleep(10)
                return {"type": "http.disconnect"}

            async def send(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    started.update(message)

            scope: dict[str, Any] = {"type": "http", "method": "POST", "path": url}
            scope |= {"query_string": b"", "root_path": "", "http_version": "1.1"}
            scope["headers"] = [(b"content-type", b"application/json")]
            await app(scope, receive, send)
            return started

        start = asyncio.run(main())
        assert start["status"] == 200
        assert dict(start["headers"])[b"x-safeserve-served-by"] == b"seen"
        assert seen == [expected]

    def test_client_leaving_mid_upload_is_not_a_failure(self) -> None:
        """A client that disconnects before its body is read (starlette's ClientDisconnect)
        is not the endpoint's failure: no record, no breaker failure, the breaker stays closed."""
        guard = ss.guard(policy("left", breaker=TRIP))(Model().answer)
        app = FastAPI()

        @app.post("/predict")
        async def raw(request: Request) -> dict[str, Any]:
            return {"size": len(await request.body())}  # raises ClientDisconnect

        app.add_middleware(SafeServeMiddleware, routes={"/predict": guard})
        scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/predict"}
        scope |= {"query_string": b"", "root_path": "", "http_version": "1.1"}
        scope["headers"] = [(b"content-type", b"application/json")]

        async def leave() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            pass

        async def main() -> None:
            for _ in range(6):
                with pytest.raises(ClientDisconnect):
                    await app(scope, leave, send)

        asyncio.run(main())
        assert guard.breaker.state == "closed"
        assert guard.breaker.figures()["failures"] == 0
        assert guard.decisions() == []
        assert headers_of(post(app)) == ("primary", "false")

    def test_4xx_passes_through_and_is_not_a_failure(self) -> None:
        """404 and 422 answers reach the client untouched and do not count against the breaker."""
        model = Model("missing")
        guard = ss.guard(policy("missing", breaker=TRIP))(model.answer)
        app = build_app(model, {"/predict": guard})
        responses = [post(app) for _ in range(5)]
        invalid = post(app, body={"amount": "not a number"})
        assert {r.status_code for r in responses} == {404}
        assert responses[0].json() == {"detail": "no such item"}
        assert headers_of(responses[0]) == ("primary", "false")
        assert invalid.status_code == 422
        assert guard.breaker.state == "closed"
        assert guard.breaker.figures()["failures"] == 0
        assert guard.stats()["degraded"] == 0

    def test_no_fallback_answers_503_with_retry_after_and_a_clean_body(self) -> None:
        """With no fallback, a crash is a 503 naming only the policy."""
        model = Model("crash")
        app = build_app(model, {"/predict": policy("bare", fallbacks=[])})
        r = post(app)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json() == {"error": "unavailable", "policy": "bare"}
        assert headers_of(r) == ("none", "true")
        assert_clean(r)

    def test_open_breaker_skips_the_endpoint_and_sets_retry_after(self) -> None:
        """Once open, the endpoint is not called; Retry-After is the time left open."""
        model = Model("crash")
        guard = ss.guard(policy("tripping", breaker=TRIP, fallbacks=[]))(model.answer)
        app = build_app(model, {"/predict": guard})
        for _ in range(2):
            post(app)
        assert guard.breaker.state == "open"
        calls = model.calls
        r = post(app)
        assert model.calls == calls
        assert r.status_code == 503
        assert 29 <= int(r.headers["retry-after"]) <= 30
        assert guard.decisions()[-1].reasons[0].code == "breaker_open"
        assert_clean(r)

    def test_forced_open_breaker_serves_the_fallback(self) -> None:
        """A breaker opened by hand sends every call to the fallbacks."""
        model = Model()
        guard = ss.guard(policy("forced"))(model.answer)
        guard.force_open()
        r = post(build_app(model, {"/predict": guard}), body=BIG)
        assert (r.json(), model.calls) == ({"label": "review"}, 0)

    def test_drill_degrades_the_route(self) -> None:
        """ss.force_degradation applies to guarded routes too."""
        model = Model()
        app = build_app(model, {"/predict": policy("drilled")})
        with ss.force_degradation(reason="timeout", policy="drilled"):
            r = post(app)
        assert (r.json(), model.calls) == ({"label": "approve-by-rule"}, 0)

    def test_bulkhead_overflow_falls_back(self) -> None:
        """With max_concurrent=1, a second concurrent request is served by the fallback."""
        model = Model("slow", slow_s=0.3)
        app = build_app(model, {"/predict": policy("bulkhead", max_concurrent=1)})
        slow: dict[str, Any] = {"json": {"amount": 1}}
        fast: dict[str, Any] = {"json": {"amount": 1, "mode": "ok"}}
        first, second = run(app, ("POST", "/predict", slow), ("POST", "/predict", fast))
        assert headers_of(first) == ("primary", "false")
        assert headers_of(second) == ("rules", "true")

    def test_template_routes_are_guarded_and_others_pass_through(self) -> None:
        """'/items/{item_id}' matches any item; an unlisted route gets no headers."""
        model = Model()
        app = build_app(model, {"/items/{item_id}": policy("items")})
        item, stream = run(app, ("GET", "/items/7", {}), ("GET", "/stream", {}))
        assert item.json()["amount"] == 7
        assert headers_of(item) == ("primary", "false")
        assert headers_of(stream) == (None, None)

    def test_templates_match_as_their_convertors_do(self) -> None:
        """A parameter is matched by its convertor's regex, an app's own convertor included
        (here one that spans "/"): each path the app routes to the template is guarded."""

        class ModelRef(Convertor[str]):
            regex = r"[a-z]+(/[a-z]+)?"  # "model" or "org/model", with a group of its own

            def convert(self, value: str) -> str:
                return value

            def to_string(self, value: str) -> str:
                return value

        register_url_convertor("modelref", ModelRef())

        async def failing(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        routes = {"/m/{name:modelref}/predict": policy("m"), "/v/{x:float}": policy("v")}
        app = SafeServeMiddleware(failing, routes=routes)
        paths = ["/m/fraud/predict", "/m/acme/fraud/predict", "/v/1.5", "/v/2", "/m/A/predict"]
        answers = run(app, *(("POST", path, {"json": {}}) for path in paths))
        served = [r.headers.get("x-safeserve-served-by") for r in answers]
        assert served == ["rules", "rules", "rules", "rules", None]
        assert [d.served_by for d in app.guards[0].decisions()] == ["rules", "rules"]
        with pytest.raises(ValueError, match="unknown path convertor 'nope'"):
            SafeServeMiddleware(failing, routes={"/a/{b:nope}": policy("n")})

    def test_a_fallback_gets_none_for_a_body_that_is_not_json(self) -> None:
        """NaN and 1e999, which Python's parser would take as floats, are not JSON, and a body
        nested past the parser's depth cannot be read: the fallback gets None for each."""
        got: list[Any] = []

        def backup(x: Any) -> dict[str, Any]:
            got.append(x)
            return {"label": "backup"}

        async def failing(scope: Any, receive: Any, send: Any) -> None:  # reads no body
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        fallbacks = [ss.Fallback.model("b", backup)]
        app = SafeServeMiddleware(failing, routes={"/predict": policy("nan", fallbacks=fallbacks)})
        deep = b"[" * 100_000 + b"]" * 100_000
        for body in (b'{"amount": NaN}', b'{"amount": 1e999}', deep, b'{"amount": 5}'):
            r = run(app, ("POST", "/predict", {"content": body}))[0]  # type: ignore[arg-type]
            assert (r.status_code, r.json()) == (200, {"label": "backup"})
        assert got == [None, None, None, {"amount": 5}]

    def test_routes_stay_guarded_behind_a_root_path(self) -> None:
        """Behind a proxy prefix (root_path "/api"), "/predict" and "/items/{item_id}" are the
        paths the app routes on, and are guarded."""
        model = Model("crash")
        app = build_app(model, {"/predict": policy("prefixed"), "/items/{item_id}": policy("i")})

        async def send_all() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=app, root_path="/api")
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return [
                    await client.post("/api/predict", json=BIG),
                    await client.get("/api/items/7"),
                ]

        predicted, item = asyncio.run(send_all())
        assert (predicted.status_code, predicted.json()) == (200, {"label": "review"})
        assert headers_of(predicted) == ("rules", "true")
        assert (item.status_code, headers_of(item)) == (200, ("rules", "true"))


class TestDecoratedFunctionHeaders:
    def test_unlisted_endpoint_gets_headers_of_a_degraded_guarded_call(self) -> None:
        """An endpoint calling a guarded function that fell back reports it in the headers."""

        async def flaky(x: dict[str, Any]) -> dict[str, Any]:
            raise ConnectionError("down")

        helper = ss.guard(name="helper", fallbacks=[ss.Fallback.static("v2", {"label": "x"})])
        app = build_app(Model(), {}, helper=helper(flaky))
        r = post(app, "/unlisted")
        assert r.json() == {"answer": {"label": "x"}}
        assert headers_of(r) == ("v2", "true")

    @pytest.mark.parametrize("kind", ["async", "sync", "sync with retries"])
    def test_unlisted_endpoint_calling_a_healthy_guarded_function_gets_the_headers(
        self, kind: str
    ) -> None:
        """A healthy guarded call inside an unlisted endpoint: served by the primary, not
        degraded (the guards' fast path and their full healthy path both say so)."""

        async def fine_async(x: dict[str, Any]) -> dict[str, Any]:
            return {"label": "ok"}

        def fine_sync(x: dict[str, Any]) -> dict[str, Any]:
            return {"label": "ok"}

        retry = ss.RetryConfig(attempts=2) if kind == "sync with retries" else None
        helper = ss.guard(name=f"fine-{kind}", retry=retry)
        app = build_app(Model(), {}, helper=helper(fine_async if kind == "async" else fine_sync))
        r = post(app, "/unlisted")
        assert r.json() == {"answer": {"label": "ok"}}
        assert headers_of(r) == ("primary", "false")

    def test_unlisted_endpoint_failing_after_a_guarded_call_gets_the_headers_on_its_500(
        self,
    ) -> None:
        """The guarded call had no answer (NoFallbackAvailable) and the endpoint let it
        through: the 500 the app's error handler sends still says none / true."""

        async def down(x: dict[str, Any]) -> dict[str, Any]:
            raise ConnectionError("down")

        helper = ss.guard(name="no-answer", fallbacks=[])(down)
        app = build_app(Model(), {}, helper=helper)
        install_error_handlers(app)
        [r] = run(app, ("POST", "/unlisted", {"json": BODY}), raise_app_exceptions=False)
        assert (r.status_code, r.json()) == (500, {"error": "internal_error"})
        assert headers_of(r) == ("none", "true")

    def test_unlisted_endpoint_calling_no_guarded_function_gets_no_headers(self) -> None:
        """Only endpoints that call a guarded function are annotated."""
        ss.guard(name="exists")(lambda x: x)  # armed: endpoints are watched
        r = run(build_app(Model(), {}), ("GET", "/items/3", {}))[0]
        assert (r.status_code, headers_of(r)) == (200, (None, None))

    def test_guarded_route_reports_a_degraded_inner_call(self) -> None:
        """A guarded route whose endpoint served a fallback of an inner guard says so."""

        async def flaky(x: dict[str, Any]) -> dict[str, Any]:
            raise ConnectionError("down")

        helper = ss.guard(name="inner", fallbacks=[ss.Fallback.static("inner-v2", 1)])(flaky)
        app = build_app(Model(), {"/unlisted": policy("outer")}, helper=helper)
        assert headers_of(post(app, "/unlisted")) == ("inner-v2", "true")


class TestBeforeAnyGuardExists:
    """Until a guard an endpoint could call exists, endpoints are not watched for such calls."""

    @pytest.fixture(autouse=True)
    def unarmed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(context, "armed", False)

    def test_routes_given_policies_still_say_how_they_were_served(self) -> None:
        """Healthy, fallback and 503 answers carry the right headers; no guard arms the app."""
        model = Model()
        routes = {"/predict": policy("unarmed"), "/unlisted": policy("bare", fallbacks=[])}
        app = build_app(model, routes)
        healthy, fell_back = post(app), post(app, body={"amount": 5000.0, "mode": "http500"})
        unavailable = post(app, "/unlisted")  # its helper is None: the endpoint fails
        assert not context.armed
        assert headers_of(healthy) == ("primary", "false")
        assert (fell_back.json(), headers_of(fell_back)) == ({"label": "review"}, ("rules", "true"))
        assert (unavailable.status_code, headers_of(unavailable)) == (503, ("none", "true"))

    def test_unlisted_routes_get_the_servers_receive_and_send_until_a_guard_exists(self) -> None:
        """An unlisted route costs a dict lookup; once a guard exists it is watched again."""
        seen: list[tuple[Any, Any]] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append((receive, send))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        middleware = SafeServeMiddleware(app, routes={"/predict": policy("lookup-only")})
        scope = {"type": "http", "path": "/other", "method": "GET", "headers": []}
        asyncio.run(middleware(scope, receive, send))
        assert seen.pop() == (receive, send)
        ss.guard(name="arms")(lambda x: x)
        assert context.armed
        asyncio.run(middleware(scope, receive, send))
        assert seen.pop()[1] is not send
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"] * 2


class TestStreaming:
    def test_chunks_are_sent_before_the_body_is_complete(self) -> None:
        """A streamed body is passed on chunk by chunk, not buffered by the middleware."""
        model = Model(chunk_gap_s=0.05)
        app = build_app(model, {"/stream": policy("stream")})
        seen: list[tuple[str, int]] = []

        requests = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await asyncio.Event().wait()  # no disconnect: starlette cancels this at the end
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                seen.append((message["body"].decode(), model.chunks_made))

        scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/stream"}
        scope |= {"headers": [], "query_string": b"", "root_path": "", "http_version": "1.1"}
        asyncio.run(app(scope, receive, send))
        assert seen == [(f"chunk-{i}\n", i + 1) for i in range(STREAM_CHUNKS)]

    def test_stream_longer_than_the_budget_is_not_replaced(self) -> None:
        """Once the response has started, the deadline no longer applies and no fallback serves."""
        model = Model(chunk_gap_s=0.15)
        app = build_app(model, {"/stream": policy("long-stream", timeout_s=0.1)})
        r = run(app, ("GET", "/stream", {}))[0]
        assert r.text == "".join(f"chunk-{i}\n" for i in range(STREAM_CHUNKS))
        assert headers_of(r) == ("primary", "false")

    def test_policy_parts_a_route_cannot_apply_are_named_in_a_warning(self) -> None:
        """Validation, retry, a confidence check, cache fallbacks and batch act on a guarded
        function's calls; a route's policy with them gets a warning that names each."""
        full = policy(
            "route-parts",
            validation=ss.ValidationConfig(schema=Txn),
            retry=ss.RetryConfig(attempts=2),
            confidence=ss.ConfidenceConfig(threshold=0.5),
            fallbacks=[ss.Fallback.cache("recent"), rules_fallback()],
        )
        with pytest.warns(UserWarning, match="middleware ignores") as caught:
            SafeServeMiddleware(FastAPI(), routes={"/predict": full, "/plain": policy("plain")})
        [warning] = caught
        message = str(warning.message)
        assert message.startswith(
            "routes['/predict']: policy 'route-parts': a route's middleware ignores validation, "
            "retry, confidence, cache fallbacks"
        )
        assert warning.filename == __file__  # points at the line that made the middleware

    def test_servers_see_an_asgi3_app(self) -> None:
        """Wrapped directly (`app = SafeServeMiddleware(inner, ...)`), the middleware passes the
        checks ASGI servers use to tell ASGI 3 apps from WSGI ones."""
        middleware = SafeServeMiddleware(FastAPI(), routes={"/x": policy("asgi3")})
        assert asyncio.iscoroutinefunction(middleware.__call__)
        if sys.version_info >= (3, 12):  # inspect.markcoroutinefunction
            assert inspect.iscoroutinefunction(middleware.__call__)

    def test_websocket_scopes_go_straight_to_the_app(self) -> None:
        """Websocket scopes reach the app with the same receive and send."""
        got: list[Any] = []

        async def inner(scope: Any, receive: Any, send: Any) -> None:
            got.append((scope["type"], receive, send))

        middleware = SafeServeMiddleware(inner, routes={"/x": policy("ws")})
        receive, send = object(), object()
        scope = {"type": "websocket", "path": "/x"}
        asyncio.run(middleware(scope, receive, send))  # type: ignore[arg-type]
        assert got == [("websocket", receive, send)]

    def test_shutdown_completes_with_the_decision_log_written(self) -> None:
        """The app's lifespan runs as it would, and its shutdown completes only once the
        records queued by then are written (SIGTERM ends uvicorn before `atexit` runs)."""
        written: list[dict[str, Any]] = []

        def lagging_sink(event: dict[str, Any]) -> None:
            time.sleep(0.02)
            written.append(event)

        log = ss.DecisionLogConfig(sink=lagging_sink, sample_rate=1.0)
        guard = ss.guard(policy("lifespan", log=log))(Model().answer)
        app = build_app(Model(), {"/predict": guard})
        startups: list[str] = []
        app.router.on_startup.append(lambda: startups.append("started"))
        for i in range(20):
            assert post(app, body={"amount": float(i)}).status_code == 200
        events = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        at_complete: list[tuple[str, int]] = []

        async def receive() -> dict[str, Any]:
            return events.pop(0)

        async def send(message: MutableMapping[str, Any]) -> None:
            at_complete.append((message["type"], len(written)))

        asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
        assert startups == ["started"]
        assert at_complete == [
            ("lifespan.startup.complete", at_complete[0][1]),
            ("lifespan.shutdown.complete", 20),
        ]


class TestAdminRoutes:
    @pytest.fixture
    def guards(self) -> list[ss.Guarded]:
        return [
            ss.guard(policy("admin-a"))(Model().answer),
            ss.guard(policy("admin-b", fallbacks=[]))(Model().answer),
        ]

    def admin(self, guards: list[ss.Guarded], token: str | None = TOKEN) -> FastAPI:
        return build_app(Model("crash"), {"/predict": guards[0]}, guards=guards, token=token)

    def test_health_lists_guards_and_turns_503_when_one_is_open(
        self, guards: list[ss.Guarded]
    ) -> None:
        """Health is 200 while all breakers are closed and 503 once one opens."""
        app = self.admin(guards)
        post(app)
        r = run(app, ("GET", "/safeserve/health", {}))[0]
        assert r.status_code == 200
        entry = r.json()["guards"][0]
        assert entry["name"] == "admin-a"
        assert (entry["state"], entry["owner"]) == ("closed", "risk-ml-oncall")
        assert entry["recent_degradation_rate"] == 1.0
        guards[1].open()
        r = run(app, ("GET", "/safeserve/health", {}))[0]
        assert (r.status_code, r.json()["status"]) == (503, "unavailable")
        assert run(app, ("HEAD", "/safeserve/health", {}))[0].status_code == 503  # a probe's

    def test_metrics_are_prometheus_text(self, guards: list[ss.Guarded]) -> None:
        """Calls, reasons, breaker state and latency are exported in the text format."""
        app = self.admin(guards)
        post(app)
        r = run(app, ("GET", "/safeserve/metrics", {}))[0]
        assert r.headers["content-type"].startswith("text/plain")
        text = r.text
        assert 'safeserve_calls_total{policy="admin-a",served_by="rules"} 1.0' in text
        assert 'safeserve_degradations_total{policy="admin-a",reason="error"} 1.0' in text
        assert 'safeserve_breaker_state{policy="admin-b",state="closed"} 1.0' in text
        assert 'safeserve_call_duration_seconds_count{policy="admin-a"} 1.0' in text
        assert 'safeserve_log_dropped_records_total{policy="admin-a"} 0.0' in text
        admin_router(guards)  # a second registry for the same guards is fine

    def test_every_route_request_is_in_the_latency_histogram_once(self) -> None:
        """Served, failed and refused by the open breaker: each request counted once."""
        guard = ss.guard(policy("every", breaker=TRIP))(Model().answer)
        app = build_app(Model("crash"), {"/predict": guard}, guards=[guard], token=TOKEN)
        for _ in range(4):  # two failures open the breaker, which refuses the next two
            post(app, body=BIG)
        assert guard.breaker.state == "open"
        text = run(app, ("GET", "/safeserve/metrics", {}))[0].text
        assert 'safeserve_call_duration_seconds_count{policy="every"} 4.0' in text
        assert 'safeserve_calls_total{policy="every",served_by="rules"} 4.0' in text

    def test_healthy_route_requests_counted_in_bulk_are_all_read(self) -> None:
        """The middleware counts a healthy answer, and puts its latency in the histogram, in bulk
        (appended per request, folded every few hundred): stats, health and metrics read every
        request all the same, between folds and across one; so does a histogram held since
        before the requests."""
        guard = ss.guard(policy("bulk"))(Model().answer)
        held = guard.collect_histograms()
        app = build_app(Model(), {"/predict": guard}, guards=[guard], token=TOKEN)
        for served in (3, 300):
            run(app, *[("POST", "/predict", {"json": BODY})] * served)
            healthy = guard.stats()["served_by"]["primary"]
            text = run(app, ("GET", "/safeserve/metrics", {}))[0].text
            for series in (
                'safeserve_calls_total{policy="bulk",served_by="primary"}',
                'safeserve_call_duration_seconds_count{policy="bulk"}',
                'safeserve_call_duration_seconds_bucket{le="+Inf",policy="bulk"}',
            ):
                assert f"{series} {healthy}.0" in text
        assert healthy == 303
        assert post(app, body={"amount": "not a number"}).status_code == 422  # the endpoint's
        [entry] = run(app, ("GET", "/safeserve/health", {}))[0].json()["guards"]
        assert (entry["calls"], entry["degraded"]) == (304, 0)
        assert sum(held.latency.counts) == 304
        assert held.latency.total > 0

    def test_calls_total_adds_up_to_every_call(self) -> None:
        """Served, failed (nothing answered) and rejected (`on_invalid: reject`) calls are all in
        `safeserve_calls_total`; the unanswered ones as served_by "none"."""
        schema = ss.ValidationConfig(schema=Txn, on_invalid="reject")
        guard = ss.guard(ss.Policy(name="adds-up", validation=schema))(lambda txn: {"ok": 1})
        assert guard({"amount": 1.0}) == {"ok": 1}
        with pytest.raises(ss.InputRejected):
            guard({"amount": "not a number"})
        guard.breaker.open()
        with pytest.raises(ss.NoFallbackAvailable):
            guard({"amount": 2.0})
        app = build_app(Model(), {"/predict": policy("adds-up-route")}, guards=[guard])
        text = run(app, ("GET", "/safeserve/metrics", {}))[0].text
        assert guard.stats()["calls"] == 3
        assert 'safeserve_calls_total{policy="adds-up",served_by="primary"} 1.0' in text
        assert 'safeserve_calls_total{policy="adds-up",served_by="none"} 2.0' in text

    def test_health_counts_rejected_inputs_as_degraded(self) -> None:
        """Inputs refused by `on_invalid: reject` are answered degraded (422, Degraded: true):
        health's degraded count and recent rate include them (a broken upstream shows)."""
        schema = ss.ValidationConfig(schema=Txn, on_invalid="reject")
        guard = ss.guard(ss.Policy(name="rejecting", validation=schema))(lambda txn: {"ok": 1})
        guard({"amount": 1.0})
        for _ in range(3):
            with pytest.raises(ss.InputRejected):
                guard({"amount": "not a number"})
        app = build_app(Model(), {"/predict": policy("rejecting-route")}, guards=[guard])
        [entry] = run(app, ("GET", "/safeserve/health", {}))[0].json()["guards"]
        assert (entry["calls"], entry["degraded"], entry["recent_degradation_rate"]) == (4, 3, 0.75)

    def test_decorated_functions_have_latency_and_confidence_histograms(self) -> None:
        """A guarded function exported by the admin router: every call's latency, and the
        confidence of every answer its check read (a low one included)."""
        answers = iter([0.97, 0.42, 0.93])

        def model(x: dict[str, Any]) -> dict[str, Any]:
            return {"label": "ok", "confidence": next(answers)}

        confident = ss.guard(
            name="confident",
            confidence=ss.ConfidenceConfig(threshold=0.8),
            fallbacks=[ss.Fallback.static("default", {"label": "review"})],
        )(model)
        app = FastAPI()
        app.include_router(admin_router([confident], token=TOKEN))
        served = [confident({"a": 1})["label"] for _ in range(3)]
        assert served == ["ok", "review", "ok"]
        text = run(app, ("GET", "/safeserve/metrics", {}))[0].text
        assert 'safeserve_call_duration_seconds_count{policy="confident"} 3.0' in text
        assert 'safeserve_confidence_count{policy="confident"} 3.0' in text
        assert 'safeserve_confidence_bucket{le="0.5",policy="confident"} 1.0' in text
        assert 'safeserve_confidence_bucket{le="0.95",policy="confident"} 2.0' in text
        assert 'safeserve_confidence_sum{policy="confident"} 2.32' in text

    def test_a_confidence_that_is_not_a_number_stays_out_of_the_histogram(self) -> None:
        """A NaN confidence (the check degrades the call) would make the histogram's sum NaN
        for good: it is left out, and later confidences add up."""
        answers = iter(["nan", "0.9"])  # the answer itself is finite: its extractor is not
        nan_guard = ss.guard(
            name="nan-confidence",
            confidence=ss.ConfidenceConfig(threshold=0.5, extract=lambda a: float(a["p"])),
            fallbacks=[ss.Fallback.static("default", {"label": "review"})],
        )(lambda x: {"label": "ok", "p": next(answers)})
        histograms = nan_guard.collect_histograms()
        assert [nan_guard({})["label"] for _ in range(2)] == ["review", "ok"]
        assert (sum(histograms.confidence.counts), histograms.confidence.total) == (1, 0.9)
        assert sum(histograms.latency.counts) == 2

    def test_a_batch_policy_times_each_batch_once(self) -> None:
        """With batch=True the model's call is the batch: one latency per batch."""
        vectorised = ss.guard(name="vectorised", batch=True)(lambda rows: [r["a"] for r in rows])
        histograms = vectorised.collect_histograms()
        vectorised.batch([{"a": 1}, {"a": 2}, {"a": 3}])
        vectorised.batch([{"a": 4}])
        assert (vectorised.stats()["calls"], sum(histograms.latency.counts)) == (4, 2)

    def test_guards_made_after_a_router_for_all_guards_have_histograms(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """admin_router() without a list exports every guard, those made later too; until a
        router exports a guard, it keeps no histograms (its calls pay nothing for them)."""
        monkeypatch.setattr(registry, "histograms_everywhere", False)
        before = ss.guard(name="before")(lambda x: x)
        assert before.histograms is None
        app = FastAPI()
        app.include_router(admin_router(token=TOKEN))
        later = ss.guard(name="later")(lambda x: x)
        before(1), later(1), later(2)
        text = run(app, ("GET", "/safeserve/metrics", {}))[0].text
        assert 'safeserve_call_duration_seconds_count{policy="before"} 1.0' in text
        assert 'safeserve_call_duration_seconds_count{policy="later"} 2.0' in text

    def test_counters_of_all_guards_do_not_go_down_when_a_guard_is_gone(self) -> None:
        """A guard that is garbage collected keeps its counts in a router exporting every
        guard: Prometheus reads a counter that goes down as a restart, and its next rate as
        every call since the start."""
        app = FastAPI()
        app.include_router(admin_router(token=TOKEN))
        name = f"gone-{uuid.uuid4()}"

        def made() -> ss.Guarded:
            return ss.guard(name=name, fallbacks=[ss.Fallback.static("s", 0)])(lambda x: 1 / x)

        def scraped() -> list[str]:
            text = run(app, ("GET", "/safeserve/metrics", {}))[0].text
            return sorted(line for line in text.splitlines() if f'"{name}"' in line)

        first, second = made(), made()
        first(1), first(0), second(1)
        before = scraped()
        assert f'safeserve_calls_total{{policy="{name}",served_by="primary"}} 2.0' in before
        assert f'safeserve_call_duration_seconds_count{{policy="{name}"}} 3.0' in before
        del first
        gc.collect()
        assert scraped() == before
        second(0)
        after = scraped()
        assert f'safeserve_calls_total{{policy="{name}",served_by="s"}} 2.0' in after
        assert f'safeserve_degradations_total{{policy="{name}",reason="error"}} 2.0' in after
        assert f'safeserve_call_duration_seconds_count{{policy="{name}"}} 4.0' in after
        del second
        gc.collect()  # the name's series stay, its breaker state goes with its last guard
        assert [s for s in scraped() if "breaker_state" not in s] == [
            s for s in after if "breaker_state" not in s
        ]

    def test_a_guard_collected_during_a_scrape_is_counted_once(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A dropped guard lives until the cyclic GC frees it: a scrape that counted it live
        does not count it again as gone when the GC runs mid-scrape (the next scrape would
        then go down)."""
        app = FastAPI()
        app.include_router(admin_router(token=TOKEN))
        name = f"mid-scrape-{uuid.uuid4()}"
        adding_up = registry.totals

        def collected_first() -> dict[str, registry.Totals]:
            gc.collect()  # as any allocation of the scrape's may
            return adding_up()

        monkeypatch.setattr(registry, "totals", collected_first)
        line = f'safeserve_calls_total{{policy="{name}",served_by="primary"}} 3.0'
        gc.disable()
        try:
            for _ in range(3):
                ss.guard(name=name)(lambda x: x)(1)  # dropped, but held by its own cycles
            first = run(app, ("GET", "/safeserve/metrics", {}))[0].text
        finally:
            gc.enable()
        second = run(app, ("GET", "/safeserve/metrics", {}))[0].text
        assert line in first
        assert line in second

    def test_a_guard_the_gc_is_freeing_is_still_counted(self) -> None:
        """The GC clears a batch of weak references first, then runs their finalizers one by
        one: a scrape in between sees the guard neither live nor gone, and must count it."""
        app = FastAPI()
        app.include_router(admin_router(token=TOKEN))
        name = f"freeing-{uuid.uuid4()}"
        g = ss.guard(name=name)(lambda x: x)
        g(1), g(2)
        line = f'safeserve_calls_total{{policy="{name}",served_by="primary"}} 2.0'
        assert line in run(app, ("GET", "/safeserve/metrics", {}))[0].text
        registry._guards.discard(g)  # its weak reference cleared, its finalizer not yet run
        try:
            assert line in run(app, ("GET", "/safeserve/metrics", {}))[0].text
        finally:
            registry._guards.add(g)

    def test_without_a_router_for_all_guards_no_counts_are_kept_for_guards_gone(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Guards with names of their own (per tenant, per version), made and dropped in a
        process that exports no router for all guards, leave nothing behind."""
        monkeypatch.setattr(registry, "histograms_everywhere", False)
        kept, retired = len(registry._remains), len(registry._retired)
        for i in range(200):
            ss.guard(name=f"tenant-{i}-{uuid.uuid4()}")(lambda x: x)(1)
        gc.collect()
        assert (len(registry._remains), len(registry._retired)) == (kept, retired)

    def test_a_guard_made_while_counts_are_added_up_does_not_hang(self) -> None:
        """A finalizer (a user's `__del__`) may make a guard inside any allocation, such as
        one of a scrape's adding up: the scrape's lock is re-entrant."""
        app = FastAPI()
        app.include_router(admin_router(token=TOKEN))
        g = ss.guard(name=f"reentrant-{uuid.uuid4()}")(lambda x: x)
        g(1)

        class MakesAGuard:
            def __del__(self) -> None:
                ss.guard(name="made-in-del")(lambda x: x)

        tally = g.remains.tally

        def collecting() -> Any:
            holder = MakesAGuard()
            holder.cycle = holder  # type: ignore[attr-defined]
            del holder
            gc.collect()  # as an allocation of the adding up may
            return tally()

        g.remains.tally = collecting
        scrape = ThreadPoolExecutor(1).submit(run, app, ("GET", "/safeserve/metrics", {}))
        assert scrape.result(timeout=10)[0].status_code == 200

    def test_guards_gone_without_a_scrape_are_added_up_as_they_go(self) -> None:
        """Guards made and dropped in a loop, with no scrape to add up their counts, do not
        pile up (each kept its counters and histograms until then)."""
        app = FastAPI()
        app.include_router(admin_router(token=TOKEN))
        name = f"loop-{uuid.uuid4()}"
        for _ in range(500):
            ss.guard(name=name)(lambda x: x)(1)
            gc.collect(0)
        gc.collect()
        assert len(registry._gone) < 100
        text = run(app, ("GET", "/safeserve/metrics", {}))[0].text
        assert f'safeserve_calls_total{{policy="{name}",served_by="primary"}} 500.0' in text

    def test_metrics_count_records_the_sink_refused(self) -> None:
        """A sink shared by two guards that refuses records is one counter, labelled by sink."""

        def refusing_sink(record: dict[str, Any]) -> None:
            raise OSError("collector down")

        log = ss.DecisionLogConfig(sink=refusing_sink)
        shared = [
            ss.guard(name=f"refused-{i}", fallbacks=[ss.Fallback.static("s", 0)], log=log)(
                lambda x: 1 / 0
            )
            for i in range(2)
        ]
        for g in shared:
            assert g(1) == 0
        ss.flush_logs()
        text = run(self.admin(shared), ("GET", "/safeserve/metrics", {}))[0].text
        line = 'safeserve_log_write_failures_total{sink="' + refusing_sink.__qualname__ + '"} 2.0'
        assert line in text
        for g in shared:  # off the failing sink: later tests' records must not fail there
            g.reload(g.policy.model_copy(update={"log": None}))

    def test_sinks_sharing_a_name_add_up_their_failures(self) -> None:
        """Two sinks of one class (two topics, say) label the same: their failures add up, and
        the counter does not show one sink's count for both."""

        class Refusing:
            def __call__(self, record: dict[str, Any]) -> None:
                raise OSError("collector down")

        guards = [
            ss.guard(
                name=f"sink-{i}",
                fallbacks=[ss.Fallback.static("s", 0)],
                log=ss.DecisionLogConfig(sink=Refusing()),
            )(lambda x: 1 / 0)
            for i in range(2)
        ]
        for g, calls in zip(guards, (3, 2), strict=True):
            for _ in range(calls):
                assert g(1) == 0
        ss.flush_logs()
        app = self.admin(guards)
        text = run(app, ("GET", "/safeserve/metrics", {}))[0].text
        names = {g.policy_writer().name for g in guards}  # type: ignore[union-attr]
        [name] = names
        line = f'safeserve_log_write_failures_total{{sink="{name}"}} 5.0'
        assert line in text
        for g in guards:
            g.reload(g.policy.model_copy(update={"log": None}))
        # no guard writes there now: the counter stays (a drop is a restart to Prometheus)
        assert line in run(app, ("GET", "/safeserve/metrics", {}))[0].text

    def test_a_guarded_method_and_a_guard_listed_twice_are_its_guard_once(self) -> None:
        """`admin_router([svc.predict])`: health answers (a bound method was a 500 on every
        probe) and counts the method's calls; a guard listed twice is counted once."""

        class Service:
            @ss.guard(policy("method"))
            def predict(self, x: Any) -> int:
                return 1

        svc = Service()
        assert [svc.predict({}) for _ in range(3)] == [1, 1, 1]
        app = FastAPI()
        app.include_router(admin_router([svc.predict, Service.predict, svc.predict], token=TOKEN))
        r = run(app, ("GET", "/safeserve/health", {}))[0]
        assert r.status_code == 200
        [entry] = r.json()["guards"]
        assert (entry["name"], entry["calls"]) == ("method", 3)
        text = run(app, ("GET", "/safeserve/metrics", {}))[0].text
        assert 'safeserve_calls_total{policy="method",served_by="primary"} 3.0' in text

    def test_a_new_owner_on_reload_keeps_a_breaker_opened_by_hand(
        self, guards: list[ss.Guarded]
    ) -> None:
        """Editing only the on-call owner does not send traffic back to a model an operator
        took out: the breaker stays open, and its records name the new owner."""
        app = self.admin(guards)
        auth = {"headers": {"Authorization": f"Bearer {TOKEN}"}}
        assert run(app, ("POST", "/safeserve/breakers/admin-a/open", auth))[0].status_code == 200
        guards[0].reload(guards[0].policy.model_copy(update={"owner": "new-oncall"}))
        r = run(app, ("GET", "/safeserve/health", {}))[0]
        entry = r.json()["guards"][0]
        assert (r.status_code, entry["state"], entry["owner"]) == (503, "open", "new-oncall")
        assert guards[0].breaker.owner == "new-oncall"

    @pytest.mark.parametrize("configured", ["", "  ", "\n"])
    def test_an_empty_token_is_no_token(self, guards: list[ss.Guarded], configured: str) -> None:
        """A token variable set but empty refuses breaker control (403), never opens it to an
        empty bearer; a secret file's trailing newline is not part of the token."""
        app = self.admin(guards, token=configured)
        for sent in ("Bearer  ", "Bearer \t", "Bearer x"):
            auth = {"headers": {"Authorization": sent}}
            r = run(app, ("POST", "/safeserve/breakers/admin-a/open", auth))[0]
            assert r.status_code in (401, 403), sent
        assert guards[0].breaker.state == "closed"
        app = self.admin(guards, token=TOKEN + "\r\n")
        auth = {"headers": {"Authorization": f"Bearer {TOKEN}"}}
        assert run(app, ("POST", "/safeserve/breakers/admin-a/open", auth))[0].status_code == 200
        # other whitespace is part of the token: the header keeps it, so must the token
        app = self.admin(guards, token=TOKEN + "\xa0")
        for sent, status in ((f"Bearer {TOKEN}", 403), (f"Bearer {TOKEN}\xa0", 200)):
            auth = {"headers": {"Authorization": sent.encode()}}
            r = run(app, ("POST", "/safeserve/breakers/admin-a/reset", auth))[0]
            assert r.status_code == status, sent

    @pytest.mark.parametrize(
        ("token", "authorization", "status"),
        [
            (None, f"Bearer {TOKEN}", 403),
            (TOKEN, None, 401),
            (TOKEN, "Bearer wrong-token", 403),
            (TOKEN, f"Basic {TOKEN}", 401),
        ],
    )
    def test_breaker_controls_refuse_without_the_right_token(
        self, guards: list[ss.Guarded], token: str | None, authorization: str | None, status: int
    ) -> None:
        """No token configured, a missing or a wrong one: refused, and the breaker unchanged."""
        app = self.admin(guards, token)
        headers = {"authorization": authorization} if authorization else {}
        r = run(app, ("POST", "/safeserve/breakers/admin-a/open", {"headers": headers}))[0]
        assert r.status_code == status
        assert guards[0].breaker.state == "closed"

    @pytest.mark.parametrize(
        "token", ["pässwört-€", "voilà", "\u0441\u0435\u043a\u0440\u0435\u0442-\u0445"]
    )
    def test_a_non_ascii_token_is_matched_by_its_utf8_bytes(
        self, guards: list[ss.Guarded], token: str
    ) -> None:
        """A token with non-ASCII characters works when the client sends its UTF-8 bytes (whose
        last byte may be one latin-1 calls a space: "à" ends in 0xA0, Cyrillic "ha" in 0x85)."""
        app = self.admin(guards, token)
        good = {"headers": {"authorization": b"Bearer " + token.encode()}}
        bad = {"headers": {"authorization": b"Bearer " + token.encode()[:-1]}}
        r = run(app, ("POST", "/safeserve/breakers/admin-a/open", bad))[0]
        assert (r.status_code, guards[0].breaker.state) == (403, "closed")
        r = run(app, ("POST", "/safeserve/breakers/admin-a/open", good))[0]
        assert (r.status_code, guards[0].breaker.state) == (200, "open")

    def test_breaker_controls_open_close_and_reset(self, guards: list[ss.Guarded]) -> None:
        """With the token, open/close/reset act on the named guard; unknown names are 404."""
        app = self.admin(guards)
        auth = {"headers": {"authorization": f"Bearer {TOKEN}"}}

        def act(path: str) -> httpx.Response:
            return run(app, ("POST", f"/safeserve/breakers/{path}", auth))[0]

        r = act("admin-b/open")
        assert (r.status_code, r.json()["states"]) == (200, ["open"])
        assert guards[1].breaker.state == "open"
        assert act("admin-b/close").json()["states"] == ["closed"]
        guards[1].force_open()
        assert act("admin-b/reset").json()["states"] == ["closed"]
        assert act("nobody/open").status_code == 404
        assert act("admin-b/explode").status_code == 404

    def test_a_guard_whose_name_holds_a_slash_can_be_controlled(self) -> None:
        guard = ss.guard(policy("team/fraud v2"))(Model().answer)
        app = self.admin([guard])
        auth = {"headers": {"authorization": f"Bearer {TOKEN}"}}
        r = run(app, ("POST", "/safeserve/breakers/team%2Ffraud%20v2/open", auth))[0]
        assert (r.status_code, r.json()["states"]) == (200, ["open"])
        assert guard.breaker.state == "open"

    def test_openapi_documents_what_the_admin_routes_answer(self, guards: list[ss.Guarded]) -> None:
        """Metrics are text, health may be 503, the breaker routes ask for a bearer token and
        may refuse: what a generated client or a contract test reads."""
        spec = run(self.admin(guards), ("GET", "/openapi.json", {}))[0].json()
        paths = spec["paths"]
        assert set(paths["/safeserve/metrics"]["get"]["responses"]["200"]["content"]) == {
            "text/plain"
        }
        assert "503" in paths["/safeserve/health"]["get"]["responses"]
        action = paths["/safeserve/breakers/{name}/{action}"]["post"]
        assert {"401", "403", "404"} <= set(action["responses"])
        assert action["security"] == [{"HTTPBearer": []}]
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


class TestRealUvicorn:
    def get(self, server: UvicornServer, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(kw.pop("method", "GET"), server.url + path, timeout=5, **kw)

    def test_healthy_and_fallback_over_http(self, uvicorn_server: UvicornServer) -> None:  # noqa: F811
        """Through a real server: healthy call, a crash served by the fallback, a clean 503."""
        ok = self.get(uvicorn_server, "/predict", method="POST", json=BODY)
        assert (ok.status_code, headers_of(ok)) == (200, ("primary", "false"))
        crash = self.get(uvicorn_server, "/predict", method="POST", json={**BIG, "mode": "crash"})
        assert (crash.json(), headers_of(crash)) == ({"label": "review"}, ("rules", "true"))
        slow = self.get(uvicorn_server, "/predict", method="POST", json={**BIG, "mode": "slow"})
        assert (slow.json(), headers_of(slow)) == ({"label": "review"}, ("rules", "true"))
        health = self.get(uvicorn_server, "/safeserve/health")
        assert health.status_code == 200
        assert {g["name"] for g in health.json()["guards"]} >= {"served", "served-stream"}
        probe = self.get(uvicorn_server, "/safeserve/health", method="HEAD")  # a balancer's
        assert (probe.status_code, probe.content) == (200, b"")

    def test_stream_chunks_arrive_as_they_are_made(self, uvicorn_server: UvicornServer) -> None:  # noqa: F811
        """The first chunk reaches the client well before the stream ends (gap 0.2 s)."""
        arrivals: list[float] = []
        t0 = time.perf_counter()
        with httpx.stream("GET", uvicorn_server.url + "/stream", timeout=5) as r:
            assert headers_of(r) == ("primary", "false")
            for _ in r.iter_raw():
                arrivals.append(time.perf_counter() - t0)
        assert len(arrivals) >= 2
        assert arrivals[0] < 0.15 < arrivals[-1]


class TestExampleApp:
    """examples/fastapi_app.py, the app users copy, works as its docstring says."""

    def test_guarded_route_and_clean_errors(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)  # its decision log is a relative path
        monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
        module = importlib.import_module("examples.fastapi_app")
        app = module.app
        r = post(app, "/predict", {"amount": 1200, "country": "DE"})
        assert r.status_code == 200
        assert headers_of(r)[0] is not None
        secret = "4111111111111111"
        r = post(app, "/explain", {"amount": "lots", "country": ["DE"], "card_number": secret})
        assert r.status_code == 422
        body = r.json()
        assert body["error"] == "invalid_input"
        assert {p["loc"] for p in body["problems"]} == {"amount", "country"}
        assert "lots" not in r.text
        assert secret not in r.text

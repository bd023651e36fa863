"""SafeServeMiddleware at the edges of a request's life: cancellations that are not its own,
answers that fail after they started, the breaker's permits there, and bulkheads on the loop."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import enum
import json
import math
import threading
import time
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

import safeserve as ss
from safeserve import registry
from safeserve.decisions import RawReason
from safeserve.fastapi import SafeServeMiddleware

STATIC = [ss.Fallback.static("static", {"label": "review"})]
Message = MutableMapping[str, Any]


def scope(path: str = "/p") -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "root_path": "",
        "http_version": "1.1",
        "headers": [(b"content-type", b"application/json")],
    }


class Client:
    """One request's ASGI side: the body `{}`, then nothing until the request is over."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.read = False

    async def receive(self) -> Message:
        if not self.read:
            self.read = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def io(self) -> tuple[Any, Any]:
        """`receive` and `send`, as the middleware is called with them."""
        return self.receive, self.send

    def statuses(self) -> list[int]:
        return [m["status"] for m in self.sent if m["type"] == "http.response.start"]


def streaming_app(entered: list[str], fail_midway: bool = False) -> FastAPI:
    """/stream answers one chunk, then fails or waits; /slow waits before answering."""
    app = FastAPI()

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        entered.append("stream")

        async def chunks() -> AsyncIterator[bytes]:
            yield b"first"
            if fail_midway:
                raise RuntimeError("the stream broke")
            await asyncio.sleep(3600)

        return StreamingResponse(chunks())

    @app.post("/slow")
    async def slow() -> dict[str, Any]:
        entered.append("slow")
        await asyncio.sleep(3600)
        return {}

    return app


def test_a_callers_own_cancellation_is_not_taken_for_the_time_budget() -> None:
    """A caller's timeout (or a server shutting down) that cancels the request before its
    deadline propagates, even when the endpoint's cleanup outlasts the deadline: no fallback
    answer, no timeout failure on the breaker."""
    app = FastAPI()

    @app.post("/p")
    async def slow_with_cleanup() -> dict[str, Any]:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.shield(asyncio.sleep(0.3))  # cleanup that awaits, past the deadline
        return {}

    middleware = SafeServeMiddleware(app, routes={"/p": ss.Policy(name="c", timeout_s=0.1)})
    guard = middleware.guards[0]
    client = Client()

    async def main() -> str:
        try:
            async with asyncio.timeout(0.02):
                await middleware(scope(), client.receive, client.send)
        except TimeoutError:
            return "the caller's timeout"
        return "answered"

    assert asyncio.run(main()) == "the caller's timeout"
    assert client.statuses() == []
    assert guard.breaker.figures()["failures"] == 0
    assert guard.decisions() == []


def test_a_notice_stays_on_the_record_when_a_started_stream_fails() -> None:
    """The answer started, so the call counts and its record carries the breaker's notice,
    as when the stream ends well."""
    app = streaming_app([], fail_midway=True)
    middleware = SafeServeMiddleware(app, routes={"/stream": ss.Policy(name="n", fallbacks=STATIC)})
    guard = middleware.guards[0]
    guard.breaker.post_notice(RawReason("store_unavailable", "admit", "redis down"))
    client = Client()

    async def main() -> None:
        # too late for a fallback: the error reaches the server, which closes the connection
        with contextlib.suppress(RuntimeError):
            await middleware(scope("/stream"), client.receive, client.send)

    asyncio.run(main())
    assert client.statuses() == [200]
    assert guard.stats()["calls"] == 1
    [record] = guard.decisions()
    assert record.served_by == "primary"
    assert "store_unavailable" in [r.code for r in record.reasons]


def test_a_probe_cancelled_mid_stream_keeps_its_half_open_slot_used() -> None:
    """A half-open probe whose answer started was counted a success there: cancelling it later
    must not hand its permit back, or one more probe than `half_open_calls` gets in."""
    now = [0.0]
    breaker = ss.BreakerConfig(
        window_size=4,
        min_calls=2,
        failure_rate_threshold=0.5,
        open_s=5,
        half_open_calls=2,
        success_threshold=2,
        clock=lambda: now[0],
    )
    guard = ss.guard(ss.Policy(name="probe", fallbacks=STATIC, breaker=breaker))(lambda x: x)
    entered: list[str] = []
    middleware = SafeServeMiddleware(
        streaming_app(entered), routes={"/stream": guard, "/slow": guard}
    )
    guard.open()
    now[0] = 100.0  # past open_s: half-open, two probes allowed

    async def main() -> list[int]:
        clients = [Client(), Client(), Client()]
        stream = asyncio.create_task(middleware(scope("/stream"), *clients[0].io))
        slow = asyncio.create_task(middleware(scope("/slow"), *clients[1].io))
        await asyncio.sleep(0.05)
        stream.cancel()  # the server cancels the streaming request
        await asyncio.sleep(0.05)
        third = asyncio.create_task(middleware(scope("/slow"), *clients[2].io))
        await asyncio.sleep(0.05)
        for task in (slow, third):
            task.cancel()
        await asyncio.gather(stream, slow, third, return_exceptions=True)
        return clients[2].statuses()

    third_statuses = asyncio.run(main())
    assert entered == ["stream", "slow"]
    assert third_statuses == [200]  # the fallback answered it: both probe slots were taken


def test_a_route_never_waits_for_a_bulkhead_slot_on_the_event_loop() -> None:
    """A sync guard's `max_wait_s` blocks its own thread; on a route it would block the event
    loop and every request on it. A route takes a free slot or none, as an async guard does."""
    policy = ss.Policy(name="bulk", fallbacks=STATIC, max_concurrent=1, max_wait_s=1.0)
    guard = ss.guard(policy)(lambda x: x)
    app = FastAPI()

    @app.post("/p")
    async def slow() -> dict[str, Any]:
        await asyncio.sleep(0.5)
        return {"label": "approve"}

    @app.get("/other")
    async def unlisted() -> dict[str, Any]:
        return {}

    middleware = SafeServeMiddleware(app, routes={"/p": guard})

    async def main() -> list[tuple[httpx.Response, float]]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            t0 = time.perf_counter()

            async def timed(request: Any) -> tuple[httpx.Response, float]:
                response = await request
                return response, time.perf_counter() - t0

            return list(
                await asyncio.gather(
                    timed(client.post("/p", json={})),
                    timed(client.post("/p", json={})),
                    timed(client.get("/other")),
                )
            )

    (first, _), (second, second_s), (other, other_s) = asyncio.run(main())
    assert first.headers["x-safeserve-served-by"] == "primary"
    assert second.headers["x-safeserve-served-by"] == "static"
    assert other.status_code == 200
    # generous bounds: the first request takes 0.5 s, and blocking would take 1 s
    assert second_s < 0.4
    assert other_s < 0.4


@dataclasses.dataclass
class Score:
    label: str
    p: float


class Tier(enum.Enum):
    REVIEW = "review"


def test_a_fallbacks_answer_is_sent_as_json_values() -> None:
    """A dataclass, an enum, a NaN: their JSON forms, never a Python repr or "nan"."""
    answer = {"score": Score("review", math.nan), "tier": Tier.REVIEW}
    fallback = ss.Fallback.model("backup", lambda body: answer)
    middleware = SafeServeMiddleware(
        failing_app(), routes={"/p": ss.Policy(name="j", fallbacks=[fallback])}
    )
    client = Client()
    asyncio.run(middleware(scope(), client.receive, client.send))
    assert client.statuses() == [200]
    assert json.loads(client.sent[1]["body"]) == {
        "score": {"label": "review", "p": None},
        "tier": "review",
    }


@pytest.mark.parametrize("then", ["no other fallback", "another fallback"])
def test_a_fallback_whose_answer_has_no_json_form_has_failed(then: str) -> None:
    """Its answer cannot be sent, so it counts as that fallback failing: the next one answers,
    or the route says 503, and the record says what the client got."""
    fallbacks = [ss.Fallback.model("opaque", lambda body: {"handle": object()})]
    if then == "another fallback":
        fallbacks.append(ss.Fallback.static("default", {"label": "review"}))
    middleware = SafeServeMiddleware(
        failing_app(), routes={"/p": ss.Policy(name="u", fallbacks=fallbacks)}
    )
    client = Client()
    asyncio.run(middleware(scope(), client.receive, client.send))
    start, body = client.sent
    [record] = middleware.guards[0].decisions()
    assert "fallback_failed" in [r.code for r in record.reasons]
    if then == "another fallback":
        assert (start["status"], json.loads(body["body"])) == (200, {"label": "review"})
        assert record.served_by == "default"
        return
    assert start["status"] == 503
    assert (b"x-safeserve-served-by", b"none") in start["headers"]
    assert (b"x-safeserve-degraded", b"true") in start["headers"]
    assert json.loads(body["body"]) == {"error": "unavailable", "policy": "u"}
    assert record.served_by is None


def test_the_body_is_not_waited_for_once_its_first_part_is_over_the_limit() -> None:
    """An open breaker, a first part already past max_body_bytes, then a stalled client: the
    fallback answers at once with None for the body."""
    middleware, seen = open_route_keeping_bodies("over", max_body_bytes=1000)
    parts = [{"type": "http.request", "body": b"x" * 5000, "more_body": True}]

    async def stalling() -> Message:
        if parts:
            return parts.pop()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    client = Client()

    async def main() -> None:
        async with asyncio.timeout(5):  # generous: it answers at once
            await middleware(scope(), stalling, client.send)

    asyncio.run(main())
    assert client.statuses() == [200]
    assert seen == [None]


def test_a_deadline_cancellation_the_endpoint_turns_into_an_error_is_a_timeout() -> None:
    """The endpoint catches the deadline's CancelledError and raises something else: the
    failure is still the timeout, and the task is no longer marked as being cancelled (its
    later deadlines would otherwise be skipped)."""
    app = FastAPI()

    @app.post("/p")
    async def converts() -> dict[str, Any]:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("interrupted") from None
        return {}

    middleware = SafeServeMiddleware(
        app, routes={"/p": ss.Policy(name="conv", timeout_s=0.05, fallbacks=STATIC)}
    )
    client = Client()

    async def main() -> int:
        await middleware(scope(), client.receive, client.send)
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert asyncio.run(main()) == 0
    assert client.statuses() == [200]
    [record] = middleware.guards[0].decisions()
    assert [r.code for r in record.reasons] == ["timeout"]


def test_a_notice_taken_by_a_request_with_no_outcome_goes_on_the_next_record() -> None:
    """The client left mid-upload (no outcome): the breaker notice it took is not lost."""
    app = FastAPI()

    @app.post("/p")
    async def raw(request: Request) -> dict[str, Any]:
        return {"size": len(await request.body())}

    middleware = SafeServeMiddleware(app, routes={"/p": ss.Policy(name="left", fallbacks=STATIC)})
    guard = middleware.guards[0]
    guard.breaker.post_notice(RawReason("store_unavailable", "admit", "redis down"))

    async def leave() -> Message:
        return {"type": "http.disconnect"}

    async def main() -> None:
        with contextlib.suppress(ClientDisconnect):
            await middleware(scope(), leave, Client().send)
        client = Client()
        await middleware(scope(), client.receive, client.send)
        assert client.statuses() == [200]

    asyncio.run(main())
    [record] = guard.decisions()
    assert record.served_by == "primary"
    assert "store_unavailable" in [r.code for r in record.reasons]


def test_tracing_turned_on_by_a_reload_mid_request_does_not_break_it() -> None:
    """A request admitted before the reload keeps no span; its answer still goes out."""
    app = FastAPI()
    release = asyncio.Event()

    @app.post("/p")
    async def waits() -> dict[str, Any]:
        await release.wait()
        return {"label": "approve"}

    middleware = SafeServeMiddleware(app, routes={"/p": ss.Policy(name="tr", fallbacks=STATIC)})
    guard = middleware.guards[0]
    client = Client()

    async def main() -> None:
        request = asyncio.create_task(middleware(scope(), client.receive, client.send))
        await asyncio.sleep(0.01)
        guard.reload(ss.Policy(name="tr", fallbacks=STATIC, log=ss.DecisionLogConfig(trace=True)))
        release.set()
        await request

    asyncio.run(main())
    assert client.statuses() == [200]
    assert json.loads(client.sent[1]["body"]) == {"label": "approve"}


def failing_app() -> FastAPI:
    app = FastAPI()

    @app.post("/p")
    async def down() -> JSONResponse:
        return JSONResponse({"error": "the model is down"}, 503)

    return app


def test_a_fallback_is_not_kept_waiting_for_a_body_it_cannot_use() -> None:
    """An open breaker answers from a fallback without the endpoint: the body is read for the
    fallback only up to max_body_bytes (past it the fallback gets None anyway)."""
    middleware, seen = open_route_keeping_bodies("big", max_body_bytes=1000)
    reads = 0

    async def endless_upload() -> Message:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": reads < 2000}

    client = Client()
    asyncio.run(middleware(scope(), endless_upload, client.send))
    assert client.statuses() == [200]
    assert seen == [None]
    assert reads <= 2


def test_a_stalled_upload_does_not_hold_the_fallback_past_the_time_budget() -> None:
    """The endpoint waits for a body the client stalls on: at the deadline the fallback answers
    at once, with None for the body it did not get."""
    seen: list[Any] = []
    fallback = ss.Fallback.model("backup", lambda body: seen.append(body) or {"label": "review"})
    app = FastAPI()

    @app.post("/p")
    async def reads_the_body(request: Request) -> dict[str, Any]:
        return {"size": len(await request.body())}

    middleware = SafeServeMiddleware(
        app, routes={"/p": ss.Policy(name="stall", timeout_s=0.2, fallbacks=[fallback])}
    )
    parts = [b'{"amount":', b" 1}"]

    async def stalling() -> Message:
        if len(parts) == 2:
            return {"type": "http.request", "body": parts.pop(0), "more_body": True}
        await asyncio.sleep(3)  # the client stalls mid-upload
        return {"type": "http.request", "body": parts.pop(0), "more_body": False}

    client = Client()
    t0 = time.perf_counter()
    asyncio.run(middleware(scope(), stalling, client.send))
    assert client.statuses() == [200]
    assert time.perf_counter() - t0 < 2.0  # generous: the budget is 0.2 s, the stall 3 s
    assert seen == [None]


def open_route_keeping_bodies(name: str, **options: Any) -> tuple[SafeServeMiddleware, list[Any]]:
    """A route whose breaker is open, and the bodies its fallback was given."""
    seen: list[Any] = []
    fallback = ss.Fallback.model("backup", lambda body: seen.append(body) or {"label": "review"})
    policy = ss.Policy(name=name, fallbacks=[fallback])
    middleware = SafeServeMiddleware(failing_app(), routes={"/p": policy}, **options)
    middleware.guards[0].force_open()
    return middleware, seen


def after_the_response(fails: bool) -> tuple[FastAPI, asyncio.Event, list[str]]:
    """/p answers (503 when `fails`) with a background task that waits for the event."""
    app = FastAPI()
    done = asyncio.Event()
    ran: list[str] = []

    async def background() -> None:
        await done.wait()
        ran.append("background")

    @app.post("/p")
    async def answer() -> JSONResponse:
        status = 503 if fails else 200
        return JSONResponse({"label": "endpoint"}, status, background=BackgroundTask(background))

    return app, done, ran


async def until_answered(client: Client) -> None:
    while not any(m["type"] == "http.response.body" for m in client.sent):
        await asyncio.sleep(0.01)


def test_the_bulkhead_slot_is_freed_when_the_response_is_over() -> None:
    """Background tasks run after the response: they do not hold the route's slot, so the
    next request, one at a time, is served by the endpoint, not refused as overloaded."""
    app, done, ran = after_the_response(fails=False)
    policy = ss.Policy(name="slot", fallbacks=STATIC, max_concurrent=1)
    middleware = SafeServeMiddleware(app, routes={"/p": policy})
    [guard] = middleware.guards

    async def main() -> list[int]:
        first, second = Client(), Client()
        running = [asyncio.create_task(middleware(scope(), *first.io))]
        await asyncio.wait_for(until_answered(first), 5)
        running.append(asyncio.create_task(middleware(scope(), *second.io)))
        await asyncio.wait_for(until_answered(second), 5)
        assert not running[0].done()  # its background task still waits
        done.set()
        await asyncio.wait_for(asyncio.gather(*running), 5)
        return first.statuses() + second.statuses()

    assert asyncio.run(main()) == [200, 200]
    assert ran == ["background", "background"]
    assert guard.stats()["served_by"] == {"primary": 2}


@pytest.mark.parametrize("budget", [None, 0.2])
def test_a_fallback_answers_once_the_5xx_response_is_over(budget: float | None) -> None:
    """Not once the app returns: its background task still runs (and is not cancelled by the
    time budget), and the record says the endpoint answered 503, not that it timed out."""
    app, done, ran = after_the_response(fails=True)
    policy = ss.Policy(name=f"late-{budget}", fallbacks=STATIC, timeout_s=budget)
    middleware = SafeServeMiddleware(app, routes={"/p": policy})
    [guard] = middleware.guards

    async def main() -> Client:
        client = Client()
        running = asyncio.create_task(middleware(scope(), *client.io))
        await asyncio.wait_for(until_answered(client), 5)
        await asyncio.sleep(0.3)  # past the time budget
        assert not running.done()
        done.set()
        await asyncio.wait_for(running, 5)
        return client

    client = asyncio.run(main())
    assert client.statuses() == [200]
    assert json.loads(client.sent[-1]["body"]) == {"label": "review"}
    assert ran == ["background"]
    [decision] = guard.decisions()
    assert [(r.code, r.detail) for r in decision.reasons] == [("error", "EndpointError: HTTP 503")]


def test_a_wrapped_apps_crash_is_answered_by_the_fallback_and_raised_for_the_log() -> None:
    """Wrapping a whole app, the middleware sees its error middleware's 500 (a fallback
    answers), then the crash the error middleware raises again for the server to log."""
    app = FastAPI()

    @app.post("/p")
    async def crash() -> dict[str, Any]:
        raise RuntimeError("the model is down")

    middleware = SafeServeMiddleware(app, routes={"/p": ss.Policy(name="whole", fallbacks=STATIC)})
    client = Client()
    with pytest.raises(RuntimeError, match="the model is down"):
        asyncio.run(middleware(scope(), *client.io))
    assert client.statuses() == [200]
    assert json.loads(client.sent[-1]["body"]) == {"label": "review"}
    [decision] = middleware.guards[0].decisions()
    assert (decision.served_by, decision.reasons[0].detail) == ("static", "EndpointError: HTTP 500")


def test_a_failed_call_keeps_its_record_when_an_outer_body_limit_refuses_the_body() -> None:
    """FastAPI's own body limit sits outside the middleware: the fallback's read of the body
    raises its 413. The client gets that 413; the endpoint's failure is still on a record."""
    app = FastAPI(max_body_size=100)

    @app.post("/p")
    async def crash() -> dict[str, Any]:
        raise RuntimeError("the model is down")

    app.add_middleware(
        SafeServeMiddleware, routes={"/p": ss.Policy(name="limited", fallbacks=STATIC)}
    )

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/p", json={"a": "x" * 300})

    assert asyncio.run(main()).status_code == 413
    [guard] = [g for g in registry.live_guards() if g.name == "limited"]
    [decision] = guard.decisions()
    assert decision.served_by is None
    assert [r.code for r in decision.reasons] == ["error"]
    assert guard.stats()["calls"] == 1


def stuck_after_the_deadline(kind: str) -> tuple[FastAPI, threading.Event]:
    """/p outlives its deadline in a way cancellation cannot cut short: a sync endpoint's
    thread behind a BaseHTTPMiddleware (its task group waits for the shielded thread), or
    cleanup that awaits once cancelled. Both end when the event is set."""
    app = FastAPI()
    release = threading.Event()

    async def cleanup() -> None:
        await asyncio.to_thread(release.wait, 5)

    if kind == "sync endpoint behind BaseHTTPMiddleware":

        @app.middleware("http")  # added before ours: it runs inside it
        async def tag(request: Request, call_next: Any) -> Any:
            return await call_next(request)

        @app.post("/p")
        def slow() -> dict[str, Any]:
            release.wait(5)
            return {"label": "late"}

    else:

        @app.post("/p")
        async def slow_async() -> dict[str, Any]:
            try:
                await asyncio.sleep(5)
            finally:
                await cleanup()
            return {"label": "late"}

    return app, release


@pytest.mark.parametrize("kind", ["sync endpoint behind BaseHTTPMiddleware", "cleanup that awaits"])
def test_the_fallback_answers_at_the_deadline_when_the_endpoint_cannot_stop(kind: str) -> None:
    app, release = stuck_after_the_deadline(kind)
    name = f"stuck-{kind.split(maxsplit=1)[0]}"
    policy = ss.Policy(name=name, fallbacks=STATIC, timeout_s=0.2)
    app.add_middleware(SafeServeMiddleware, routes={"/p": policy})

    async def main() -> tuple[Client, float]:
        client = Client()
        t0 = time.perf_counter()
        running = asyncio.create_task(app(scope(), *client.io))
        await asyncio.wait_for(until_answered(client), 3)
        answered_s = time.perf_counter() - t0
        assert not running.done()  # the endpoint is still stuck
        release.set()
        await asyncio.wait_for(running, 5)  # then ends without an error
        return client, answered_s

    client, answered_s = asyncio.run(main())
    assert answered_s < 1.5  # generous: the endpoint would take 5 s
    assert client.statuses() == [200]  # the endpoint's late answer is dropped
    assert json.loads(client.sent[1]["body"]) == {"label": "review"}
    [guard] = [g for g in registry.live_guards() if g.name == name]
    [decision] = guard.decisions()
    assert [r.code for r in decision.reasons] == ["timeout"]


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def test_a_fallback_answering_at_the_deadline_sees_its_own_requests_context() -> None:
    """The deadlines' timer runs in the context of the request that set it: a fallback started
    from it (an endpoint behind a BaseHTTPMiddleware unwinds too late) must not see another
    request's context variables."""
    app = FastAPI()

    @app.middleware("http")  # inside ours: the endpoint unwinds through its task group
    async def tag(request: Request, call_next: Any) -> Any:
        return await call_next(request)

    @app.post("/p")
    async def slow() -> dict[str, Any]:
        await asyncio.sleep(5)
        return {}

    async def backup(body: Any) -> dict[str, str]:
        return {"request": REQUEST_ID.get()}

    policy = ss.Policy(
        name="own-context", timeout_s=0.1, fallbacks=[ss.Fallback.model("backup", backup)]
    )
    app.add_middleware(SafeServeMiddleware, routes={"/p": policy})

    async def one(request_id: str) -> Client:
        REQUEST_ID.set(request_id)  # as a request-id middleware outside ours would
        client = Client()
        await app(scope(), *client.io)
        return client

    async def main() -> list[Client]:
        return list(await asyncio.wait_for(asyncio.gather(one("A"), one("B"), one("C")), 5))

    answers = [json.loads(c.sent[1]["body"]) for c in asyncio.run(main())]
    assert answers == [{"request": "A"}, {"request": "B"}, {"request": "C"}]


def test_a_fallback_cut_off_by_a_cancellation_leaves_the_calls_record() -> None:
    """The client went away (the server cancels the request) while a fallback answered: the
    endpoint's failure is still on a record, with nothing serving it."""
    entered = asyncio.Event()

    async def slow_backup(body: Any) -> dict[str, str]:
        entered.set()
        await asyncio.sleep(5)
        return {}

    policy = ss.Policy(name="cut-off", fallbacks=[ss.Fallback.model("slow", slow_backup)])
    middleware = SafeServeMiddleware(after_the_response(fails=True)[0], routes={"/p": policy})
    [guard] = middleware.guards

    async def main() -> None:
        running = asyncio.create_task(middleware(scope(), *Client().io))
        await asyncio.wait_for(entered.wait(), 5)
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running

    asyncio.run(main())
    [decision] = guard.decisions()
    assert decision.served_by is None
    assert decision.reasons[0].code == "error"
    assert guard.breaker.figures()["consecutive_failures"] == 1


def test_another_cancellation_right_after_the_deadline_still_leaves_a_record() -> None:
    """The endpoint is stuck after the deadline and another cancellation (the server going
    away) comes before the fallback's own task has run: that cancellation goes on, and the
    call is still counted and recorded (its breaker permit used), not dropped."""

    async def endpoint(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:  # the deadline's; the server's comes a turn later
            asyncio.get_running_loop().call_soon(_current_task_cancel())
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            raise

    policy = ss.Policy(name="raced", timeout_s=0.1, fallbacks=STATIC)
    middleware = SafeServeMiddleware(endpoint, routes={"/p": policy})
    [guard] = middleware.guards

    async def main() -> None:
        with pytest.raises(asyncio.CancelledError):
            await middleware(scope(), *Client().io)
        await asyncio.sleep(0.05)  # the fallback's task finishes on its own

    asyncio.run(main())
    assert guard.stats()["calls"] == 1
    [decision] = guard.decisions()
    assert decision.reasons[0].code == "timeout"


def _current_task_cancel() -> Any:
    task = asyncio.current_task()
    assert task is not None
    return task.cancel

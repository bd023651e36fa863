"""SafeServeMiddleware's cost under load: the same endpoint served bare and guarded by uvicorn.

Each variant runs in its own uvicorn process on loopback (uvloop and httptools when installed).
A lean load generator in this process (an asyncio Protocol per keep-alive connection, one
request in flight on each) sends the same number of requests to every variant in many short
rounds (48 of 3,000 requests in the closed loop, of 1,000 at a fixed rate); the order of the
variants alternates from round to round (ABC, CBA, ...) so that drift hits every variant alike.
Each round gives a throughput, latency percentiles and the server's own CPU time per request
(from /proc, so the load generator's cost is not in it). A variant's figures are those of its
median round, compared with bare's median round; the brackets after a comparison hold its 90 %
bootstrap interval (each side's rounds resampled), and a target (throughput >= 95 %, p99 at most
+0.2 ms) is "met" or "missed" only when the whole interval says so.

Why short rounds and medians: on the 2-core VM this was written on, the noise is fast and
nearly white. Bare's throughput moved by about 10 % from one quarter of a second to the next
(lag-1 autocorrelation 0.2), so pairing a variant's round with bare's next to it cancels little;
the median of many rounds does. Resampling a series of bare's rounds of 1,000, the ratio of two
medians of 48 rounds spread by 1.5 % (standard deviation), the median of 16 paired ratios by
3.9 %; in a full run, the closed loop's 90 % intervals are about 9 points wide. The closed loop's
rounds are longer: at a round's start the 32 connections start at once, and in rounds of 1,000
one of them was often served last again and again, so that one round in two had a p99 several
times the others' (not so in rounds of 3,000).

The variants: bare; "headers only", a middleware that wraps `send` to add the two X-SafeServe
headers and does nothing else (the floor for any middleware with the issue's headers);
"minimal", which also keeps the body for a fallback, holds back a 5xx start and catches the
endpoint's failures (the floor for the issue's features, without breaker or metrics); the
route guarded by a policy (breaker, static fallback); the same with a time budget; and the
guarded route in a process that also has a guarded function, so that endpoints are watched for
its degradations (until a process has one, the middleware skips that).

Two loads, one after the other:
- closed loop (the issue's "20k requests at concurrency 32"): each connection sends its next
  request as soon as the last is answered, which saturates the server. Throughput is measured
  here. The latency of a saturated server is concurrency / throughput (Little's law; a request
  waits for the 31 others, p99 about twice that), so its p99 moves with throughput alone:
  +0.2 ms there is a throughput within 1-2.5 % of bare's (printed with the figures).
- fixed rate (as wrk2 and k6's constant-arrival-rate measure latency), at a quarter and at half
  of bare's closed-loop throughput: requests become due at that rate whatever the server's
  speed, with at most 32 in flight; a request due while all connections are busy waits, and its
  wait counts. Latency is measured here: what a request waits for at a load the server can
  carry. A server that is not saturated spends more CPU per request (no batching, cold caches),
  so the bench prints how busy bare's server was at each rate.

First, the same apps are called in this process through ASGI with in-memory messages (no
server, no sockets): the middleware's own time per request, free of the network's and the
scheduler's noise that dominates single rounds on a shared machine, and the number of Python
bytecodes a request runs, which no load can move.

    python bench/fastapi.py [--rounds 48] [--round 3000] [--concurrency 32]
                            [--load 0.25 0.5] [--variants guarded ...] [--quick]
"""

import os
import random
import sys
from pathlib import Path

# This file is named fastapi.py: keep its directory off sys.path so `import fastapi` is the
# library, and measure the safeserve of this checkout.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_root = str(Path(_here).parent)
if _root not in sys.path:
    sys.path.insert(0, _root)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import Awaitable, Callable  # noqa: E402
from typing import Any  # noqa: E402

VARIANTS = {
    "bare": "no middleware",
    "headers only": "the floor: a middleware that adds the two headers and does nothing else",
    "minimal": "the floor of the features: body kept, 5xx held back, failures caught, headers",
    "guarded": "SafeServeMiddleware: breaker + static fallback",
    "guarded+timeout": "same, plus timeout_s=1.0",
    "guarded+helper": "guarded, in a process with a guarded function its endpoints may call",
}
BODY = json.dumps({"amount": 12.5, "merchant": "shop-17", "country": "DE"}).encode()
REQUEST = (
    b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


def build_app(variant: str) -> Any:
    """The app served for one variant: one JSON endpoint, guarded or not."""
    from fastapi import FastAPI
    from pydantic import BaseModel

    import safeserve as ss
    from safeserve.fastapi import SafeServeMiddleware

    class Txn(BaseModel):
        amount: float
        merchant: str
        country: str

    app = FastAPI()

    @app.post("/predict")
    async def predict(txn: Txn) -> dict[str, Any]:
        return {"label": "approve" if txn.amount < 1000 else "review", "confidence": 0.93}

    if variant == "headers only":
        app.add_middleware(HeadersOnly)
    elif variant == "minimal":
        app.add_middleware(Minimal)
    elif variant != "bare":
        policy = ss.Policy(
            name="bench",
            timeout_s=1.0 if variant == "guarded+timeout" else None,
            fallbacks=[ss.Fallback.static("default", {"label": "review"})],
        )
        app.add_middleware(SafeServeMiddleware, routes={"/predict": policy})
    if variant == "guarded+helper":  # the middleware now watches endpoints for guarded calls
        app.state.helper = ss.guard(name="helper")(lambda x: x)
    return app


class HeadersOnly:
    """The least a middleware with the issue's headers does: wrap `send`, add two headers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Minimal:
    """The least a middleware does on a healthy request for the issue's features, written
    without safeserve: keep the body for a fallback, hold back a 5xx start, catch the endpoint's
    failures and answer from a fallback, add the two headers. No breaker, bulkhead, time
    budget, metrics, records or outcomes of guarded calls."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.paths = {"/predict"}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        kept: list[dict[str, Any]] = []  # what a fallback would parse
        started = failed = False

        async def receive_kept() -> dict[str, Any]:
            message = await receive()
            kept.append(message)
            return message

        async def send_checked(message: dict[str, Any]) -> None:
            nonlocal started, failed
            if not (started or failed) and message["type"] == "http.response.start":
                if message["status"] >= 500:
                    failed = True
                    return
                started = True
                message["headers"] = [*message.get("headers", ()), *HEADERS]
            if started:
                await send(message)

        try:
            await self.app(scope, receive_kept, send_checked)
        except Exception:
            if started:
                raise
        if not started:  # a 5xx, an exception, or no answer: the fallback's
            body = json.dumps({"label": "review"}).encode()
            length = (b"content-length", b"%d" % len(body))
            headers = [(b"content-type", b"application/json"), length, *DEGRADED]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})


HEADERS = [(b"x-safeserve-served-by", b"primary"), (b"x-safeserve-degraded", b"false")]
DEGRADED = [(b"x-safeserve-served-by", b"default"), (b"x-safeserve-degraded", b"true")]


class InProcess:
    """The variants' apps called through ASGI in this process, with in-memory messages (no
    server, no sockets); each variant's process state (`context.armed`) set as in its server."""

    def __init__(self, variants: list[str]) -> None:
        self.apps = {v: build_app(v) for v in variants}
        self.request = {"type": "http.request", "body": BODY, "more_body": False}
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/predict",
            "raw_path": b"/predict",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(BODY)),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
            "state": {},
        }
        self.statuses: set[int] = set()
        self.loop = new_loop()

    async def receive(self) -> dict[str, Any]:
        return self.request

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.statuses.add(message["status"])

    async def serve(self, app: Any, n: int) -> float:
        """Seconds for `n` requests."""
        scope, receive, send = self.scope, self.receive, self.send
        t0 = time.perf_counter()
        for _ in range(n):
            await app(dict(scope), receive, send)
        return time.perf_counter() - t0

    def run(self, variant: str, n: int) -> float:
        self.arm(variant)
        return self.loop.run_until_complete(self.serve(self.apps[variant], n))

    @staticmethod
    def arm(variant: str) -> None:
        from safeserve import context

        context.armed = variant == "guarded+helper"  # as in the variant's own process

    def check(self) -> None:
        if self.statuses != {200}:
            raise RuntimeError(f"unexpected statuses: {sorted(self.statuses)}")

    def close(self) -> None:
        self.loop.close()


def in_process(variants: list[str], repeats: int, requests: int = 2000) -> dict[str, float]:
    """µs per request with the app called directly: `repeats` runs of `requests` per variant,
    in a new random order each time; the lower quartile of the runs, which load elsewhere on
    the machine can only raise."""
    calls = InProcess(variants)
    order = list(calls.apps)
    shuffle = random.Random(0).shuffle
    try:
        times: dict[str, list[float]] = {v: [] for v in order}
        for v in order:  # warm-up
            calls.run(v, 2000)
        for _ in range(repeats):
            shuffle(order)
            for v in order:
                times[v].append(calls.run(v, requests) / requests * 1e6)
    finally:
        calls.close()
    calls.check()
    return {v: statistics.quantiles(t, n=4)[0] for v, t in times.items()}


def bytecodes(variants: list[str], requests: int = 100) -> dict[str, float]:
    """Python bytecodes run per request, by variant (after a warm-up that fills the breaker's
    window): a count the machine's load cannot move."""
    calls = InProcess(variants)
    counts: dict[str, float] = {}
    executed = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal executed
        frame.f_trace_opcodes = True
        if event == "opcode":
            executed += 1
        return trace

    try:
        for v in calls.apps:
            calls.run(v, 1000)
            calls.arm(v)
            serving = calls.serve(calls.apps[v], requests)
            executed = 0
            sys.settrace(trace)  # the requests, and the little it takes to run them on the loop
            try:
                calls.loop.run_until_complete(serving)
            finally:
                sys.settrace(None)
            counts[v] = executed / requests
    finally:
        calls.close()
    calls.check()
    return counts


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed, as uvicorn uses it; else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(variant: str, port: int) -> None:
    import uvicorn

    uvicorn.run(
        build_app(variant), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(variant: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = [sys.executable, os.path.abspath(__file__), "--serve", variant, "--port", str(port)]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {variant} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server for {variant} did not start")


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by all threads of process `pid` (Linux schedstat, in ns)."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except OSError:
        return float("nan")
    return total / 1e9


class Connection(asyncio.Protocol):
    """One keep-alive connection sending `count` requests back to back, timing each."""

    def __init__(self, count: int, latencies: list[float], done: asyncio.Future[None]) -> None:
        self.left = count
        self.latencies = latencies
        self.done = done
        self.buffer = b""
        self.need = -1  # bytes of the current response, once its head has arrived
        self.t = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        self.t = time.perf_counter()
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        while True:
            if self.need < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buffer[:end].lower()
                if not head.startswith(b"http/1.1 200"):
                    self.fail(RuntimeError(f"unexpected response: {head[:60]!r}"))
                    return
                start = head.index(b"content-length:") + 15
                self.need = end + 4 + int(head[start : head.index(b"\r\n", start)])
            if len(buffer) < self.need:
                break
            self.latencies.append(time.perf_counter() - self.t)
            buffer = buffer[self.need :]
            self.need = -1
            self.answered()
        self.buffer = buffer

    def answered(self) -> None:
        self.left -= 1
        if self.left:
            self.send()
        else:
            self.transport.close()
            if not self.done.done():
                self.done.set_result(None)

    def fail(self, exc: Exception) -> None:
        self.transport.close()
        if not self.done.done():
            self.done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.left and not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed by the server"))


class Paced(Connection):
    """A keep-alive connection that sends only when the pacer hands it a request."""

    def __init__(self, pacer: "Pacer") -> None:
        super().__init__(0, pacer.latencies, pacer.done)
        self.pacer = pacer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.pacer.idle.append(self)

    def start(self, due: float) -> None:
        self.t = due  # waiting for a free connection counts as latency
        self.transport.write(REQUEST)

    def answered(self) -> None:
        self.pacer.finished(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pacer.outstanding and not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed by the server"))


class Pacer:
    """Open-loop load: requests become due at a fixed rate whatever the server's speed.

    A closed loop (each connection sends its next request as soon as the last one is answered)
    keeps the server saturated, so its latency is concurrency / throughput and a p99 there
    measures throughput again. At a fixed rate below saturation the p99 is what a request waits
    for; a request due while all connections are busy waits in a queue here, and that wait counts
    (no coordinated omission). Requests are released on the event loop's timer ticks (about a
    millisecond), so they arrive in small bursts, as traffic does.
    """

    def __init__(self, requests: int, rate: float, done: asyncio.Future[None]) -> None:
        self.requests = requests
        self.rate = rate
        self.done = done
        self.latencies: list[float] = []
        self.idle: list[Paced] = []
        self.backlog: deque[float] = deque()
        self.outstanding = requests

    def finished(self, conn: Paced) -> None:
        self.outstanding -= 1
        if self.outstanding == 0:
            if not self.done.done():
                self.done.set_result(None)
        elif self.backlog:
            conn.start(self.backlog.popleft())
        else:
            self.idle.append(conn)

    async def run(self) -> None:
        t0 = time.perf_counter()
        released = 0
        while released < self.requests:
            now = time.perf_counter()
            due = min(self.requests, int((now - t0) * self.rate) + 1)
            for _ in range(due - released):
                if self.idle:
                    self.idle.pop().start(now)
                else:
                    self.backlog.append(now)
            released = due
            await asyncio.sleep(0.001)
        await self.done


def connect(port: int) -> socket.socket:
    """A loopback connection to `port` that sends each request at once (no Nagle delay)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def paced(
    port: int, requests: int, rate: float, concurrency: int
) -> tuple[float, list[float]]:
    """`requests` requests at `rate` per second over at most `concurrency` connections."""
    loop = asyncio.get_running_loop()
    pacer = Pacer(requests, rate, loop.create_future())
    transports = []
    for _ in range(concurrency):
        transport, _ = await loop.create_connection(lambda: Paced(pacer), sock=connect(port))
        transports.append(transport)
    t0 = time.perf_counter()
    try:
        await pacer.run()
    finally:
        for transport in transports:
            transport.close()
    return time.perf_counter() - t0, pacer.latencies


async def load(port: int, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Send `requests` requests over `concurrency` connections: (seconds, latencies)."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    per = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    dones = [loop.create_future() for _ in per]
    # connect first, then start every connection at once: the clock sees requests only
    conns = [(connect(port), count, done) for count, done in zip(per, dones, strict=True)]
    t0 = time.perf_counter()
    for sock, count, done in conns:
        await loop.create_connection(lambda c=count, d=done: Connection(c, latencies, d), sock=sock)
    await asyncio.gather(*dones)
    return time.perf_counter() - t0, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1]


Round = dict[str, float]
Servers = dict[str, tuple[subprocess.Popen[bytes], int]]


def measure(proc: subprocess.Popen[bytes], run: Awaitable[tuple[float, list[float]]]) -> Round:
    """One round against one server: req/s, p50/p99 in ms, server CPU µs per request."""
    gc.collect()
    gc.disable()  # the load generator's own pauses would land on whichever variant runs
    try:
        cpu0, own0 = cpu_seconds(proc.pid), time.process_time()
        seconds, lat = asyncio.get_event_loop().run_until_complete(run)
        cpu, own = cpu_seconds(proc.pid) - cpu0, time.process_time() - own0
    finally:
        gc.enable()
    return {
        "rps": len(lat) / seconds,
        "p50": percentile(lat, 0.50) * 1e3,
        "p99": percentile(lat, 0.99) * 1e3,
        "cpu_us": cpu / len(lat) * 1e6,
        "client_us": own / len(lat) * 1e6,
    }


def rounds_of(
    servers: Servers, rounds: int, run: Callable[[int], Awaitable[tuple[float, list[float]]]]
) -> dict[str, list[Round]]:
    """`rounds` rounds of `run(port)` on every server, the order alternating (ABC, CBA, ...)."""
    order = list(servers)
    for v in order:  # warm-up: connections, imports, caches, the breaker's window
        measure(servers[v][0], run(servers[v][1]))
    out: dict[str, list[Round]] = {v: [] for v in order}
    for i in range(rounds):
        for v in order if i % 2 == 0 else order[::-1]:
            out[v].append(measure(servers[v][0], run(servers[v][1])))
    return out


def median(rounds: list[Round], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def interval(
    rounds: list[Round], bare: list[Round], key: str, compare: Callable[[float, float], float]
) -> tuple[float, float, float]:
    """`compare` of the variant's median round and bare's, and the 90 % interval of that figure
    over 2,000 bootstrap resamples of each side's rounds: how far the machine's noise could have
    moved it."""
    mine, theirs = [r[key] for r in rounds], [r[key] for r in bare]
    pick = random.Random(0).choices
    resampled = sorted(
        compare(
            statistics.median(pick(mine, k=len(mine))),
            statistics.median(pick(theirs, k=len(theirs))),
        )
        for _ in range(2000)
    )
    figure = compare(statistics.median(mine), statistics.median(theirs))
    return figure, resampled[100], resampled[1899]


def report(results: dict[str, list[Round]], throughput: bool) -> None:
    """One line per variant (its median round), then how it compares with bare's median round,
    with the 90 % interval the noise leaves, and against the targets."""
    bare = results["bare"]
    for v, r in results.items():
        what = VARIANTS[v]
        line = f"{v:16} {median(r, 'rps'):7.0f} req/s" if throughput else f"{v:16}"
        line += (
            f"  p50 {median(r, 'p50'):6.3f} ms  p99 {median(r, 'p99'):6.3f} ms"
            f"  server {median(r, 'cpu_us'):5.1f} µs/req"
        )
        if v != "bare":
            line += f"\n{'':16} "
            if throughput:
                ratio, low, high = interval(r, bare, "rps", lambda a, b: a / b)
                line += (
                    f"throughput {ratio:6.1%} of bare ({low:.1%}..{high:.1%}; "
                    f"target >= 95 %: {verdict(low >= 0.95, high < 0.95)})  "
                )
            delta, low, high = interval(r, bare, "p99", lambda a, b: a - b)
            cpu = median(r, "cpu_us") - median(bare, "cpu_us")
            line += (
                f"p99 {delta:+.3f} ms ({low:+.3f}..{high:+.3f}; "
                f"target <= +0.2 ms: {verdict(high <= 0.2, low > 0.2)})  server {cpu:+.1f} µs/req"
            )
        print(f"{line}   ({what})")


def verdict(met: bool, missed: bool) -> str:
    """Met or missed when the whole interval says so; else this run cannot tell."""
    return "met" if met else "missed" if missed else "within the noise"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="per variant and load (48; --quick 12)")
    parser.add_argument(
        "--round", type=int, default=3000, help="requests in a closed-loop round (1/3 at a rate)"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--load",
        type=float,
        nargs="+",
        default=[0.25, 0.5],
        help="fixed rates, as fractions of bare's closed-loop throughput",
    )
    parser.add_argument("--quick", action="store_true", help="12 rounds, 10 in-process runs")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="the variants to compare with bare (all); fewer leave time for more rounds",
    )
    parser.add_argument("--serve", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    if args.rounds is None:
        args.rounds = 12 if args.quick else 48
    if args.round < 3 * args.concurrency:  # a connection with no request would never finish
        parser.error(f"--round must be at least 3 x --concurrency ({3 * args.concurrency})")
    repeats = 10 if args.quick else 40
    variants = [v for v in VARIANTS if v == "bare" or v in args.variants]
    inproc = in_process(variants, repeats)
    codes = bytecodes(variants)
    print(
        f"in process (ASGI calls, no server): µs per request, lower quartile of {repeats} runs; "
        "Python bytecodes run per request"
    )
    bare_us, bare_codes = inproc["bare"], codes["bare"]
    for v, us in inproc.items():
        line = f"  {v:16} {us:6.2f} µs  {codes[v]:6.0f} bytecodes"
        if v != "bare":
            line += f"  +{us - bare_us:.2f} µs ({bare_us / us:.1%} of bare)"
            line += f"  +{codes[v] - bare_codes:.0f} bytecodes"
        print(line)
    print()
    asyncio.set_event_loop(new_loop())
    servers = {v: start_server(v) for v in variants}
    n, conc, rounds = args.round, args.concurrency, args.rounds
    try:
        closed = rounds_of(servers, rounds, lambda port: load(port, n, conc))
        fixed = {}
        for share in args.load:
            rate = share * median(closed["bare"], "rps")
            fixed[share] = (
                rate,
                rounds_of(servers, rounds, lambda p, rate=rate: paced(p, n // 3, rate, conc)),
            )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=10)
        asyncio.get_event_loop().close()
    client = statistics.median(x["client_us"] for r in closed.values() for x in r)
    print(
        f"Closed loop: {n * rounds} requests per variant on {conc} connections, each "
        f"sending its next request when answered; {rounds} rounds in alternating order, "
        f"{os.cpu_count()} CPUs; each variant's median round, and in brackets the 90 % "
        f"interval the noise leaves; the load generator used {client:.1f} µs of CPU per request"
    )
    report(closed, throughput=True)
    bare_p99 = median(closed["bare"], "p99")
    print(
        f"  The server is saturated: a request waits for the {conc - 1} others, so latency is "
        f"concurrency / throughput and p99 +0.2 ms here is throughput >= "
        f"{bare_p99 / (bare_p99 + 0.2):.1%} of bare.\n"
    )
    for share, (rate, results) in fixed.items():
        busy = rate * median(results["bare"], "cpu_us") / 1e6
        print(
            f"Fixed rate: {rate:.0f} req/s ({share:.0%} of bare's throughput; bare's server "
            f"{busy:.0%} busy) for every variant, at most {conc} requests in flight, "
            f"{n // 3 * rounds} requests per variant in {rounds} rounds; a request that "
            "waits for a free connection "
            "counts its wait"
        )
        report(results, throughput=False)
        print()


if __name__ == "__main__":
    main()

"""SafeServeMiddleware's cost under load: the same endpoint served bare and guarded by uvicorn.

Each variant runs in its own uvicorn process on loopback (uvloop and httptools when installed);
a raw-socket HTTP/1.1 keep-alive load generator in this process sends the same bounded number of
requests at a fixed concurrency, in alternating rounds so drift hits every variant alike. Prints
throughput and latency percentiles per variant and the ratios against bare (targets: throughput
>= 95 %, p99 at most +0.2 ms).

    python bench/fastapi.py [--requests 20000] [--concurrency 32] [--rounds 4]
"""

import os
import sys

# This file is named fastapi.py: keep its directory off sys.path so `import fastapi` is the library.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

VARIANTS = {
    "bare": "no middleware",
    "guarded": "SafeServeMiddleware: breaker + rules fallback",
    "guarded+timeout": "same, plus timeout_s=1.0 (endpoint run as its own task)",
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

    if variant != "bare":
        policy = ss.Policy(
            name="bench",
            timeout_s=1.0 if variant == "guarded+timeout" else None,
            fallbacks=[ss.Fallback.static("default", {"label": "review"})],
        )
        app.add_middleware(SafeServeMiddleware, routes={"/predict": policy})
    return app


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
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server for {variant} did not start")


async def _client(port: int, count: int, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    perf = time.perf_counter
    try:
        for _ in range(count):
            t = perf()
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response: {head[:60]!r}")
            start = head.lower().index(b"content-length:") + 15
            length = int(head[start : head.index(b"\r\n", start)])
            await reader.readexactly(length)
            latencies.append(perf() - t)
    finally:
        writer.close()


async def load(port: int, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Send `requests` requests over `concurrency` connections: (seconds, latencies)."""
    latencies: list[float] = []
    per = requests // concurrency
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, per, latencies) for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="per variant, all rounds")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--serve", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    servers = {v: start_server(v) for v in VARIANTS}
    elapsed = dict.fromkeys(VARIANTS, 0.0)
    latencies: dict[str, list[float]] = {v: [] for v in VARIANTS}
    per_round = args.requests // args.rounds
    try:
        for _, port in servers.values():  # warm-up: connections, imports, caches
            asyncio.run(load(port, 2000, args.concurrency))
        for _ in range(args.rounds):
            for v, (_, port) in servers.items():
                seconds, lat = asyncio.run(load(port, per_round, args.concurrency))
                elapsed[v] += seconds
                latencies[v] += lat
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=10)
    print(
        f"{args.requests} requests per variant, concurrency {args.concurrency}, "
        f"{args.rounds} alternating rounds, {os.cpu_count()} CPUs"
    )
    base_rps = len(latencies["bare"]) / elapsed["bare"]
    base_p99 = percentile(latencies["bare"], 0.99)
    for v, what in VARIANTS.items():
        lat = latencies[v]
        rps = len(lat) / elapsed[v]
        p50, p99 = percentile(lat, 0.50) * 1e3, percentile(lat, 0.99) * 1e3
        line = f"{v:16} {rps:9.0f} req/s  p50 {p50:6.3f} ms  p99 {p99:6.3f} ms"
        if v != "bare":
            delta = p99 - base_p99 * 1e3
            line += f"  throughput {rps / base_rps:6.1%} of bare  p99 {delta:+.3f} ms"
        print(f"{line}   ({what})")


if __name__ == "__main__":
    main()

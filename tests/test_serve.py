"""`safeserve serve`: one predict route per policy, body validated by the policy's schema."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from safeserve.serve import build_app

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "examples" / "policies.yaml"
TXN = {"amount": 120.0, "country": "DE", "customer_id": "c-1"}


def request(app: Any, method: str, url: str, **kw: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, url, **kw)

    return asyncio.run(go())


class TestApp:
    """The app `serve` runs, through the real ASGI stack."""

    def test_predict_answers_with_the_safeserve_headers(self) -> None:
        app = build_app(POLICIES)
        r = request(app, "POST", "/v1/models/fraud/predict", json=TXN)
        assert r.status_code == 200
        assert r.json()["label"] in ("approve", "review")
        assert r.headers["X-SafeServe-Served-By"] == "primary"
        assert r.headers["X-SafeServe-Degraded"] == "false"

    def test_body_is_validated_by_the_policy_schema(self) -> None:
        app = build_app(POLICIES)
        r = request(app, "POST", "/v1/models/fraud/predict", json={"amount": "lots"})
        assert r.status_code == 422
        assert "Traceback" not in r.text

    def test_openapi_shows_the_schema_of_each_route(self) -> None:
        app = build_app(POLICIES)
        spec = request(app, "GET", "/openapi.json").json()
        assert "/v1/models/fraud/predict" in spec["paths"]
        assert "Txn" in spec["components"]["schemas"]

    def test_admin_routes_are_included(self) -> None:
        app = build_app(POLICIES, admin_token="s3cret")
        assert request(app, "GET", "/safeserve/health").status_code == 200
        assert "safeserve" in request(app, "GET", "/safeserve/metrics").text
        r = request(
            app,
            "POST",
            "/safeserve/breakers/fraud/open",
            headers={"Authorization": "Bearer s3cret"},
        )
        assert r.status_code == 200
        r = request(app, "POST", "/v1/models/fraud/predict", json=TXN)
        assert r.status_code == 200
        assert r.headers["X-SafeServe-Degraded"] == "true"
        assert r.headers["X-SafeServe-Served-By"] != "primary"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_safeserve_serve_runs_a_real_uvicorn(tmp_path: Path) -> None:
    """The CLI starts uvicorn on a loopback port and answers a predict request."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "safeserve.cli", "serve", str(POLICIES), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/models/fraud/predict", json=TXN)
                break
            except httpx.TransportError:
                assert proc.poll() is None, "safeserve serve exited"
                assert time.monotonic() < deadline, "safeserve serve did not start"
                time.sleep(0.1)
        assert r.status_code == 200
        assert r.headers["X-SafeServe-Served-By"] == "primary"
    finally:
        proc.terminate()
        proc.wait(10)

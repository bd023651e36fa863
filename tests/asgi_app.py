"""A FastAPI app guarded by `SafeServeMiddleware`, for the tests (in-process and under uvicorn).

`build_app(model, routes, ...)` wires the endpoints below to a controllable `Model`; the
module-level `app` is the one `tests/uvicorn_server.py` serves in a real uvicorn process, where
the request body's `mode` field chooses the endpoint's behaviour.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

import safeserve as ss
from safeserve.fastapi import SafeServeMiddleware, admin_router

SECRET = "model exploded: secret-detail-7f3a"  # must never reach an HTTP body
STREAM_CHUNKS = 3


class Txn(BaseModel):
    amount: float
    card_number: str = "4111-1111-1111-1111"
    mode: str | None = None  # per-request behaviour, for the uvicorn app


class Model:
    """The endpoint's behaviour: "ok", "crash", "slow", "http500", "missing" (404)."""

    def __init__(self, mode: str = "ok", slow_s: float = 1.0, chunk_gap_s: float = 0.0) -> None:
        self.mode = mode
        self.slow_s = slow_s
        self.chunk_gap_s = chunk_gap_s
        self.calls = 0
        self.chunks_made = 0

    def answer(self, txn: Txn) -> dict[str, Any]:
        self.calls += 1
        mode = txn.mode or self.mode
        if mode == "crash":
            raise RuntimeError(SECRET)
        if mode == "http500":
            raise HTTPException(500, SECRET)
        if mode == "missing":
            raise HTTPException(404, "no such item")
        return {"label": "approve", "amount": txn.amount, "served": "endpoint"}


def build_app(
    model: Model,
    routes: Mapping[str, ss.Policy | ss.Guarded],
    guards: list[ss.Guarded] | None = None,  # None: every live guard
    token: str | None = None,
    helper: ss.Guarded | None = None,
) -> FastAPI:
    """An app whose endpoints use `model`; `helper` is a guarded function `/unlisted` calls."""
    app = FastAPI()

    @app.post("/predict")
    async def predict(txn: Txn) -> dict[str, Any]:
        if (txn.mode or model.mode) == "slow":
            await asyncio.sleep(model.slow_s)
        return model.answer(txn)

    @app.post("/predict_sync")
    def predict_sync(txn: Txn) -> dict[str, Any]:
        if (txn.mode or model.mode) == "slow":
            time.sleep(model.slow_s)
        return model.answer(txn)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        return model.answer(Txn(amount=item_id))

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(STREAM_CHUNKS):
                if i:
                    await asyncio.sleep(model.chunk_gap_s)
                model.chunks_made += 1
                yield f"chunk-{i}\n".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.post("/unlisted")
    async def unlisted(txn: Txn) -> dict[str, Any]:
        assert helper is not None
        answer = helper(txn.model_dump())  # a sync guard answers, an async one needs awaiting
        return {"answer": await answer if inspect.isawaitable(answer) else answer}

    app.add_middleware(SafeServeMiddleware, routes=routes)
    app.include_router(admin_router(guards, token=token))
    return app


def rules_fallback() -> ss.Fallback:
    """Answers from the parsed body: large amounts go to review."""
    return ss.Fallback.rules(
        "rules",
        [ss.Rule(when={"amount": {"gt": 1000}}, then={"label": "review"})],
        default={"label": "approve-by-rule"},
    )


served_model = Model(chunk_gap_s=0.2)
app = build_app(
    served_model,
    {
        "/predict": ss.Policy(
            name="served", owner="risk-ml-oncall", timeout_s=0.3, fallbacks=[rules_fallback()]
        ),
        "/stream": ss.Policy(name="served-stream", timeout_s=0.1),
    },
    token="uvicorn-test-token",
)

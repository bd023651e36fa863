"""FastAPI integration under schemathesis: requests generated from the app's OpenAPI schema never
get a 500 or an error body that leaks a trace, an exception message or an input value.

The app stands in for `safeserve serve` (not built yet): a pydantic-bodied model route guarded
with a fallback, one guarded without (so crashes answer 503), and the admin router.
"""

from __future__ import annotations

from typing import Annotated, Any

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from pydantic import BaseModel, Field

import safeserve as ss
from safeserve.fastapi import SafeServeMiddleware, admin_router

SECRET = "model exploded: secret-detail-5c1e"  # must never reach an HTTP body
LEAKS = ("Traceback", "RuntimeError", "Exception", SECRET)


class Transaction(BaseModel):
    amount: Annotated[float, Field(ge=0, le=1e9)]
    merchant: Annotated[str, Field(max_length=64)]
    country: Annotated[str, Field(pattern="^[A-Z]{2}$")]


def score(txn: Transaction) -> dict[str, Any]:
    """The 'model': crashes on large amounts, with a message that must not leak."""
    if txn.amount > 1000:
        raise RuntimeError(SECRET)
    return {"label": "approve", "confidence": 0.93}


def build_app() -> FastAPI:
    """Two guarded model routes (with and without a fallback) and the admin routes."""
    app = FastAPI()

    @app.post("/v1/models/fraud/predict")
    async def predict(txn: Transaction) -> dict[str, Any]:
        return score(txn)

    @app.post("/v1/models/bare/predict")
    def predict_bare(txn: Transaction) -> dict[str, Any]:
        return score(txn)

    rules = ss.Fallback.rules(
        "rules",
        [ss.Rule(when={"amount": {"gt": 5000}}, then={"label": "review"})],
        default={"label": "approve-by-rule"},
    )
    fraud = ss.Policy(name="schema-fraud", owner="risk-ml-oncall", fallbacks=[rules])
    bare = ss.Policy(name="schema-bare", timeout_s=2.0)
    routes = {"/v1/models/fraud/predict": fraud, "/v1/models/bare/predict": bare}
    app.add_middleware(SafeServeMiddleware, routes=routes)
    app.include_router(admin_router(token="schema-admin-token"))
    return app


schema = schemathesis.openapi.from_asgi("/openapi.json", build_app())


@schema.parametrize()
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_server_error_and_no_leak(case: Any) -> None:
    """Any generated request: no 500; a 5xx is the clean 503 or the health check's 503."""
    response = case.call()
    text = response.text
    assert response.status_code != 500, text
    for leak in LEAKS:
        assert leak not in text
    if response.status_code >= 500:
        assert response.status_code == 503
        body = response.json()
        if case.path.startswith("/v1/models/"):
            assert body == {"error": "unavailable", "policy": "schema-bare"}
            assert int(response.headers["retry-after"][0]) >= 1
        else:
            assert body["status"] == "unavailable"

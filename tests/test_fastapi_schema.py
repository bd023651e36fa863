"""FastAPI integration under schemathesis: requests generated from the app's OpenAPI schema never
get a 500 or an error body that leaks a trace, an exception message or an input value.

Two apps: a hand-written one (a pydantic-bodied model route guarded by `SafeServeMiddleware`
with a fallback, one without, so crashes answer 503, and the admin router), and the app
`safeserve serve examples/policies.yaml` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from pydantic import BaseModel, Field

import safeserve as ss
from safeserve.fastapi import SafeServeMiddleware, admin_router
from safeserve.serve import build_app as build_serve_app

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


POLICIES = Path(__file__).resolve().parent.parent / "examples" / "policies.yaml"
serve_schema = schemathesis.openapi.from_asgi("/openapi.json", build_serve_app(POLICIES))


def strings_in(value: Any) -> list[str]:
    """Every string in a generated body (keys and values), to look for in error bodies."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings_in(k), *strings_in(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


@serve_schema.parametrize()
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_safeserve_serve_app_no_server_error_and_no_leak(case: Any) -> None:
    """`safeserve serve`'s app: no 500; a 4xx is a clean body that echoes no input string."""
    response = case.call()
    text = response.text
    assert response.status_code != 500, text
    for leak in LEAKS:
        assert leak not in text
    if response.status_code == 422:
        body = response.json()
        assert set(body) == {"error", "problems"}
        assert all(set(p) == {"loc", "message"} for p in body["problems"])
        # long generated strings only: a short one may be a word of a message by chance
        for value in strings_in(case.body):
            if len(value) >= 8:
                assert value not in text
    if response.status_code >= 500:
        assert response.status_code == 503

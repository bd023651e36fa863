"""A FastAPI service guarded by safeserve: copy it and replace the model.

    pip install -e ".[fastapi]"    # from the repository's root
    SAFESERVE_ADMIN_TOKEN=change-me uvicorn examples.fastapi_app:app --port 8000

    curl -s localhost:8000/predict -H 'content-type: application/json' \\
         -d '{"amount": 1200, "country": "DE"}' -i
    curl -s localhost:8000/safeserve/health
    curl -s -X POST localhost:8000/safeserve/breakers/fraud/open \\
         -H "Authorization: Bearer change-me"

`/predict` is guarded by the middleware: a crash, a 5xx or no answer within 200 ms serves the
rule table (which reads the JSON body), else a static answer; every response says who served it
in `X-SafeServe-Served-By` / `X-SafeServe-Degraded`. `/explain` is not guarded itself but calls a
guarded function, so its responses carry the same headers (which say whether that function
degraded).
"""

from __future__ import annotations

import os
import random
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

import safeserve as ss
from safeserve.fastapi import SafeServeMiddleware, admin_router, install_error_handlers


class Txn(BaseModel):
    amount: float
    country: str


policy = ss.Policy(
    name="fraud",
    owner="risk-ml-oncall",
    model_version="v3",
    timeout_s=0.2,
    breaker=ss.BreakerConfig(window_size=50, min_calls=20, open_s=30),
    fallbacks=[
        ss.Fallback.rules(
            "rules", [ss.Rule(when={"amount": {"gt": 1000}}, then={"label": "review"})]
        ),
        ss.Fallback.static("default", {"label": "approve"}),
    ],
    log=ss.DecisionLogConfig(sink="decisions.jsonl", redact=["card_number"]),
)


@ss.guard(name="explainer", timeout_s=0.1, fallbacks=[ss.Fallback.static("no-explanation", [])])
async def explain_model(x: dict[str, Any]) -> list[str]:
    if random.random() < 0.2:  # stands in for a flaky remote explainer
        raise ConnectionError("explainer unavailable")
    return ["amount"] if x["amount"] > 1000 else []


app = FastAPI(title="fraud scoring")


@app.post("/predict")
async def predict(txn: Txn) -> dict[str, Any]:
    """The primary model (here a stand-in); the middleware guards it with `policy`."""
    if random.random() < 0.05:
        raise RuntimeError("model server error")
    return {"label": "review" if txn.amount > 5000 else "approve", "confidence": 0.91}


@app.post("/explain")
async def explain(txn: Txn) -> dict[str, Any]:
    return {"features": await explain_model(txn.model_dump())}


app.add_middleware(SafeServeMiddleware, routes={"/predict": policy})
# guards=None: every live guard, including the one the middleware made for /predict
app.include_router(admin_router(token=os.environ.get("SAFESERVE_ADMIN_TOKEN")))
# FastAPI's default 422 echoes the offending input: answer in safeserve's clean shape instead
install_error_handlers(app)

"""`safeserve serve POLICIES`: a FastAPI app with one predict route per policy, run by uvicorn.

Each policy gets `POST /v1/models/{name}/predict`; the request body is validated by the
policy's input schema (so OpenAPI shows it), the model runs under its guard, and the answer
comes back with `X-SafeServe-Served-By` / `X-SafeServe-Degraded`. The admin routes
(`/safeserve/health`, `/safeserve/metrics`, breaker control) are included. Needs the
`fastapi` extra.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from safeserve.config import load_policies
from safeserve.decisions import json_safe
from safeserve.decorator import guard_model
from safeserve.errors import InputRejected, NoFallbackAvailable
from safeserve.fastapi import admin_router
from safeserve.guard import AsyncGuard, Guard

POLICIES_ENV = "SAFESERVE_POLICIES"
TOKEN_ENV = "SAFESERVE_ADMIN_TOKEN"


def build_app(policies_path: str | Path, admin_token: str | None = None) -> FastAPI:
    """The app for a policies file: one guarded predict route per policy with a model."""
    policies = load_policies(policies_path)
    app = FastAPI(
        title="safeserve",
        description=f"Guarded models from {Path(policies_path).name}",
        version="1",
    )
    guards: list[Guard] = []
    for name, policy in policies.items():
        if policy.model is None:
            continue  # a policy without a model is for decorators in code, not for serving
        guarded = guard_model(policy)
        guards.append(guarded)
        schema = policy.validation.schema if policy.validation is not None else None
        _add_route(app, name, guarded, schema)
    app.include_router(admin_router(guards, token=admin_token))
    return app


def _add_route(app: FastAPI, name: str, guarded: Guard, schema: type[BaseModel] | None) -> None:
    async def predict(body: Any = Body(...)) -> JSONResponse:  # noqa: B008 - FastAPI idiom
        x = body.model_dump() if isinstance(body, BaseModel) else body
        try:
            if isinstance(guarded, AsyncGuard):
                outcome = await guarded.call(x)
            else:
                outcome = await run_in_threadpool(guarded.call, x)
        except InputRejected as err:
            problems = [{"loc": p.loc, "message": p.message} for p in err.problems]
            return JSONResponse({"error": "invalid_input", "problems": problems}, 422)
        except NoFallbackAvailable:
            retry = max(1, round(guarded.breaker.retry_after_s())) or 1
            return JSONResponse(
                {"error": "unavailable", "policy": name},
                503,
                headers={"Retry-After": str(retry), **_headers(None, True)},
            )
        d = outcome.decision
        return JSONResponse(json_safe(outcome.value), headers=_headers(d.served_by, d.degraded))

    # the body's type is the policy's schema, so FastAPI validates it and OpenAPI shows it
    predict.__annotations__["body"] = schema if schema is not None else dict[str, Any]
    app.add_api_route(
        f"/v1/models/{name}/predict",
        predict,
        methods=["POST"],
        name=f"predict_{name}",
        summary=f"Predict with {name!r} ({guarded.policy.model_version or 'unversioned'})",
    )


def _headers(served_by: str | None, degraded: bool) -> dict[str, str]:
    return {
        "X-SafeServe-Served-By": served_by or "none",
        "X-SafeServe-Degraded": "true" if degraded else "false",
    }


def app_from_env() -> FastAPI:
    """The app uvicorn's workers build (`--workers N` needs an import string)."""
    return build_app(os.environ[POLICIES_ENV], os.environ.get(TOKEN_ENV) or None)


def serve(policies_path: str, host: str, port: int, workers: int, admin_token: str | None) -> int:
    """Check the file, then run uvicorn on the app."""
    import uvicorn

    build_app(policies_path, admin_token)  # fail here, with the file's problems, not in a worker
    os.environ[POLICIES_ENV] = str(Path(policies_path).resolve())
    if admin_token:
        os.environ[TOKEN_ENV] = admin_token
    uvicorn.run(
        "safeserve.serve:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
    )
    return 0

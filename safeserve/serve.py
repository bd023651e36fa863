"""`safeserve serve POLICIES`: a FastAPI app with one predict route per policy, run by uvicorn.

Each policy with a model gets `POST /v1/models/{name}/predict`. The route reads the raw JSON
body and hands it to the policy's guard, so the guard's own validation decides what invalid
input means: `on_invalid: reject` answers a clean 422, `fallback` walks the fallbacks (200,
`X-SafeServe-Degraded: true`), `flag` lets the primary try it. The policy's schema is still
documented in OpenAPI. The answer comes back with `X-SafeServe-Served-By` /
`X-SafeServe-Degraded`; the admin routes (`/safeserve/health`, `/safeserve/metrics`, breaker
control) are included. No error body holds a trace, an exception message or an input value.
Needs the `fastapi` extra.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from http import HTTPStatus
from pathlib import Path
from typing import IO, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from safeserve.config import load_policies
from safeserve.configfile import SUFFIXES
from safeserve.decisions import Outcome
from safeserve.decorator import guard_model
from safeserve.errors import InputRejected, NoFallbackAvailable, PolicyError, Problem
from safeserve.guard import AsyncGuard, Guard
from safeserve.integrations.admin import admin_router
from safeserve.integrations.encoding import encode_answer
from safeserve.integrations.middleware import FlushLogsAtShutdown, failed_request_headers
from safeserve.pipeline import build_problems, unservable_names
from safeserve.policy import Policy
from safeserve.recording import loads_json
from safeserve.validation import field_names, problems_of

POLICIES_ENV = "SAFESERVE_POLICIES"
TOKEN_ENV = "SAFESERVE_ADMIN_TOKEN"
ALLOWED_ENV = "SAFESERVE_ALLOWED_MODULES"
MAX_BODY_ENV = "SAFESERVE_MAX_BODY_BYTES"
MAX_BODY_BYTES = 1 << 20  # one input row; a bigger body is refused before it is read in full


class InputProblem(BaseModel):
    """One problem with the request body: where (a dotted path, `$` for the body) and what."""

    loc: str
    message: str


class InvalidInput(BaseModel):
    """The 422 body: the same for the guard's `on_invalid: reject` and unreadable bodies."""

    error: Literal["invalid_input"]
    problems: list[InputProblem]


class Unavailable(BaseModel):
    """The 503 body when neither the model nor any fallback answered."""

    error: Literal["unavailable"]
    policy: str


class NothingToServe(PolicyError):
    """No policy in the file names a model; `unserved` lists them all."""

    def __init__(self, unserved: list[str]) -> None:
        self.unserved = unserved
        super().__init__(["policies: no policy names a model, so there is nothing to serve"])


class RequestRefused(BaseModel):
    """The 413/415 body: the request is too large or not JSON."""

    error: Literal["body_too_large", "unsupported_media_type"]


def build_app(
    policies_path: str | Path,
    admin_token: str | None = None,
    allowed_modules: Sequence[str] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The app for a policies file: one guarded predict route per policy with a model.

    Raises `PolicyError` for a bad file (`NothingToServe` when no policy names a model) and
    `OSError` when it cannot be read. `app.state.unserved` lists the policies without a model,
    `app.state.guards` the guards of those with one.
    """
    policies = load_policies(policies_path, allowed_modules=allowed_modules)
    served = {name: policy for name, policy in policies.items() if policy.model is not None}
    if not served:
        raise NothingToServe(list(policies))
    built = _guards_of(served)
    app = FastAPI(
        title="safeserve",
        description=f"Guarded models from {Path(policies_path).name}",
        version="1",
        redirect_slashes=False,  # ".../predict/" is not found, not redirected without headers
    )
    app.add_middleware(FlushLogsAtShutdown)  # SIGTERM ends uvicorn before `atexit` handlers
    app.state.unserved = [name for name in policies if name not in served]
    install_error_handlers(app)
    app.add_exception_handler(Exception, _internal_error_answered)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    schemas: dict[str, type[BaseModel]] = {}
    for name, guarded in built.items():
        validation = guarded.policy.validation
        schema = validation.schema if validation is not None else None
        if schema is not None:
            schemas[name] = schema
        _add_route(app, name, guarded, schema, max_body_bytes)
    guards = list(built.values())
    app.state.guards = guards
    app.include_router(admin_router(guards, token=admin_token))
    _document_schemas(app, schemas)
    return app


def _guards_of(served: dict[str, Policy]) -> dict[str, Guard]:
    """The guard of each served policy, or one `PolicyError` with every problem on the way,
    each on its policy's path: names that cannot be part of a URL (`check` warns of them),
    what `check` finds too (`build_problems`), then what making a guard still refuses (a sink
    not writable)."""
    unfit = unservable_names(served)
    if unfit:
        raise PolicyError(unfit)
    problems = build_problems(served)
    if problems:  # a guard stops at its first: say them all
        raise PolicyError(problems)
    built: dict[str, Guard] = {}
    for name, policy in served.items():
        try:
            built[name] = guard_model(policy)
        except PolicyError as err:
            problems += [f"policies.{name}.{problem}" for problem in err.problems]
        else:  # an answer with no JSON form is the model's (or a fallback's) failure
            built[name].check_answers(_encodable)
    if problems:
        raise PolicyError(problems)
    return built


# The body of the answer last checked in this request's context, for the response: an answer
# is encoded once, by the guard's check.
_encoded: ContextVar[tuple[Any, bytes] | None] = ContextVar("safeserve_encoded", default=None)


def _encodable(answer: Any) -> None:
    """The guards' check of every answer: it has a JSON form (else `Unencodable`)."""
    _encoded.set((answer, encode_answer(answer)))


def _body(answer: Any) -> bytes:
    """The answer's JSON body: the one its check made, if made in this context."""
    kept = _encoded.get()
    return kept[1] if kept is not None and kept[0] is answer else encode_answer(answer)


def _call(guarded: Guard, x: Any) -> tuple[Outcome, bytes]:
    """A sync guard's call, run in a worker thread: its answer's body is read there."""
    outcome = guarded.call(x)
    return outcome, _body(outcome.value)


def _add_route(
    app: FastAPI,
    name: str,
    guarded: Guard,
    schema: type[BaseModel] | None,
    max_body_bytes: int,
) -> None:
    # A schema's failures are the guard's to handle (reject, fallback or flag, as the policy
    # says); without a schema the route itself asks for a JSON object.
    needs_object = schema is None

    async def predict(request: Request) -> Response:
        response = await answer(request)
        if "x-safeserve-served-by" not in response.headers:  # refused before the model
            response.headers.update(_headers(None, False))
        return response

    async def answer(request: Request) -> Response:
        refused = _refusal(request, max_body_bytes)
        if refused is not None:
            return refused
        body = await _read_body(request, max_body_bytes)
        if body is None:
            return _refused("body_too_large", 413)
        try:
            x = loads_json(body)
        except RecursionError:
            return _invalid_input([Problem("$", "not valid JSON: nested too deeply")])
        except json.JSONDecodeError as err:  # its msg is the parser's, never the input
            return _invalid_input([Problem("$", f"not valid JSON: {err.msg}")])
        except ValueError:  # not UTF-8, or a number too long to convert
            return _invalid_input([Problem("$", "not valid JSON")])
        if needs_object and not isinstance(x, dict):
            return _invalid_input([Problem("$", "Input should be a JSON object")])
        try:
            if isinstance(guarded, AsyncGuard):
                outcome = await guarded.call(x)
                content = _body(outcome.value)
            else:
                outcome, content = await run_in_threadpool(_call, guarded, x)
        except InputRejected as err:  # the guard's decision, degraded on its record
            return _invalid_input(err.problems, _headers(None, True))
        except NoFallbackAvailable:
            retry = max(1, math.ceil(guarded.breaker.retry_after_s()))
            return JSONResponse(
                {"error": "unavailable", "policy": name},
                503,
                headers={"Retry-After": str(retry), **_headers(None, True)},
            )
        d = outcome.decision
        headers = _headers(d.served_by, d.degraded)
        return Response(content, media_type="application/json", headers=headers)

    body_schema: dict[str, Any] = (
        _ref(schema) if schema is not None else {"type": "object", "additionalProperties": True}
    )
    app.add_api_route(
        f"/v1/models/{name}/predict",
        predict,
        methods=["POST"],
        name=f"predict_{name}",
        summary=f"Predict with {name!r} ({guarded.policy.model_version or 'unversioned'})",
        description=_describe(guarded.policy),
        # the body is read raw (so the guard's on_invalid applies) but documented as the schema
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body_schema}},
            }
        },
        responses={
            200: {"description": "The answer of the model or of a fallback"},
            413: {"model": RequestRefused, "description": f"Body over {max_body_bytes} bytes"},
            415: {"model": RequestRefused, "description": "Body not application/json"},
            422: {"model": InvalidInput, "description": "Input rejected (never echoed)"},
            503: {"model": Unavailable, "description": "Nothing could answer; see Retry-After"},
        },
    )


def _describe(policy: Policy) -> str:
    on_invalid = policy.validation.on_invalid if policy.validation is not None else None
    if on_invalid == "reject":
        return "A body that fails the schema is answered 422."
    if on_invalid == "flag":
        return "A body that fails the schema is still given to the model; the call is flagged."
    if on_invalid == "fallback":
        return "A body that fails the schema is answered by the fallbacks (degraded)."
    return "The body is a JSON object given to the model as is."


_OWN_MODELS: tuple[type[BaseModel], ...] = (InvalidInput, InputProblem, Unavailable, RequestRefused)


def _document_schemas(app: FastAPI, schemas: dict[str, type[BaseModel]]) -> None:
    """Add the policies' input schemas (`schemas`: by policy name) to the OpenAPI components,
    refer each predict route to its own, and document every 422 as the clean `InvalidInput`
    body the app really sends. Models of the same name (two policies' `Input`, a nested model
    each, a schema called `InvalidInput`) get names of their own, qualified by module."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = plain()
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        for fastapi_shape in ("HTTPValidationError", "ValidationError"):  # never sent
            components.pop(fastapi_shape, None)
        # ours go in too, so that a schema named like one of them is told apart; FastAPI has
        # already documented ours under their own names
        mode: Literal["validation"] = "validation"
        models = [(m, mode) for m in (*dict.fromkeys(schemas.values()), *_OWN_MODELS)]
        refs, top = models_json_schema(models, ref_template="#/components/schemas/{model}")
        own = {refs[(m, "validation")]["$ref"].rsplit("/", 1)[1] for m in _OWN_MODELS}
        components.update({k: v for k, v in top.get("$defs", {}).items() if k not in own})
        for policy, schema in schemas.items():
            operation = spec["paths"][f"/v1/models/{policy}/predict"]["post"]
            body = operation["requestBody"]["content"]["application/json"]
            body["schema"] = refs[(schema, "validation")]
        for operations in spec.get("paths", {}).values():
            for operation in operations.values():
                invalid = operation.get("responses", {}).get("422")
                if invalid is not None:
                    invalid["content"] = {"application/json": {"schema": _ref(InvalidInput)}}
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _refusal(request: Request, max_body_bytes: int) -> JSONResponse | None:
    """A 415 for a body that says it is not JSON, a 413 for one that says it is too large."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        return _refused("unsupported_media_type", 415)
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_body_bytes:
        return _refused("body_too_large", 413)
    return None


async def _read_body(request: Request, max_body_bytes: int) -> bytes | None:
    """The body, or None as soon as it grows past the limit (a missing length header too)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _invalid_input(
    problems: Sequence[Problem], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    listed = [{"loc": p.loc, "message": p.message} for p in problems]
    return JSONResponse({"error": "invalid_input", "problems": listed}, 422, headers=headers)


def _refused(error: str, status: int) -> JSONResponse:
    return JSONResponse({"error": error}, status)


def install_error_handlers(app: FastAPI) -> None:
    """Clean error bodies for a FastAPI app: its own request validation answers 422 in the
    guard's shape (`{"error": "invalid_input", "problems": [{"loc", "message"}]}`) instead of
    FastAPI's default, which echoes the offending input; an unhandled exception answers 500
    `{"error": "internal_error"}` (the trace goes to the server's log only)."""
    app.add_exception_handler(RequestValidationError, _request_invalid)
    app.add_exception_handler(Exception, _internal_error)


async def _request_invalid(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own validation of a route's parameters, in the guard's shape: no inputs, no
    validator's message, no key the client chose (`problems_of`)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    route = request.scope.get("route")
    names = _route_names(route) if isinstance(route, APIRoute) else frozenset()
    body = [{**e, "loc": _body_loc(e)} if _in_body(e) else e for e in errors]
    return _invalid_input(problems_of(body, names))


def _body_loc(error: Mapping[str, Any]) -> tuple[Any, ...]:
    """Where in the body: the field's path, or the whole body ("$") for JSON that does not
    parse, which FastAPI places at a character offset."""
    return () if error.get("type") == "json_invalid" else tuple(error["loc"])[1:]


def _in_body(error: Mapping[str, Any]) -> bool:
    loc = error.get("loc", ())
    return len(loc) > 0 and loc[0] == "body"


def _route_names(route: APIRoute) -> frozenset[str]:
    """What a route's validation errors may name: where a parameter comes from, its name and
    alias, and the fields of its type (`field_names`). Worked out per 422, not kept: a few
    µs, and routes are not hashable."""
    names = {"query", "path", "header", "cookie", "body"}
    annotations = []
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        stack.extend(dependant.dependencies)
        params = (
            *dependant.path_params,
            *dependant.query_params,
            *dependant.header_params,
            *dependant.cookie_params,
            *dependant.body_params,
        )
        for param in params:
            names.update((param.name, param.alias))
            annotations.append(param.field_info.annotation)
    return field_names(*annotations) | names


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug of ours: a plain 500 (the trace goes to the server's log, never to the client),
    with the X-SafeServe headers if the endpoint called a guarded function."""
    headers = failed_request_headers(request.scope)
    return JSONResponse({"error": "internal_error"}, 500, headers=headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """The router's own answers (no such model: 404, a GET on predict: 405) in the app's
    shape, `{"error": "not_found"}`, with the X-SafeServe headers."""
    assert isinstance(exc, StarletteHTTPException)  # the type it is registered for
    error = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    headers = {**(exc.headers or {}), **_headers(None, False)}  # e.g. a 405's Allow
    return JSONResponse({"error": error}, exc.status_code, headers=headers)


async def _internal_error_answered(request: Request, exc: Exception) -> JSONResponse:
    """`serve`'s 500: every answer of the app carries the X-SafeServe headers."""
    return JSONResponse({"error": "internal_error"}, 500, headers=_headers(None, True))


def _headers(served_by: str | None, degraded: bool) -> dict[str, str]:
    name = (served_by or "none").encode("latin-1", "replace").decode("latin-1")  # headers' bytes
    return {
        "X-SafeServe-Served-By": name,
        "X-SafeServe-Degraded": "true" if degraded else "false",
    }


def app_from_env() -> FastAPI:
    """The app uvicorn's workers build (`--workers N` needs an import string)."""
    allowed = os.environ.get(ALLOWED_ENV)
    return build_app(
        os.environ[POLICIES_ENV],
        os.environ.get(TOKEN_ENV) or None,
        allowed_modules=allowed.split("\n") if allowed else None,
        max_body_bytes=int(os.environ.get(MAX_BODY_ENV) or MAX_BODY_BYTES),
    )


def serve(
    policies_path: str,
    host: str,
    port: int,
    workers: int,
    admin_token: str | None,
    allowed_modules: Sequence[str] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    err: IO[str] | None = None,
) -> int:
    """Check the file and the address, then run uvicorn on the app; the exit code.

    Problems are printed on `err` as one line each, as `safeserve check` prints them: a bad
    file exits 1; an unreadable file, nothing to serve or an address that cannot be bound exit 2.
    """
    import uvicorn

    err = err if err is not None else sys.stderr
    prefix = "safeserve serve"
    path = Path(policies_path)
    if path.suffix.lower() not in SUFFIXES:
        print(f"{prefix}: {policies_path}: not a .yaml, .yml or .toml file", file=err)
        return 2
    try:  # fail here, with the file's problems, not in a worker
        app = build_app(path, admin_token, allowed_modules, max_body_bytes)
    except OSError as exc:  # worded as `safeserve check` words it
        print(f"{prefix}: cannot read {policies_path}: {exc.strerror or exc}", file=err)
        return 2
    except NothingToServe as exc:
        _warn_unserved(exc.unserved, err)
        print(f"{prefix}: no policy in {policies_path} names a model: nothing to serve", file=err)
        return 2
    except PolicyError as exc:
        for problem in exc.problems:
            print(f"{policies_path}: {problem}", file=err)
        return 1
    _warn_unserved(app.state.unserved, err)
    refusal = _cannot_bind(host, port)
    if refusal is not None:
        print(f"{prefix}: cannot listen on {host}:{port}: {refusal}", file=err)
        return 2
    if workers == 1:  # serve the app just checked
        uvicorn.run(app, host=host, port=port, log_level="info")
        return 0
    # each worker process builds its own app from the file (uvicorn needs an import string)
    # with the options just checked, not what the environment held before
    os.environ[POLICIES_ENV] = str(path.resolve())
    os.environ[MAX_BODY_ENV] = str(max_body_bytes)
    for name, value in ((ALLOWED_ENV, "\n".join(allowed_modules or ())), (TOKEN_ENV, admin_token)):
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)
    uvicorn.run(
        "safeserve.serve:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
    )
    return 0


def _warn_unserved(names: list[str], err: IO[str]) -> None:
    for name in names:
        print(f"safeserve serve: warning: policy {name!r} names no model: no route", file=err)


def _cannot_bind(host: str, port: int) -> str | None:
    """Why uvicorn could not listen on host:port (None when it can), checked before it starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return str(exc.strerror or exc)
    except OverflowError:
        return "the port must be 0-65535"
    return None

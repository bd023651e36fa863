"""`safeserve serve`: one predict route per policy, body validated by the policy's schema."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, field_validator

import safeserve as ss
import safeserve.serve as serve_module
from safeserve.cli import main
from safeserve.decorator import guard_model
from safeserve.errors import InputRejected, PolicyError
from safeserve.serve import build_app, install_error_handlers

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "examples" / "policies.yaml"
TXN = {"amount": 120.0, "country": "DE", "customer_id": "c-1"}
# the reviewer's body: fails the schema (a list, a number), holds a card number that must not leak
CARD = 4111111111111111
BAD_TXN = {"amount": 5, "country": ["DE"], "card_number": CARD}
SECRET = "model exploded: secret-detail-5c1e"


class Item(BaseModel):
    amount: float


class Strict(BaseModel):
    """What a client can get wrong: a value a validator quotes, a key it made up, a dict's key,
    a UUID, a field deep in a list."""

    model_config = ConfigDict(extra="forbid")
    card: str
    ref: UUID
    tags: dict[int, int] = {}
    items: list[Item] = []

    @field_validator("card")
    @classmethod
    def digits(cls, v: str) -> str:
        if not v.isdigit():
            raise ValueError(f"card {v} is not numeric")
        return v


STRICT_BODY = {
    "card": "SECRET-4111",
    "ref": "SECRET-uuid",
    "tags": {"SECRETK": 1},
    "items": [{"amount": 1}, {"amount": "SECRET-amt"}],
    "SECRETKEY": 1,
}
STRICT_PROBLEMS = [
    {"loc": "card", "message": "rejected by a validator (value_error)"},
    {"loc": "ref", "message": "Input should be a valid UUID"},
    {
        "loc": "tags.*.[key]",
        "message": "Input should be a valid integer, unable to parse string as an integer",
    },
    {
        "loc": "items.1.amount",
        "message": "Input should be a valid number, unable to parse string as a number",
    },
    {"loc": "*", "message": "Extra inputs are not permitted"},
]

MODELS = f"""
from typing import Any

def boom(x: Any) -> Any:
    raise RuntimeError({SECRET!r})

def echo(x: Any) -> dict[str, Any]:
    return {{"id": x.get("id")}}

def typed(x: Any) -> dict[str, Any]:
    import dataclasses, datetime, decimal, enum, uuid
    import numpy as np

    class Tier(enum.Enum):
        GOLD = "gold"

    @dataclasses.dataclass
    class Score:
        label: str
        p: float

    deep: Any = {{"leaf": 1}}
    for _ in range(30):
        deep = {{"n": deep}}
    return {{
        "ref": uuid.UUID(int=5), "day": datetime.date(2024, 1, 2), "tier": Tier.GOLD,
        "price": decimal.Decimal("1.50"), "raw": b"ok", "score": Score("approve", 0.9),
        "took": datetime.timedelta(seconds=3), "probs": np.array([0.25, 0.75]), "deep": deep,
    }}

def opaque(x: Any) -> Any:
    return {{"handle": object()}}

async def opaque_async(x: Any) -> Any:
    return {{"handle": object()}}

async def fine_async(x: Any) -> Any:
    return {{"label": "approve", "score": 0.9}}

def what_it_got(x: Any) -> dict[str, Any]:
    # says which type reached the model, so a test sees the raw body or the validated one
    kind = type(x.get("card_number")).__name__ if isinstance(x, dict) else type(x).__name__
    return {{"label": "approve", "score": 0.9, "card_number_type": kind}}
"""

POLICY_FILE = """
policies:
  fraud:
    model: serve_models:what_it_got
    validation:
      schema: examples.fraud_models:Txn
      on_invalid: {on_invalid}
    fallbacks:
      - name: default
        static: {{label: review, score: 0.0}}
  bare:
    model: serve_models:boom
    validation:
      schema: examples.fraud_models:Txn
      on_invalid: {on_invalid}
  free:
    model: serve_models:what_it_got
  echo:
    model: serve_models:echo
  decorators_only:
    timeout_s: 0.5
"""


@pytest.fixture
def policy_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A function writing a policies file (test models importable) for an `on_invalid`."""
    (tmp_path / "serve_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT))

    def write(on_invalid: str) -> Path:
        path = tmp_path / f"{on_invalid}.yaml"
        path.write_text(POLICY_FILE.format(on_invalid=on_invalid))
        return path

    yield write
    sys.modules.pop("serve_models", None)


def predict_with(policy_file: Any, tmp_path: Path, policies: str, body: Any) -> httpx.Response:
    """The answer of the one policy in `policies` (YAML, which may name the test models)."""
    policy_file("reject")  # writes the test models, importable
    path = tmp_path / "policies.yaml"
    path.write_text(f"policies:\n{policies}")
    [name] = serve_module.load_policies(path)
    return request(build_app(path), "POST", f"/v1/models/{name}/predict", json=body)


def assert_clean_422(r: httpx.Response, *leaks: object) -> list[dict[str, str]]:
    """The guard's invalid-input shape, exactly, with none of the given input values in it."""
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "problems"}
    assert body["error"] == "invalid_input"
    assert body["problems"]
    for problem in body["problems"]:
        assert set(problem) == {"loc", "message"}
        assert isinstance(problem["loc"], str)
        assert isinstance(problem["message"], str)
    for leak in ("Traceback", '"input"', *map(str, leaks)):
        assert leak not in r.text
    problems: list[dict[str, str]] = body["problems"]
    return problems


def request(
    app: Any, method: str, url: str, raise_app_exceptions: bool = True, **kw: Any
) -> httpx.Response:
    """One request through the ASGI stack (`raise_app_exceptions=False`: as a server answers
    an exception the app let through, with starlette's error middleware's 500)."""

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
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
        app = build_app(POLICIES)  # fraud: on_invalid: fallback
        r = request(app, "POST", "/v1/models/fraud/predict", json={"amount": "lots"})
        assert r.status_code == 200
        assert r.headers["X-SafeServe-Degraded"] == "true"
        assert r.headers["X-SafeServe-Served-By"] != "primary"

    @pytest.mark.parametrize(
        ("method", "url", "status", "error"),
        [
            ("GET", "/v1/models/fraud/predict", 405, "method_not_allowed"),
            ("POST", "/v1/models/nope/predict", 404, "not_found"),
            ("POST", "/v1/models/fraud/predict/", 404, "not_found"),  # not a bare redirect
        ],
    )
    def test_the_routers_own_answers_have_the_apps_shape_and_headers(
        self, method: str, url: str, status: int, error: str
    ) -> None:
        r = request(build_app(POLICIES), method, url, json=TXN)
        assert (r.status_code, r.json()) == (status, {"error": error})
        assert r.headers["X-SafeServe-Served-By"] == "none"
        assert r.headers["X-SafeServe-Degraded"] == "false"
        if status == 405:
            assert r.headers["Allow"] == "POST"

    def test_openapi_shows_the_schema_of_each_route(self) -> None:
        app = build_app(POLICIES)
        spec = request(app, "GET", "/openapi.json").json()
        route = spec["paths"]["/v1/models/fraud/predict"]["post"]
        body = route["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/Txn"}
        assert set(spec["components"]["schemas"]["Txn"]["properties"]) >= {"amount", "country"}
        free = spec["paths"]["/v1/models/chargeback/predict"]["post"]["requestBody"]
        assert free["content"]["application/json"]["schema"]["type"] == "object"

    def test_openapi_tells_apart_schemas_of_the_same_name(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two policies' `Input` (each with a nested `Inner`), and a schema named like one of the
        app's own bodies: each route documents its own schema, and the 422 stays the app's."""
        for module, field in (("shapes_a", "amount: float"), ("shapes_b", "tenure: int")):
            (tmp_path / f"{module}.py").write_text(
                "from pydantic import BaseModel\n"
                f"class Inner(BaseModel):\n    {field}\n"
                f"class Input(BaseModel):\n    inner: Inner\n    {field}\n"
                f"class InvalidInput(BaseModel):\n    {field}\n"
                f"class ValidationError(BaseModel):\n    {field}\n"
                "def predict(x):\n    return {'label': 'ok'}\n"
            )
        monkeypatch.syspath_prepend(str(tmp_path))
        path = tmp_path / "shapes.yaml"
        path.write_text(
            "policies:\n"
            "  a: {model: 'shapes_a:predict', validation: {schema: 'shapes_a:Input'}}\n"
            "  b: {model: 'shapes_b:predict', validation: {schema: 'shapes_b:Input'}}\n"
            "  c: {model: 'shapes_a:predict', validation: {schema: 'shapes_a:InvalidInput'}}\n"
            "  d: {model: 'shapes_b:predict', validation: {schema: 'shapes_b:ValidationError'}}\n"
        )
        spec = request(build_app(path), "GET", "/openapi.json").json()
        components = spec["components"]["schemas"]

        def resolve(ref: dict[str, str]) -> dict[str, Any]:
            schema: dict[str, Any] = components[ref["$ref"].rsplit("/", 1)[1]]
            return schema

        def body(policy: str) -> dict[str, Any]:
            operation = spec["paths"][f"/v1/models/{policy}/predict"]["post"]
            return resolve(operation["requestBody"]["content"]["application/json"]["schema"])

        assert set(body("a")["properties"]) == {"inner", "amount"}
        assert set(body("b")["properties"]) == {"inner", "tenure"}
        assert set(resolve(body("a")["properties"]["inner"])["properties"]) == {"amount"}
        assert set(resolve(body("b")["properties"]["inner"])["properties"]) == {"tenure"}
        assert set(body("c")["properties"]) == {"amount"}
        assert set(body("d")["properties"]) == {"tenure"}  # named like FastAPI's own, dropped
        assert set(components["InvalidInput"]["properties"]) == {"error", "problems"}
        for module in ("shapes_a", "shapes_b"):
            sys.modules.pop(module, None)

    def test_openapi_documents_the_422_the_app_sends(self) -> None:
        spec = request(build_app(POLICIES), "GET", "/openapi.json").json()
        invalid = {"$ref": "#/components/schemas/InvalidInput"}
        for operations in spec["paths"].values():
            for operation in operations.values():
                if "422" in operation["responses"]:
                    assert operation["responses"]["422"]["content"]["application/json"] == {
                        "schema": invalid
                    }
        assert "HTTPValidationError" not in spec["components"]["schemas"]

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


class TestInvalidInput:
    """A body the schema refuses: the policy's `on_invalid` decides, and nothing is echoed."""

    def test_reject_answers_the_guards_shape_without_the_input(self, policy_file: Any) -> None:
        path = policy_file("reject")
        r = request(build_app(path), "POST", "/v1/models/fraud/predict", json=BAD_TXN)
        problems = assert_clean_422(r, CARD, "DE")
        # exactly what the guard's InputRejected carries
        guarded = guard_model(ss_load(path)["fraud"])
        with pytest.raises(InputRejected) as err:
            guarded(BAD_TXN)
        assert problems == [{"loc": p.loc, "message": p.message} for p in err.value.problems]
        assert [p["loc"] for p in problems] == ["country", "card_number"]

    @pytest.mark.parametrize("body", [[1, 2], "hello-zq9", None, 12345])
    def test_reject_refuses_a_body_that_is_not_an_object(
        self, policy_file: Any, body: object
    ) -> None:
        app = build_app(policy_file("reject"))
        r = request(app, "POST", "/v1/models/fraud/predict", json=body)
        problems = assert_clean_422(r, "hello-zq9", "12345", "[1,2]", "[1, 2]")
        assert problems[0]["loc"] == "$"

    def test_fallback_walks_the_fallbacks(self, policy_file: Any) -> None:
        app = build_app(policy_file("fallback"))
        for body in (BAD_TXN, [1, 2], "hello"):
            r = request(app, "POST", "/v1/models/fraud/predict", json=body)
            assert r.status_code == 200
            assert r.json() == {"label": "review", "score": 0.0}
            assert r.headers["X-SafeServe-Served-By"] == "default"
            assert r.headers["X-SafeServe-Degraded"] == "true"

    def test_fallback_without_fallbacks_is_a_clean_503(self, policy_file: Any) -> None:
        app = build_app(policy_file("fallback"))
        r = request(app, "POST", "/v1/models/bare/predict", json=BAD_TXN)
        assert r.status_code == 503
        assert r.json() == {"error": "unavailable", "policy": "bare"}
        assert r.headers["X-SafeServe-Served-By"] == "none"

    def test_retry_after_is_never_shorter_than_the_breaker_stays_open(
        self, policy_file: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """2.2 s left open: come back in 3 s, not 2."""
        app = build_app(policy_file("fallback"))
        (bare,) = [g for g in app.state.guards if g.name == "bare"]
        bare.open()
        monkeypatch.setattr(bare.breaker, "retry_after_s", lambda: 2.2)
        r = request(app, "POST", "/v1/models/bare/predict", json=TXN)
        assert (r.status_code, r.headers["Retry-After"]) == (503, "3")

    def test_rejected_input_says_nothing_served_it(self, policy_file: Any) -> None:
        """A 422 of on_invalid=reject carries the headers of its (degraded) decision."""
        app = build_app(policy_file("reject"))
        r = request(app, "POST", "/v1/models/fraud/predict", json=BAD_TXN)
        assert r.status_code == 422
        assert (r.headers["X-SafeServe-Served-By"], r.headers["X-SafeServe-Degraded"]) == (
            "none",
            "true",
        )

    def test_flag_gives_the_primary_the_raw_body(self, policy_file: Any) -> None:
        app = build_app(policy_file("flag"))
        body = {"amount": 5, "country": "DE", "card_number": CARD}
        r = request(app, "POST", "/v1/models/fraud/predict", json=body)
        assert r.status_code == 200
        assert r.json()["card_number_type"] == "int"  # not coerced: the schema refused it
        assert r.headers["X-SafeServe-Served-By"] == "primary"
        assert r.headers["X-SafeServe-Degraded"] == "false"

    def test_a_valid_body_reaches_the_model_validated(self, policy_file: Any) -> None:
        app = build_app(policy_file("reject"))
        body = {"amount": 5, "country": "DE", "card_number": "4111"}
        r = request(app, "POST", "/v1/models/fraud/predict", json=body)
        assert r.status_code == 200
        assert r.json()["card_number_type"] == "str"

    def test_a_route_without_schema_wants_a_json_object(self, policy_file: Any) -> None:
        app = build_app(policy_file("reject"))
        r = request(app, "POST", "/v1/models/free/predict", json=["secret-zq9"])
        assert assert_clean_422(r, "secret-zq9") == [
            {"loc": "$", "message": "Input should be a JSON object"}
        ]
        r = request(app, "POST", "/v1/models/free/predict", json={"any": "thing"})
        assert r.status_code == 200

    @pytest.mark.parametrize(
        "content",
        [
            b'{"amount": 5, "card_number": 4111111111111111',
            b"{'amount': 5}",
            b"",
            b"[" * 100_000 + b"]" * 100_000,
            b'{"amount": ' + b"4" * 5000 + b"}",
            b'\xff\xfe{"a": 4111111111111111}',
        ],
        ids=["truncated", "single-quotes", "empty", "deep", "long-number", "not-utf8"],
    )
    def test_malformed_json_is_a_clean_422(self, policy_file: Any, content: bytes) -> None:
        app = build_app(policy_file("fallback"))
        headers = {"content-type": "application/json"}
        r = request(app, "POST", "/v1/models/fraud/predict", content=content, headers=headers)
        problems = assert_clean_422(r, CARD, "4444", "amount")
        assert problems[0]["loc"] == "$"
        assert problems[0]["message"].startswith("not valid JSON")

    def test_fastapis_own_validation_answers_the_same_shape(self) -> None:
        app = build_app(POLICIES)

        @app.get("/probe")
        def probe(n: int) -> int:
            return n

        r = request(app, "GET", "/probe", params={"n": "secret-zq9"})
        assert assert_clean_422(r, "secret-zq9") == [
            {
                "loc": "query.n",
                "message": "Input should be a valid integer, unable to parse string as an integer",
            }
        ]

    def test_no_value_key_or_validator_text_of_the_client_in_a_422(
        self, policy_file: Any, tmp_path: Path
    ) -> None:
        """What a validator wrote (it quotes the value), keys the client made up and the
        character a parser found are left out; the schema's own names stay."""
        strict = (
            "  strict:\n    model: serve_models:what_it_got\n"
            "    validation: {schema: 'test_serve:Strict', on_invalid: reject}\n"
        )
        r = predict_with(policy_file, tmp_path, strict, STRICT_BODY)
        assert assert_clean_422(r, "SECRET") == STRICT_PROBLEMS

    def test_fastapis_own_validation_is_as_clean(self) -> None:
        """install_error_handlers gives a plain FastAPI route the same clean problems."""
        app = FastAPI()
        install_error_handlers(app)

        @app.post("/score/{shop}")
        def score(shop: int, body: Strict, limit: int = 3) -> int:
            return limit

        r = request(app, "POST", "/score/SECRET-shop?limit=SECRET-9", json=STRICT_BODY)
        locs = ["path.shop", "query.limit", *(p["loc"] for p in STRICT_PROBLEMS)]
        assert [p["loc"] for p in assert_clean_422(r, "SECRET")] == locs

    def test_malformed_json_is_a_problem_of_the_whole_body(self, policy_file: Any) -> None:
        """JSON that does not parse is located at "$", as `safeserve serve` locates it, not at
        the character offset FastAPI gives, on a plain route as on a served one."""
        app = FastAPI()
        install_error_handlers(app)

        @app.post("/score")
        def score(body: Strict) -> int:
            return 1

        served = build_app(policy_file("reject"))
        broken = b'{"amount": 1, "country": '
        json_type = {"content-type": "application/json"}
        for r in (
            request(app, "POST", "/score", content=broken, headers=json_type),
            request(served, "POST", "/v1/models/bare/predict", content=broken, headers=json_type),
        ):
            assert [p["loc"] for p in assert_clean_422(r, "SECRET")] == ["$"]

    def test_a_model_error_never_reaches_the_body(self, policy_file: Any) -> None:
        app = build_app(policy_file("reject"))
        r = request(app, "POST", "/v1/models/bare/predict", json=TXN)
        assert r.status_code == 503
        assert SECRET not in r.text
        assert "RuntimeError" not in r.text

    def test_a_fallback_named_outside_latin1_still_answers(
        self, policy_file: Any, tmp_path: Path
    ) -> None:
        """HTTP headers are latin-1: a fallback's name that is not (Cyrillic, say) reaches the
        header with "?" for what latin-1 lacks, instead of turning the answer into a 500."""
        rules = "\u043f\u0440\u0430\u0432\u0438\u043b\u0430"
        m = f"  m:\n    model: serve_models:boom\n    fallbacks: [{{name: {rules}, static: 0}}]\n"
        r = predict_with(policy_file, tmp_path, m, TXN)
        assert (r.status_code, r.json()) == (200, 0)
        assert r.headers["X-SafeServe-Served-By"] == "???????"
        assert r.headers["X-SafeServe-Degraded"] == "true"

    def test_an_answer_holding_a_lone_surrogate_is_sent_escaped(self, policy_file: Any) -> None:
        """JSON lets a client send "\\ud800", which UTF-8 cannot hold: a model that echoes it
        is still answered (escaped, as JSON writes it), with the headers."""
        app = build_app(policy_file("reject"))
        body = b'{"id": "c-\\ud800"}'
        r = request(app, "POST", "/v1/models/echo/predict", content=body)
        assert r.status_code == 200
        assert r.headers["X-SafeServe-Served-By"] == "primary"
        assert r.json() == {"id": "c-\ud800"}

    def test_answers_are_json_values_not_python_reprs(
        self, policy_file: Any, tmp_path: Path
    ) -> None:
        """What models return (enums, UUIDs, dates, decimals, dataclasses, numpy, deep nesting)
        reaches the client as FastAPI would send it."""
        r = predict_with(policy_file, tmp_path, "  typed:\n    model: serve_models:typed\n", {})
        assert r.status_code == 200
        answer = r.json()
        deep = answer.pop("deep")
        assert answer == {
            "ref": "00000000-0000-0000-0000-000000000005",
            "day": "2024-01-02",
            "tier": "gold",
            "price": 1.5,
            "raw": "ok",
            "score": {"label": "approve", "p": 0.9},
            "took": 3.0,
            "probs": [0.25, 0.75],
        }
        for _ in range(30):
            deep = deep["n"]
        assert deep == {"leaf": 1}

    @pytest.mark.parametrize("model", ["opaque", "opaque_async"])
    def test_an_answer_with_no_json_form_is_the_models_failure(
        self, policy_file: Any, tmp_path: Path, model: str
    ) -> None:
        """A model answering what JSON cannot hold (an object, say) has failed, as with an
        output schema: the fallback answers and the record says why, naming the type only.
        The answer is not sent as a 500 on a record that says the model served."""
        policies = (
            f"  opaque:\n    model: serve_models:{model}\n"
            "    fallbacks: [{name: default, static: {label: review}}]\n"
        )
        policy_file("reject")
        path = tmp_path / "policies.yaml"
        path.write_text(f"policies:\n{policies}")
        app = build_app(path)
        r = request(app, "POST", "/v1/models/opaque/predict", json={"card": SECRET})
        assert (r.status_code, r.json()) == (200, {"label": "review"})
        assert (r.headers["X-SafeServe-Served-By"], r.headers["X-SafeServe-Degraded"]) == (
            "default",
            "true",
        )
        [guard] = app.state.guards
        [decision] = guard.decisions()
        [reason] = decision.reasons
        assert (decision.served_by, reason.code, reason.stage) == (
            "default",
            "invalid_output",
            "output",
        )
        assert "'object'" in reason.detail
        assert SECRET not in reason.detail
        assert guard.breaker.figures()["consecutive_failures"] == 1  # a failure, as it is

    @pytest.mark.parametrize("model", ["boom", "fine_async"])
    def test_a_fallback_whose_answer_has_no_json_form_has_failed(
        self, policy_file: Any, tmp_path: Path, model: str
    ) -> None:
        """The next fallback answers; with none left, a clean 503 on a record that says so.
        A sync guard (its model fails) and an async one (a drill sends it to the fallbacks)."""
        opaque_first = (
            f"  m:\n    model: serve_models:{model}\n"
            "    fallbacks:\n"
            "      - {name: odd, model: serve_models:opaque}\n"
            "      - {name: default, static: {label: review}}\n"
        )
        policy_file("reject")
        path = tmp_path / "policies.yaml"
        path.write_text(f"policies:\n{opaque_first}")
        app = build_app(path)
        [guard] = app.state.guards
        with ss.force_degradation("timeout", "m") if model == "fine_async" else nullcontext():
            r = request(app, "POST", "/v1/models/m/predict", json=TXN)
        assert (r.status_code, r.json()) == (200, {"label": "review"})
        assert r.headers["X-SafeServe-Served-By"] == "default"
        [decision] = guard.decisions()
        failed = [x for x in decision.reasons if x.code == "fallback_failed"]
        assert [x.detail.split(":")[0] for x in failed] == ["odd"]
        assert "Unencodable" in failed[0].detail

        only_opaque = opaque_first.replace("      - {name: default, static: {label: review}}\n", "")
        path.write_text(f"policies:\n{only_opaque}")
        app = build_app(path)
        [guard] = app.state.guards
        with ss.force_degradation("timeout", "m") if model == "fine_async" else nullcontext():
            r = request(app, "POST", "/v1/models/m/predict", json=TXN)
        assert (r.status_code, r.json()) == (503, {"error": "unavailable", "policy": "m"})
        [decision] = guard.decisions()
        assert decision.served_by is None

    def test_a_bug_of_ours_is_a_clean_500_with_the_headers(
        self, policy_file: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def broken(value: Any) -> Any:
            raise RuntimeError(SECRET)

        monkeypatch.setattr(serve_module, "_body", broken)
        app = build_app(policy_file("reject"))
        r = request(app, "POST", "/v1/models/free/predict", raise_app_exceptions=False, json=TXN)
        assert (r.status_code, r.json()) == (500, {"error": "internal_error"})
        assert (r.headers["X-SafeServe-Served-By"], r.headers["X-SafeServe-Degraded"]) == (
            "none",
            "true",
        )


class TestRequestsRefused:
    """Bodies that are not JSON, too large, or sent with the wrong method: short clean answers."""

    def test_a_body_that_says_it_is_not_json_is_415(self) -> None:
        app = build_app(POLICIES)
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            r = request(
                app,
                "POST",
                "/v1/models/fraud/predict",
                content=b"amount=5&card=4111111111111111",
                headers={"content-type": content_type},
            )
            assert r.status_code == 415
            assert r.json() == {"error": "unsupported_media_type"}
            assert (r.headers["X-SafeServe-Served-By"], r.headers["X-SafeServe-Degraded"]) == (
                "none",
                "false",
            )

    @pytest.mark.parametrize(
        ("number", "why"),
        [
            ("NaN", "NaN is not JSON"),
            ("Infinity", "Infinity is not JSON"),
            ("-Infinity", "-Infinity is not JSON"),
            ("1e999", "a number too large for a float"),
            ("-1e400", "a number too large for a float"),
        ],
    )
    def test_numbers_json_has_not_are_refused(self, number: str, why: str) -> None:
        """Python's parser takes them (1e999 as infinity); JSON has no such numbers, so the
        model never sees one."""
        app = build_app(POLICIES)
        content = b'{"amount": %s, "country": "DE"}' % number.encode()
        headers = {"content-type": "application/json"}
        r = request(app, "POST", "/v1/models/fraud/predict", content=content, headers=headers)
        problems = assert_clean_422(r, "DE", "999", "400")
        assert problems == [{"loc": "$", "message": f"not valid JSON: {why}"}]

    def test_a_validation_error_raised_by_the_app_itself_is_a_clean_422(self) -> None:
        """An endpoint that raises FastAPI's RequestValidationError with bare errors (no type,
        no message) gets the clean shape, not a 500."""
        app = FastAPI()
        install_error_handlers(app)

        @app.get("/raises")
        def raises() -> None:
            raise RequestValidationError([{"loc": ("query", "x"), "msg": "SECRET-9"}])

        problems = assert_clean_422(request(app, "GET", "/raises"), "SECRET")
        assert problems == [{"loc": "query.*", "message": "rejected by a validator ()"}]

    def test_json_variants_and_no_content_type_are_read_as_json(self) -> None:
        app = build_app(POLICIES)
        for headers in (
            {"content-type": "application/json; charset=utf-8"},
            {"content-type": "application/vnd.api+json"},
            {},
        ):
            r = request(
                app,
                "POST",
                "/v1/models/fraud/predict",
                content=b'{"amount": 120.0, "country": "DE"}',
                headers=headers,
            )
            assert r.status_code == 200, headers
            assert r.headers["X-SafeServe-Served-By"] == "primary"

    def test_a_body_over_the_limit_is_413(self) -> None:
        app = build_app(POLICIES, max_body_bytes=1000)
        big = b'{"amount": 1, "country": "DE", "pad": "' + b"x" * 2000 + b'"}'
        r = request(app, "POST", "/v1/models/fraud/predict", content=big)
        assert r.status_code == 413
        assert r.json() == {"error": "body_too_large"}

        async def chunks() -> Any:  # no content-length: counted while it streams in
            for _ in range(10):
                yield b" " * 200

        r = request(app, "POST", "/v1/models/fraud/predict", content=chunks())
        assert r.status_code == 413

    def test_wrong_method_and_unknown_model(self) -> None:
        app = build_app(POLICIES)
        r = request(app, "GET", "/v1/models/fraud/predict")
        assert r.status_code == 405
        r = request(app, "POST", "/v1/models/nope-zq9/predict", json=TXN)
        assert r.status_code == 404
        assert "nope-zq9" not in r.text


def test_workers_build_the_app_with_the_same_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--workers N`: each worker's app keeps the allow-list and the body limit."""
    monkeypatch.setenv(serve_module.POLICIES_ENV, str(POLICIES))
    monkeypatch.setenv(serve_module.MAX_BODY_ENV, "100")
    app = serve_module.app_from_env()
    r = request(app, "POST", "/v1/models/fraud/predict", content=b"[" + b" " * 200 + b"]")
    assert r.status_code == 413
    monkeypatch.setenv(serve_module.ALLOWED_ENV, "elsewhere.\nalso.")
    with pytest.raises(PolicyError, match=re.escape("is outside 'elsewhere.', 'also.' ")):
        serve_module.app_from_env()


def test_workers_get_the_options_just_checked_not_stale_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An allow-list or token left in the environment does not reach the workers of a
    `serve --workers N` that was given none (a worker refusing the file restarts forever)."""
    monkeypatch.setenv(serve_module.ALLOWED_ENV, "elsewhere.")
    monkeypatch.setenv(serve_module.TOKEN_ENV, "stale")
    for name in (serve_module.POLICIES_ENV, serve_module.MAX_BODY_ENV):  # restored after
        monkeypatch.setenv(name, "")
    seen: dict[str, str | None] = {}

    def run(*args: Any, **kwargs: Any) -> None:
        seen.update(
            {k: os.environ.get(k) for k in (serve_module.ALLOWED_ENV, serve_module.TOKEN_ENV)}
        )
        serve_module.app_from_env()  # what each worker does; refused with the stale allow-list

    monkeypatch.setattr("uvicorn.run", run)
    assert serve_module.serve(str(POLICIES), "127.0.0.1", 0, 2, None) == 0
    assert seen == {serve_module.ALLOWED_ENV: None, serve_module.TOKEN_ENV: None}


def ss_load(path: Path) -> Any:
    from safeserve.config import load_policies

    return load_policies(path)


class TestServeCommand:
    """`safeserve serve`'s own errors: one line each, no traceback, exit 2 (1 for a bad file)."""

    def run(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
        try:
            code = main(["serve", *args])
        except SystemExit as exit:  # argparse's own refusals
            code = int(exit.code or 0)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, err

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (["--port", "99999"], "safeserve serve: --port must be 0-65535, not 99999\n"),
            (["--port", "-1"], "safeserve serve: --port must be 0-65535, not -1\n"),
            (["--workers", "0"], "safeserve serve: --workers must be 1 or more, not 0\n"),
            (
                ["--port", "abc"],
                "safeserve serve: argument --port: invalid int value: 'abc' "
                "(see safeserve serve --help)\n",
            ),
            (
                ["--bogus", "1"],
                "safeserve serve: unrecognized arguments: --bogus 1 (see safeserve serve --help)\n",
            ),
            (
                ["--max-body-bytes", "0"],
                "safeserve serve: --max-body-bytes must be 1 or more, not 0\n",
            ),
        ],
    )
    def test_bad_options_are_one_line_and_exit_2(
        self, capsys: pytest.CaptureFixture[str], args: list[str], message: str
    ) -> None:
        assert self.run(capsys, str(POLICIES), *args) == (2, message)

    def test_a_missing_file(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        path = tmp_path / "nope.yaml"
        assert self.run(capsys, str(path)) == (
            2,
            f"safeserve serve: cannot read {path}: No such file or directory\n",
        )

    def test_not_a_policy_file(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        path = tmp_path / "policies.txt"
        path.write_text("policies: {}\n")
        assert self.run(capsys, str(path)) == (
            2,
            f"safeserve serve: {path}: not a .yaml, .yml or .toml file\n",
        )

    def test_a_bad_file_prints_its_problems_as_check_does(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text("policies:\n  fraud:\n    timeout_s: -1\n")
        code, err = self.run(capsys, str(path))
        assert code == 1
        assert err.startswith(f"{path}: policies.fraud.timeout_s: ")

    def test_policy_names_that_cannot_be_a_url_part(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """A served policy named "{x}" would answer for every model, one named "a/b" could not
        be named by the breaker routes: each is a problem of the file, and nothing is served."""
        path = tmp_path / "names.yaml"
        model = "examples.fraud_models:predict_v3"
        path.write_text(
            f"policies:\n  '{{x}}':\n    model: {model}\n  a/b:\n    model: {model}\n"
            f"  ok.v-2_~:\n    model: {model}\n  'no model/':\n    timeout_s: 1\n"
            f"  '..':\n    model: {model}\n"
        )
        code, err = self.run(capsys, str(path))
        assert code == 1
        problems = [line for line in err.splitlines() if "warning" not in line]
        why = (
            "a served policy's name is part of its URL: use letters, digits and . _ ~ - only "
            "(not . or .. alone)"
        )
        assert problems == [
            f"{path}: policies.{{x}}: {why}",
            f"{path}: policies.a/b: {why}",
            f"{path}: policies...: {why}",
        ]

    def test_allow_module_restricts_import_paths(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, err = self.run(capsys, str(POLICIES), "--allow-module", "elsewhere.")
        assert code == 1
        assert (
            f"{POLICIES}: policies.fraud.model: 'examples.fraud_models:predict_v3' is not " in err
        )
        assert "outside 'elsewhere.'" in err

    def test_help_lists_allow_module(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["serve", "--help"]) == 0
        out = capsys.readouterr().out
        assert "--allow-module PREFIX" in out
        assert "--max-body-bytes N" in out

    def test_a_policy_without_model_is_named_in_a_warning(
        self, capsys: pytest.CaptureFixture[str], policy_file: Any
    ) -> None:
        with socket.socket() as taken:  # a port in use: serve stops after its checks
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = str(taken.getsockname()[1])
            code, err = self.run(capsys, str(policy_file("reject")), "--port", port)
        assert code == 2
        assert err.splitlines() == [
            "safeserve serve: warning: policy 'decorators_only' names no model: no route",
            f"safeserve serve: cannot listen on 127.0.0.1:{port}: Address already in use",
        ]

    def test_no_policy_with_a_model_exits_2(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        path = tmp_path / "none.yaml"
        path.write_text("policies:\n  a:\n    timeout_s: 1\n  b:\n    timeout_s: 2\n")
        code, err = self.run(capsys, str(path))
        assert code == 2
        assert err.splitlines() == [
            "safeserve serve: warning: policy 'a' names no model: no route",
            "safeserve serve: warning: policy 'b' names no model: no route",
            f"safeserve serve: no policy in {path} names a model: nothing to serve",
        ]

    def test_a_host_that_does_not_resolve(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, err = self.run(capsys, str(POLICIES), "--host", "999.1.1.1", "--port", "0")
        assert code == 2
        assert err.startswith("safeserve serve: cannot listen on 999.1.1.1:0: ")
        assert len(err.splitlines()) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_safeserve_serve_runs_a_real_uvicorn(tmp_path: Path) -> None:
    """The CLI starts uvicorn on a loopback port and answers a predict request."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after the process
    args = ["serve", str(POLICIES), "--port", str(port), "--max-body-bytes", "100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "safeserve.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
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
        url = f"http://127.0.0.1:{port}/v1/models/fraud/predict"
        r = httpx.post(url, json=BAD_TXN)
        assert r.status_code == 200
        assert r.headers["X-SafeServe-Degraded"] == "true"
        r = httpx.post(url, content=b"{" * 200_000, headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = httpx.post(url, content=b'{"amount": 1, "country": ', headers={})
        assert r.status_code == 422
    finally:
        proc.terminate()
        proc.wait(10)
        log.seek(0)
        stderr = log.read().decode(errors="replace")
        log.close()
    assert "Traceback" not in stderr


SLOW_SINK_MODULE = """
import json, os, time

def predict(x):
    return {"label": "approve"}

def slow_sink(event):
    time.sleep(0.02)  # a sink that lags behind the calls
    with open(os.environ["RECORDS"], "a") as f:
        f.write(json.dumps(event) + "\\n")
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_flushes_the_decision_log(tmp_path: Path, workers: int) -> None:
    """SIGTERM (what Docker, Kubernetes and systemd send) shuts the server down with every
    queued decision record written, though the sink lags behind the calls."""
    (tmp_path / "lagging.py").write_text(SLOW_SINK_MODULE)
    policies = tmp_path / "policies.yaml"
    policies.write_text(
        "policies:\n  m:\n    model: lagging:predict\n"
        "    log: {sink: 'lagging:slow_sink', sample_rate: 1.0}\n"
    )
    records = tmp_path / "records.jsonl"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}", "RECORDS": str(records)}
    args = ["serve", str(policies), "--port", str(port), "--workers", str(workers)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "safeserve.cli", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1/models/m/predict"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.post(url, json={"amount": 1})
                break
            except httpx.TransportError:
                assert proc.poll() is None, "safeserve serve exited"
                assert time.monotonic() < deadline, "safeserve serve did not start"
                time.sleep(0.1)
        with httpx.Client() as client:
            answers = [client.post(url, json={"amount": i}) for i in range(40)]
        assert {r.status_code for r in answers} == {200}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    written = [json.loads(line) for line in records.read_text().splitlines()]
    decisions = [r for r in written if r.get("kind") == "decision"]
    assert len(decisions) == 41

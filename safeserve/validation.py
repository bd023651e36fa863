"""Input validation: the pydantic schema (baseline-derived checks join this stage later)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from safeserve.errors import Problem


class Invalid(Exception):
    """Raised by a validator; carries the per-field problems."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__(problems)


class SchemaValidator:
    """Validates the input with a pydantic model and hands the primary the validated value.

    The primary gets the model instance when its input parameter is annotated with the schema,
    else a plain dict of the coerced values, so `def predict(x: dict)` keeps working.
    """

    __slots__ = ("keep_model", "schema")

    def __init__(self, schema: type[BaseModel], fn: Callable[..., Any]) -> None:
        self.schema = schema
        self.keep_model = _annotated_with(fn, schema)

    def __call__(self, x: Any) -> Any:
        try:
            value = self.schema.model_validate(x)
        except ValidationError as err:
            raise Invalid(problems_of(err)) from None
        return value if self.keep_model else value.model_dump()


def problems_of(err: ValidationError) -> list[Problem]:
    """One `Problem` per field, without the offending value (it may be personal data)."""
    out = []
    for e in err.errors(include_input=False, include_url=False, include_context=False):
        loc = ".".join(str(p) for p in e["loc"]) or "$"
        out.append(Problem(loc=loc, message=e["msg"]))
    return out


def _annotated_with(fn: Callable[..., Any], schema: type[BaseModel]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    if not params:
        return False
    ann = params[0].annotation
    if isinstance(ann, str):
        return ann == schema.__name__
    return isinstance(ann, type) and issubclass(ann, schema)

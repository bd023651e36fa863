"""Input validation: the pydantic schema, then per-call checks derived from a training baseline
(range, unseen category, null) and freshness."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Literal, get_args, get_origin, get_type_hints

from pydantic import AliasChoices, AliasPath, BaseModel, ValidationError
from typing_extensions import is_typeddict

from safeserve.errors import Problem


class Invalid(Exception):
    """Raised by validation; carries the per-field problems and the call's arguments as far as
    validation got (with the validated input when only the baseline checks failed), which
    `on_invalid="flag"` hands to the primary."""

    def __init__(self, problems: list[Problem], call_args: tuple[Any, ...] = ()) -> None:
        self.problems = problems
        self.call_args = call_args
        super().__init__(problems)


class SchemaValidator:
    """Validates the input with a pydantic model and hands the primary the validated value.

    The primary gets the model instance when its input parameter is annotated with the schema,
    else a plain dict of the coerced values, so `def predict(x: dict)` keeps working.
    """

    __slots__ = ("keep_model", "names", "schema")

    def __init__(self, schema: type[BaseModel], fn: Callable[..., Any]) -> None:
        self.schema = schema
        self.keep_model = _annotated_with(fn, schema)
        self.names = field_names(schema)

    def __call__(self, x: Any) -> Any:
        try:
            value = self.schema.model_validate(x)
        except ValidationError as err:
            errors = err.errors(include_input=False, include_url=False)
            raise Invalid(problems_of(errors, self.names)) from None
        return value if self.keep_model else value.model_dump()


def problems_of(errors: Iterable[Mapping[str, Any]], names: frozenset[str]) -> list[Problem]:
    """One `Problem` per pydantic error, holding nothing the client sent (it may be personal
    data): a location part that is not one of the schema's names (an unexpected key, a dict's
    key) reads "*"; the message is pydantic's own template for the error's type, filled with
    what the schema says (bounds, patterns, expected values), never with what was found; a
    validator's own text gives way to a fixed one."""
    out = []
    for e in errors:
        parts = e.get("loc", ())
        loc = ".".join(str(p) if type(p) is int or p in names else "*" for p in parts) or "$"
        message = _clean_message(str(e.get("type", "")), e.get("ctx") or {})
        out.append(Problem(loc=loc, message=message))
    return out


def _templates() -> dict[str, str]:
    try:
        from pydantic_core._pydantic_core import list_all_errors
    except ImportError:  # moved: every message is then the fixed one
        return {}
    return {e["type"]: e["message_template_python"] for e in list_all_errors()}


_TEMPLATES = _templates()
_AUTHORED = frozenset({"value_error", "assertion_error"})  # the text is the validator's
# what an error's context holds that the schema, not the client, decided
_SCHEMA_SAYS = frozenset(
    {
        "gt", "ge", "lt", "le", "multiple_of", "min_length", "max_length", "expected_plural",
        "actual_length", "pattern", "expected", "class_name", "class", "field_type",
        "max_digits", "decimal_places", "whole_digits", "expected_schemes", "expected_version",
        "discriminator", "expected_tags", "encoding", "method_name", "tz_expected",
    }
)  # fmt: skip
# parsers whose `error` is their own fixed text ("invalid character in year"), not the input's
_OWN_ERROR = frozenset(
    {
        "json_invalid", "date_parsing", "date_from_datetime_parsing", "time_parsing",
        "datetime_parsing", "datetime_from_date_parsing", "time_delta_parsing", "url_parsing",
        "url_syntax_violation",
    }
)  # fmt: skip
_COUNTS = ("min_length", "max_length", "max_digits", "decimal_places", "whole_digits")
_PLACEHOLDER = re.compile(r"(, |: )?\{(\w+)\}")


def _clean_message(kind: str, ctx: Mapping[str, Any]) -> str:
    """Pydantic's template for `kind` with the schema's values filled in: a value from the
    input ends the message if it ends it (", {error}"), else reads "*"."""
    template = _TEMPLATES.get(kind)
    if template is None or kind in _AUTHORED:  # custom error types too
        return f"rejected by a validator ({kind})"

    def fill(m: re.Match[str]) -> str:
        lead, key = m.group(1) or "", m.group(2)
        if key == "expected_plural":  # pydantic derives it from the bound it follows
            bound = next((ctx[k] for k in _COUNTS if k in ctx), None)
            return "" if bound == 1 else "s"
        if key not in ctx:
            raise KeyError(key)
        if key in _SCHEMA_SAYS or (key == "error" and kind in _OWN_ERROR):
            return f"{lead}{ctx[key]}"
        return "" if lead and m.end() == len(template) else f"{lead}*"

    try:
        return _PLACEHOLDER.sub(fill, template)
    except KeyError:  # a custom error reusing a built-in type's name
        return f"rejected by a validator ({kind})"


def field_names(*annotations: Any) -> frozenset[str]:
    """The names an error's location may show without quoting the client's keys (besides
    list indexes): the field names and aliases of every model, dataclass and TypedDict
    reachable from `annotations`, their class names and literal values (a union's member, a
    tagged union's tag), and pydantic's own marker for a dict's key."""
    names: set[str] = {"[key]"}
    seen: set[int] = set()

    def alias_names(alias: Any) -> list[str]:
        if isinstance(alias, str):
            return [alias]
        if isinstance(alias, AliasChoices):
            return [n for choice in alias.choices for n in alias_names(choice)]
        if isinstance(alias, AliasPath):
            return [str(p) for p in alias.path if isinstance(p, str)]
        return []

    def walk(tp: Any) -> None:
        if id(tp) in seen:
            return
        seen.add(id(tp))
        fields: dict[str, Any] = {}
        pydantic_fields = getattr(tp, "__pydantic_fields__", None)  # models, pydantic dataclasses
        if isinstance(tp, type) and isinstance(pydantic_fields, dict):
            for name, f in pydantic_fields.items():
                names.update(alias_names(f.alias) + alias_names(f.validation_alias))
                fields[name] = f.annotation
        elif isinstance(tp, type) and (dataclasses.is_dataclass(tp) or is_typeddict(tp)):
            try:
                fields = get_type_hints(tp)
            except Exception:  # an unresolvable forward reference: the names, untyped
                fields = dict.fromkeys(getattr(tp, "__annotations__", {}))
        if isinstance(tp, type) and fields:
            names.add(tp.__name__)
        names.update(fields)
        if get_origin(tp) is Literal:
            names.update(str(a) for a in get_args(tp))
        for sub in (*fields.values(), *get_args(tp)):
            walk(sub)

    for annotation in annotations:
        walk(annotation)
    return frozenset(names)


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


def feature_getter(x: Any) -> Callable[[str], Any]:
    """How to read a named feature of this input (mapping key or attribute)."""
    if isinstance(x, dict):
        return x.get
    return lambda name: getattr(x, name, None)


class BaselineChecks:
    """Per-call checks compiled from a training baseline: each feature's range (widened by
    `tolerance` x the range on each side), unseen categories (when training saw every category
    it kept), and nulls where training had none."""

    __slots__ = ("categorical", "numeric")

    def __init__(self, baseline: Any, tolerance: float, skip: frozenset[str]) -> None:
        self.numeric: list[tuple[str, float, float, bool]] = []
        self.categorical: list[tuple[str, frozenset[str] | None, bool]] = []
        for name, f in baseline.features.items():
            if name in skip:
                continue
            allow_null = f.null_count > 0
            if f.kind == "numeric" and f.min is not None and f.max is not None:
                pad = tolerance * (f.max - f.min)
                self.numeric.append((name, f.min - pad, f.max + pad, allow_null))
            else:
                complete = not f.proportions or f.proportions[-1] == 0
                known = frozenset(f.categories) if complete else None
                self.categorical.append((name, known, allow_null))

    def __call__(self, x: Any) -> list[Problem]:
        get = feature_getter(x)
        problems: list[Problem] = []
        for name, lo, hi, allow_null in self.numeric:
            v = get(name)
            t = type(v)
            # the common case in two comparisons; NaN, None and strays fall through
            if (t is float or t is int) and lo <= v <= hi:
                continue
            problem = numeric_problem(v, lo, hi, allow_null)
            if problem is not None:
                problems.append(Problem(name, problem))
        for name, known, allow_null in self.categorical:
            v = get(name)
            if v is None:
                if not allow_null:
                    problems.append(Problem(name, "null, never null in training"))
            elif known is not None and category_key(v) not in known:
                problems.append(Problem(name, "unseen category"))
        return problems


def numeric_problem(v: Any, lo: float, hi: float, allow_null: bool) -> str | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None if allow_null else "null, never null in training"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "not a number"
    if v < lo or v > hi:
        return f"out of the training range [{lo:.6g}, {hi:.6g}]"
    return None


def category_key(value: Any) -> str:
    """A value as a baseline category: booleans are "true"/"false", the rest their string."""
    if type(value) is str:
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


class FreshnessCheck:
    """An input whose timestamp field is older than `max_age_s` is stale. One more than
    `max_age_s` in the future is as unusable (a clock or a unit gone wrong: epoch
    milliseconds read as seconds land thousands of years ahead)."""

    __slots__ = ("field", "max_age_s")

    def __init__(self, field: str, max_age_s: float) -> None:
        self.field = field
        self.max_age_s = max_age_s

    def __call__(self, x: Any) -> list[Problem]:
        ts = feature_getter(x)(self.field)
        if ts is None:
            return [Problem(self.field, "stale: no timestamp")]
        try:
            when = _epoch(ts)
        except (TypeError, ValueError):
            return [Problem(self.field, "stale: unreadable timestamp")]
        age = time.time() - when
        if age > self.max_age_s:
            return [Problem(self.field, f"stale: {age:.0f} s old > {self.max_age_s:g} s")]
        if -age > self.max_age_s:
            return [Problem(self.field, f"stale: {-age:.0f} s in the future (clock or unit?)")]
        return []


def _epoch(ts: Any) -> float:
    if isinstance(ts, datetime):
        return ts.timestamp()  # a naive datetime is read as local time, as Python does
    if isinstance(ts, int | float) and not isinstance(ts, bool):
        return float(ts)
    if isinstance(ts, str):
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    raise TypeError(type(ts).__name__)

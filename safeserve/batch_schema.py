"""An input schema's simple constraints, tested on whole columns of a batch.

A pydantic schema made only of plain fields (numbers with bounds, integers, strings, booleans,
`Literal` choices, each optionally nullable; no validators, no nested models) can be judged a
column at a time with numpy. The test is conservative: it only finds the *suspect* rows, which
are then validated one at a time by pydantic itself, so which rows are invalid, and their
problems, read exactly as a single call's would (a string "0.5" in a float field is suspect, and
pydantic then accepts it, coerced). Any schema with more than that is validated row by row.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types as at
import numpy as np
from pydantic import BaseModel

from safeserve.batch_rows import Rows, out_of_range

_KINDS = {float: "number", int: "int", str: "str", bool: "bool"}


@dataclass(frozen=True, slots=True)
class ColumnRule:
    """What one field accepts, as far as a column test can tell."""

    key: str  # the input key (the field's alias, if it has one)
    kind: str  # "number", "int", "str", "bool" or "choice"
    nullable: bool
    lower: float = -math.inf
    lower_open: bool = False
    upper: float = math.inf
    upper_open: bool = False
    choices: tuple[Any, ...] = ()


def column_rules(schema: type[BaseModel]) -> list[ColumnRule] | None:
    """The schema as column rules; None when something in it needs pydantic row by row."""
    decorators = schema.__pydantic_decorators__
    if decorators.validators or decorators.field_validators or decorators.model_validators:
        return None
    if decorators.root_validators or schema.model_config.get("strict"):
        return None
    if schema.model_config.get("extra") == "forbid":
        return None
    rules = []
    for name, field in schema.model_fields.items():
        alias = field.validation_alias if field.validation_alias is not None else field.alias
        if alias is not None and not isinstance(alias, str):
            return None  # AliasPath / AliasChoices
        rule = _rule(alias or name, field.annotation, field.metadata)
        if rule is None:
            return None
        rules.append(rule)
    return rules


def _rule(key: str, annotation: Any, metadata: list[Any]) -> ColumnRule | None:
    nullable = False
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            return None
        nullable, annotation = True, members[0]
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        if metadata or not all(type(c) in (str, int) for c in choices):
            return None
        return ColumnRule(key, "choice", nullable, choices=choices)
    kind = _KINDS.get(annotation)
    if kind is None:
        return None
    bounds: dict[str, Any] = {}
    for m in metadata:
        if kind not in ("number", "int"):
            return None
        if isinstance(m, at.Ge):
            bounds.update(lower=_bound(m.ge))
        elif isinstance(m, at.Gt):
            bounds.update(lower=_bound(m.gt), lower_open=True)
        elif isinstance(m, at.Le):
            bounds.update(upper=_bound(m.le))
        elif isinstance(m, at.Lt):
            bounds.update(upper=_bound(m.lt), upper_open=True)
        else:
            return None  # multiple_of, allow_inf_nan, strict...: pydantic decides
    return ColumnRule(key, kind, nullable, **bounds)


def _bound(value: Any) -> float:
    return float(value)


def suspect_rows(rules: list[ColumnRule], rows: Rows) -> np.ndarray:
    """A mask of the rows some field may reject (every row it certainly accepts is False)."""
    suspect = np.zeros(rows.n, dtype=bool)
    data = rows.data
    if rows.form == "array" and data.dtype.kind in "fiu":
        # bounded numbers of a numeric matrix: the baseline's blocked pass over the whole
        # matrix (open bounds made closed: x > a is x >= the next float after a)
        whole = [
            r
            for r in rules
            if r.key in rows.names
            and (r.kind == "number" or (r.kind == "int" and data.dtype.kind in "iu"))
        ]
        if whole:
            bounds = [
                (
                    r.key,
                    np.nextafter(r.lower, math.inf) if r.lower_open else r.lower,
                    np.nextafter(r.upper, -math.inf) if r.upper_open else r.upper,
                    False,  # NaN is suspect
                )
                for r in whole
            ]
            suspect |= out_of_range(data, [rows.names.index(r.key) for r in whole], bounds)
            rules = [r for r in rules if r not in whole]
    for rule in rules:
        suspect |= _suspect(rule, rows.column(rule.key))
    return suspect


def _suspect(rule: ColumnRule, col: np.ndarray) -> np.ndarray:
    kind = col.dtype.kind
    if rule.kind in ("number", "int") and kind in "fiu":
        values = col.astype(float, copy=False)
        lower_ok = values > rule.lower if rule.lower_open else values >= rule.lower
        upper_ok = values < rule.upper if rule.upper_open else values <= rule.upper
        ok = lower_ok & upper_ok  # NaN (a null, perhaps) is suspect: pydantic decides
        if rule.kind == "int" and kind == "f":
            ok &= np.isfinite(values) & (values == np.floor(values))
        return ~ok
    if rule.kind == "bool" and kind == "b":
        return np.zeros(len(col), dtype=bool)
    if kind != "O":
        return np.ones(len(col), dtype=bool)  # e.g. numbers in a str field: pydantic decides
    return np.fromiter((not _accepts(rule, v) for v in col.tolist()), bool, len(col))


def _accepts(rule: ColumnRule, v: Any) -> bool:
    """Whether the field surely accepts `v` as it is (False: perhaps not; pydantic decides)."""
    if v is None:
        return rule.nullable
    t = type(v)
    if rule.kind == "str":
        return t is str
    if rule.kind == "bool":
        return t is bool
    if rule.kind == "choice":
        return t in (str, int) and v in rule.choices
    if t is not float and t is not int:
        return False
    if rule.kind == "int" and t is float and not v.is_integer():
        return False
    lower_ok = v > rule.lower if rule.lower_open else v >= rule.lower
    upper_ok = v < rule.upper if rule.upper_open else v <= rule.upper
    return bool(lower_ok and upper_ok)

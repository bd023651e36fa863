"""An answer (a model's or a fallback's) as the JSON value an HTTP client gets: the types a model
or a fallback commonly returns converted as FastAPI's `jsonable_encoder` converts them, plus
numpy's; never a Python repr."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from collections.abc import Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from pathlib import PurePath
from types import GeneratorType
from typing import Any
from uuid import UUID

import numpy as np
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

_COMPACT = (",", ":")


class Unencodable(TypeError):
    """An answer holds a value that has no JSON form."""


def encode_answer(value: Any) -> bytes:
    """`value` as a JSON body (UTF-8, compact). Mappings (keys as strings), sequences and sets
    become objects and lists; numpy arrays and scalars, pydantic models and dataclasses their
    values and fields; enums their values; dates and times ISO 8601, durations seconds,
    decimals numbers, UUIDs and paths strings, bytes UTF-8 text; a non-finite float is null
    (JSON has no NaN). A lone surrogate, which UTF-8 cannot hold, is sent escaped.

    Raises `Unencodable` for any other type, nesting past Python's recursion limit, or an
    integer too long to write."""
    try:
        plain = _plain(value)
    except RecursionError:
        raise Unencodable("the answer is nested too deeply") from None
    except PydanticSerializationError:
        raise Unencodable("the answer holds a pydantic model that cannot be serialised") from None
    try:
        try:
            return json.dumps(
                plain, ensure_ascii=False, allow_nan=False, separators=_COMPACT
            ).encode()
        except UnicodeEncodeError:
            return json.dumps(plain, allow_nan=False, separators=_COMPACT).encode()  # escaped
    except ValueError:  # int's digit limit (sys.set_int_max_str_digits)
        raise Unencodable("the answer holds an integer too long to write") from None


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_key(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | deque | GeneratorType):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):  # arrays and scalars
        return _plain(_numpy_time(value) if value.dtype.kind in "mM" else value.tolist())
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return _plain(value.value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return _decimal(value)
    if isinstance(value, UUID | PurePath):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    kind = type(value).__name__
    raise Unencodable(f"the answer holds a value of type {kind!r}, which has no JSON form")


def _key(key: Any) -> str:
    """A mapping's key as JSON writes it (None is "null", True "true")."""
    if isinstance(key, str):
        return key
    if isinstance(key, float):  # as json.dumps writes a key: NaN, Infinity
        return json.dumps(key)
    plain = _plain(key)
    if isinstance(plain, dict | list):
        raise Unencodable(f"an answer has a {type(key).__name__} as a key")
    return plain if isinstance(plain, str) else json.dumps(plain)


def _numpy_time(value: Any) -> Any:
    """numpy dates in ISO 8601 and durations in seconds, at any unit; None for NaT."""
    if value.dtype.kind == "M":
        text = np.datetime_as_string(value).astype(object)
        dates: Any = np.where(np.isnat(value), None, text)
        return dates.tolist()
    return (value / np.timedelta64(1, "s")).tolist()  # NaT: NaN, then null


def _decimal(value: Decimal) -> int | float | None:
    """As FastAPI writes a Decimal: an int when it has no fraction, else a float."""
    if not value.is_finite():
        return None
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent >= 0:
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else None  # past a float's range

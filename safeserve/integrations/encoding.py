"""An answer (a model's or a fallback's) as the JSON value an HTTP client gets: the types a model
or a fallback commonly returns converted as FastAPI's `jsonable_encoder` converts them, plus
numpy's; never a Python repr."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
import sys
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
import pydantic.networks
from pydantic import AnyUrl, BaseModel, NameEmail, SecretBytes, SecretStr
from pydantic_core import MultiHostUrl, PydanticSerializationError, Url

_COMPACT = (",", ":")
_PLAIN = (str, int, bool, type(None))  # exactly these types: a subclass may be an enum
# written as their text, as FastAPI's jsonable_encoder writes them
_AS_TEXT = (
    UUID,
    PurePath,
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    ipaddress.IPv4Interface,
    ipaddress.IPv6Interface,
    AnyUrl,  # HttpUrl and the rest; pydantic_core's Url before pydantic 2.10
    Url,
    MultiHostUrl,
    getattr(pydantic.networks, "_BaseMultiHostUrl", MultiHostUrl),  # PostgresDsn, from 2.10
    NameEmail,
    SecretStr,  # masked: "**********"
    SecretBytes,
)
# a numpy duration's unit in seconds (years and months have no fixed length)
_SECONDS = {
    "W": 604800.0,
    "D": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "ns": 1e-9,
    "ps": 1e-12,
    "fs": 1e-15,
    "as": 1e-18,
}


class Unencodable(TypeError):
    """An answer holds a value that has no JSON form."""


def encode_answer(value: Any) -> bytes:
    """`value` as a JSON body (UTF-8, compact). Mappings (keys as strings), sequences and sets
    become objects and lists; numpy arrays and scalars, pydantic models (by alias) and
    dataclasses their values and fields; enums their values; dates and times ISO 8601,
    durations seconds, decimals numbers; UUIDs, paths, IP addresses, URLs and regex patterns
    strings, secrets masked; UTF-8 bytes text; a non-finite float is null (JSON has no NaN). A
    lone surrogate, which UTF-8 cannot hold, is sent escaped.

    Raises `Unencodable`, and nothing else, for any other type, bytes that are not UTF-8,
    nesting past Python's recursion limit, a value a conversion fails on, or an integer too
    long to write."""
    try:
        plain = _plain(value)
    except Unencodable:
        raise
    except RecursionError:
        raise Unencodable("the answer is nested too deeply") from None
    except PydanticSerializationError:
        raise Unencodable("the answer holds a pydantic model that cannot be serialised") from None
    except Exception as err:  # a conversion failed (a cycle in a model, an odd numpy unit)
        kind = type(err).__name__
        raise Unencodable(f"a value in the answer could not be converted ({kind})") from None
    try:
        try:
            return json.dumps(
                plain, ensure_ascii=False, allow_nan=False, separators=_COMPACT
            ).encode()
        except UnicodeEncodeError:
            return json.dumps(plain, allow_nan=False, separators=_COMPACT).encode()  # escaped
    except ValueError:  # int's digit limit (sys.set_int_max_str_digits)
        raise Unencodable("the answer holds an integer too long to write") from None
    except TypeError as err:  # what `_plain` let through and json cannot write (a bug of ours)
        kind = type(err).__name__
        raise Unencodable(f"a value in the answer could not be written ({kind})") from None


def _plain(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_key(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | deque | GeneratorType):
        return [_plain(v) for v in value]
    if isinstance(value, Enum):
        return _plain(value.value)
    if isinstance(value, bool | int | str):  # subclasses
        return value
    if isinstance(value, np.ndarray | np.generic):  # arrays and scalars
        return _numpy(value)
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(mode="json", by_alias=True))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return _decimal(value)
    if isinstance(value, _AS_TEXT):
        return str(value)
    if isinstance(value, re.Pattern):
        return _plain(value.pattern)  # text, or bytes
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise Unencodable("the answer holds bytes that are not UTF-8 text") from None
    kind = type(value).__name__
    raise Unencodable(f"the answer holds a value of type {kind!r}, which has no JSON form")


def _key(key: Any) -> str:
    """A mapping's key as JSON writes it (None is "null", True "true", NaN "NaN")."""
    if isinstance(key, str) and not isinstance(key, Enum):
        return key
    plain = _plain(key)
    if plain is None and key is not None:  # a non-finite number: as json.dumps writes a key
        return json.dumps(float(key))
    if isinstance(plain, dict | list):
        raise Unencodable(f"an answer has a {type(key).__name__} as a key")
    return plain if isinstance(plain, str) else json.dumps(plain)


def _numpy(value: Any) -> Any:
    """A numpy array or scalar as plain values: records field by field, dates in ISO 8601 and
    durations in seconds at any unit, masked entries None."""
    dtype = value.dtype
    if dtype.names is not None:  # a record, or an array of them
        if isinstance(value, np.ndarray):
            return [_numpy(row) for row in value]
        return [_numpy(value[name]) for name in dtype.names]
    if dtype.kind in "mM":
        return _plain(_numpy_time(value))
    plain = value.tolist()
    if isinstance(plain, np.generic):  # a longdouble, which has no Python type
        if isinstance(plain, np.floating):
            return _plain(float(plain))
        raise Unencodable(f"the answer holds a numpy {dtype.name}, which has no JSON form")
    return _plain(plain)


def _numpy_time(value: Any) -> Any:
    """numpy dates in ISO 8601 and durations in seconds, at any unit; None for NaT (and for a
    masked entry)."""
    missing = np.isnat(value)
    if isinstance(value, np.ma.MaskedArray):
        missing = missing | np.ma.getmaskarray(value)
        value = value.data
    if value.dtype.kind == "M":
        text: Any = np.datetime_as_string(value).astype(object)
    else:
        unit, count = np.datetime_data(value.dtype)
        if unit not in _SECONDS:
            raise Unencodable(f"a numpy duration in {unit!r} units has no fixed length")
        text = (value.astype(np.float64) * (_SECONDS[unit] * count)).astype(object)
    plain: Any = np.where(missing, None, text)
    return plain.tolist()


def _decimal(value: Decimal) -> int | float | None:
    """As FastAPI writes a Decimal: an int when it has no fraction, else a float."""
    if not value.is_finite():
        return None
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent >= 0:
        if value.adjusted() >= (sys.get_int_max_str_digits() or 4300):  # not worked out first
            raise Unencodable("the answer holds an integer too long to write")
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else None  # past a float's range

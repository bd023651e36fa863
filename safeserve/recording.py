"""How values go into a decision record: JSON-safe copies, fields redacted or hashed by key at
any depth, and free text scrubbed of the redacted and hashed values a call carried.

The recorder runs when a record is built (only for degraded, flagged or sampled calls); the
scrubber runs when a record is rendered (on the log writer's thread, or when a `Decision` is
asked for). Neither runs for a healthy call.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import hmac
import json
import math
import os
import re
import types
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from decimal import Decimal
from enum import Enum
from math import isfinite
from pathlib import PurePath
from typing import TYPE_CHECKING, Any
from uuid import UUID

import numpy as np
from pydantic import BaseModel

if TYPE_CHECKING:
    from safeserve.decisions import Record

REDACTED = "[redacted]"
_MAX_DEPTH = 20  # how deep fields are looked for (and recorded); deeper values become `<TypeName>`
_TOKEN_BELOW = 6  # values shorter than this are scrubbed only where they stand as a whole token
_CUT_AT = 200  # free text this long (or ending in "…") may have been cut inside a value
_CUT_MIN = 4  # the shortest start of a value scrubbed at the end of such a cut text
# values never looked into for fields: code, errors, containers, arrays, scalars shown as text
_NOT_RECORDS = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    BaseException,
    str,
    bytes,
    bytearray,
    list,
    set,
    frozenset,
    np.ndarray,
    np.generic,
    Enum,
    date,
    clock_time,
    timedelta,
    Decimal,
    UUID,
    PurePath,
)
_QUOTES = frozenset("\"'\\")  # characters a repr or JSON escapes in printable ASCII text
_PANDAS_CELLS = 10_000  # a larger DataFrame is recorded as "<DataFrame>", not cell by cell


def loads_json(text: str | bytes) -> Any:
    """`json.loads`, but what JSON has no number for is an error (`json.JSONDecodeError`):
    NaN and Infinity, which Python's parser takes, and numbers too large for a float (1e999),
    which it reads as infinity."""
    return json.loads(text, parse_constant=_not_json, parse_float=_finite_float)


def _not_json(constant: str) -> Any:
    raise json.JSONDecodeError(f"{constant} is not JSON", constant, 0)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise json.JSONDecodeError("a number too large for a float", text, 0)
    return value


def json_safe(value: Any, depth: int = 0) -> Any:
    """A JSON-serialisable copy of `value` (numpy, pydantic, sets, non-finite floats handled)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth > 20:
        return repr(value)[:200]
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v, depth + 1) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist(), depth + 1)
    if isinstance(value, np.generic):
        return json_safe(value.item(), depth + 1)
    if isinstance(value, BaseModel):
        return json_safe(value.model_dump(mode="json"), depth + 1)
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(value)[:200]


class Recorded:
    """What an `InputRecorder` made of one value: the loggable form, and the raw values of the
    redacted and hashed fields it met, each with its marker, to scrub from the record's text."""

    __slots__ = ("recorder", "secrets", "value")

    def __init__(self, value: Any, secrets: list[tuple[Any, str]], recorder: InputRecorder) -> None:
        self.value = value
        self.secrets = secrets
        self.recorder = recorder


class InputRecorder:
    """Prepares an input (or an answer) for a record: fields named in `redact` dropped and those
    in `hash` salted-hashed, by key at any depth; dataclasses, pydantic models, named tuples and
    plain objects recorded as dicts of their fields, lists element-wise; anything it cannot show
    field by field is recorded as `"<TypeName>"`, never as its repr."""

    __slots__ = ("_hash", "_keys", "_redact", "_salt", "_scanner", "_scanning")

    def __init__(self, redact: list[str], hash_fields: list[str], salt: str | None) -> None:
        self._redact = frozenset(redact)
        self._hash = frozenset(hash_fields)
        self._keys = self._redact | self._hash
        salt = salt or os.environ.get("SAFESERVE_HASH_SALT") or os.urandom(16).hex()
        self._salt = salt.encode()
        self._scanning = False  # only collecting secrets: no numeric array converted
        self._scanner: InputRecorder | None = None

    def secrets_in(self, value: Any) -> Recorded:
        """What the record's text must be scrubbed of in `value`, without the loggable form
        (an input not logged, the call's other keyword arguments): a numeric array, which has
        no field to redact, is passed over instead of converted (a second, not a millisecond,
        for an embedding batch)."""
        scanner = self._scanner
        if scanner is None:
            scanner = copy.copy(self)
            scanner._scanning = True
            self._scanner = scanner  # published once it scans
        return scanner(value)

    @property
    def keys(self) -> frozenset[str]:
        """The field names redacted or hashed."""
        return self._keys

    def hash_value(self, value: Any) -> str:
        """A salted SHA-256 of the value's JSON form (first 32 hex digits)."""
        data = repr(json_safe(value)).encode()
        return hmac.new(self._salt, data, hashlib.sha256).hexdigest()[:32]

    def __call__(self, value: Any) -> Recorded:
        secrets: list[tuple[Any, str]] = []
        if type(value) is dict:  # the usual input: skip the type tests of `_walk`
            return Recorded(self._fields(value.items(), 0, secrets), secrets, self)
        return Recorded(self._walk(value, 0, secrets), secrets, self)

    def attach(self, record: Record, x: Any, value: Any, inputs: bool, outputs: bool) -> None:
        """Put the call's input (when `inputs`) and answer (when `outputs`) on its record, and
        in any case what the record's text must be scrubbed of."""
        if inputs:
            record.inputs = self(x)
        else:
            record.keep(self.secrets_in(x))
        if outputs:
            record.output = self(value)

    def redact_keys(self, value: Any, found: list[tuple[Any, str]]) -> Any:
        """`value` with the redacted and hashed fields handled by key at any depth; the raw
        values met are added to `found`."""
        return self._walk(value, 0, found)

    def _walk(self, value: Any, depth: int, secrets: list[tuple[Any, str]]) -> Any:
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else str(value)
        if depth >= _MAX_DEPTH:
            return _placeholder(value)
        if isinstance(value, Enum):
            return self._walk(value.value, depth + 1, secrets)
        pairs = _fields_of(value)
        if pairs is not None:
            return self._fields(pairs, depth, secrets)
        if isinstance(value, list | tuple | set | frozenset):
            return [self._walk(v, depth + 1, secrets) for v in value]
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "biuf":
                return None if self._scanning else json_safe(value)
            return self._walk(value.tolist(), depth + 1, secrets)
        if isinstance(value, np.generic):
            return self._walk(value.item(), depth + 1, secrets)
        if isinstance(value, datetime | date | clock_time):
            return value.isoformat()
        if isinstance(value, Decimal | UUID | PurePath | timedelta):
            return str(value)
        return _placeholder(value)

    def _fields(self, pairs: Any, depth: int, secrets: list[tuple[Any, str]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        keys = self._keys
        for k, v in pairs:
            name = k if type(k) is str else str(k)
            if name not in keys:
                t = type(v)  # most features are plain scalars: no call needed
                plain = t is str or t is int or v is None or (t is float and isfinite(v))
                out[name] = v if plain else self._walk(v, depth + 1, secrets)
            elif name in self._redact:
                secrets.append((v, REDACTED))
            else:
                hashed = self.hash_value(v)
                secrets.append((v, f"[hash:{hashed}]"))
                out[name] = hashed
        return out


def _placeholder(value: Any) -> str:
    """What is recorded for a value that cannot be shown field by field: its type's name."""
    return f"<{type(value).__name__}>"


def _fields_of(value: Any) -> Any:
    """The (name, value) pairs of a record-like value, or None when it is not one."""
    if isinstance(value, Mapping):
        return value.items()
    if isinstance(value, tuple):
        names = getattr(value, "_fields", None)  # a named tuple
        return zip(names, value, strict=False) if isinstance(names, tuple) else None
    if isinstance(value, BaseModel):
        return value.model_dump().items()  # as before: serializers and computed fields applied
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ((f.name, getattr(value, f.name, None)) for f in dataclasses.fields(value))
    if isinstance(value, _NOT_RECORDS):
        return None
    module = type(value).__module__ or ""
    if module.startswith("pandas") and callable(getattr(value, "to_dict", None)):
        return _pandas_fields(value)
    # a plain object: its public attributes (private ones, `_name`, are never recorded)
    attrs = getattr(value, "__dict__", None)
    names = _slot_names(type(value)) + (list(attrs) if isinstance(attrs, dict) else [])
    public = [n for n in dict.fromkeys(names) if isinstance(n, str) and not n.startswith("_")]
    pairs = [(n, getattr(value, n)) for n in public if hasattr(value, n)]
    return pairs or None


def _pandas_fields(value: Any) -> Any:
    """A small DataFrame as {column: {index: value}}, a Series as {index: value}; None when big."""
    try:
        if int(value.size) > _PANDAS_CELLS:
            return None
    except (AttributeError, TypeError, ValueError):
        return None
    data = value.to_dict()
    return data.items() if isinstance(data, Mapping) else None


def _slot_names(cls: type) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        slots = klass.__dict__.get("__slots__", ())
        names.extend([slots] if isinstance(slots, str) else slots)
    return names


class Scrubber:
    """Replaces, in a rendered record's free text (reason details, attempt errors, strings in
    `inputs` and `output`), the text forms of one call's redacted and hashed values with their
    marker: `[redacted]`, or `[hash:...]` with the same hash the inputs show.

    Forms of a value: `str()`, and for strings also `repr()`, JSON escapes and each line, for
    integral floats the integer; matched case-insensitively. Values of one character (and booleans,
    None) are not scrubbed: replacing every `1` or `a` would make text unreadable and hides
    nothing. Values shorter than `_TOKEN_BELOW` characters are replaced only as whole tokens
    (`42` in "age 42", not in "420"). A text that may have been cut (ending in "…", or
    `_CUT_AT` characters or more) also loses a tail that starts one of the values.
    """

    __slots__ = ("_cut", "_forms", "_markers", "_needles", "_pattern")

    def __init__(self, secrets: list[tuple[Any, str]]) -> None:
        needles: dict[str, None] = {}  # each form as written: a form always matches itself
        markers: dict[str, str] = {}  # by lower case; "[redacted]" wins over a hash
        for value, marker in secrets:
            for text in _texts(value, 0):
                if len(text) < 2:
                    continue
                needles[text] = None
                key = text.lower()
                if key not in markers or marker == REDACTED:
                    markers[key] = marker
        self._markers = markers
        self._needles = [(k, markers[k], len(k) < _TOKEN_BELOW) for k in markers]
        self._forms = list(needles)
        self._cut = [k for k in needles if len(k) >= _TOKEN_BELOW]
        self._pattern: re.Pattern[str] | None = None  # built for a text with letters like "İ"

    def __bool__(self) -> bool:
        return bool(self._needles)

    def record(self, rec: dict[str, Any]) -> None:
        """Scrub a rendered decision record in place."""
        for reason in rec["reasons"]:
            if reason["detail"]:
                reason["detail"] = self.text(reason["detail"])
        for attempt in rec["attempts"]:
            if attempt["error"]:
                attempt["error"] = self.text(attempt["error"])
        for key in ("inputs", "output"):
            if key in rec:
                rec[key] = self.value(rec[key])

    def value(self, value: Any) -> Any:
        """A JSON-safe value with every string in it (keys too) scrubbed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        return value

    def text(self, text: str) -> str:
        """`text` with every form of every value replaced by its marker."""
        low = text.lower()
        if len(low) == len(text):
            out = self._replace(text, low)
        else:  # positions in the lower-case copy are not positions in `text`: a regex instead
            if self._pattern is None:
                self._pattern = _pattern_of(self._forms)
            out = self._pattern.sub(self._mark, text)
        if out.endswith("…") or len(out) >= _CUT_AT:
            out = self._cut_tail(out)
        return out

    def _replace(self, text: str, low: str) -> str:
        """Find each form in the lower-case copy; replace the union of what was found, so that
        overlapping forms leave no character of either."""
        spans: list[tuple[int, int, str]] = []
        for needle, marker, whole_token in self._needles:
            start = low.find(needle)
            while start != -1:
                end = start + len(needle)
                if not whole_token or (_edge(low, start - 1) and _edge(low, end)):
                    spans.append((start, end, marker))
                start = low.find(needle, start + 1)
        if not spans:
            return text
        spans.sort(key=lambda s: (s[0], s[0] - s[1]))
        parts: list[str] = []
        done = 0
        for start, end, marker in spans:
            if start >= done:
                parts += (text[done:start], marker)
            done = max(done, end)
        parts.append(text[done:])
        return "".join(parts)

    def _mark(self, match: re.Match[str]) -> str:
        return self._markers.get(match.group(0).lower(), REDACTED)

    def _cut_tail(self, text: str) -> str:
        body = text.removesuffix("…")
        low = body.lower()
        for needle in self._cut:
            lowered = needle.lower()
            for size in range(len(needle) - 1, _CUT_MIN - 1, -1):
                if body.endswith(needle[:size]) or low.endswith(lowered[:size]):
                    marker = self._markers.get(lowered, REDACTED)
                    return body[:-size] + marker + text[len(body) :]
        return text


def _edge(text: str, i: int) -> bool:
    """Whether position `i` is outside `text` or not a word character (a token's edge)."""
    return i < 0 or i >= len(text) or not (text[i].isalnum() or text[i] == "_")


def _pattern_of(forms: list[str]) -> re.Pattern[str]:
    """The forms as one case-insensitive regex, longest first, short ones as whole tokens."""
    parts = [
        re.escape(k) if len(k) >= _TOKEN_BELOW else rf"(?<!\w){re.escape(k)}(?!\w)"
        for k in sorted(forms, key=len, reverse=True)
    ]
    return re.compile("|".join(parts), re.IGNORECASE)


def _texts(value: Any, depth: int) -> list[str]:
    """The ways `value` may be written in an error message or a string field."""
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, str):  # each line too: an error message keeps only its first line
        forms = [value, value.strip(), *value.splitlines()]
        if not (value.isascii() and value.isprintable()) or _QUOTES.intersection(value):
            forms += (repr(value)[1:-1], json.dumps(value)[1:-1])  # escaped as in a repr or JSON
        return forms
    if isinstance(value, int):
        return [str(value)]
    if isinstance(value, float):
        forms = [repr(value)]
        if value.is_integer() and abs(value) < 1e18:
            forms.append(str(int(value)))
        return forms
    if isinstance(value, bytes | bytearray):
        return [bytes(value).decode("utf-8", "replace"), repr(bytes(value))[2:-1]]
    if isinstance(value, datetime | date | clock_time):
        return [str(value), value.isoformat()]
    if isinstance(value, Enum):
        return [str(value), *_texts(value.value, depth + 1)]
    if isinstance(value, np.generic):
        return _texts(value.item(), depth + 1)
    if isinstance(value, np.ndarray):
        return _texts(value.tolist(), depth + 1)
    if depth >= _MAX_DEPTH:
        return []
    pairs = _fields_of(value)
    if pairs is None and isinstance(value, list | tuple | set | frozenset):
        pairs = enumerate(value)
    if pairs is None:
        return [str(value)]
    return [t for _, v in pairs for t in _texts(v, depth + 1)]

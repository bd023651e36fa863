"""Confidence extraction and the output checks that run on every primary answer."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from safeserve.decisions import RawReason
from safeserve.policy import ConfidenceConfig

_AUTO_KEYS = ("confidence", "score", "proba")

Extractor = Callable[[Any], float | None]


def as_confidence(value: Any) -> float | None:
    """A number, or the max over the last axis of a probability array (min over rows)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, np.generic):
        return float(value)
    if isinstance(value, list | tuple):
        if not value:
            return None
        value = np.asarray(value, dtype=float)
    if isinstance(value, np.ndarray):
        if value.size == 0 or value.dtype.kind not in "fiu":
            return None
        if value.ndim == 0:
            return float(value)
        # per row: the probability of the predicted class; a batch is as sure as its least sure row
        return float(np.min(np.max(value, axis=-1)))
    return None


def auto_extract(answer: Any) -> float | None:
    """Reads a `confidence`/`score`/`proba` key or attribute, or a probability array."""
    if type(answer) is dict or isinstance(answer, Mapping):
        for key in _AUTO_KEYS:
            if key in answer:
                v = answer[key]
                return float(v) if type(v) is float else as_confidence(v)
        return None
    if isinstance(answer, np.ndarray | list | tuple):
        return as_confidence(answer)
    for key in _AUTO_KEYS:
        v = getattr(answer, key, None)
        if v is not None:
            return as_confidence(v)
    return None


def make_extractor(extract: str | Callable[[Any], Any]) -> Extractor:
    """The extractor a `ConfidenceConfig.extract` names."""
    if callable(extract):
        fn = extract

        def call(answer: Any) -> float | None:
            return as_confidence(fn(answer))

        return call
    if extract == "auto":
        return auto_extract
    key = extract

    def by_key(answer: Any) -> float | None:
        if isinstance(answer, Mapping):
            return as_confidence(answer.get(key))
        return as_confidence(getattr(answer, key, None))

    return by_key


class ConfidenceCheck:
    """Compares the primary's confidence with the threshold; degrades or flags below it."""

    __slots__ = ("degrades", "extract", "threshold")

    def __init__(self, config: ConfidenceConfig) -> None:
        self.extract = make_extractor(config.extract)
        self.threshold = config.threshold
        self.degrades = config.action == "fallback"

    def judge(self, conf: float | None) -> RawReason:
        """Why a confidence fails the check: under the threshold (`low_confidence`), or not a
        probability at all (`invalid_output`: missing, NaN, or outside [0, 1]), which degrades
        even with `action="flag"`: an answer without a usable confidence is a broken answer."""
        if conf is None:
            return RawReason("invalid_output", "confidence", "no confidence in the answer")
        if math.isnan(conf):
            return RawReason(code="invalid_output", stage="confidence", detail="confidence is NaN")
        if not 0.0 <= conf <= 1.0:
            return RawReason("invalid_output", "confidence", f"confidence {conf:.4g} not in [0, 1]")
        return RawReason(
            code="low_confidence", stage="confidence", detail=f"{conf:.4g} < {self.threshold:.4g}"
        )


def first_non_finite(value: Any, depth: int = 0) -> str | None:
    """Where a NaN or infinity sits in an answer (`$`, `$.proba[2]`...), or None.

    Written for the hot path: exact-type checks first, recursion only into containers.
    (`v - v` is 0.0 for a finite float and NaN, which is truthy, otherwise.)
    """
    t = type(value)
    if t is float:
        return "$" if value - value else None
    if t is dict:
        # detection first, on values only; the location is worked out once something is found
        for v in value.values():
            tv = type(v)
            if tv is float:
                if v - v:
                    return _locate(value, depth)
            elif (
                tv is not str
                and tv is not int
                and tv is not bool
                and v is not None
                and first_non_finite(v, depth + 1) is not None
            ):
                return _locate(value, depth)
        return None
    if t is str or t is int or t is bool or value is None or depth > 32:
        return None
    if t is list or t is tuple:
        for i, v in enumerate(value):
            where = first_non_finite(v, depth + 1)
            if where is not None:
                return f"$[{i}]{where[1:]}"
        return None
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return "$[...]"
        return None
    if isinstance(value, float | np.floating):
        return None if math.isfinite(value) else "$"
    if isinstance(value, Mapping):
        return first_non_finite(dict(value), depth)
    if isinstance(value, list | tuple):
        return first_non_finite(list(value), depth)
    if isinstance(value, BaseModel):
        return first_non_finite(value.__dict__, depth)
    return None


def _locate(value: dict[Any, Any], depth: int) -> str:
    for k, v in value.items():
        where = first_non_finite(v, depth + 1)
        if where is not None:
            return f"$.{k}{where[1:]}"
    return "$"


class OutputCheck:
    """Non-finite numbers anywhere in the answer (unless `finite` is False), the output schema
    if one is given, and the guard's own check of its answers (`Guard.check_answers`) if set."""

    __slots__ = ("answer", "finite", "schema")

    def __init__(
        self,
        schema: type[BaseModel] | None,
        finite: bool = True,
        answer: Callable[[Any], object] | None = None,
    ) -> None:
        self.schema = schema
        self.finite = finite
        self.answer = answer

    def __call__(self, answer: Any) -> RawReason | None:
        where = first_non_finite(answer) if self.finite else None
        if where is not None:
            return RawReason(code="invalid_output", stage="output", detail=f"non-finite at {where}")
        if self.schema is not None:
            try:
                self.schema.model_validate(answer)
            except ValidationError as err:
                fields = sorted({".".join(map(str, e["loc"])) or "$" for e in err.errors()})
                return RawReason(
                    code="invalid_output",
                    stage="output",
                    detail=f"schema: {', '.join(fields)}"[:200],
                )
        if self.answer is not None:
            try:
                self.answer(answer)
            except Exception as err:  # the check's own words: they name types, not values
                return RawReason(code="invalid_output", stage="output", detail=str(err)[:200])
        return None

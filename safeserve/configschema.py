"""The policy-file format as pydantic models: the `Policy` models with import paths for callables.

Each `File*` model subclasses the config model it stands for, so it has every field, constraint
and validator of that model; only fields holding callables or classes change, to import paths
(`"pkg.module:attr"`) resolved with importlib while validating. `PolicyFile.model_json_schema()`
is the JSON Schema `safeserve schema` prints. `to_policy` turns a validated file policy into the
`Policy` a guard takes.
"""

from __future__ import annotations

import builtins
import importlib
import re
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from safeserve.policy import (
    BreakerConfig,
    ConfidenceConfig,
    DecisionLogConfig,
    Fallback,
    Freshness,
    Policy,
    RetryConfig,
    Rule,
    ValidationConfig,
)

IMPORT_PATH = re.compile(
    r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)"
)
# the same, for JSON Schema (ECMA-262 regexes have no `(?P<name>...)` groups)
_SCHEMA_PATTERN = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"
FALLBACK_KINDS = ("model", "rules", "cache", "static")
_TRANSIENT: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)


def resolve(path: str, allowed_modules: Sequence[str] | None) -> Any:
    """The object an import path names; the module is checked against the allow-list first."""
    match = IMPORT_PATH.fullmatch(path)
    if match is None:
        raise ValueError(f"expected an import path 'pkg.module:attr', got {path!r}")
    module = match["module"]
    if allowed_modules is not None and not any(
        module == prefix.rstrip(".") or module.startswith(prefix) for prefix in allowed_modules
    ):
        allowed = ", ".join(repr(p) for p in allowed_modules) or "none"
        raise ValueError(f"{path!r} is not allowed: module {module!r} is outside {allowed}")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"cannot import {path!r}: {_lower(str(exc))}") from None
    except Exception as exc:  # the module itself fails on import: the file's problem all the same
        raise ValueError(f"cannot import {path!r}: {type(exc).__name__}: {exc}") from None
    for part in match["attr"].split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"cannot import {path!r}: no attribute {part!r}") from None
    return obj


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


def _allowed(info: ValidationInfo) -> Sequence[str] | None:
    context = info.context or {}
    allowed: Sequence[str] | None = context.get("allowed_modules")
    return allowed


def _to_callable(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be an import path 'pkg.module:attr'")
    obj = resolve(value, _allowed(info))
    if not callable(obj):
        raise ValueError(f"{value!r} is not callable")
    return obj


def _to_callable_or_str(value: Any, info: ValidationInfo) -> Any:
    """Strings shaped `module:attr` are import paths; other strings stay strings."""
    if isinstance(value, str) and IMPORT_PATH.fullmatch(value):
        return _to_callable(value, info)
    return value


def _to_exception(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be a builtin exception name or 'pkg.module:Class'")
    if ":" in value:
        obj = resolve(value, _allowed(info))
    else:
        obj = getattr(builtins, value, None)
        if obj is None:
            raise ValueError(f"unknown exception {value!r}: a builtin name or 'pkg.module:Class'")
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise ValueError(f"{value!r} is not an exception class")
    return obj


def _to_model(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be an import path 'pkg.module:Class'")
    obj = resolve(value, _allowed(info))
    if not (isinstance(obj, type) and issubclass(obj, BaseModel)):
        raise ValueError(f"{value!r} is not a pydantic model class")
    return obj


def _path_schema(what: str) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "pattern": _SCHEMA_PATTERN, "description": what})


CallableRef = Annotated[
    Callable[..., Any],
    BeforeValidator(_to_callable),
    _path_schema("import path of a callable, 'pkg.module:attr'"),
]
ExceptionRef = Annotated[
    type[BaseException],
    BeforeValidator(_to_exception),
    WithJsonSchema(
        {"type": "string", "description": "a builtin exception name or 'pkg.module:Class'"}
    ),
]
ModelRef = Annotated[
    type[BaseModel],
    BeforeValidator(_to_model),
    _path_schema("import path of a pydantic model class, 'pkg.module:Class'"),
]


class FileRetry(RetryConfig):
    """Retries of the primary; `retry_on` lists exception names or import paths."""

    __init__ = BaseModel.__init__  # plain pydantic init: errors keep their location
    retry_on: list[ExceptionRef] = Field(default_factory=lambda: list(_TRANSIENT))


class FileBreaker(BreakerConfig):
    """Circuit breaker settings; exception types and callables as import paths."""

    __init__ = BaseModel.__init__
    record_on: list[ExceptionRef] = Field(default_factory=list)
    ignore_on: list[ExceptionRef] = Field(default_factory=list)
    on_state_change: list[CallableRef] = Field(default_factory=list)
    clock: CallableRef = Field(default_factory=lambda: time.monotonic, exclude=True)


class FileFreshness(Freshness):
    """Inputs older than `max_age_s` by their `field` timestamp are invalid."""

    __init__ = BaseModel.__init__


class FileValidation(ValidationConfig):
    """Input validation; `schema` and `output_schema` are import paths of pydantic models."""

    __init__ = BaseModel.__init__
    schema_: ModelRef | None = Field(default=None, alias="schema")
    output_schema: ModelRef | None = None
    baseline: str | None = Field(default=None, description="path of a baseline JSON file")
    freshness: FileFreshness | None = None


class FileConfidence(ConfidenceConfig):
    """Confidence check; `extract` is "auto", a key name, or an import path 'pkg.module:fn'."""

    __init__ = BaseModel.__init__
    threshold: float = Field(ge=0, le=1)
    extract: Annotated[
        str | Callable[[Any], Any],
        BeforeValidator(_to_callable_or_str),
        WithJsonSchema({"type": "string", "description": "'auto', a key, or 'pkg.module:fn'"}),
    ] = "auto"


class FileLog(DecisionLogConfig):
    """Decision log; `sink` is "stdout", a file path, or an import path 'pkg.module:fn'."""

    __init__ = BaseModel.__init__
    sink: Annotated[
        str | Callable[[dict[str, Any]], Any] | None,
        BeforeValidator(_to_callable_or_str),
        WithJsonSchema({"type": "string", "description": "'stdout', a path, or 'pkg.module:fn'"}),
    ] = None


class FileRule(Rule):
    """A rule-table row: `when: {feature: {op: value}}` (all must hold), `then: answer`."""

    __init__ = BaseModel.__init__


class CacheSpec(BaseModel):
    """The last good primary answer for an equal input, if younger than `ttl_s`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ttl_s: float | None = Field(default=None, gt=0)
    max_items: int = Field(default=10_000, ge=1)


def _one_kind_schema(schema: dict[str, Any]) -> None:
    schema["oneOf"] = [{"required": [kind]} for kind in FALLBACK_KINDS]


class FallbackEntry(BaseModel):
    """One step of the fallback chain: exactly one of `model`, `rules`, `cache`, `static`."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        arbitrary_types_allowed=True,
        json_schema_extra=_one_kind_schema,
    )
    name: str = Field(min_length=1)
    model: CallableRef | None = None
    rules: list[FileRule] | None = None
    default: Any = Field(default=None, description="answer of a rules fallback when none matches")
    cache: CacheSpec | None = None
    static: Any = Field(default=None, description="the fixed answer of a static fallback")
    timeout_s: float | None = Field(default=None, gt=0)
    threshold: float | None = Field(default=None, ge=0, le=1)
    batch: bool = Field(
        default=False,
        description="a model fallback that takes a batch: predict.batch's rows in one call",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> FallbackEntry:
        given = [k for k in FALLBACK_KINDS if k in self.model_fields_set]
        if len(given) != 1:
            found = f" (found {', '.join(given)})" if given else ""
            raise ValueError(f"give exactly one of model, rules, cache, static{found}")
        if "default" in self.model_fields_set and given != ["rules"]:
            raise ValueError("`default` belongs to a rules fallback")
        if self.batch and given != ["model"]:
            raise ValueError("`batch` belongs to a model fallback")
        return self

    @property
    def kind(self) -> str:
        """Which kind of fallback this entry declares."""
        return next(k for k in FALLBACK_KINDS if k in self.model_fields_set)

    def to_fallback(self) -> Fallback:
        """The `Fallback` this entry declares."""
        kw: dict[str, Any] = {"name": self.name, "kind": self.kind}
        given = self.model_fields_set
        kw.update({k: getattr(self, k) for k in ("timeout_s", "threshold", "batch") if k in given})
        if self.model is not None:
            kw["fn"] = self.model
        if self.rules is not None:
            kw["table"] = [Rule(when=r.when, then=r.then) for r in self.rules]
            kw["default"] = self.default
        if self.cache is not None:
            kw.update(_set_fields(self.cache))
        if self.kind == "static":
            kw["value"] = self.static
        return Fallback(**kw)


def _drop_name_requirement(schema: dict[str, Any]) -> None:
    schema["required"] = [r for r in schema.get("required", []) if r != "name"]
    if not schema["required"]:
        del schema["required"]


class FilePolicy(Policy):
    """One policy: every `Policy` field, plus `model`, the import path of the primary."""

    model_config = ConfigDict(json_schema_extra=_drop_name_requirement)
    __init__ = BaseModel.__init__
    name: str = Field(min_length=1, description="defaults to the policy's key")
    model: CallableRef | None = None
    validation: FileValidation | None = None
    retry: FileRetry | None = None
    breaker: FileBreaker = Field(default_factory=FileBreaker)
    confidence: FileConfidence | None = None
    # the file's fallback entries have their own shape; `to_policy` builds the `Fallback`s
    fallbacks: list[FallbackEntry] = Field(default_factory=list)  # type: ignore[assignment]
    log: FileLog | None = None

    @field_validator("fallbacks")
    @classmethod
    def _unique_names(cls, fallbacks: list[Any]) -> list[Any]:
        """Replaces Policy's check: the loader reports duplicates with their index."""
        return fallbacks


class PolicyFile(BaseModel):
    """A safeserve policies file (YAML or TOML): `policies: {NAME: {...}}`."""

    model_config = ConfigDict(
        extra="forbid",
        title="safeserve policies",
        json_schema_extra={"patternProperties": {"^x-": {}}},  # free keys for YAML anchors
    )
    policies: dict[str, FilePolicy] = Field(min_length=1)


_REAL: dict[type[BaseModel], type[BaseModel]] = {
    FilePolicy: Policy,
    FileRetry: RetryConfig,
    FileBreaker: BreakerConfig,
    FileFreshness: Freshness,
    FileValidation: ValidationConfig,
    FileConfidence: ConfidenceConfig,
    FileLog: DecisionLogConfig,
}


def _set_fields(model: BaseModel) -> dict[str, Any]:
    """The fields the file gave, by the names the real constructor takes (aliases included)."""
    fields = type(model).model_fields
    return {
        fields[name].alias or name: _to_real(getattr(model, name))
        for name in model.model_fields_set
    }


def _to_real(value: Any) -> Any:
    if isinstance(value, FallbackEntry):
        return value.to_fallback()
    if isinstance(value, list):
        return [_to_real(v) for v in value]
    real = _REAL.get(type(value))
    if real is not None:
        return real(**_set_fields(value))
    return value


def to_policy(file_policy: FilePolicy) -> Policy:
    """The `Policy` a validated file policy declares; unset fields take `Policy`'s defaults."""
    policy = _to_real(file_policy)
    assert isinstance(policy, Policy)
    return policy

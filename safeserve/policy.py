"""The policy: pydantic config models for every stage of a guarded call.

Every model is frozen and rejects unknown fields; a bad value raises `PolicyError` with one
`path: message` line per problem.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from safeserve.errors import PolicyError

RULE_OPS = ("eq", "ne", "lt", "le", "gt", "ge", "in", "not_in", "is_null")


class _Config(BaseModel):
    """Base of the config models: frozen, strict about unknown fields, typed errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise PolicyError.from_validation(err, type(self).__name__) from None


ExceptionTypes = list[type[BaseException]]


def _transient_errors() -> ExceptionTypes:
    return [ConnectionError, TimeoutError]


class RetryConfig(_Config):
    """Retries of the primary (tenacity): only for `retry_on` errors, within the call budget."""

    attempts: int = Field(default=3, ge=1, le=100)
    backoff_s: float = Field(default=0.1, ge=0)
    max_backoff_s: float = Field(default=2.0, ge=0)
    jitter: bool = True
    retry_on: ExceptionTypes = Field(default_factory=_transient_errors)
    attempt_timeout_s: float | None = Field(default=None, gt=0)
    budget: float | None = Field(default=None, ge=0)
    min_retries_per_s: float = Field(default=10.0, ge=0)


def masked_url(url: str) -> str:
    """A store URL fit for a log or a repr: its password (`redis://user:PASSWORD@host`, or a
    `password=` query parameter) replaced by `***`."""
    url = re.sub(r"^([^:/?#]+://[^:/?#@]*:)[^?#]*@", r"\1***@", url)  # to the last @
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


class BreakerConfig(_Config):
    """Circuit breaker settings; the defaults are resilience4j's."""

    window: Literal["count", "time"] = "count"
    window_size: int = Field(default=100, ge=1)
    min_calls: int = Field(default=100, ge=1)
    failure_rate_threshold: float = Field(default=0.5, gt=0, le=1)
    slow_call_s: float | None = Field(default=60.0, gt=0)  # None: no slow-call detection
    slow_call_rate_threshold: float = Field(default=1.0, gt=0, le=1)
    open_s: float = Field(default=60.0, gt=0)
    open_backoff: float = Field(default=1.0, ge=1)
    max_open_s: float | None = Field(default=None, gt=0)
    half_open_calls: int = Field(default=10, ge=1)
    success_threshold: int | None = Field(default=None, ge=1)
    probe_timeout_s: float | None = Field(default=None, gt=0)
    consecutive_failures: int | None = Field(default=None, ge=1)
    record_on: ExceptionTypes = Field(default_factory=list)
    ignore_on: ExceptionTypes = Field(default_factory=list)
    mode: Literal["normal", "metrics_only"] = "normal"
    store: str | None = None
    store_prefix: str = Field(default="safeserve", min_length=1)
    store_sync_s: float = Field(default=0.05, gt=0, le=5)
    on_state_change: list[Callable[..., Any]] = Field(default_factory=list)
    clock: Callable[[], float] = Field(default=time.monotonic, exclude=True)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, masked_url(value) if name == "store" and value else value

    @field_validator("store")
    @classmethod
    def _store_url(cls, url: str | None) -> str | None:
        if url is None:
            return url
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("a redis://host:port/db, rediss://... or unix://... URL")
        db = parts.path.strip("/") if parts.scheme != "unix" else ""
        if db and not db.isdigit():
            raise ValueError(  # not quoted: it may be the end of a password holding a "/"
                f"the database in {parts.scheme}://host:port/db is a number (a / or @ in the "
                "password is written %2F or %40)"
            )
        try:
            parts.port  # noqa: B018 (raises on a port that is not a number)
        except ValueError:
            raise ValueError("the port is not a number") from None
        return url

    @model_validator(mode="after")
    def _check_probes(self) -> BreakerConfig:
        if self.success_threshold is not None and self.success_threshold > self.half_open_calls:
            raise ValueError("success_threshold cannot exceed half_open_calls")
        return self

    @property
    def probes_to_close(self) -> int:
        """Successful probes needed to close from half-open."""
        return self.success_threshold or self.half_open_calls


class ConfidenceConfig(_Config):
    """Confidence check on the primary's answer."""

    threshold: float = Field(ge=0, le=1)
    extract: str | Callable[[Any], Any] = "auto"
    action: Literal["fallback", "flag"] = "fallback"


class Freshness(_Config):
    """Inputs older than `max_age_s` (by their `field` timestamp) are invalid, detail `stale`."""

    field: str = Field(min_length=1)
    max_age_s: float = Field(gt=0)


class ValidationConfig(_Config):
    """Input validation: a pydantic schema, and per-call checks derived from a training baseline.

    `baseline` (a path or an `ss.Baseline`) adds: value outside the training range (widened by
    `tolerance` x the range on each side), unseen category, null where training had none; it also
    turns on online feature profiles (`profile`, flushed every `profile_interval_s`).
    `on_invalid`: "fallback" (default), "reject" (`ss.InputRejected`) or "flag" (the primary
    serves, the decision records the problem).
    """

    schema_: type[BaseModel] | None = Field(default=None, alias="schema")
    output_schema: type[BaseModel] | None = None
    baseline: Any = None
    tolerance: float = Field(default=0.0, ge=0)
    on_invalid: Literal["fallback", "reject", "flag"] = "fallback"
    freshness: Freshness | None = None
    profile: bool = True
    profile_interval_s: float = Field(default=60.0, gt=0)

    @field_validator("baseline")
    @classmethod
    def _baseline_kind(cls, v: Any) -> Any:
        if v is None or isinstance(v, str | Path) or hasattr(v, "features"):
            return v
        raise ValueError("a path to a baseline JSON file or an ss.Baseline")

    @property
    def schema(self) -> type[BaseModel] | None:  # type: ignore[override]
        """The input schema (stored as `schema_`: pydantic reserves the name)."""
        return self.schema_


class DecisionLogConfig(_Config):
    """Where decision records go and what they contain."""

    sink: str | Path | Callable[[dict[str, Any]], Any] | None = None
    sample_rate: float = Field(default=0.0, ge=0, le=1)
    include_inputs: bool = True
    include_outputs: bool = False
    redact: list[str] = Field(default_factory=list)
    hash: list[str] = Field(default_factory=list)
    hash_salt: str | None = Field(default=None, repr=False)  # a secret: never in a repr
    queue_size: int = Field(default=10_000, ge=1)
    open_breaker: Literal["each", "aggregate"] = "each"
    ring_size: int = Field(default=1000, ge=1)
    # each call annotates the current OpenTelemetry span (the `otel` extra); see tracing.py
    trace: bool = False


class Rule(_Config):
    """A rule-table row: when every condition holds, the answer is `then`."""

    when: dict[str, dict[str, Any]]
    then: Any

    @field_validator("when")
    @classmethod
    def _known_ops(cls, when: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for feature, conds in when.items():
            for op, value in conds.items():
                if op not in RULE_OPS:
                    raise ValueError(f"{feature}: unknown op {op!r} (one of {', '.join(RULE_OPS)})")
                if op in ("in", "not_in") and not isinstance(value, list | tuple | set | frozenset):
                    raise ValueError(f"{feature}: {op} takes a list")
        return when


class Fallback(_Config):
    """One step of the fallback chain; build with `Fallback.model/rules/cache/static`."""

    name: str = Field(min_length=1)
    kind: Literal["model", "rules", "cache", "static"]
    fn: Callable[..., Any] | None = None
    table: list[Rule] = Field(default_factory=list)
    default: Any = None
    ttl_s: float | None = Field(default=None, gt=0)
    max_items: int = Field(default=10_000, ge=1)
    value: Any = None
    timeout_s: float | None = Field(default=None, gt=0)
    threshold: float | None = Field(default=None, ge=0, le=1)
    batch: bool = False  # a model fallback that takes a batch: `predict.batch`'s rows in one call

    @model_validator(mode="after")
    def _kind_fields(self) -> Fallback:
        if self.kind == "model" and not callable(self.fn):
            raise ValueError("a model fallback needs a callable `fn`")
        if self.batch and self.kind != "model":
            raise ValueError("only a model fallback takes batches (`batch=True`)")
        return self

    @classmethod
    def model(
        cls,
        name: str,
        fn: Callable[..., Any],
        *,
        timeout_s: float | None = None,
        threshold: float | None = None,
        batch: bool = False,
    ) -> Fallback:
        """Another model (sync or async), called with the same arguments as the primary.

        `batch=True`: `fn` takes a batch and returns one answer per row, like a `batch=True`
        primary; `predict.batch` then hands it every row still waiting for a fallback in one
        call (a row it answers with None or NaN goes on to the next fallback).
        """
        return cls(
            name=name, kind="model", fn=fn, timeout_s=timeout_s, threshold=threshold, batch=batch
        )

    @classmethod
    def rules(
        cls,
        name: str,
        rules: list[Rule] | list[Mapping[str, Any]],
        default: Any = None,
        *,
        timeout_s: float | None = None,
        threshold: float | None = None,
    ) -> Fallback:
        """A rule table: the first rule whose `when` holds answers, else `default` (unless None)."""
        return cls(
            name=name,
            kind="rules",
            table=[r if isinstance(r, Rule) else Rule(**r) for r in rules],
            default=default,
            timeout_s=timeout_s,
            threshold=threshold,
        )

    @classmethod
    def cache(
        cls,
        name: str,
        ttl_s: float | None = None,
        max_items: int = 10_000,
        *,
        threshold: float | None = None,
    ) -> Fallback:
        """The last good primary answer for an equal input, if younger than `ttl_s`."""
        return cls(name=name, kind="cache", ttl_s=ttl_s, max_items=max_items, threshold=threshold)

    @classmethod
    def static(cls, name: str, value: Any, *, threshold: float | None = None) -> Fallback:
        """A fixed answer."""
        return cls(name=name, kind="static", value=value, threshold=threshold)


def schema_field_names(schema: type[BaseModel]) -> list[str]:
    """The input keys a schema knows: its field names and their aliases."""
    fields = schema.model_fields
    return [*fields, *(f.alias for f in fields.values() if f.alias)]


class Policy(_Config):
    """Everything a guard does for one model: the whole degradation policy."""

    name: str = Field(min_length=1)
    owner: str | None = None
    model_version: str | None = None
    model: Callable[..., Any] | None = None
    validation: ValidationConfig | None = None
    timeout_s: float | None = Field(default=None, gt=0)
    retry: RetryConfig | None = None
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    confidence: ConfidenceConfig | None = None
    fallbacks: list[Fallback] = Field(default_factory=list)
    log: DecisionLogConfig | None = None
    max_concurrent: int | None = Field(default=None, ge=1)
    max_wait_s: float = Field(default=0.0, ge=0)
    batch: bool = False  # the model takes and returns batches (`predict.batch(rows)`)
    workers: int = Field(default=8, ge=1)
    max_abandoned: int = Field(default=64, ge=0)
    check_finite: bool = True  # False: answers are not searched for NaN or infinity

    @field_validator("fallbacks")
    @classmethod
    def _unique_names(cls, fallbacks: list[Fallback]) -> list[Fallback]:
        names = [f.name for f in fallbacks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"fallback names must be unique: {', '.join(dupes)}")
        if "primary" in names:
            raise ValueError("'primary' is reserved for the guarded model")
        if "none" in names:  # served_by "none": nothing answered (records, headers, metrics)
            raise ValueError("'none' is reserved for calls nothing answered")
        return fallbacks

    @model_validator(mode="after")
    def _rules_name_schema_fields(self) -> Policy:
        """A rule on a feature the input schema does not have would never match: refused, as
        a policies file refuses it."""
        schema = self.validation.schema if self.validation is not None else None
        if not isinstance(schema, type) or not issubclass(schema, BaseModel):
            return self  # (a policies file's own models check this themselves, with lines)
        known = set(schema_field_names(schema))
        for i, fallback in enumerate(self.fallbacks):
            for j, rule in enumerate(getattr(fallback, "table", ())):
                for feature in rule.when:
                    if feature not in known:
                        where = f"fallbacks[{i}].rules[{j}].when.{feature}"
                        raise ValueError(f"{where}: not a field of the input schema")
        return self

"""The stages of one policy, built once at decoration time (and again on a reload).

A `Pipeline` is immutable once built; a guard reads it once per call, so swapping a guard's
pipeline for a new one (hot reload) is one attribute store: every call runs wholly on the old
stages or wholly on the new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import threading
from collections.abc import Callable, Mapping
from importlib.util import find_spec
from time import perf_counter
from typing import Any

from safeserve.confidence import ConfidenceCheck, OutputCheck
from safeserve.deadlines import Deadlines
from safeserve.decisions import InputRecorder, OpenAggregate
from safeserve.errors import PolicyError, Problem
from safeserve.fallbacks import CacheStep, FallbackStep, build_steps
from safeserve.histograms import Histograms
from safeserve.logwriter import LogWriter, writer_for
from safeserve.policy import DecisionLogConfig, Policy
from safeserve.profile import Profiler
from safeserve.retry import RetryRunner
from safeserve.timeouts import WorkerPool
from safeserve.tracing import OTEL_MISSING, SpanAnnotator
from safeserve.validation import BaselineChecks, FreshnessCheck, Invalid, SchemaValidator

_INF = float("inf")


class Pipeline:
    """Everything configured for one guard: validators, deadline, retries, checks, fallbacks,
    bulkhead and decision log; each stage is present only when the policy asks for it."""

    __slots__ = (
        "_parameters",
        "answer_check",
        "attempt_timeout",
        "bulkhead",
        "caches",
        "check_finite",
        "checks",
        "checks_output",
        "confidence",
        "deadlines",
        "flag_invalid",
        "fn",
        "has_deadline",
        "hist",
        "include_inputs",
        "include_outputs",
        "inline_slot",
        "inspects_input",
        "max_wait_s",
        "open_aggregate",
        "output_check",
        "output_schema",
        "plain_healthy",
        "policy",
        "pool",
        "profile_add",
        "profiler",
        "recorder",
        "reject_invalid",
        "retry",
        "sample_rate",
        "schema",
        "slot_release",
        "steps",
        "timed",
        "timeout_s",
        "tracer",
        "validating",
        "writer",
    )

    def __init__(
        self, fn: Callable[..., Any], policy: Policy, is_async: bool, previous: Pipeline | None
    ) -> None:
        self.fn = fn
        self._parameters: tuple[Callable[..., Any], tuple[str, ...], int] | None = None
        self.policy = policy
        val = policy.validation
        log = policy.log
        # annotates the current OpenTelemetry span per call; None (and no import) when off.
        # Built first: a missing `otel` extra fails before any thread or file is opened.
        self.tracer = (
            SpanAnnotator(policy.name, policy.owner, policy.model_version)
            if log is not None and log.trace
            else None
        )
        self.writer = _writer(log)  # before any thread starts: a bad sink fails the policy
        unprofiled = frozenset((log.redact + log.hash) if log else [])
        self.schema = (
            SchemaValidator(val.schema, fn) if val is not None and val.schema is not None else None
        )
        baseline = _baseline(val.baseline) if val is not None else None
        self.checks: list[Callable[[Any], list[Problem]]] = []
        if baseline is not None and val is not None:
            self.checks.append(BaselineChecks(baseline, val.tolerance, frozenset()))
        if val is not None and val.freshness is not None:
            self.checks.append(FreshnessCheck(val.freshness.field, val.freshness.max_age_s))
        self.validating = self.schema is not None or bool(self.checks)
        self.reject_invalid = val is not None and val.on_invalid == "reject"
        self.flag_invalid = val is not None and val.on_invalid == "flag"
        self.output_schema = val.output_schema if val is not None else None
        self.check_finite = policy.check_finite
        # a check of every answer the guard's user set (`Guard.check_answers`), kept over a reload
        self.check_answers_with(previous.answer_check if previous is not None else None)
        self.confidence = ConfidenceCheck(policy.confidence) if policy.confidence else None
        self.steps: list[FallbackStep] = build_steps(
            policy.fallbacks, policy.name, batch_primary=policy.batch
        )
        self.caches = [s for s in self.steps if isinstance(s, CacheStep)]
        # -- deadline, retries, bulkhead
        self.timeout_s = policy.timeout_s
        self.retry = RetryRunner(policy.retry) if policy.retry else None
        self.attempt_timeout = policy.retry.attempt_timeout_s if policy.retry else None
        self.has_deadline = bool(self.timeout_s or self.attempt_timeout)
        self.pool = self._pool(policy, is_async, previous)
        # async calls' deadlines, by event loop (safeserve.deadlines); kept over a reload
        self.deadlines: dict[asyncio.AbstractEventLoop, Deadlines] = (
            previous.deadlines if previous is not None else {}
        )
        self.bulkhead = (
            threading.BoundedSemaphore(policy.max_concurrent) if policy.max_concurrent else None
        )
        self.max_wait_s = policy.max_wait_s
        # With a worker pool, a call's slot is freed by its worker when the call really ends
        # (an abandoned call keeps it), not when the caller gives up.
        self.slot_release = self.bulkhead.release if self.bulkhead is not None else None
        # -- records
        self.sample_rate = log.sample_rate if log is not None else 0.0
        self.include_inputs = log.include_inputs if log is not None else True
        self.include_outputs = log.include_outputs if log is not None else False
        self.recorder = InputRecorder(
            log.redact if log else [], log.hash if log else [], log.hash_salt if log else None
        )
        self.open_aggregate = (
            OpenAggregate(self.writer, policy.name, policy.owner)
            if log is not None and log.open_breaker == "aggregate"
            else None
        )
        self.profiler = (
            Profiler(
                baseline,
                unprofiled,
                policy.name,
                policy.owner,
                self.writer,
                val.profile_interval_s,
            )
            if baseline is not None and val is not None and val.profile
            else None
        )
        self.profile_add = self.profiler.add if self.profiler is not None else None
        self.inspects_input = self.validating or self.profile_add is not None
        self.inline_slot = self.bulkhead is not None and self.pool is None  # freed by the caller
        # a healthy call needs nothing but a count: no cache to fill, no retry stats, no sample,
        # no span to annotate
        self.plain_healthy = (
            not self.caches and self.retry is None and not self.sample_rate and self.tracer is None
        )
        # the guard's histograms, once something exports them (Guard.collect_histograms)
        self.hist: Histograms | None = previous.hist if previous is not None else None
        # a healthy call's latency is read only where something uses it: slow-call detection,
        # the checks and bookkeeping that record it, the histograms (the degraded branches time
        # themselves)
        self.timed = (
            self.hist is not None
            or not self.plain_healthy
            or policy.breaker.slow_call_s is not None
            or self.confidence is not None
            or self.output_schema is not None
        )

    def parameters(self) -> tuple[tuple[str, ...], int]:
        """`positional_parameters(self.fn)`, worked out once per function (a twin made with
        another `fn` works its own out): read only off the healthy path, for an input passed
        by keyword and for the names of a recorded call's other arguments."""
        known = self._parameters
        if known is None or known[0] is not self.fn:
            known = self._parameters = (self.fn, *positional_parameters(self.fn))
        return known[1], known[2]

    def check_answers_with(self, check: Callable[[Any], object] | None) -> None:
        """Hold every answer to `check` too (`Guard.check_answers`), or to the policy's checks
        alone (None)."""
        self.answer_check = check
        self.output_check = OutputCheck(self.output_schema, self.check_finite, check)
        # whether a finite answer is still checked (the schema, the user's check)
        self.checks_output = self.output_schema is not None or check is not None

    @staticmethod
    def _pool(policy: Policy, is_async: bool, previous: Pipeline | None) -> WorkerPool | None:
        attempt_timeout = policy.retry.attempt_timeout_s if policy.retry else None
        if is_async or not (policy.timeout_s or attempt_timeout):
            return None
        old = previous.pool if previous is not None else None
        if old is not None and (old.workers, old.max_abandoned) == (
            policy.workers,
            policy.max_abandoned,
        ):
            return old  # a reload keeps the threads (and the count of abandoned calls)
        return WorkerPool(policy.name, policy.workers, policy.max_abandoned)

    def attempt_limit(self, deadline: float | None) -> float:
        """An attempt's time: min(attempt_timeout_s, time left); inf when neither is set."""
        left = _INF if deadline is None else deadline - perf_counter()
        return left if self.attempt_timeout is None else min(left, self.attempt_timeout)

    def first_timeout(self, t0: float) -> float:
        """The first attempt's time, for a call that started at `t0`."""
        return self.attempt_limit(None if self.timeout_s is None else t0 + self.timeout_s)

    def deadline(self, t0: float) -> float | None:
        """When the call's whole budget runs out (None without `timeout_s`)."""
        return None if self.timeout_s is None else t0 + self.timeout_s

    def validate(self, args: tuple[Any, ...], offset: int) -> tuple[Any, ...]:
        """The arguments with the validated input in place of the raw one; `Invalid` (carrying
        the arguments as far as validation got) when the schema or a check fails."""
        x = args[offset] if offset < len(args) else None
        if self.schema is not None:
            try:
                x = self.schema(x)
            except Invalid as inv:
                inv.call_args = args
                raise
            args = (*args[:offset], x, *args[offset + 1 :])
        if self.checks:
            problems = [problem for check in self.checks for problem in check(x)]
            if problems:
                raise Invalid(problems, args)
        return args

    def enter_bulkhead(self, may_block: bool = True) -> bool:
        """Take a `max_concurrent` slot, waiting up to `max_wait_s` (never on an event loop:
        an async guard takes a free slot or none)."""
        assert self.bulkhead is not None
        if self.max_wait_s and may_block:
            return self.bulkhead.acquire(timeout=self.max_wait_s)
        return self.bulkhead.acquire(blocking=False)


def _writer(log: DecisionLogConfig | None) -> LogWriter | None:
    """The writer of the policy's sink (opened now, so a sink that cannot be written fails)."""
    if log is None or log.sink is None:
        return None
    try:
        return writer_for(log.sink, log.queue_size)
    except OSError as exc:
        problem = f"log.sink: cannot append to {str(log.sink)!r}: {exc.strerror or exc}"
        raise PolicyError([problem]) from None


_URL_NAME = re.compile(r"(?!\.{1,2}\Z)[A-Za-z0-9._~-]+")  # unreserved in a URL path, not . or ..


def unservable_names(policies: Mapping[str, Policy]) -> list[str]:
    """The policies with a model whose name cannot be part of the URL `safeserve serve` routes
    them on, one `policies.NAME: message` line each: "{x}" would route every model, "a/b"
    could not be named by the breaker routes. `serve` refuses them; `check` warns (a guard
    made in code may be named so)."""
    return [
        f"policies.{name}: a served policy's name is part of its URL: use letters, digits "
        "and . _ ~ - only (not . or .. alone)"
        for name, policy in policies.items()
        if policy.model is not None and not _URL_NAME.fullmatch(name)
    ]


def build_problems(policies: Mapping[str, Policy]) -> list[str]:
    """What making a file's guards would refuse, found without making them (no sink opened,
    no thread started), one `policies.NAME.PATH: message` line each: a baseline that cannot be
    loaded, tracing without OpenTelemetry. `safeserve check` reports them, so that a file it
    passes builds; `serve` reports them all before a guard stops at its first."""
    problems = []
    for name, policy in policies.items():
        if policy.validation is not None:
            try:
                _baseline(policy.validation.baseline)
            except PolicyError as err:
                problems += [f"policies.{name}.{problem}" for problem in err.problems]
        if policy.log is not None and policy.log.trace and not _importable("opentelemetry.trace"):
            problems.append(f"policies.{name}.{OTEL_MISSING}")
    return problems


def positional_parameters(fn: Callable[..., Any]) -> tuple[tuple[str, ...], int]:
    """The names of `fn`'s parameters that take a positional argument, in order, and how many
    of them lead as positional-only (never taken by keyword). The input is the first, or the
    second for a method (after `self`). A decorator's own signature when it names its
    parameters (`def wrapper(**kw)` takes nothing by position), the wrapped function's when
    it takes `*args` (`functools.wraps` around `def wrapper(*args, **kwargs)`, `lru_cache`)."""
    own: inspect.Signature | None
    try:
        own = inspect.signature(fn, follow_wrapped=False)
        passes_on = any(q.kind is inspect.Parameter.VAR_POSITIONAL for q in own.parameters.values())
    except (TypeError, ValueError):
        own, passes_on = None, True
    signature = own
    if passes_on and hasattr(fn, "__wrapped__"):
        with contextlib.suppress(TypeError, ValueError):
            signature = inspect.signature(fn)
    if signature is None:  # a callable without a signature: its input is positional
        return (), 0
    names: list[str] = []
    only = 0
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            only += 1
        elif parameter.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        names.append(parameter.name)
    return tuple(names), only


def other_arguments(p: Pipeline, args: tuple[Any, ...], offset: int, kwargs: dict[str, Any]) -> Any:
    """A call's arguments besides the input, for what a record must be scrubbed of: by name
    where the signature gives one (`token` in `predict(x, token)`, as in `predict(x,
    token=...)`), those past it in a list; the keyword ones beside them, so that no name
    shadows another."""
    rest = args[offset + 1 :]
    if not rest:
        return kwargs
    names = p.parameters()[0][offset + 1 :]
    named: dict[str, Any] = dict(zip(names, rest, strict=False))
    return [named, list(rest[len(names) :]), kwargs]


def _importable(module: str) -> bool:
    """Whether `module` can be imported, found without importing it."""
    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package missing
        return False


def _baseline(source: Any) -> Any:
    """The baseline a `ValidationConfig.baseline` names (a path is loaded once, here)."""
    if source is None or hasattr(source, "features"):
        return source
    from safeserve.baseline import Baseline

    try:
        return Baseline.load(source)
    except (OSError, ValueError) as exc:
        raise PolicyError([f"validation.baseline: cannot load {str(source)!r}: {exc}"]) from None

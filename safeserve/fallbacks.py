"""The fallback chain's runtime: each `Fallback` config becomes a small callable value.

A fallback answers or raises `NoAnswer` (a rule table with no match and no default, a cache
miss) or the error of the model it calls. The guard walks them in order.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import operator
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel

from safeserve.confidence import auto_extract
from safeserve.errors import AttemptTimeout
from safeserve.policy import Fallback, Rule
from safeserve.timeouts import WorkerPool


class NoAnswer(Exception):
    """The fallback has nothing to say for this input."""


def _is_null(value: Any, wanted: Any) -> bool:
    null = value is None or (isinstance(value, float) and math.isnan(value))
    return null if wanted else not null


def _contains(value: Any, options: Any) -> bool:
    return value in options


def _not_contains(value: Any, options: Any) -> bool:
    return value not in options


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "in": _contains,
    "not_in": _not_contains,
    "is_null": _is_null,
}


def feature(x: Any, name: str) -> Any:
    """A named feature of the input: a mapping key or an attribute (None when absent)."""
    if isinstance(x, Mapping):
        return x.get(name)
    return getattr(x, name, None)


class CompiledRule:
    """A `Rule` turned into (feature, op, value) triples, checked in order."""

    __slots__ = ("conds", "then")

    def __init__(self, rule: Rule) -> None:
        self.then = rule.then
        self.conds = [
            (f, op, _OPS[op], v if op not in ("in", "not_in") else _frozen(v))
            for f, cs in rule.when.items()
            for op, v in cs.items()
        ]

    def matches(self, x: Any) -> bool:
        for name, op, fn, wanted in self.conds:
            value = feature(x, name)
            if op != "is_null" and value is None:
                return False
            try:
                if not fn(value, wanted):
                    return False
            except TypeError:  # e.g. "abc" > 3: the rule does not apply to this input
                return False
        return True


def _frozen(values: Any) -> Any:
    try:
        return frozenset(values)
    except TypeError:
        return list(values)


def freeze(x: Any) -> Any:
    """A hashable key for an input, equal for equal inputs."""
    if isinstance(x, BaseModel):
        x = x.model_dump()
    if isinstance(x, Mapping):
        return tuple(sorted((str(k), freeze(v)) for k, v in x.items()))
    if isinstance(x, list | tuple):
        return tuple(freeze(v) for v in x)
    if isinstance(x, np.ndarray):
        return (x.shape, x.dtype.str, x.tobytes())
    if isinstance(x, set | frozenset):
        return frozenset(freeze(v) for v in x)
    try:
        hash(x)
    except TypeError:
        return repr(x)
    return x


class FallbackStep:
    """One runtime fallback: `name`, optional `timeout_s` and `threshold`."""

    def __init__(self, config: Fallback) -> None:
        self.name = config.name
        self.kind = config.kind
        self.timeout_s = config.timeout_s
        self.threshold = config.threshold
        self.is_async = False

    def answer(
        self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], time_left: float | None
    ) -> Any:
        raise NotImplementedError

    async def answer_async(
        self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], time_left: float | None
    ) -> Any:
        return self.answer(x, args, kwargs, time_left)

    def below_threshold(self, answer: Any) -> float | None:
        """The answer's confidence when it is under this fallback's own threshold, else None."""
        if self.threshold is None:
            return None
        conf = auto_extract(answer)
        if conf is None or math.isnan(conf) or conf < self.threshold:
            return conf if conf is not None else float("nan")
        return None


class ModelStep(FallbackStep):
    """Another model, called with the primary's arguments, under its own timeout.

    A `batch` model takes a batch and returns one answer per row: `predict.batch` calls it
    once with every row still waiting (`answer_batch`). A single call reaches it as a batch of
    one row, unless the primary takes batches too (then the call's input already is a batch).
    """

    def __init__(self, config: Fallback, pool_name: str, batch_primary: bool = False) -> None:
        super().__init__(config)
        assert config.fn is not None
        self.fn = config.fn
        self.batch = config.batch
        self.wraps_rows = config.batch and not batch_primary
        self.is_async = inspect.iscoroutinefunction(self.fn)
        self._pool_name = pool_name
        self._pool: WorkerPool | None = None

    def _timeout(self, time_left: float | None) -> float | None:
        if self.timeout_s is None:
            return time_left
        return self.timeout_s if time_left is None else min(self.timeout_s, time_left)

    def answer(
        self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], time_left: float | None
    ) -> Any:
        if self.wraps_rows:
            return only_answer(self._call(([x],), {}, time_left))
        return self._call(args, kwargs, time_left)

    def answer_batch(self, batch: Any, time_left: float | None) -> Any:
        """The answers of a `batch` model for the rows of `batch`, in one call."""
        return self._call((batch,), {}, time_left)

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any], time_left: float | None) -> Any:
        if self.is_async:
            raise TypeError(f"fallback {self.name!r} is async; guard an async function to use it")
        timeout = self._timeout(time_left)
        if timeout is None:
            return self.fn(*args, **kwargs)
        if self._pool is None:
            self._pool = WorkerPool(f"{self._pool_name}-{self.name}", 4, 16)
        return self._pool.run(self.fn, args, kwargs, timeout)

    async def answer_async(
        self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], time_left: float | None
    ) -> Any:
        if self.wraps_rows:
            return only_answer(await self._call_async(([x],), {}, time_left))
        return await self._call_async(args, kwargs, time_left)

    async def answer_batch_async(self, batch: Any, time_left: float | None) -> Any:
        """The async twin of `answer_batch`."""
        return await self._call_async((batch,), {}, time_left)

    async def _call_async(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], time_left: float | None
    ) -> Any:
        timeout = self._timeout(time_left)
        if not self.is_async:  # a model may take its time: never on the event loop
            return await asyncio.to_thread(self._call, args, kwargs, timeout)
        if timeout is None:
            return await self.fn(*args, **kwargs)
        try:
            async with asyncio.timeout(timeout):
                return await self.fn(*args, **kwargs)
        except TimeoutError:
            raise AttemptTimeout(f"no answer within {timeout * 1000:.0f} ms") from None


def only_answer(answers: Any) -> Any:
    """The one answer of a batch model called on a batch of one row."""
    if hasattr(answers, "to_numpy"):
        answers = answers.to_numpy()
    try:
        count = len(answers)
    except TypeError:
        count = -1
    if count != 1:
        raise NoAnswer(f"{count} answers for a batch of one row")
    answer = answers[0]
    return answer.tolist() if isinstance(answer, np.ndarray | np.generic) else answer


class RulesStep(FallbackStep):
    """A rule table; the first matching rule answers, else the default."""

    def __init__(self, config: Fallback) -> None:
        super().__init__(config)
        self.rules = [CompiledRule(r) for r in config.table]
        self.default = config.default

    def answer(
        self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], time_left: float | None
    ) -> Any:
        for rule in self.rules:
            if rule.matches(x):
                return rule.then
        if self.default is None:
            raise NoAnswer("no rule matched and there is no default")
        return self.default


class CacheStep(FallbackStep):
    """The last good primary answer for an equal input (LRU, `max_items`, `ttl_s`)."""

    def __init__(self, config: Fallback, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config)
        self.ttl_s = config.ttl_s
        self.max_items = config.max_items
        self.clock = clock
        self._items: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, x: Any, answer: Any) -> None:
        """Store a good primary answer (called by the guard on healthy calls)."""
        key = freeze(x)
        now = self.clock()
        with self._lock:
            self._items[key] = (now, answer)
            self._items.move_to_end(key)
            if len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def answer(
        self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], time_left: float | None
    ) -> Any:
        key = freeze(x)
        with self._lock:
            item = self._items.get(key)
            if item is None:
                raise NoAnswer("no cached answer for this input")
            stored, answer = item
            if self.ttl_s is not None and self.clock() - stored > self.ttl_s:
                del self._items[key]
                raise NoAnswer("cached answer expired")
            self._items.move_to_end(key)
        return answer

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class StaticStep(FallbackStep):
    """A fixed answer."""

    def __init__(self, config: Fallback) -> None:
        super().__init__(config)
        self.value = config.value

    def answer(
        self, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], time_left: float | None
    ) -> Any:
        return self.value


def build_steps(
    configs: list[Fallback], pool_name: str, batch_primary: bool = False
) -> list[FallbackStep]:
    """The runtime chain for a policy's fallbacks, in order (`batch_primary`: the guarded
    function takes batches, `Policy.batch`)."""
    steps: list[FallbackStep] = []
    for c in configs:
        if c.kind == "model":
            steps.append(ModelStep(c, pool_name, batch_primary))
        elif c.kind == "rules":
            steps.append(RulesStep(c))
        elif c.kind == "cache":
            steps.append(CacheStep(c))
        else:
            steps.append(StaticStep(c))
    return steps

"""`ss.guard`: wraps a function (sync, async or method) in a `Guard`."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import Any, overload

from safeserve.breaker import Breaker
from safeserve.decisions import Decision
from safeserve.errors import PolicyError
from safeserve.guard import Guard
from safeserve.policy import Policy


class Guarded:
    """A guarded sync function: call it for the answer, `.call()` for the `Outcome`."""

    __slots__ = ("__dict__", "__weakref__", "_guard", "_offset", "_run")

    def __init__(self, guard: Guard, offset: int = 0) -> None:
        self._guard = guard
        self._offset = offset
        self._run = guard.run_sync if not guard.is_async else guard.run_async
        functools.update_wrapper(self, guard.fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(args, kwargs, self._offset, False)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """The answer and its `Decision` as an `Outcome` (built for healthy calls too)."""
        return self._run(args, kwargs, self._offset, True)

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return _Bound(self, obj)

    # -- the guard's state and controls ------------------------------------------------------
    @property
    def guard(self) -> Guard:
        """The engine behind this wrapper."""
        return self._guard

    @property
    def policy(self) -> Policy:
        return self._guard.policy

    @property
    def breaker(self) -> Breaker:
        return self._guard.breaker

    def stats(self) -> dict[str, Any]:
        """Counts since the guard was created (calls, served_by, reasons, ...)."""
        return self._guard.stats()

    def decisions(self) -> list[Decision]:
        """The most recent decision records, oldest first."""
        return self._guard.decisions()

    def open(self) -> None:
        """Open the breaker for `open_s`, then half-open as usual."""
        self._guard.breaker.open()

    def force_open(self) -> None:
        """Open the breaker until `close()` or `reset()`."""
        self._guard.breaker.force_open()

    def close(self) -> None:
        """Close the breaker and clear its window."""
        self._guard.breaker.close()

    def reset(self) -> None:
        """Closed, with fresh metrics."""
        self._guard.breaker.reset()

    def disable(self) -> None:
        """The breaker never blocks again until `reset()`."""
        self._guard.breaker.disable()

    def __repr__(self) -> str:
        return f"<safeserve guard {self._guard.name!r} of {self._guard.fn!r}>"


class AsyncGuarded(Guarded):
    """A guarded `async def`: calling it returns an awaitable, as does `.call()`."""

    __slots__ = ()

    def __init__(self, guard: Guard, offset: int = 0) -> None:
        super().__init__(guard, offset)
        # asyncio.iscoroutinefunction() (and frameworks) see an async callable
        self._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
        mark = getattr(inspect, "markcoroutinefunction", None)
        if mark is not None:  # Python >= 3.12: inspect.iscoroutinefunction() too
            mark(self)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self._guard.run_async(args, kwargs, self._offset, False)

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        """The answer and its `Decision` as an `Outcome` (built for healthy calls too)."""
        return await self._guard.run_async(args, kwargs, self._offset, True)


class _Bound:
    """A guard bound to an instance (methods): prepends `self`, forwards the rest."""

    __slots__ = ("_obj", "_wrapper")

    def __init__(self, wrapper: Guarded, obj: Any) -> None:
        self._wrapper = wrapper
        self._obj = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        g = self._wrapper._guard
        run = g.run_async if g.is_async else g.run_sync
        return run((self._obj, *args), kwargs, 1, False)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        g = self._wrapper._guard
        run = g.run_async if g.is_async else g.run_sync
        return run((self._obj, *args), kwargs, 1, True)

    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self._wrapper)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapper, name)


@overload
def guard(policy: Callable[..., Any], /) -> Guarded: ...
@overload
def guard(
    policy: Policy | None = None, /, **fields: Any
) -> Callable[[Callable[..., Any]], Guarded] | Guarded: ...


def guard(policy: Policy | Callable[..., Any] | None = None, /, **fields: Any) -> Any:
    """Guard a predict function with a policy; `fields` override or replace the policy's.

    `@ss.guard(policy)`, `@ss.guard(name="m", timeout_s=0.1)`, or `ss.guard(policy)` alone
    when the policy names its model (`Policy(model=...)`, as config files do).
    """
    if policy is not None and not isinstance(policy, Policy):
        if callable(policy) and not fields:
            raise PolicyError(["guard: give a Policy or name=...; e.g. @ss.guard(name='model')"])
        raise PolicyError([f"guard: expected a Policy, got {type(policy).__name__}"])
    if policy is None:
        if "name" not in fields:
            raise PolicyError(["name: is required (ss.guard(name=...) or ss.guard(Policy(...)))"])
        effective = Policy(**fields)
    elif fields:
        effective = Policy(**{**_shallow(policy), **fields})
    else:
        effective = policy

    def decorate(fn: Callable[..., Any]) -> Guarded:
        if not callable(fn):
            raise PolicyError([f"guard: {fn!r} is not callable"])
        g = Guard(fn, effective)
        return AsyncGuarded(g) if g.is_async else Guarded(g)

    if effective.model is not None:
        return decorate(effective.model)
    return decorate


def _shallow(policy: Policy) -> dict[str, Any]:
    return {name: getattr(policy, name) for name in type(policy).model_fields}

"""`ss.guard`: wraps a function (sync, async or method) in a `Guard`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, overload

from safeserve.errors import PolicyError
from safeserve.guard import AsyncGuard, Guard
from safeserve.policy import Policy

# The names users see: a guard is the wrapper itself.
Guarded = Guard
AsyncGuarded = AsyncGuard


@overload
def guard(policy: Callable[..., Any], /) -> Guarded: ...
@overload
def guard(
    policy: Policy | None = None, **fields: Any
) -> Callable[[Callable[..., Any]], Guarded] | Guarded: ...


def guard(policy: Policy | Callable[..., Any] | None = None, **fields: Any) -> Any:
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
        return (AsyncGuard if inspect.iscoroutinefunction(fn) else Guard)(fn, effective)

    if effective.model is not None:
        return decorate(effective.model)
    return decorate


def guard_model(policy: Policy) -> Guard:
    """The guard of the model a policy names (`Policy(model=...)`, as config files give)."""
    if policy.model is None:
        raise PolicyError([f"{policy.name}.model: the policy names no model to guard"])
    fn = policy.model
    return (AsyncGuard if inspect.iscoroutinefunction(fn) else Guard)(fn, policy)


def _shallow(policy: Policy) -> dict[str, Any]:
    return {name: getattr(policy, name) for name in type(policy).model_fields}

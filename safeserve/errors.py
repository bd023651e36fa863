"""Typed errors: each carries the data a caller needs to act on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

    from safeserve.decisions import Decision


class SafeServeError(Exception):
    """Base class of every error safeserve raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem with one input field: where it is and what is wrong (never the value)."""

    loc: str
    message: str


class PolicyError(SafeServeError, ValueError):
    """A policy or config is invalid; `problems` holds one `path: message` line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    @classmethod
    def from_validation(cls, err: ValidationError, prefix: str = "") -> PolicyError:
        """Turn a pydantic error into one readable line per field, values left out."""
        lines = []
        for e in err.errors(include_input=False, include_url=False):
            path = _format_loc(e["loc"])
            where = f"{prefix}.{path}" if prefix and path else (prefix or path or "<root>")
            lines.append(f"{where}: {friendly_message(e)}")
        return cls(lines)


class InputRejected(SafeServeError, ValueError):
    """The input failed validation and the policy says `on_invalid="reject"`."""

    def __init__(self, policy: str, problems: list[Problem]) -> None:
        self.policy = policy
        self.problems = problems
        fields = ", ".join(f"{p.loc}: {p.message}" for p in problems)
        super().__init__(f"input rejected by policy {policy!r}: {fields}")


class NoFallbackAvailable(SafeServeError, RuntimeError):
    """The primary and every fallback failed; `decision` records what was tried."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        codes = ", ".join(r.code for r in decision.reasons)
        super().__init__(
            f"policy {decision.policy!r}: no fallback answered (reasons: {codes or 'none'})"
        )


class AttemptTimeout(TimeoutError):
    """An attempt ran out of its share of the call's time budget (retryable as TimeoutError)."""


class Overloaded(SafeServeError):
    """The guard has too many calls in flight or abandoned; the call was not started."""


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_BOUND_WORDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def friendly_message(e: Any) -> str:
    """A pydantic error as a short instruction a person can act on (`must be > 0`)."""
    kind = e.get("type", "")
    ctx = e.get("ctx") or {}
    if kind in _BOUND_WORDS:
        bound = next(iter(ctx.values()), "?")
        shown = format(bound, "g") if isinstance(bound, float) else bound
        return f"must be {_BOUND_WORDS[kind]} {shown}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "must be a mapping"
    msg = str(e.get("msg", "invalid"))
    for lead in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(lead)
    for said in ("Input should", "String should", "List should"):
        msg = msg.replace(said, "must")
    return msg[:1].lower() + msg[1:]

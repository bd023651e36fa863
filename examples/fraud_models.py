"""The models that `examples/policies.yaml` and `examples/policies.toml` name by import path.

Deterministic stand-ins for a fraud model and its predecessor, the input schema, and the error a
remote model client raises when the model server is down.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel

HIGH_RISK = frozenset({"NG", "RU", "XX"})


class Txn(BaseModel):
    """A card transaction: the input of the fraud models."""

    amount: float
    country: str
    customer_id: str = ""
    card_number: str | None = None


class Verdict(BaseModel):
    """The answer of every fraud model and fallback: checked as the output schema."""

    label: Literal["approve", "review"]
    score: float


class ModelUnavailable(ConnectionError):
    """The model server did not answer (worth a retry)."""


def predict_v3(x: dict[str, Any]) -> dict[str, Any]:
    """The current model: a score in [0, 1] from the amount and the country."""
    score = min(1.0, float(x["amount"]) / 10_000 + (0.5 if x["country"] in HIGH_RISK else 0.0))
    label = "review" if score >= 0.5 else "approve"
    return {"label": label, "score": round(max(score, 1 - score), 3)}


def predict_v2(x: dict[str, Any]) -> dict[str, Any]:
    """The previous model: a plain amount cut-off, confident about small amounts only."""
    amount = float(x["amount"])
    return {
        "label": "review" if amount > 2_000 else "approve",
        "score": 0.9 if amount < 500 else 0.6,
    }


def page_oncall(event: Any) -> None:
    """Breaker state changes: where a real service would page its on-call owner."""
    logging.getLogger("examples.fraud").warning(
        "breaker of %s: %s -> %s", event.policy, event.from_state, event.to_state
    )

"""Output checks: non-finite numbers anywhere in the answer, and confidence thresholds."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

import safeserve as ss

STATIC = {"label": "static"}


def codes(decision: Any) -> list[str]:
    return [r.code for r in decision.reasons]


def answering(value: Any) -> Any:
    """A primary that always answers `value`."""

    def predict(x: Any) -> Any:
        return value

    return predict


def guarded(value: Any, **fields: Any) -> Any:
    fields.setdefault("fallbacks", [ss.Fallback.static("static", STATIC)])
    return ss.guard(name="m", **fields)(answering(value))


@dataclass
class Prediction:
    """A model answer carrying its confidence as an attribute."""

    label: str
    confidence: float


NON_FINITE = [
    float("nan"),
    float("inf"),
    [1.0, float("inf")],
    np.array([0.1, np.nan]),
    np.float64("nan"),
    {"a": {"b": [1.0, float("-inf")]}},
    {"scores": np.array([[0.2, np.inf]])},
    (1.0, float("nan")),
]

FINITE = [
    1.0,
    [1, 2.5],
    np.array([0.1, 0.9]),
    {"a": {"b": [1.0, -2.0]}},
    {"label": "nan"},
    {"scores": np.array([[0.2, 0.8]])},
]


class TestNonFiniteOutputs:
    @pytest.mark.parametrize("value", NON_FINITE, ids=repr)
    def test_non_finite_output_falls_back_with_invalid_output(self, value: Any) -> None:
        """NaN or infinity anywhere in the answer makes it invalid_output and a fallback serves."""
        out = guarded(value).call({"a": 1})
        assert out.value == STATIC
        assert out.decision.served_by == "static"
        assert "invalid_output" in codes(out.decision)
        assert {r.stage for r in out.decision.reasons if r.code == "invalid_output"} == {"output"}

    @pytest.mark.parametrize("value", FINITE, ids=repr)
    def test_finite_output_is_served_by_primary(self, value: Any) -> None:
        """Finite answers (and strings that merely read "nan") pass the output check."""
        out = guarded(value).call({"a": 1})
        assert out.decision.served_by == "primary"
        assert out.decision.reasons == []

    @pytest.mark.parametrize("value", NON_FINITE[:3], ids=repr)
    def test_check_finite_false_serves_non_finite_answers(self, value: Any) -> None:
        """`check_finite=False` (for answers known to be finite, or too big to search) skips
        the NaN/infinity search: the primary's answer is served as it is."""
        predict = guarded(value, check_finite=False)
        assert predict({"a": 1}) is value
        out = predict.call({"a": 1})
        assert (out.decision.served_by, out.decision.reasons) == ("primary", [])

    def test_check_finite_false_still_checks_the_output_schema(self) -> None:
        """Only the NaN/infinity search is off: an output schema still rejects bad answers."""

        class Answer(BaseModel):
            label: str

        predict = guarded(
            {"score": float("nan")},
            check_finite=False,
            validation=ss.ValidationConfig(output_schema=Answer),
        )
        out = predict.call({"a": 1})
        assert out.decision.served_by == "static"
        assert [r.detail for r in out.decision.reasons] == ["schema: label"]


class TestConfidenceAuto:
    @pytest.mark.parametrize("key", ["confidence", "score", "proba"])
    def test_auto_reads_confidence_keys(self, key: str) -> None:
        """auto reads a confidence, score or proba key and falls back below the threshold."""
        g = guarded({"label": "x", key: 0.3}, confidence=ss.ConfidenceConfig(threshold=0.5))
        out = g.call({"a": 1})
        assert out.decision.served_by == "static"
        assert "low_confidence" in codes(out.decision)
        assert out.decision.confidence == pytest.approx(0.3)

    @pytest.mark.parametrize("key", ["confidence", "score", "proba"])
    def test_auto_passes_confident_key(self, key: str) -> None:
        """An answer at or above the threshold is served by the primary."""
        g = guarded({"label": "x", key: 0.8}, confidence=ss.ConfidenceConfig(threshold=0.5))
        out = g.call({"a": 1})
        assert out.decision.served_by == "primary"
        assert out.decision.confidence == pytest.approx(0.8)

    def test_auto_reads_confidence_attribute(self) -> None:
        """auto reads a `confidence` attribute of an object answer."""
        g = guarded(Prediction("x", 0.2), confidence=ss.ConfidenceConfig(threshold=0.5))
        out = g.call({"a": 1})
        assert out.decision.served_by == "static"
        assert out.decision.confidence == pytest.approx(0.2)

    @pytest.mark.parametrize(
        ("probs", "expected"),
        [
            (np.array([0.2, 0.3, 0.5]), 0.5),
            (np.array([[0.2, 0.3, 0.5]]), 0.5),
        ],
        ids=["1d", "2d-one-row"],
    )
    def test_auto_takes_max_over_last_axis_of_probability_array(
        self, probs: np.ndarray, expected: float
    ) -> None:
        """auto reads a probability array's max over the last axis as the confidence."""
        g = guarded(probs, confidence=ss.ConfidenceConfig(threshold=0.6))
        out = g.call({"a": 1})
        assert out.decision.served_by == "static"
        assert "low_confidence" in codes(out.decision)
        assert float(out.decision.confidence) == pytest.approx(expected)

    def test_confident_probability_array_is_served(self) -> None:
        """A probability array whose max clears the threshold is served by the primary."""
        g = guarded(np.array([0.05, 0.95]), confidence=ss.ConfidenceConfig(threshold=0.6))
        out = g.call({"a": 1})
        assert out.decision.served_by == "primary"
        assert float(out.decision.confidence) == pytest.approx(0.95)


class TestConfidenceExtract:
    def test_extract_by_key_name(self) -> None:
        """extract="<key>" reads that key of the answer."""
        g = guarded(
            {"certainty": 0.1, "confidence": 0.99},
            confidence=ss.ConfidenceConfig(threshold=0.5, extract="certainty"),
        )
        out = g.call({"a": 1})
        assert out.decision.served_by == "static"
        assert out.decision.confidence == pytest.approx(0.1)

    def test_extract_by_callable(self) -> None:
        """extract=callable computes the confidence from the answer."""
        g = guarded(
            {"p": [0.9, 0.4]},
            confidence=ss.ConfidenceConfig(threshold=0.5, extract=lambda out: out["p"][1]),
        )
        out = g.call({"a": 1})
        assert out.decision.served_by == "static"
        assert out.decision.confidence == pytest.approx(0.4)


class TestUnreadableConfidence:
    """With a confidence check, an answer whose confidence cannot be read, or is not a
    probability, is a broken answer: `invalid_output`, and a fallback serves (even with
    action="flag", which only serves answers that are merely unsure)."""

    @pytest.mark.parametrize(
        ("answer", "detail"),
        [
            ({"label": "x"}, "no confidence in the answer"),
            ({"label": "x", "confidence": None}, "no confidence in the answer"),
            ({"label": "x", "confidence": "0.9"}, "no confidence in the answer"),
            ({"label": "x", "confidence": True}, "no confidence in the answer"),
            (None, "no confidence in the answer"),
            ({"label": "x", "confidence": 7}, "confidence 7 not in [0, 1]"),
            ({"label": "x", "confidence": -0.5}, "confidence -0.5 not in [0, 1]"),
        ],
        ids=repr,
    )
    @pytest.mark.parametrize("action", ["fallback", "flag"])
    def test_falls_back_with_invalid_output(self, answer: Any, detail: str, action: str) -> None:
        g = guarded(answer, confidence=ss.ConfidenceConfig(threshold=0.7, action=action))
        out = g.call({"a": 1})
        assert (out.value, out.decision.served_by) == (STATIC, "static")
        assert [(r.code, r.stage, r.detail) for r in out.decision.reasons] == [
            ("invalid_output", "confidence", detail)
        ]

    def test_missing_key_named_by_extract(self) -> None:
        g = guarded({"score": 0.9}, confidence=ss.ConfidenceConfig(threshold=0.5, extract="p"))
        assert g({"a": 1}) == STATIC

    def test_batch_rows_without_a_confidence_fall_back(self) -> None:
        """The same rule per row in a batch."""

        @ss.guard(
            name="batch-conf",
            batch=True,
            confidence=ss.ConfidenceConfig(threshold=0.5),
            fallbacks=[ss.Fallback.static("static", STATIC)],
        )
        def predict(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{"confidence": r["c"]} if r["c"] is not None else {} for r in rows]

        out = predict.batch([{"c": 0.9}, {"c": None}, {"c": 3.0}, {"c": 0.1}])
        assert out.served_by == ["primary", "static", "static", "static"]
        reasons = {d.row: d.reasons[0].code for d in out.decisions}
        assert reasons == {1: "invalid_output", 2: "invalid_output", 3: "low_confidence"}


class TestConfidenceAction:
    def test_flag_serves_primary_and_marks_decision(self) -> None:
        """action="flag" serves the primary answer and flags the decision with low_confidence."""
        answer = {"label": "x", "confidence": 0.3}
        g = guarded(answer, confidence=ss.ConfidenceConfig(threshold=0.5, action="flag"))
        out = g.call({"a": 1})
        assert out.value == answer
        assert out.decision.served_by == "primary"
        assert out.decision.flagged is True
        assert out.decision.degraded is False
        assert codes(out.decision) == ["low_confidence"]

    def test_flagged_call_is_recorded_and_counted(self) -> None:
        """A flagged call leaves a decision in the ring and counts in stats()["flagged"]."""
        answer = {"label": "x", "confidence": 0.3}
        g = guarded(answer, confidence=ss.ConfidenceConfig(threshold=0.5, action="flag"))
        assert g({"a": 1}) == answer
        assert len(g.decisions()) == 1
        assert g.decisions()[0].flagged is True
        assert g.stats()["flagged"] == 1

    def test_decision_confidence_is_the_primarys_when_fallback_served(self) -> None:
        """decision.confidence is the primary's value even when a confident fallback served."""
        g = guarded(
            {"label": "x", "confidence": 0.3},
            confidence=ss.ConfidenceConfig(threshold=0.5),
            fallbacks=[ss.Fallback.model("v2", lambda x: {"label": "y", "confidence": 0.99})],
        )
        out = g.call({"a": 1})
        assert out.decision.served_by == "v2"
        assert out.decision.confidence == pytest.approx(0.3)

    def test_confidence_is_none_when_not_read(self) -> None:
        """Without a confidence config no confidence is read and the field is null."""
        out = guarded({"label": "x", "confidence": 0.3}).call({"a": 1})
        assert out.decision.served_by == "primary"
        assert out.decision.confidence is None

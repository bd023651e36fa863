"""The skew report's model-health layer: served confidences and predictions vs training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from safeserve.baseline import Baseline
from safeserve.skew import analyze

RNG = np.random.default_rng(3)


def baseline() -> Baseline:
    data = {
        "amount": RNG.normal(100, 10, 5000),
        "confidence": RNG.beta(8, 2, 5000),
        "label": RNG.choice(["approve", "review"], 5000, p=[0.8, 0.2]),
    }
    return Baseline.from_data(data, confidence="confidence", prediction="label")


def log(path: Path, confidences: np.ndarray, labels: list[str]) -> Path:
    with path.open("w") as f:
        for i, (c, label) in enumerate(zip(confidences, labels, strict=True)):
            f.write(
                json.dumps(
                    {
                        "kind": "decision",
                        "schema_version": 1,
                        "id": f"d{i}",
                        "ts": "2026-11-25T10:00:00+00:00",
                        "policy": "fraud",
                        "served_by": "primary",
                        "degraded": False,
                        "reasons": [],
                        "attempts": [],
                        "confidence": float(c),
                        "output": {"label": label},
                        "inputs": {"amount": 100.0},
                    }
                )
                + "\n"
            )
    return path


def test_served_confidences_like_training_are_not_flagged(tmp_path: Path) -> None:
    b = baseline()
    labels = list(RNG.choice(["approve", "review"], 3000, p=[0.8, 0.2]))
    report = analyze([log(tmp_path / "a.jsonl", RNG.beta(8, 2, 3000), labels)], b)
    assert report["model"]["confidence"]["severity"] == "none"
    assert report["model"]["prediction"]["severity"] == "none"
    assert report["model"]["confidence"]["n"] == 3000


def test_a_model_that_got_unsure_is_flagged(tmp_path: Path) -> None:
    b = baseline()
    labels = list(RNG.choice(["approve", "review"], 3000, p=[0.3, 0.7]))
    report = analyze([log(tmp_path / "b.jsonl", RNG.beta(2, 2, 3000), labels)], b)
    assert report["model"]["confidence"]["severity"] == "major"
    assert report["model"]["prediction"]["severity"] != "none"

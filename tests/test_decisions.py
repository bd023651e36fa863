"""Decision records: fields, the JSON-lines log, redaction, sinks, drills and testing mode."""

import asyncio
import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import safeserve as ss

STATIC = {"label": "static"}
CARD = "4111-1111-1111-1111"
EMAIL = "alice.secret@example.org"


class ModelCrashedError(RuntimeError):
    """An error raised deep inside a model."""


def codes(decision: Any) -> list[str]:
    return [r.code for r in decision.reasons]


def failing(x: Any) -> Any:
    raise ValueError("boom")


def healthy(x: Any) -> Any:
    return {"label": "ok"}


def read_records(path: Path, kind: str = "decision") -> list[dict]:
    """The log file's records of one kind, after flushing every queued record."""
    assert ss.flush_logs() is True
    lines = path.read_text().splitlines() if path.exists() else []
    records = [json.loads(line) for line in lines]
    return [r for r in records if r.get("kind") == kind]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "decisions.jsonl"


def fraud_guard(fn: Any, **log: Any) -> Any:
    fields: dict[str, Any] = {
        "name": "fraud",
        "owner": "risk-ml-oncall",
        "model_version": "v3",
        "fallbacks": [ss.Fallback.static("static", STATIC)],
    }
    if log:
        fields["log"] = ss.DecisionLogConfig(**log)
    return ss.guard(**fields)(fn)


class TestRecordFields:
    def test_decision_has_every_spec_field(self) -> None:
        """A degraded call's Decision carries every SPEC 2 field with the right values."""
        g = fraud_guard(failing)
        out = g.call({"amount": 5})
        d = out.decision
        assert d.kind == "decision"
        assert d.schema_version == 1
        assert isinstance(d.id, str)
        assert d.id
        assert d.policy == "fraud"
        assert d.owner == "risk-ml-oncall"
        assert d.model_version == "v3"
        assert d.served_by == "static"
        assert d.degraded is True
        assert len(d.reasons) == 1
        assert isinstance(d.reasons[0], ss.Reason)
        assert (d.reasons[0].code, d.reasons[0].stage) == ("error", "call")
        assert [type(a) for a in d.attempts] == [ss.Attempt, ss.Attempt]
        assert [(a.name, a.ok, a.error) for a in d.attempts] == [
            ("primary", False, "ValueError: boom"),
            ("static", True, None),
        ]
        assert all(a.latency_ms >= 0 for a in d.attempts)
        assert d.confidence is None
        assert d.breaker_state == "closed"
        assert d.latency_ms >= 0
        assert d.inputs == {"amount": 5}

    def test_record_is_json_with_objects_and_utc_iso_time(self) -> None:
        """to_record() is JSON-safe: reasons and attempts are objects, ts is UTC ISO-8601."""
        g = fraud_guard(failing)
        record = g.call({"amount": 5}).decision.to_record()
        record = json.loads(json.dumps(record))
        assert record["kind"] == "decision"
        assert record["schema_version"] == 1
        assert record["reasons"][0]["code"] == "error"
        assert set(record["reasons"][0]) >= {"code", "stage", "detail"}
        assert set(record["attempts"][0]) >= {"name", "ok", "latency_ms", "error"}
        ts = datetime.fromisoformat(record["ts"])
        assert ts.utcoffset() == timedelta(0)
        for key in (
            "id",
            "policy",
            "owner",
            "model_version",
            "served_by",
            "degraded",
            "confidence",
            "breaker_state",
            "latency_ms",
            "inputs",
        ):
            assert key in record
        assert "output" not in record

    def test_decision_ids_are_unique(self) -> None:
        """Every decision gets its own id."""
        g = fraud_guard(failing)
        ids = {g.call({"amount": i}).decision.id for i in range(200)}
        assert len(ids) == 200

    def test_non_mapping_input_is_recorded_raw(self) -> None:
        """An input that is not a mapping is recorded as its JSON-safe raw value."""
        g = fraud_guard(failing)
        assert g.call([1.5, 2.5]).decision.to_record()["inputs"] == [1.5, 2.5]

    def test_decision_ring_keeps_last_records_oldest_first(self) -> None:
        """predict.decisions() holds the last 1000 records, oldest first."""
        g = fraud_guard(failing)
        for i in range(1005):
            g({"i": i})
        decisions = g.decisions()
        assert len(decisions) == 1000
        assert decisions[0].inputs == {"i": 5}
        assert decisions[-1].inputs == {"i": 1004}


class TestFileSink:
    def test_jsonl_file_holds_one_line_per_degraded_call(self, log_path: Path) -> None:
        """A path sink gets one JSON line per degraded call, parent dirs created."""
        state = {"fail": False}

        def predict(x: Any) -> Any:
            if state["fail"]:
                raise ValueError("boom")
            return {"label": "ok"}

        g = fraud_guard(predict, sink=str(log_path))
        g({"i": 0})
        g({"i": 1})
        state["fail"] = True
        for i in range(2, 5):
            g({"i": i})
        records = read_records(log_path)
        assert [r["inputs"]["i"] for r in records] == [2, 3, 4]
        assert all(r["served_by"] == "static" for r in records)
        assert all(r["policy"] == "fraud" for r in records)

    def test_path_object_sink_is_accepted(self, log_path: Path) -> None:
        """A pathlib.Path works as a sink like a str."""
        g = fraud_guard(failing, sink=log_path)
        g({"i": 1})
        assert len(read_records(log_path)) == 1

    def test_sample_rate_one_logs_healthy_calls(self, log_path: Path) -> None:
        """sample_rate=1.0 records every healthy call too."""
        g = fraud_guard(healthy, sink=str(log_path), sample_rate=1.0)
        for i in range(5):
            g({"i": i})
        records = read_records(log_path)
        assert len(records) == 5
        assert all(r["served_by"] == "primary" for r in records)
        assert all(r["degraded"] is False for r in records)

    def test_sample_rate_zero_logs_no_healthy_call(self, log_path: Path) -> None:
        """sample_rate=0 records no healthy call."""
        g = fraud_guard(healthy, sink=str(log_path), sample_rate=0.0)
        for i in range(50):
            g({"i": i})
        assert read_records(log_path) == []

    def test_callable_sink_receives_json_safe_dicts(self) -> None:
        """A callable sink is called with each record as a JSON-safe dict."""
        received: list[dict] = []
        g = fraud_guard(failing, sink=received.append)
        g({"i": 1})
        g({"i": 2})
        assert ss.flush_logs() is True
        decisions = [r for r in received if r.get("kind") == "decision"]
        assert [r["inputs"] for r in decisions] == [{"i": 1}, {"i": 2}]
        json.dumps(received)

    def test_no_log_config_writes_nothing_to_disk_or_stdout(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without log= records stay in memory: no file appears and nothing goes to stdout."""
        monkeypatch.chdir(tmp_path)
        g = fraud_guard(failing)
        for i in range(5):
            g({"i": i})
        ss.flush_logs()
        assert list(tmp_path.rglob("*")) == []
        assert len(g.decisions()) == 5
        assert capsys.readouterr().out == ""


class TestInputsAndOutputs:
    def test_redact_drops_fields_everywhere(self, log_path: Path) -> None:
        """Redacted features are absent from the record and never appear in the file."""
        g = fraud_guard(failing, sink=str(log_path), redact=["card_number"])
        out = g.call({"amount": 5, "card_number": CARD})
        assert "card_number" not in out.decision.inputs
        assert out.decision.inputs["amount"] == 5
        records = read_records(log_path)
        assert records[0]["inputs"] == {"amount": 5}
        assert CARD not in log_path.read_text()

    def test_hash_replaces_fields_with_salted_hash(self, log_path: Path) -> None:
        """Hashed features are replaced by a stable salted hash; the raw value never appears."""
        g = fraud_guard(failing, sink=str(log_path), hash=["email"], hash_salt="pepper")
        g({"amount": 5, "email": EMAIL})
        g({"amount": 6, "email": EMAIL})
        records = read_records(log_path)
        hashed = [r["inputs"]["email"] for r in records]
        assert hashed[0] == hashed[1]
        assert hashed[0] != EMAIL
        assert hashed[0]
        text = log_path.read_text()
        assert EMAIL not in text
        assert "alice.secret" not in text

    def test_hash_depends_on_salt(self, tmp_path: Path) -> None:
        """Two salts give two different hashes for the same value."""
        paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
        for path, salt in zip(paths, ["salt-a", "salt-b"], strict=True):
            g = fraud_guard(failing, sink=str(path), hash=["email"], hash_salt=salt)
            g({"email": EMAIL})
        first, second = (read_records(p)[0]["inputs"]["email"] for p in paths)
        assert first != second

    def test_include_inputs_false_leaves_no_inputs_key(self, log_path: Path) -> None:
        """include_inputs=False removes the inputs key from the record."""
        g = fraud_guard(failing, sink=str(log_path), include_inputs=False)
        out = g.call({"amount": 5, "card_number": CARD})
        assert "inputs" not in out.decision.to_record()
        records = read_records(log_path)
        assert "inputs" not in records[0]
        assert CARD not in log_path.read_text()

    def test_include_outputs_records_served_answer(self, log_path: Path) -> None:
        """include_outputs=True adds the served answer as `output`."""
        g = fraud_guard(failing, sink=str(log_path), include_outputs=True)
        g({"amount": 5})
        assert read_records(log_path)[0]["output"] == STATIC

    def test_outputs_excluded_by_default(self, log_path: Path) -> None:
        """Without include_outputs the record has no output key."""
        g = fraud_guard(failing, sink=str(log_path))
        g({"amount": 5})
        assert "output" not in read_records(log_path)[0]


class TestErrorText:
    def test_record_error_is_type_and_message_never_a_traceback(self, log_path: Path) -> None:
        """An exception deep in the model is recorded as 'TypeName: msg', without traceback."""

        def inner(x: Any) -> Any:
            raise ModelCrashedError("gone")

        def middle(x: Any) -> Any:
            return inner(x)

        def predict(x: Any) -> Any:
            return middle(x)

        g = fraud_guard(predict, sink=str(log_path))
        g({"amount": 5})
        record = read_records(log_path)[0]
        assert record["attempts"][0]["error"] == "ModelCrashedError: gone"
        text = log_path.read_text()
        assert "Traceback" not in text
        assert 'File "' not in text
        assert "inner" not in text

    def test_long_error_message_is_shortened(self) -> None:
        """An error text is at most 200 characters."""

        def predict(x: Any) -> Any:
            raise ValueError("x" * 5000)

        g = fraud_guard(predict)
        error = g.call({"a": 1}).decision.attempts[0].error
        assert error.startswith("ValueError: ")
        assert len(error) <= 200


class TestDrills:
    def test_force_degradation_skips_the_model(self) -> None:
        """force_degradation takes the degradation path without calling the model."""
        calls: list[int] = []

        def predict(x: Any) -> Any:
            calls.append(1)
            return {"label": "ok"}

        g = fraud_guard(predict)
        with ss.force_degradation(reason="timeout"):
            out = g.call({"a": 1})
        assert calls == []
        assert out.value == STATIC
        assert out.decision.served_by == "static"
        assert out.decision.degraded is True
        assert set(codes(out.decision)) >= {"timeout", "forced"}
        assert {r.stage for r in out.decision.reasons if r.code == "timeout"} == {"drill"}
        assert g({"a": 1}) == {"label": "ok"}
        assert calls == [1]

    def test_force_degradation_for_another_policy_leaves_guard_alone(self) -> None:
        """force_degradation(policy=...) affects only guards of that policy name."""
        g = fraud_guard(healthy)
        with ss.force_degradation(reason="error", policy="some-other-model"):
            out = g.call({"a": 1})
        assert out.decision.served_by == "primary"

    def test_force_degradation_on_async_guard(self) -> None:
        """An async guard also honours a drill."""
        calls: list[int] = []

        async def predict(x: Any) -> Any:
            calls.append(1)
            return {"label": "ok"}

        g = fraud_guard(predict)

        async def main() -> Any:
            with ss.force_degradation(reason="timeout"):
                return await g.call({"a": 1})

        out = asyncio.run(main())
        assert calls == []
        assert out.decision.served_by == "static"
        assert "forced" in codes(out.decision)


class TestTestingMode:
    def test_testing_turns_backoff_sleeps_off(self) -> None:
        """Under ss.testing() long backoffs do not slow a test down."""
        calls: list[int] = []

        def predict(x: Any) -> Any:
            calls.append(1)
            raise ConnectionError("down")

        g = ss.guard(
            name="m",
            retry=ss.RetryConfig(
                attempts=3, backoff_s=2, max_backoff_s=2, jitter=False, retry_on=[ConnectionError]
            ),
            fallbacks=[ss.Fallback.static("static", STATIC)],
        )(predict)
        start = time.monotonic()
        with ss.testing():
            assert g({"a": 1}) == STATIC
        assert time.monotonic() - start < 1.0
        assert len(calls) == 3

    def test_testing_resets_breakers_on_entry(self) -> None:
        """Entering ss.testing() closes open breakers."""
        g = fraud_guard(healthy)
        g.open()
        assert g.breaker.state == "open"
        with ss.testing():
            assert g.breaker.state == "closed"
            assert g.call({"a": 1}).decision.served_by == "primary"

    def test_testing_writes_logs_synchronously(self, log_path: Path) -> None:
        """Under ss.testing() a record is in the file as soon as the call returns."""
        with ss.testing():
            g = fraud_guard(failing, sink=str(log_path))
            g({"a": 1})
            lines = [json.loads(x) for x in log_path.read_text().splitlines()]
        assert [r["inputs"] for r in lines if r.get("kind") == "decision"] == [{"a": 1}]

    def test_testing_returns_a_manager_when_called(self) -> None:
        """ss.testing() called plainly returns a context manager usable later."""
        manager = ss.testing()
        with manager:
            pass


class TestLogConfigDefaults:
    def test_decision_log_config_defaults(self) -> None:
        """DecisionLogConfig() has the defaults SPEC 2 lists."""
        cfg = ss.DecisionLogConfig()
        assert cfg.sink is None
        assert cfg.sample_rate == 0.0
        assert cfg.include_inputs is True
        assert cfg.include_outputs is False
        assert list(cfg.redact) == []
        assert list(cfg.hash) == []
        assert cfg.queue_size == 10000

"""Redacted and hashed fields never appear raw in a decision record: not in inputs of any shape,
not in outputs, not in exception messages, not through the FastAPI middleware, not in profiles;
and the in-memory `Decision` shows no more than the log line."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import time
import traceback
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import safeserve as ss
from safeserve.decisions import Record
from safeserve.recording import REDACTED, InputRecorder, Scrubber

CARD = "4111111111111111"
EMAIL = "alice.secret@example.org"
TXN = {"amount": 12.5, "card_number": CARD, "email": EMAIL}
CARDS = [CARD, "5500000000000004", "340000000000009"]
STATIC = {"label": "static"}


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every decision record in the log file, after flushing the queue."""
    assert ss.flush_logs() is True
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("kind") == "decision"]


def assert_no_secret(path: Path, *decisions: ss.Decision, secrets: tuple[str, ...] = ()) -> None:
    """Neither the log file nor the given in-memory decisions hold a raw secret."""
    assert ss.flush_logs() is True
    texts = [path.read_text()] + [json.dumps(d.to_record(), ensure_ascii=False) for d in decisions]
    for text in texts:
        for secret in secrets or (CARD, EMAIL, "alice.secret"):
            assert secret not in text


def line_of(decision: ss.Decision) -> dict[str, Any]:
    """A Decision's log line, less `ts` (pydantic writes UTC as "Z", the log as "+00:00")."""
    rec = decision.to_record()
    del rec["ts"]
    return rec


def without_ts(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "ts"}


def guard(fn: Any, path: Path, *, fallbacks: Any = None, **log: Any) -> Any:
    """A guard with `card_number` redacted and `email` hashed, logging to `path`."""
    log.setdefault("redact", ["card_number"])
    log.setdefault("hash", ["email"])
    batch = log.pop("batch", False)
    return ss.guard(
        name=f"redaction-{time.monotonic_ns()}",
        batch=batch,
        fallbacks=[ss.Fallback.static("static", STATIC)] if fallbacks is None else fallbacks,
        log=ss.DecisionLogConfig(sink=str(path), hash_salt="pepper", **log),
    )(fn)


def bad_card(x: Any) -> Any:
    raise ValueError(f"bad card {x['card_number']} for {x['email']}")


def missing_card(x: Any) -> Any:
    raise KeyError(x["card_number"])


def crash(x: Any) -> Any:
    raise RuntimeError("model crashed")


def free_text(decision: ss.Decision) -> list[str]:
    """Every reason detail and attempt error of a decision."""
    texts = [r.detail for r in decision.reasons] + [a.error for a in decision.attempts]
    return [t for t in texts if t]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "decisions.jsonl"


class TestErrorMessages:
    def test_primary_error_message_is_scrubbed_in_log_and_decision(self, log_path: Path) -> None:
        """A model error quoting the card and the email logs `[redacted]` and the email's hash,
        in `reasons[].detail` and `attempts[].error` alike, and the Decision says the same."""
        g = guard(bad_card, log_path)
        decision = g.call(TXN).decision
        record = read_records(log_path)[0]
        hashed = record["inputs"]["email"]
        expected = f"ValueError: bad card {REDACTED} for [hash:{hashed}]"
        assert record["reasons"][0]["detail"] == expected
        assert record["attempts"][0]["error"] == expected
        assert decision.reasons[0].detail == expected
        assert decision.attempts[0].error == expected
        assert line_of(decision) == without_ts(record)
        assert line_of(g.decisions()[-1]) == without_ts(record)
        assert_no_secret(log_path, decision)

    def test_key_error_repr_is_scrubbed(self, log_path: Path) -> None:
        """`KeyError(card)` quotes the value's repr: the quotes stay, the value goes."""
        g = guard(missing_card, log_path)
        decision = g.call(TXN).decision
        assert decision.reasons[0].detail == f"KeyError: '{REDACTED}'"
        assert_no_secret(log_path, decision)

    def test_fallback_errors_and_no_fallback_available_decision_are_scrubbed(
        self, log_path: Path
    ) -> None:
        """A failing fallback's error is scrubbed in its attempt and reason, and the decision
        carried by NoFallbackAvailable matches the log."""

        def fallback(x: Any) -> Any:
            raise LookupError(f"no rule for {x['card_number']}")

        g = guard(missing_card, log_path, fallbacks=[ss.Fallback.model("lookup", fallback)])
        with pytest.raises(ss.NoFallbackAvailable) as err:
            g(TXN)
        decision = err.value.decision
        assert decision.reasons[1].detail == f"lookup: LookupError: no rule for {REDACTED}"
        assert decision.attempts[1].error == f"LookupError: no rule for {REDACTED}"
        assert line_of(decision) == without_ts(read_records(log_path)[0])
        assert_no_secret(log_path, decision)
        assert CARD not in str(err.value)

    def test_retried_attempts_are_scrubbed(self, log_path: Path) -> None:
        """Every retry's error is scrubbed, not only the last one."""

        def flaky(x: Any) -> Any:
            raise ConnectionError(f"card {x['card_number']} refused")

        g = ss.guard(
            name=f"redaction-retry-{time.monotonic_ns()}",
            retry=ss.RetryConfig(attempts=3, backoff_s=0.0, jitter=False),
            fallbacks=[ss.Fallback.static("static", STATIC)],
            log=ss.DecisionLogConfig(sink=str(log_path), redact=["card_number"]),
        )(flaky)
        decision = g.call(TXN).decision
        primaries = [a for a in decision.attempts if a.name == "primary"]
        assert len(primaries) == 3
        assert {a.error for a in primaries} == {f"ConnectionError: card {REDACTED} refused"}
        assert_no_secret(log_path, decision, secrets=(CARD,))

    def test_async_guard_scrubs_its_records_too(self, log_path: Path) -> None:
        """An `async def` model's error is scrubbed the same way."""

        async def amodel(x: Any) -> Any:
            raise ValueError(f"bad card {x['card_number']}")

        g = guard(amodel, log_path)
        decision = asyncio.run(g.call(TXN)).decision
        assert decision.reasons[0].detail == f"ValueError: bad card {REDACTED}"
        assert_no_secret(log_path, decision)

    def test_text_forms_of_a_value_are_all_scrubbed(self, log_path: Path) -> None:
        """Escaped (repr/JSON), upper-cased and integer forms of a value are scrubbed, and a
        multi-line value's first line where the message is cut at its end."""
        tricky = 'o\'brien "x"\n@example.org'

        def model(x: Any) -> Any:
            raise ValueError(
                f"{int(x['pan'])} / {x['pan']} / {x['email']!r} / {json.dumps(x['email'])} / "
                f"{x['email'].upper()}"
            )

        g = guard(model, log_path, redact=["pan"], hash=["email"])
        decision = g.call({"email": tricky, "pan": 4111111111111111.0}).decision
        detail = decision.reasons[0].detail
        assert detail is not None
        for leak in ("brien", "4111111111111111", "EXAMPLE.ORG", "example.org"):
            assert leak not in detail
        assert detail.count(REDACTED) == 2
        assert_no_secret(log_path, decision, secrets=("brien", "4111111111111111"))

    def test_cut_message_does_not_keep_the_start_of_a_value(self, log_path: Path) -> None:
        """An error message cut at 200 characters inside the card number keeps none of it."""

        def model(x: Any) -> Any:
            raise ValueError("x" * 170 + f" card {x['card_number']} declined")

        g = guard(model, log_path)
        decision = g.call(TXN).decision
        detail = decision.reasons[0].detail
        assert detail is not None
        assert detail.endswith(f"card {REDACTED}…")
        assert "4111" not in detail
        assert_no_secret(log_path, decision)

    def test_short_values_are_scrubbed_as_whole_tokens_only(self, log_path: Path) -> None:
        """A two-digit value goes where it stands alone, not inside other numbers; one-character
        values and booleans are left alone (they would blank out unrelated text)."""

        def model(x: Any) -> Any:
            raise ValueError(f"age {x['age']} at row 420, grade {x['grade']}, vip {x['vip']}")

        g = guard(model, log_path, redact=["age", "grade", "vip"], hash=[])
        decision = g.call({"age": 42, "grade": "B", "vip": True}).decision
        assert decision.reasons[0].detail == (
            f"ValueError: age {REDACTED} at row 420, grade B, vip True"
        )

    def test_error_messages_are_scrubbed_when_inputs_are_not_logged(self) -> None:
        """With `include_inputs=False`, the record (through `attach`) still knows what to scrub."""
        recorder = InputRecorder(["card_number"], ["email"], "pepper")
        record = Record("p", None, None, None, True, False, [], [], None, "closed", 1.0)
        record.reasons = [ss.decisions.RawReason("error", "call", f"ValueError: {CARD}")]
        recorder.attach(record, TXN, {"card_number": CARD}, inputs=False, outputs=True)
        rec = record.to_record()
        assert "inputs" not in rec
        assert rec["output"] == {}
        assert rec["reasons"][0]["detail"] == f"ValueError: {REDACTED}"

    def test_guard_without_logged_inputs_still_scrubs_error_messages(self, log_path: Path) -> None:
        """`include_inputs=False` keeps the inputs out of the log, and the card out of the text."""
        g = guard(bad_card, log_path, include_inputs=False)
        decision = g.call(TXN).decision
        assert "inputs" not in decision.to_record()
        assert_no_secret(log_path, decision)

    def test_a_record_that_cannot_be_scrubbed_keeps_no_free_text(
        self, log_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """If scrubbing fails, details, errors, inputs and output are all `[redacted]`."""

        def broken(self: Scrubber, secrets: Any) -> None:
            raise RuntimeError("scrubber bug")

        monkeypatch.setattr(Scrubber, "__init__", broken)
        g = guard(bad_card, log_path)
        decision = g.call(TXN).decision
        assert free_text(decision) == [REDACTED, REDACTED]
        assert decision.inputs == REDACTED
        assert_no_secret(log_path, decision)

    def test_calls_without_redacted_fields_are_rendered_unchanged(self, log_path: Path) -> None:
        """No redacted or hashed value in the input: the message is logged as it was."""
        g = guard(lambda x: bad_card({"card_number": "n/a", "email": "none"}), log_path)
        decision = g.call({"amount": 3}).decision
        assert decision.reasons[0].detail == "ValueError: bad card n/a for none"


@dataclasses.dataclass
class TxnData:
    amount: float
    card_number: str
    email: str


class TxnModel(BaseModel):
    amount: float
    card_number: str
    email: str


class TxnTuple(NamedTuple):
    amount: float
    card_number: str
    email: str


class TxnObject:
    def __init__(self) -> None:
        self.amount = 12.5
        self.card_number = CARD
        self.email = EMAIL
        self._token = "private-token-value"

    def __repr__(self) -> str:
        return f"TxnObject({self.card_number})"


class TxnSlots:
    __slots__ = ("amount", "card_number", "email")

    def __init__(self) -> None:
        self.amount = 12.5
        self.card_number = CARD
        self.email = EMAIL


class Opaque:
    """No fields to show: its repr holds the card, so it must never be recorded."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Opaque(card={CARD})"


class Tier(Enum):
    GOLD = "gold"


class TestNoFallbackAvailable:
    def test_its_traceback_does_not_show_the_model_error(self, log_path: Path) -> None:
        """Nothing answered: the app that logs `NoFallbackAvailable` with its traceback (as
        `logger.exception` or an error tracker does) shows the decision's scrubbed error, not
        the model's exception quoting the card; code that wants it finds it on `__context__`."""
        g = guard(bad_card, log_path, fallbacks=[])
        with pytest.raises(ss.NoFallbackAvailable) as err:
            g(TXN)
        shown = "".join(traceback.format_exception(err.value))
        assert "ValueError" not in shown
        assert CARD not in shown
        assert err.value.decision.reasons[0].detail.startswith(f"ValueError: bad card {REDACTED}")
        assert isinstance(err.value.__context__, ValueError)


class TestKeywordArguments:
    """The wrapper keeps the function's signature, so `predict(x=...)` is a normal call: the
    input passed by keyword is the input (validated, recorded, scrubbed) as when passed by
    position, and other keyword arguments with a redacted name are scrubbed from errors too."""

    def test_input_by_keyword_is_recorded_and_scrubbed(self, log_path: Path) -> None:
        g = guard(bad_card, log_path)
        by_keyword = g.call(x=TXN).decision
        by_position = g.call(TXN).decision
        hashed = by_keyword.inputs["email"]
        assert by_keyword.inputs == {"amount": 12.5, "email": hashed}
        expected = f"ValueError: bad card {REDACTED} for [hash:{hashed}]"
        assert free_text(by_keyword) == [expected, expected]
        assert (by_keyword.inputs, by_keyword.reasons) == (by_position.inputs, by_position.reasons)
        assert_no_secret(log_path, by_keyword)

    def test_input_by_keyword_of_a_method_and_an_async_guard(self, log_path: Path) -> None:
        class Model:
            @guard_method(log_path)
            def predict(self, x: Any) -> Any:
                return bad_card(x)

        async def bad_card_async(x: Any) -> Any:
            return bad_card(x)

        method = Model().predict.call(x=TXN).decision
        in_async = asyncio.run(guard(bad_card_async, log_path).call(x=TXN)).decision
        for decision in (method, in_async):
            assert decision.inputs is not None
            assert decision.inputs["amount"] == 12.5
            assert any(REDACTED in t for t in free_text(decision))
        assert_no_secret(log_path, method, in_async)

    def test_input_by_keyword_is_validated(self) -> None:
        class Txn(BaseModel):
            amount: float

        def score(x: Txn) -> dict[str, Any]:
            return {"amount": x.amount}

        g = ss.guard(
            name=f"keyword-validated-{time.monotonic_ns()}",
            validation=ss.ValidationConfig(schema=Txn, on_invalid="reject"),
        )(score)
        assert g(x={"amount": "2.5"}) == {"amount": 2.5}
        with pytest.raises(ss.InputRejected):
            g(x={"amount": "lots"})

    def test_other_keyword_arguments_with_a_redacted_name_are_scrubbed(
        self, log_path: Path
    ) -> None:
        def uses_token(x: Any, token: str = "") -> Any:
            raise PermissionError(f"token {token} refused for {x['amount']}")

        g = guard(uses_token, log_path, redact=["card_number", "token"])
        by_keyword = g.call(TXN, token="tok_SECRET123").decision
        by_position = g.call(TXN, "tok_SECRET456").decision
        for decision in (by_keyword, by_position):
            expected = f"PermissionError: token {REDACTED} refused for 12.5"
            assert free_text(decision)[0] == expected
        assert_no_secret(log_path, by_keyword, by_position, secrets=("tok_SECRET", CARD))

    def test_arguments_past_the_signature_are_scanned_too(self, log_path: Path) -> None:
        def many(x: Any, *extra: Any) -> Any:
            raise ValueError(f"cannot use {extra[0]['card_number']}")

        g = guard(many, log_path)
        decision = g.call({"amount": 1.0}, {"card_number": CARD}).decision
        assert free_text(decision)[0] == f"ValueError: cannot use {REDACTED}"
        assert_no_secret(log_path, decision)

    def test_a_reload_to_a_model_with_another_input_name_takes_that_name(self) -> None:
        class Row(BaseModel):
            amount: float

        def v1(x: Any) -> Any:
            return {"model": 1}

        def v2(features: Any) -> Any:
            return {"model": 2}

        name = f"kw-reload-{time.monotonic_ns()}"

        def policy(model: Any) -> ss.Policy:
            validation = ss.ValidationConfig(schema=Row, on_invalid="reject")
            return ss.Policy(name=name, model=model, validation=validation)

        g = ss.guard(policy(v1))
        assert g(x={"amount": 1.0}) == {"model": 1}
        g.reload(policy(v2))
        assert g(features={"amount": 1.0}) == {"model": 2}

    def test_a_wrapper_taking_only_keywords_gets_them_as_keywords(self) -> None:
        """`functools.wraps` gives a `def wrapper(**kw)` its function's signature; the guard
        reads the wrapper's own, so the call reaches it as made."""

        def keywords_only(fn: Any) -> Any:
            @functools.wraps(fn)
            def wrapper(**kw: Any) -> Any:
                return fn(**kw)

            return wrapper

        @keywords_only
        def score(x: Any) -> Any:
            return {"amount": x["amount"]}

        g = ss.guard(name=f"kw-wrapper-{time.monotonic_ns()}")(score)
        assert g.call(x={"amount": 3.0}).decision.served_by == "primary"

    def test_a_model_behind_a_decorator_taking_args_is_read_through_it(
        self, log_path: Path
    ) -> None:
        """`functools.wraps` around `def wrapper(*args, **kwargs)` (the usual decorator) and
        `lru_cache`: the wrapped function names the input and the other arguments."""

        def passes_on(fn: Any) -> Any:
            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return fn(*args, **kwargs)

            return wrapper

        class Row(BaseModel):
            amount: float

        def score(x: Any, token: str = "") -> Any:
            if token:
                raise PermissionError(f"token {token} refused")
            return {"amount": x["amount"]}

        g = ss.guard(
            name=f"kw-decorated-{time.monotonic_ns()}",
            validation=ss.ValidationConfig(schema=Row, on_invalid="reject"),
            fallbacks=[ss.Fallback.static("static", STATIC)],
            log=ss.DecisionLogConfig(sink=str(log_path), redact=["token"]),
        )(passes_on(score))
        assert g.call(x={"amount": 1.0}).decision.served_by == "primary"
        cached = guard(functools.lru_cache(score), log_path, redact=["token"])  # hashable input
        decisions = [g.call({"amount": 2.0}, "tok_SECRET_W").decision]
        decisions.append(cached.call(("amount", 2.0), "tok_SECRET_L").decision)
        for decision in decisions:
            assert free_text(decision)[0] == f"PermissionError: token {REDACTED} refused"
        assert_no_secret(log_path, *decisions, secrets=("tok_SECRET",))

    def test_a_positional_only_secret_is_scrubbed(self, log_path: Path) -> None:
        def positional(x: Any, token: str, /, **extra: Any) -> Any:
            raise PermissionError(f"token {token}, then {extra['token']}")

        g = guard(positional, log_path, redact=["card_number", "token"])
        decision = g.call(TXN, "tok_SECRET_A", token="tok_SECRET_B").decision
        assert free_text(decision)[0] == f"PermissionError: token {REDACTED}, then {REDACTED}"
        assert_no_secret(log_path, decision, secrets=("tok_SECRET", CARD))

    def test_a_sampled_answer_quoting_a_redacted_keyword_is_scrubbed(self, log_path: Path) -> None:
        def greets(x: Any, token: str = "") -> Any:
            return {"message": f"token {token} accepted"}

        g = guard(greets, log_path, redact=["card_number", "token"], include_outputs=True)
        decision = g.call(TXN, token="tok_SECRET123").decision
        assert decision.output == {"message": f"token {REDACTED} accepted"}
        assert_no_secret(log_path, decision, secrets=("tok_SECRET123", CARD))


class TestArraysNotLogged:
    def test_a_numeric_array_not_logged_is_never_converted(
        self, log_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An input with `include_inputs=False`, or a keyword argument (an embedding batch,
        say), is only scanned for secrets when a degraded call is recorded: a numeric array is
        passed over, not turned into lists (that took 0.75 s for 2000 x 768), and the secrets
        beside it are still scrubbed."""
        from safeserve import recording

        converted: list[type] = []
        real = recording.json_safe

        def watched(value: Any, depth: int = 0) -> Any:
            converted.append(type(value))
            return real(value, depth)

        monkeypatch.setattr(recording, "json_safe", watched)

        def uses_card(x: Any, embedding: Any = None, meta: Any = None) -> Any:
            raise ValueError(f"bad card {meta['card_number']}")

        g = guard(uses_card, log_path, include_inputs=False)
        batch = np.zeros((200, 16))
        decision = g.call(batch, embedding=batch, meta={"card_number": CARD}).decision
        assert np.ndarray not in converted
        assert free_text(decision)[0] == f"ValueError: bad card {REDACTED}"
        assert decision.inputs is None
        assert_no_secret(log_path, decision)


def guard_method(path: Path) -> Any:
    """`guard` as a method decorator."""
    return lambda fn: guard(fn, path)


class TestInputShapes:
    @pytest.mark.parametrize(
        "x",
        [
            TxnData(12.5, CARD, EMAIL),
            TxnModel(amount=12.5, card_number=CARD, email=EMAIL),
            TxnTuple(12.5, CARD, EMAIL),
            TxnObject(),
            TxnSlots(),
        ],
        ids=["dataclass", "pydantic", "namedtuple", "object", "slots"],
    )
    def test_record_like_inputs_are_recorded_as_redacted_dicts(
        self, x: Any, log_path: Path
    ) -> None:
        """Dataclasses, pydantic models, named tuples and plain objects are recorded field by
        field: the card dropped, the email hashed, private attributes left out."""
        g = guard(crash, log_path)
        decision = g.call(x).decision
        inputs = read_records(log_path)[0]["inputs"]
        assert set(inputs) == {"amount", "email"}
        assert inputs["amount"] == 12.5
        assert len(inputs["email"]) == 32
        assert decision.inputs == inputs
        assert_no_secret(log_path, decision, secrets=(CARD, EMAIL, "private-token"))

    def test_list_of_dicts_is_redacted_element_wise(self, log_path: Path) -> None:
        """A list (or tuple) of inputs is redacted element by element."""
        g = guard(crash, log_path)
        g([TXN, (TXN, {"amount": 1})])
        inputs = read_records(log_path)[0]["inputs"]
        assert inputs[0] == {"amount": 12.5, "email": inputs[0]["email"]}
        assert inputs[1][1] == {"amount": 1}
        assert inputs[1][0] == inputs[0]
        assert_no_secret(log_path)

    def test_nested_fields_are_redacted_at_any_depth(self, log_path: Path) -> None:
        """`{"meta": {"card_number": ...}}` loses the card; hashes match those at the top."""
        g = guard(crash, log_path)
        g({"email": EMAIL, "meta": {"card_number": CARD, "who": [{"email": EMAIL}]}})
        inputs = read_records(log_path)[0]["inputs"]
        assert inputs["meta"] == {"who": [{"email": inputs["email"]}]}
        assert_no_secret(log_path)

    def test_values_too_deep_become_placeholders(self, log_path: Path) -> None:
        """Past the depth bound a value is recorded as its type name, never its repr."""
        deep: Any = {"card_number": CARD}
        for _ in range(30):
            deep = {"next": deep}
        g = guard(crash, log_path)
        g(deep)
        text = log_path.read_text() if ss.flush_logs() else ""
        assert '"<dict>"' in text
        assert CARD not in text

    def test_unknown_objects_are_placeholders_not_reprs(self, log_path: Path) -> None:
        """An object with no fields to show is `<TypeName>`: its repr could hold anything."""
        g = guard(crash, log_path)
        g({"amount": 1, "extra": Opaque(), "raw": b"card " + CARD.encode()})
        inputs = read_records(log_path)[0]["inputs"]
        assert inputs == {"amount": 1, "extra": "<Opaque>", "raw": "<bytes>"}
        assert_no_secret(log_path)

    def test_plain_values_keep_their_json_form(self, log_path: Path) -> None:
        """Numbers, arrays, enums and non-finite floats are recorded as before."""
        g = guard(crash, log_path)
        g({"v": np.array([1.5, 2.0]), "n": np.int64(3), "tier": Tier.GOLD, "bad": float("nan")})
        inputs = read_records(log_path)[0]["inputs"]
        assert inputs == {"v": [1.5, 2.0], "n": 3, "tier": "gold", "bad": "nan"}

    def test_a_small_dataframe_is_redacted_by_column(self, log_path: Path) -> None:
        """A pandas DataFrame is recorded column by column, without the redacted column."""
        g = guard(crash, log_path)
        g(pd.DataFrame([TXN, TXN]))
        inputs = read_records(log_path)[0]["inputs"]
        assert set(inputs) == {"amount", "email"}
        assert inputs["amount"] == {"0": 12.5, "1": 12.5}
        assert_no_secret(log_path)

    def test_free_text_inputs_are_scrubbed_of_redacted_values(self, log_path: Path) -> None:
        """A redacted value repeated in a free-text field is scrubbed there too."""
        g = guard(crash, log_path)
        g({**TXN, "note": f"customer {EMAIL} paid with {CARD}"})
        inputs = read_records(log_path)[0]["inputs"]
        assert inputs["note"] == f"customer [hash:{inputs['email']}] paid with {REDACTED}"
        assert_no_secret(log_path)


class TestOutputs:
    def test_echoed_fields_in_outputs_are_redacted_by_key(self, log_path: Path) -> None:
        """An answer echoing the card (at any depth) and the email is redacted and hashed like
        the input; the hash is the input's hash."""

        def echo(x: Any) -> Any:
            return {"label": "ok", "card_number": x["card_number"], "meta": {"email": x["email"]}}

        g = guard(crash, log_path, include_outputs=True, fallbacks=[ss.Fallback.model("e", echo)])
        decision = g.call(TXN).decision
        record = read_records(log_path)[0]
        assert record["output"] == {"label": "ok", "meta": {"email": record["inputs"]["email"]}}
        assert decision.output == record["output"]
        assert_no_secret(log_path, decision)

    def test_output_fields_not_in_the_input_are_redacted_too(self, log_path: Path) -> None:
        """A card the model looked up (not in the input) is dropped by key and scrubbed from
        the error text of a later fallback."""
        other = "5500000000000004"

        def lookup(x: Any) -> Any:
            return {"label": "ok", "card_number": other, "note": f"matched {other}"}

        g = guard(crash, log_path, include_outputs=True, fallbacks=[ss.Fallback.model("l", lookup)])
        g({"amount": 1})
        record = read_records(log_path)[0]
        assert record["output"] == {"label": "ok", "note": f"matched {REDACTED}"}
        assert_no_secret(log_path, secrets=(other,))

    def test_dataclass_outputs_echoing_the_input_keep_no_card(self, log_path: Path) -> None:
        """A dataclass answer holding the input's card is recorded field by field, without it."""
        g = guard(
            crash,
            log_path,
            include_outputs=True,
            fallbacks=[ss.Fallback.model("d", lambda x: TxnData(**x))],
        )
        g(TXN)
        output = read_records(log_path)[0]["output"]
        assert "card_number" not in output
        assert output["amount"] == TXN["amount"]
        assert_no_secret(log_path)

    def test_pydantic_outputs_are_redacted(self, log_path: Path) -> None:
        """A pydantic answer holding the card is recorded without it."""
        g = guard(
            crash,
            log_path,
            include_outputs=True,
            fallbacks=[ss.Fallback.model("m", lambda x: TxnModel(**x))],
        )
        g(TXN)
        assert set(read_records(log_path)[0]["output"]) == {"amount", "email"}
        assert_no_secret(log_path)


class TestBatches:
    def test_rows_failed_alone_are_scrubbed_of_their_own_values(self, log_path: Path) -> None:
        """A batch whose rows fail one by one (bisection) logs each row's error scrubbed."""

        def model(batch: Any) -> Any:
            raise ValueError("cards " + ",".join(r["card_number"] for r in batch))

        g = guard(model, log_path, batch=True)
        out = g.batch([{"a": i, "card_number": c} for i, c in enumerate(CARDS)])
        assert [d.reasons[0].detail for d in out.decisions] == [f"ValueError: cards {REDACTED}"] * 3
        assert_no_secret(log_path, *out.decisions, secrets=tuple(CARDS))

    def test_a_record_keeps_every_row_of_its_batch_out_of_its_text(self) -> None:
        """`Record.keep` adds a whole batch's values to a row's: an error shared by the rows
        may quote any of them."""
        recorder = InputRecorder(["card_number"], [], "pepper")
        rows = [{"card_number": c} for c in CARDS]
        record = Record("p", None, None, None, True, False, [], [], None, "closed", 1.0)
        record.reasons = [ss.decisions.RawReason("timeout", "call", ",".join(CARDS))]
        record.keep(recorder(rows))
        record.inputs = recorder(rows[0])
        assert record.to_record()["reasons"][0]["detail"] == ",".join([REDACTED] * 3)

    def test_an_error_shared_by_every_row_is_scrubbed_of_every_row(self, log_path: Path) -> None:
        """A timeout of the whole batch quoting all the cards is scrubbed in every row."""

        def model(batch: Any) -> Any:
            raise TimeoutError("cards " + ",".join(r["card_number"] for r in batch))

        g = guard(model, log_path, batch=True)
        out = g.batch([{"a": i, "card_number": c} for i, c in enumerate(CARDS)])
        assert_no_secret(log_path, *out.decisions, secrets=tuple(CARDS))


class TestMiddleware:
    def test_crash_on_a_guarded_route_logs_no_card(self, log_path: Path) -> None:
        """An endpoint error quoting the body's card, under SafeServeMiddleware: the record has
        the parsed body redacted and the error scrubbed."""
        from asgi_app import Model, build_app, rules_fallback
        from test_fastapi import post

        class CardModel(Model):
            def answer(self, txn: Any) -> dict[str, Any]:
                raise ValueError(f"card {txn.card_number} declined")

        model = CardModel()
        policy = ss.Policy(
            name=f"redaction-asgi-{time.monotonic_ns()}",
            fallbacks=[rules_fallback()],
            log=ss.DecisionLogConfig(
                sink=str(log_path), redact=["card_number"], hash=["email"], include_outputs=True
            ),
        )
        g = ss.guard(policy)(model.answer)
        r = post(build_app(model, {"/predict": g}), body=TXN)
        assert (r.status_code, r.json()) == (200, {"label": "approve-by-rule"})
        record = read_records(log_path)[0]
        assert record["reasons"][0]["detail"] == f"ValueError: card {REDACTED} declined"
        assert set(record["inputs"]) == {"amount", "email"}
        assert_no_secret(log_path, g.decisions()[-1])


class TestProfiles:
    def test_redacted_and_hashed_features_are_never_profiled(self, tmp_path: Path) -> None:
        """A baseline that knows the redacted and hashed features still profiles neither."""
        rng = np.random.default_rng(3)
        baseline = ss.Baseline.from_data(
            {
                "amount": rng.uniform(0, 100, 500).tolist(),
                "card_number": rng.integers(10**15, 10**16, 500).astype(float).tolist(),
                "email": rng.choice([EMAIL, "bob@example.org"], 500).tolist(),
            }
        )
        sink = tmp_path / "log.jsonl"
        g = ss.guard(
            name=f"redaction-profile-{time.monotonic_ns()}",
            validation=ss.ValidationConfig(baseline=baseline),
            log=ss.DecisionLogConfig(sink=str(sink), redact=["card_number"], hash=["email"]),
        )(lambda x: {"label": "ok"})
        g({"amount": 5.0, "card_number": 4111111111111111.0, "email": EMAIL})
        profile = g.profile()
        assert profile is not None
        assert set(profile["features"]) == {"amount"}
        assert ss.flush_logs()
        records = [json.loads(line) for line in sink.read_text().splitlines()]
        profiles = [r for r in records if r["kind"] == "profile"]
        assert profiles
        assert all(set(p["features"]) == {"amount"} for p in profiles)
        assert EMAIL not in sink.read_text()


SECRET_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="[]"),
    min_size=6,
    max_size=30,
)


class TestProperties:
    @settings(max_examples=200, deadline=None)
    @given(secret=SECRET_TEXT, before=st.text(max_size=20), after=st.text(max_size=20))
    def test_a_redacted_string_never_survives_in_free_text(
        self, secret: str, before: str, after: str
    ) -> None:
        """Whatever the value and the text around it, it is gone from the rendered record."""
        recorder = InputRecorder(["card_number"], [], "pepper")
        record = Record("p", None, None, "s", True, False, [], [], None, "closed", 1.0)
        message = f"{before}{secret}{after}"
        record.reasons = [ss.decisions.RawReason("error", "call", message)]
        record.inputs = recorder({"card_number": secret, "note": message})
        rec = record.to_record()
        assert secret not in rec["reasons"][0]["detail"]
        assert secret not in rec["inputs"]["note"]
        assert "card_number" not in rec["inputs"]

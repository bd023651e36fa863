"""How answers are written into HTTP bodies (`encode_answer`): as FastAPI's jsonable_encoder
writes them, plus numpy; strictly valid JSON; a clear error, never a repr, for the rest."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import ipaddress
import json
import math
import re
import time
import uuid
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, SecretStr, TypeAdapter

from safeserve.integrations.encoding import Unencodable, encode_answer


class Tier(enum.IntEnum):
    GOLD = 1


class Code(int, enum.Enum):
    """An enum whose value is not its int (FastAPI writes the value)."""

    OK = "ok"

    def __new__(cls, label: str) -> Code:
        member = int.__new__(cls, 200)
        member._value_ = label
        return member


@dataclasses.dataclass
class Score:
    label: str
    tags: list[str] = dataclasses.field(default_factory=list)


class Verdict(BaseModel):
    """Sent by its aliases, as FastAPI sends a model."""

    risk_score: float = Field(alias="riskScore")
    token: SecretStr


RECORD = np.array(
    [(np.datetime64("2024-01-01", "ns"), np.timedelta64(3, "s"))],
    dtype=[("at", "M8[ns]"), ("took", "m8[ns]")],
)


def strict(body: bytes) -> Any:
    """Parsed as JSON that has no NaN or Infinity."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"{constant} in {body!r}")

    return json.loads(body, parse_constant=refuse)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (uuid.UUID(int=5), "00000000-0000-0000-0000-000000000005"),
        (datetime.date(2024, 1, 2), "2024-01-02"),
        (datetime.timedelta(minutes=1), 60.0),
        (decimal.Decimal("1.50"), 1.5),
        (decimal.Decimal("3"), 3),
        (decimal.Decimal("1" + "0" * 400 + ".5"), None),  # past a float's range
        (decimal.Decimal("NaN"), None),
        (Tier.GOLD, 1),
        (Score("review"), {"label": "review", "tags": []}),
        (b"ok", "ok"),
        (collections.deque([1, 2]), [1, 2]),
        ((i for i in range(2)), [0, 1]),
        ({1, 2}, [1, 2]),
        (math.nan, None),
        (np.float32(0.5), 0.5),
        (np.array([[1, 2]]), [[1, 2]]),
        (np.bool_(True), True),
        (np.datetime64("2020-01-01T00:00:00.123456789", "ns"), "2020-01-01T00:00:00.123456789"),
        (np.datetime64("NaT"), None),
        (np.timedelta64(3, "ms"), 0.003),
        ({None: 1, True: 2, 3: 3, math.inf: 4}, {"null": 1, "true": 2, "3": 3, "Infinity": 4}),
        ({decimal.Decimal("NaN"): 1, np.float16("nan"): 2}, {"NaN": 2}),  # as a float NaN key
        (Code.OK, "ok"),
        (Verdict(riskScore=0.9, token=SecretStr("s3cret")), {"riskScore": 0.9, "token": "*" * 10}),
        (ipaddress.ip_interface("10.0.0.1/8"), "10.0.0.1/8"),
        (TypeAdapter(HttpUrl).validate_python("https://example.com/a"), "https://example.com/a"),
        (re.compile("a+b"), "a+b"),
        (re.compile(b"a+b"), "a+b"),
        (RECORD, [["2024-01-01T00:00:00.000000000", 3.0]]),
        (
            np.ma.masked_array(np.array(["2024-01-01", "2024-02-29"], "M8[D]"), [0, 1]),
            ["2024-01-01", None],
        ),
        (np.timedelta64(2 * 10**14, "D"), 2 * 10**14 * 86400.0),  # past int64 nanoseconds
        (np.longdouble(1.5), 1.5),
    ],
)
def test_an_answer_is_written_as_its_json_value(value: Any, expected: Any) -> None:
    assert strict(encode_answer({"v": value}))["v"] == expected


def test_nesting_is_kept_at_any_depth() -> None:
    deep: Any = "leaf"
    for _ in range(100):
        deep = {"n": deep}
    body = strict(encode_answer(deep))
    for _ in range(100):
        body = body["n"]
    assert body == "leaf"


def test_a_lone_surrogate_is_sent_escaped() -> None:
    assert encode_answer({"id": "c-\ud800"}) == b'{"id":"c-\\ud800"}'


class Opaque(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    handle: object


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (object(), "a value of type 'object'"),
        (10**5000, "an integer too long"),
        (Opaque(handle=object()), "pydantic model that cannot be serialised"),
        ({("a", "b"): 1}, "a tuple as a key"),
        (b"\xff\xfe", "bytes that are not UTF-8"),
        (np.timedelta64(3, "M"), "in 'M' units has no fixed length"),
        ({10**5000: 1}, r"could not be converted \(ValueError\)"),
    ],
    ids=["object", "huge int", "pydantic", "tuple key", "bytes", "months", "huge key"],
)
def test_what_has_no_json_form_is_a_clear_error(value: Any, message: str) -> None:
    with pytest.raises(Unencodable, match=message) as caught:
        encode_answer({"v": value})
    assert "0x" not in str(caught.value)  # never a repr


def test_a_cycle_is_an_error_not_a_crash() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(Unencodable, match="nested too deeply"):
        encode_answer(loop)


def test_a_huge_decimal_is_refused_before_it_is_worked_out() -> None:
    """An integral Decimal is written as an int, as FastAPI writes it; one with more digits
    than Python writes is refused at once, not after seconds of conversion on the loop."""
    assert strict(encode_answer(decimal.Decimal("1E+400"))) == 10**400
    t0 = time.perf_counter()
    with pytest.raises(Unencodable, match="an integer too long"):
        encode_answer(decimal.Decimal("1E+1000000"))
    assert time.perf_counter() - t0 < 1.0  # generous: the conversion took 30 s


def test_a_cyclic_model_is_an_error_not_a_crash() -> None:
    class Node(BaseModel):
        next: Node | None = None

    node = Node()
    node.next = node
    with pytest.raises(Unencodable):
        encode_answer(node)

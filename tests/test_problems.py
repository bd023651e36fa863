"""What a rejected input's problems say: the schema's names and pydantic's messages, never
anything the client sent (values, made-up keys, tags, a validator's own text)."""

from __future__ import annotations  # the dataclass and TypedDict below keep string annotations

import dataclasses
from typing import Annotated, Any, Literal

import pytest
from pydantic import AliasChoices, AliasPath, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from safeserve.validation import Invalid, SchemaValidator


class Cat(BaseModel):
    kind: Literal["cat"]
    meow: int


class Dog(BaseModel):
    kind: Literal["dog"]
    bark: int


@dataclasses.dataclass
class Inner:
    deep_value: int


@dataclasses.dataclass
class Outer:
    inner_dc: Inner


class InnerTD(TypedDict):
    deep_value: int


class OuterTD(TypedDict):
    td_inner: InnerTD


class Everything(BaseModel):
    model_config = ConfigDict(extra="forbid", val_json_bytes="base64")
    pet: Annotated[Cat | Dog, Field(discriminator="kind")]
    other_pet: Annotated[Cat | Dog, Field(discriminator="kind")]
    name: str
    blob: bytes
    dc: Outer
    td: OuterTD
    amount: int = Field(validation_alias=AliasChoices("amt", "amount"))
    nested: int = Field(validation_alias=AliasPath("outer", "inner_key"))
    tags: list[int] = Field(max_length=1)

    @field_validator("name", mode="before")
    @classmethod
    def plain(cls, v: Any) -> Any:
        if "SECRET" in str(v):  # a custom error that reuses a built-in type's name
            raise PydanticCustomError("string_type", "bad name {v}", {"v": v})
        return v


BODY = {
    "pet": {"kind": "SECRET-tag"},
    "other_pet": {"kind": "cat", "meow": "SECRET-meow"},
    "name": "SECRET-name",
    "blob": "ab$SECRET",
    "dc": {"inner_dc": {"deep_value": "SECRET-dc"}},
    "td": {"td_inner": {"deep_value": "SECRET-td"}},
    "amt": "SECRET-amt",
    "outer": {"inner_key": "SECRET-nested"},
    "tags": [1, 2, 3],
    "SECRET-key": 1,
}
INT = "Input should be a valid integer, unable to parse string as an integer"


def problems(body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(Invalid) as info:
        SchemaValidator(Everything, lambda x: x)(body)
    return [(p.loc, p.message) for p in info.value.problems]


def test_nothing_the_client_sent_and_every_name_the_schema_has() -> None:
    found = problems(BODY)
    assert "SECRET" not in repr(found)
    assert "$" not in "".join(message for _, message in found)  # base64's bad character
    assert found == [
        (
            "pet",
            "Input tag '*' found using 'kind' does not match any of the expected tags: "
            "'cat', 'dog'",
        ),
        ("other_pet.cat.meow", INT),
        ("name", "Input should be a valid string"),  # pydantic's, not the validator's text
        ("blob", "Data should be valid base64"),
        ("dc.inner_dc.deep_value", INT),
        ("td.td_inner.deep_value", INT),
        ("amt", INT),
        ("outer.inner_key", INT),
        ("tags", "List should have at most 1 item after validation, not 3"),
        ("*", "Extra inputs are not permitted"),
    ]

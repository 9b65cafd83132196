"""The OpenAPI document, as Litestar writes it from the wire types, with one correction.

`libs.messages.AttributeValue` is `float | int | bool | str | None`: msgspec needs both
numbers so that `3` stays an int and `3.5` a float on the wire. Litestar writes a union as
`oneOf`, and `3` is both a `number` and an `integer`: it matches two branches, so every
integer attribute would be invalid against the document (and a client generator builds a
union it cannot decode). Where a `oneOf` has both, the document keeps `number`, which is
what JSON has. The types stay as they are; a Litestar schema plugin cannot take a union.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import OpenAPI

NUMBER = {"type": "number"}
INTEGER = {"type": "integer"}


@dataclass
class OpenAPIDocumentConfig(OpenAPIConfig):
    """`OpenAPIConfig` whose document writes a JSON number once (built when first asked)."""

    def to_openapi_schema(self) -> OpenAPI:
        document = super().to_openapi_schema()
        return _Document(**{f.name: getattr(document, f.name) for f in fields(document)})


@dataclass
class _Document(OpenAPI):
    def to_schema(self) -> dict[str, Any]:
        schema = super().to_schema()
        _one_number(schema)
        return schema


def _one_number(node: Any) -> None:
    """In place: a `oneOf` with a `number` and an `integer` branch keeps the `number`."""
    if isinstance(node, dict):
        branches = node.get("oneOf")
        if isinstance(branches, list) and NUMBER in branches and INTEGER in branches:
            branches.remove(INTEGER)
        for value in node.values():
            _one_number(value)
    elif isinstance(node, list):
        for value in node:
            _one_number(value)

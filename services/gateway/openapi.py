"""The OpenAPI document: Litestar writes it from the wire types; two things it cannot say alone.

- A union with both `int` and `float` (`libs.messages.AttributeValue`: msgspec keeps `3` an
  int and `3.5` a float on the wire) is written `anyOf` by `NumberUnionPlugin`, a schema
  plugin of the app. Litestar writes every union as `oneOf`, and `3` is both an `integer` and
  a `number`: it would match two branches and be invalid against the document.
- Every operation documents its errors with one `Problem` schema (`services.gateway.problems`),
  a component that Litestar's own (regenerated from the handlers' types) does not hold.

`tests/integration/test_api_contract.py` checks that no `oneOf` of the document overlaps.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin

from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import OpenAPI, Reference, Schema
from litestar.plugins import OpenAPISchemaPlugin

from services.gateway.problems import PROBLEM, PROBLEM_SCHEMA

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.typing import FieldDefinition


class NumberUnionPlugin(OpenAPISchemaPlugin):
    """Writes a union that holds both `int` and `float` as `anyOf` (its branches overlap).

    Litestar gives a plugin the part of an optional union that is not None as a
    `typing.Union`; a `X | Y` union it cannot give a plugin at all (it has no registry key for
    one), so a union of numbers needs its `None` (as `AttributeValue` has) to be seen here."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        if get_origin(field_definition.annotation) is not Union:
            return False
        branches = set(get_args(field_definition.annotation))
        return int in branches and float in branches

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        branches: list[Schema | Reference] = [
            schema_creator.for_field_definition(inner) for inner in field_definition.inner_types
        ]
        return Schema(any_of=branches)


@dataclass
class OpenAPIDocumentConfig(OpenAPIConfig):
    """`OpenAPIConfig` whose document holds the `Problem` component (built when first asked)."""

    def to_openapi_schema(self) -> OpenAPI:
        document = super().to_openapi_schema()
        return _Document(**{f.name: getattr(document, f.name) for f in fields(document)})


@dataclass
class _Document(OpenAPI):
    def to_schema(self) -> dict[str, Any]:
        schema = super().to_schema()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if PROBLEM in components:
            raise RuntimeError(f"a wire type is named {PROBLEM}, the problem details' component")
        components[PROBLEM] = PROBLEM_SCHEMA.to_schema()
        schema["components"]["schemas"] = dict(sorted(components.items()))
        return schema

"""Request bodies decoded by one strict msgspec decoder per type.

Litestar's default body handling converts with `strict=False` (it would take `"60"` for a
float). `StrictBody[T]` is a minimal DTO that decodes the raw bytes with a
`msgspec.json.Decoder(T)` built once, so wrong types are refused, unknown fields are refused
(the wire structs forbid them), and the error names the field path (`$.trigger`). It keeps
the body's schema in the OpenAPI document.

    @post("/", dto=StrictBody[DeviceCreate])
    async def create(self, data: JSONBody[DeviceCreate]) -> Device: ...
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, ClassVar, Generic, TypeVar

import msgspec
from litestar.dto import AbstractDTO, DTOConfig, DTOFieldDefinition
from litestar.openapi.spec import Reference, Schema
from litestar.typing import FieldDefinition

from libs.errors import Invalid
from services.gateway.problems import field_error

T = TypeVar("T")

MAX_BODY_BYTES = 1024 * 1024
TOO_DEEP = "the JSON is nested too deeply"


class StrictBody(AbstractDTO[T], Generic[T]):
    config: ClassVar[DTOConfig] = DTOConfig()
    decoder: ClassVar[msgspec.json.Decoder[Any]]

    def __class_getitem__(cls, annotation: Any) -> type[StrictBody[Any]]:
        # Unlike other DTOs this one takes any msgspec type, unions included (`A | list[A]`).
        name = getattr(annotation, "__name__", None) or str(annotation)
        return type(
            f"StrictBody[{name}]",
            (cls,),
            {"model_type": annotation, "decoder": msgspec.json.Decoder(annotation)},
        )

    def decode_bytes(self, value: bytes) -> Any:
        try:
            return self.decoder.decode(value)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            path, message = field_error(str(exc))
            raise Invalid(message, field=path) from None
        except RecursionError:
            raise Invalid(TOO_DEEP, field="$") from None

    def decode_builtins(self, value: dict[str, Any]) -> Any:
        try:
            return msgspec.convert(value, self.model_type)
        except msgspec.ValidationError as exc:
            path, message = field_error(str(exc))
            raise Invalid(message, field=path) from None

    @classmethod
    def create_for_field_definition(cls, *args: Any, **kwargs: Any) -> None:
        """Nothing to prepare: the decoder was built with the class."""

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any
    ) -> Reference | Schema:
        return schema_creator.for_field_definition(FieldDefinition.from_annotation(cls.model_type))

    @classmethod
    def generate_field_definitions(
        cls, model_type: type[Any]
    ) -> Generator[DTOFieldDefinition, None, None]:
        yield from ()

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False

    @classmethod
    def is_supported_model_type_field(cls, field_definition: FieldDefinition) -> bool:
        # Only for request bodies: responses are encoded by Litestar as usual.
        return False

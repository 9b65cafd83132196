"""Every error the gateway answers is an RFC 9457 problem details document.

One exception handler (`problem_response`) turns the platform's exception family, Litestar's
HTTP and validation errors, and an unreachable bus, database or cache into a
`ProblemDetailsException` (Litestar's problem details type), rendered as
`application/problem+json`:

    {"type": ..., "title": ..., "status": 422, "detail": ...,
     "errors": [{"field": "$.data.power_w", "message": "Expected `float`, got `str`"}]}

A dependency that cannot be reached is a 503 with the reason, never a 500.
"""

from __future__ import annotations

import functools
import http
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import nats.errors
import nats.js.errors
import redis.exceptions
import sqlalchemy.exc
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    Reference,
    RequestBody,
    Schema,
)
from litestar.openapi.spec import Parameter as ParameterSpec
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import ParameterKwarg
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.routes import HTTPRoute
from litestar.types import ExceptionHandlersMap

from libs import bus, errors
from libs.db.engine import refused
from services.gateway.browser import SAFE_METHODS

log = logging.getLogger(__name__)

TYPE_PREFIX = "urn:smarthome:problem:"
RETRY_AFTER_S = "5"

# msgspec messages: "<message> - at `$.path`"; missing/unknown fields name the field only
# in the message, so it is appended to the path.
_AT = re.compile(r"^(?P<message>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.DOTALL)
_NAMED_FIELD = re.compile(r"^Object (?:missing required|contains unknown) field `(?P<name>[^`]*)`")


def field_error(message: str, root: str = "$") -> tuple[str, str]:
    """Split a msgspec error into (field path, message): `$.data.power_w`, `Expected ...`."""
    match = _AT.match(message)
    assert match is not None  # the pattern matches every string
    text, path = match["message"], match["path"] or root
    if named := _NAMED_FIELD.match(text):
        path = f"{path}.{named['name']}"
    return path, text


def _slug(title: str) -> str:
    return TYPE_PREFIX + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _problem(
    status: int,
    title: str,
    detail: str,
    errors_: list[dict[str, str]] | None = None,
    *,
    type_: str | None = None,
    headers: dict[str, str] | None = None,
) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=status,
        type_=type_ or _slug(title),
        title=title,
        detail=detail,
        extra={"errors": errors_ or []},
        headers=headers,
    )


def _unavailable(what: str, exc: BaseException) -> ProblemDetailsException:
    reason = f"{what} is unreachable ({type(exc).__name__}); try again later"
    log.warning("answering 503: %s: %s", reason, exc)
    return _problem(
        503,
        errors.Unavailable.title,
        reason,
        headers={"Retry-After": RETRY_AFTER_S},
    )


def problem_response(request: Request, exc: Exception) -> Response:
    """The gateway's one exception handler."""
    problem = to_problem(exc, request)
    if problem.status_code == errors.StorageFull.status:
        resources = getattr(request.app.state, "resources", None)
        if resources is not None:  # readiness learns that the bus stores nothing more
            resources.bus_storage.refused()
    return problem.to_response(request)


def to_problem(exc: Exception, request: Request | None = None) -> ProblemDetailsException:
    """The one mapping from an exception to the problem details the client sees."""
    match exc:
        case ProblemDetailsException():
            return exc
        case errors.PlatformError():
            headers = {"Retry-After": RETRY_AFTER_S} if exc.status in (503, 507) else None
            if not exc.field:
                return _problem(exc.status, exc.title, exc.detail, headers=headers)
            field = [{"field": exc.field, "message": exc.detail}]
            detail = f"{exc.field}: {exc.detail}" if exc.status == 422 else exc.detail
            return _problem(exc.status, exc.title, detail, field, headers=headers)
        case ValidationException():
            fields = _fields(exc.extra, _aliases(request))
            detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields) or str(exc.detail)
            return _problem(422, errors.Invalid.title, detail, fields)
        case HTTPException():
            phrase = http.HTTPStatus(exc.status_code).phrase
            detail = exc.detail if exc.detail != phrase else _DETAILS.get(exc.status_code, phrase)
            return _problem(
                exc.status_code, phrase, detail, type_="about:blank", headers=_retry(exc)
            )
        case sqlalchemy.exc.IntegrityError():
            return _problem(409, errors.Conflict.title, "the change conflicts with stored data")
        case sqlalchemy.exc.DBAPIError() if refused(exc):  # a value the schema let through
            return _problem(422, errors.Invalid.title, "the database refused a value in it")
        case sqlalchemy.exc.SQLAlchemyError():
            return _unavailable("the database", exc)
        case nats.js.errors.APIError() if exc.err_code in bus.STORAGE_FULL_CODES:
            return to_problem(errors.StorageFull(bus.STORAGE_FULL), request)
        case nats.errors.Error():
            return _unavailable("the event bus", exc)
        case redis.exceptions.RedisError():
            return _unavailable("the state cache", exc)
        case ConnectionError() | TimeoutError():
            return _unavailable("a backing service", exc)
        case RecursionError():  # a decoder given JSON nested thousands deep
            log.warning("answering 422: input nested too deeply")
            return _problem(422, errors.Invalid.title, "the input is nested too deeply")
    log.exception("unexpected error", exc_info=exc)
    return _problem(500, errors.PlatformError.title, "an unexpected error occurred")


def _retry(exc: HTTPException) -> dict[str, str] | None:
    """A 429 says when to come back: Litestar's rate limit gives `RateLimit-Reset` only."""
    headers = dict(exc.headers or {})
    if exc.status_code == 429 and "Retry-After" not in headers:
        headers["Retry-After"] = headers.get("RateLimit-Reset", "60")
    return headers or None


_DETAILS = {
    429: "too many requests; try again later",
    404: "no such resource",
    405: "this method is not allowed on this resource",
    413: "the request body is larger than the gateway accepts",
}


def _fields(extra: Any, aliases: dict[str, str]) -> list[dict[str, str]]:
    """Litestar's validation messages (`{"key", "message", "source"}`) as field errors."""
    out = []
    for item in extra if isinstance(extra, list) else []:
        if not isinstance(item, dict):
            continue
        key = str(item.get("key") or "$")
        if key == "data":  # the body as a whole: absent
            out.append({"field": "$", "message": "a JSON request body is required"})
        else:
            out.append({"field": aliases.get(key, key), "message": str(item.get("message"))})
    return out


def _aliases(request: Request | None) -> dict[str, str]:
    """Handler argument → the parameter name the client used (`device_state` → `state`)."""
    try:
        parameters = request.route_handler.parsed_fn_signature.parameters if request else {}
    except Exception:  # no route (404): no parameters either
        return {}
    return {
        name: field.kwarg_definition.name
        for name, field in parameters.items()
        if isinstance(field.kwarg_definition, ParameterKwarg) and field.kwarg_definition.name
    }


HANDLED: tuple[type[Exception], ...] = (
    errors.PlatformError,
    HTTPException,
    sqlalchemy.exc.SQLAlchemyError,
    nats.errors.Error,
    redis.exceptions.RedisError,
    ConnectionError,
    TimeoutError,
    Exception,
)


def exception_handlers() -> ExceptionHandlersMap:
    return dict.fromkeys(HANDLED, problem_response)


# --- the OpenAPI side: every operation documents its errors as problem details -------------

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM = "Problem"  # its name in `components.schemas` (`services.gateway.openapi`)
_STRING = Schema(type=OpenAPIType.STRING)
PROBLEM_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    title=PROBLEM,
    description="RFC 9457 problem details",
    required=["type", "title", "status", "detail", "errors"],
    properties={
        "type": Schema(type=OpenAPIType.STRING, description="a URI naming the kind of problem"),
        "title": _STRING,
        "status": Schema(type=OpenAPIType.INTEGER),
        "detail": Schema(type=OpenAPIType.STRING, description="what is wrong, for a human"),
        "errors": Schema(
            type=OpenAPIType.ARRAY,
            description="one entry per invalid field",
            items=Schema(
                type=OpenAPIType.OBJECT,
                required=["field", "message"],
                properties={
                    "field": Schema(
                        type=OpenAPIType.STRING,
                        description="a JSON path into the body (`$.data.power_w`) or a "
                        "parameter name (`subject`)",
                    ),
                    "message": _STRING,
                },
            ),
        ),
    },
)


def _documented(description: str) -> OpenAPIResponse:
    # One component that every operation refers to: inline, a client generator makes one
    # model per operation and status, with clashing names.
    return OpenAPIResponse(
        description=description,
        content={
            PROBLEM_MEDIA_TYPE: OpenAPIMediaType(
                schema=Reference(ref=f"#/components/schemas/{PROBLEM}")
            )
        },
    )


@dataclass
class ProblemOperation(Operation):
    """Replaces Litestar's generic `400 ValidationException` with the problems we answer."""

    # Set per handler by `document_problems` (a subclass per combination).
    public: ClassVar[bool] = False  # needs no credential
    guarded: ClassVar[bool] = False  # a role, or a browser's foreign origin, may be refused
    writes: ClassVar[bool] = False  # counted by the write rate limit
    text: ClassVar[tuple[str, ...]] = ()  # the media types of a text body it answers (`answers`)

    def __post_init__(self) -> None:
        responses = dict(self.responses or {})
        for status, response in responses.items():  # a streamed export: text, not JSON
            if self.text and status[0] == "2" and isinstance(response, OpenAPIResponse):
                response.content = {kind: OpenAPIMediaType(schema=_STRING) for kind in self.text}
        for status, response in responses.items():  # a route's own, from `problem()`
            if status[0] in "45" and isinstance(response, OpenAPIResponse) and not response.content:
                responses[status] = _documented(response.description)
        if responses.pop("400", None) is not None:
            responses.setdefault("422", _documented("Invalid input; `errors` names each field"))
        if any(
            isinstance(p, ParameterSpec) and p.param_in == "path" for p in self.parameters or []
        ):
            responses.setdefault("404", _documented("No such resource"))
        if self.request_body is not None:
            responses.setdefault("413", _documented("The body is larger than 1 MiB"))
        responses.setdefault("503", _documented("The bus or the database is unreachable"))
        if self.request_body is not None:
            responses.setdefault("507", _documented("The bus storage is full: nothing is stored"))
        if self.public:
            self.security = []  # not the document's default bearer requirement
        if not self.public or self.request_body is not None:  # a header or a body credential
            responses.setdefault("401", _documented("No valid credential"))
        if self.guarded:
            responses.setdefault(
                "403", _documented("The caller's role may not do this, or a foreign page asked")
            )
        if self.writes:
            responses.setdefault(
                "409", _documented("The change conflicts with what is stored (an id that exists)")
            )
            responses.setdefault(
                "429", _documented("Too many writes or sign-ins; `Retry-After` says when")
            )
        if isinstance(self.request_body, RequestBody) and any(
            kind == "application/json" for kind in self.request_body.content
        ):
            responses.setdefault("415", _documented("The body is not `application/json`"))
        self.responses = responses


def problem(description: str) -> ResponseSpec:
    """A problem one route answers beyond those every operation documents:
    `@get(..., responses={404: problem("The device is not one of yours")})`."""
    return ResponseSpec(data_container=None, description=description, generate_examples=False)


_ANSWERS = "answers"


def answers(*media_types: str) -> dict[str, tuple[str, ...]]:
    """A route that answers text in one of these media types, not JSON (a streamed export):
    `@get(..., opt=answers("application/x-ndjson", "text/csv"))`."""
    return {_ANSWERS: media_types}


@functools.cache
def _operation_class(
    *, public: bool, guarded: bool, writes: bool, text: tuple[str, ...]
) -> type[ProblemOperation]:
    return type(
        ProblemOperation.__name__,
        (ProblemOperation,),
        {"public": public, "guarded": guarded, "writes": writes, "text": text},
    )


def document_problems(app: Litestar, public: Sequence[str] = ()) -> None:
    """Document every operation's errors as problem details (read when the schema is built).
    `public`: the path patterns the authentication middleware lets through."""
    open_paths = [re.compile(pattern) for pattern in public]
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            is_public = any(pattern.search(route.path) for pattern in open_paths)
            for handler in route.route_handlers:
                writes = not handler.http_methods <= SAFE_METHODS
                handler.operation_class = _operation_class(
                    public=is_public,
                    # A write is refused to a page of a foreign `Origin` (`browser`).
                    guarded=writes or bool(handler.resolve_guards()),
                    writes=writes,
                    text=tuple(handler.opt.get(_ANSWERS, ())),
                )

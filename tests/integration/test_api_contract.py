"""The HTTP API keeps its contract: schemathesis drives every operation of
`/schema/openapi.json`, as an administrator and as a resident; no answer is a 5xx, and every
answer's status code, media type and body are the ones the document gives for that operation.

The app runs in-process on schemathesis's ASGI transport (an event loop in a thread of its
own; the app's lifespan opened once, against the session's NATS and database). The tests are
made at collection from the document the app builds, which is the one the schema route
serves (checked). Left out: `GET /events/stream`, a live stream that never ends (and
`/events/ws`, a WebSocket, is not in the document).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from litestar import Litestar
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.db.models import DeviceState
from libs.principals import Role
from libs.settings import Settings
from services.gateway.app import create_app
from tests.api import api_client, bearer
from tests.helpers import unique_id

SCHEMA_PATH = "/schema/openapi.json"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Where a generated webhook points: loopback, allowed for administrators here, and a port
# nothing listens on, so that no delivery ever leaves this machine.
WEBHOOK_URL = "http://127.0.0.1:9/hook"
# Random cases per operation, beside the examples and the boundary cases of the coverage
# phase: the whole file takes under a minute here. The resident's pass has no coverage phase
# and fewer random cases: what it adds is how the API answers a resident (403 for what it
# may not use, whatever it sends; its own homes only in what it reads), while validating
# parameters and bodies, the same for both, is the administrator's pass's work.
MAX_EXAMPLES = 10
RESIDENT_MAX_EXAMPLES = 3
# A rule's body nests conditions in conditions: the coverage phase makes some ten thousand
# boundary cases of it (a minute per operation); the random cases cover those well.
NESTED_BODIES = ["createRule", "replaceRule", "testRuleBody"]
# What a generated object may do in the tests that come after this module: a rule runs when
# a rules service starts, a subscription is delivered to by a webhooks service.
ACTIVE_OBJECTS = ["/api/v1/rules", "/api/v1/subscriptions"]


@dataclasses.dataclass(frozen=True)
class Seeded:
    """Objects that exist before the run, so that lists and reads answer real data: a home,
    a device in it with integer, float, boolean and string attributes, a rule with
    conditions."""

    home: str
    device_id: str
    rule_id: str


@pytest.fixture(scope="module")
def contract_settings(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings,
        allowed_hosts=(*settings.allowed_hosts, asgi.HOST),
        webhook_allow_nets=("127.0.0.0/8",),
        # Thousands of writes a minute is the point here, not the rate limit.
        writes_per_minute=1_000_000,
    )


@pytest.fixture(scope="module")
async def seeded(
    contract_settings: Settings,
    admin_token: str,
    sessions: async_sessionmaker[AsyncSession],
) -> Seeded:
    home, device_id, rule_id = unique_id("home"), unique_id(), unique_id("rule")
    async with api_client(contract_settings, admin_token) as client:
        created = [
            await client.post(
                "/api/v1/locations", json={"id": home, "name": "Contract", "kind": "home"}
            ),
            await client.post(
                "/api/v1/devices",
                json={"id": device_id, "name": "Lamp", "kind": "light", "location": home},
            ),
            await client.post(
                "/api/v1/rules",
                json={
                    "id": rule_id,
                    "name": "Bright at night",
                    "home": home,
                    "trigger": {
                        "type": "threshold",
                        "device_id": device_id,
                        "attribute": "level",
                        "above": 50,
                    },
                    "conditions": [
                        {
                            "type": "attribute",
                            "device_id": device_id,
                            "attribute": "level",
                            "equals": 80,
                        },
                        {
                            "type": "any",
                            "conditions": [
                                {"type": "time", "after": "22:00", "before": "06:00"},
                                {
                                    "type": "not",
                                    "condition": {
                                        "type": "state",
                                        "device_id": device_id,
                                        "state": "off",
                                    },
                                },
                            ],
                        },
                    ],
                    "actions": [{"type": "command", "device_id": device_id, "action": "turn_off"}],
                },
            ),
        ]
    assert [r.status_code for r in created] == [201, 201, 201], [r.text for r in created]
    async with sessions.begin() as session:
        session.add(
            DeviceState(
                device_id=device_id,
                state="active",
                connection="online",
                attributes={"level": 80, "power_w": 7.5, "on": True, "mode": "warm", "x": None},
                version=3,
                last_seq=1,
            )
        )
    return Seeded(home, device_id, rule_id)


@pytest.fixture(scope="module")
def app(contract_settings: Settings) -> Iterator[Litestar]:
    app = create_app(contract_settings)
    yield app
    asgi.shutdown_lifespans()  # the app's NATS and database connections, before the servers


@pytest.fixture(scope="module")
def leaves_no_active_objects(app: Litestar, admin_token: str) -> Iterator[None]:
    """Removes the rules and subscriptions made from here on (the run's and the seeded)."""
    with asgi.get_client(app) as client:
        client.headers.update(bearer(admin_token))
        before = {path: _ids(client, path) for path in ACTIVE_OBJECTS}
        yield
        for path in ACTIVE_OBJECTS:
            for created in _ids(client, path) - before[path]:
                assert client.delete(f"{path}/{created}").status_code == 204


def _ids(client: asgi.ASGIClient, path: str) -> set[str]:
    ids: set[str] = set()
    query: dict[str, Any] = {"limit": 500}
    while True:
        page = client.get(path, params=query).json()
        ids |= {item["id"] for item in page["items"]}
        if not page["next_cursor"]:
            return ids
        query["cursor"] = page["next_cursor"]


@pytest.fixture(scope="module")
async def resident_token(make_token: Any, seeded: Seeded) -> str:
    return str(await make_token(Role.RESIDENT, [seeded.home]))


def _document() -> dict[str, Any]:
    """The document `/schema/openapi.json` serves, built as the gateway builds it: tests are
    made from it at collection, before the session's servers run
    (`test_the_schema_route_serves_the_document_under_test` keeps the two the same).
    Loading it from a fixture instead (`schemathesis.pytest.from_fixture`) fails on pytest 9.2
    (schemathesis 4.32 sets `Node._nodeid`, which pytest no longer has)."""
    return create_app(Settings(jwt_secret="collection only")).openapi_schema.to_schema()


def _schema(max_examples: int, coverage: bool) -> BaseSchema:
    """Every operation of the document but the endless stream: its examples, `max_examples`
    random cases, and with `coverage` the boundary cases of its parameters and body."""
    return schemathesis.openapi.from_dict(
        DOCUMENT,
        config=schemathesis.Config.from_dict(
            {
                "seed": 11,
                "generation": {
                    "max-examples": max_examples,
                    "deterministic": True,
                    "database": "none",
                },
                "phases": {"stateful": {"enabled": False}, "coverage": {"enabled": coverage}},
                "operations": [
                    {
                        "include-operation-id": NESTED_BODIES,
                        "phases": {"coverage": {"enabled": False}},
                    }
                ],
            }
        ),
    ).exclude(path="/api/v1/events/stream")


DOCUMENT = _document()
schema = _schema(MAX_EXAMPLES, coverage=True)
resident_schema = _schema(RESIDENT_MAX_EXAMPLES, coverage=False)


def loopback_webhooks(context: schemathesis.HookContext, body: Any) -> Any:
    if (
        context.operation is not None
        and context.operation.path == "/api/v1/subscriptions"
        and isinstance(body, dict)
        and isinstance(body.get("url"), str)
    ):
        return {**body, "url": WEBHOOK_URL}
    return body


schema.hook("map_body")(loopback_webhooks)
resident_schema.hook("map_body")(loopback_webhooks)
bounded = settings(deadline=None, suppress_health_check=list(HealthCheck))


@schema.parametrize()
@bounded
@pytest.mark.usefixtures("leaves_no_active_objects", "seeded")
def test_every_operation_keeps_its_contract_for_an_administrator(
    case: schemathesis.Case, app: Litestar, admin_token: str
) -> None:
    case.call_and_validate(app=app, headers=bearer(admin_token), checks=CHECKS)


@resident_schema.parametrize()
@bounded
@pytest.mark.usefixtures("leaves_no_active_objects")
def test_every_operation_keeps_its_contract_for_a_resident(
    case: schemathesis.Case, app: Litestar, resident_token: str
) -> None:
    case.call_and_validate(app=app, headers=bearer(resident_token), checks=CHECKS)


@pytest.mark.parametrize("principal", ["admin", "resident"])
def test_stored_objects_are_read_as_documented(
    principal: str, app: Litestar, admin_token: str, resident_token: str, seeded: Seeded
) -> None:
    token = admin_token if principal == "admin" else resident_token
    reads = [
        ("/api/v1/devices/{device_id}", {"device_id": seeded.device_id}),
        ("/api/v1/rules/{rule_id}", {"rule_id": seeded.rule_id}),
        ("/api/v1/devices", {}),
        ("/api/v1/rules", {}),
    ]
    for path, parameters in reads:
        case = schema[path]["GET"].Case(path_parameters=parameters)
        response = case.call_and_validate(app=app, headers=bearer(token), checks=CHECKS)
        assert response.status_code == 200, (path, response.text)


def test_the_schema_route_serves_the_document_under_test(app: Litestar, admin_token: str) -> None:
    with asgi.get_client(app) as client:
        served = client.get(SCHEMA_PATH, headers=bearer(admin_token))
    assert served.status_code == 200, served.text
    assert served.json() == DOCUMENT


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    for name, component in DOCUMENT["components"]["schemas"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(component)
        except jsonschema.SchemaError as exc:
            raise AssertionError(f"components.schemas.{name}: {exc.message}") from None


def test_no_value_matches_two_branches_of_a_one_of() -> None:
    """`oneOf` holds when exactly one branch matches: an integer is also a `number`, so a
    `oneOf` with both (or twice the same type) refuses the very values it describes."""
    overlapping = [
        (where, types)
        for where, branches in _one_ofs(DOCUMENT, "#")
        if len(types := [b["type"] for b in branches if isinstance(b.get("type"), str)])
        != len(set(types))
        or {"number", "integer"} <= set(types)
    ]
    assert overlapping == []


def _one_ofs(node: Any, where: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    if isinstance(node, dict):
        if isinstance(node.get("oneOf"), list):
            yield where, node["oneOf"]
        for key, value in node.items():
            yield from _one_ofs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _one_ofs(value, f"{where}/{index}")

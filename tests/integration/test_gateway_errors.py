"""Bad input answers a problem details document that says what is wrong; never a 500."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from tests.helpers import unique_id

DEVICES = "/api/v1/devices"
JSON = {"Content-Type": "application/json"}


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status
    assert {"type", "title", "status", "detail", "errors"} <= problem.keys()
    if field is not None:
        assert field in [e["field"] for e in problem["errors"]], problem
    return problem


async def test_malformed_json(client: AsyncTestClient) -> None:
    response = await client.post(DEVICES, content=b'{"name": "x", ', headers=JSON)

    problem = assert_problem(response, 422, "$")
    assert "malformed" in problem["detail"] or "truncated" in problem["detail"]


async def test_a_missing_body(client: AsyncTestClient) -> None:
    assert_problem(await client.post(DEVICES, content=b"", headers=JSON), 422, "$")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "kind": "light", "colour": "red"}, "$.colour"),  # unknown field
        ({"name": 7, "kind": "light"}, "$.name"),  # wrong type
        ({"name": "x", "kind": "light", "metadata": []}, "$.metadata"),  # wrong type
        ({"kind": "light"}, "$.name"),  # missing field
        ({"name": "x", "kind": "no spaces"}, "$.kind"),  # not a token
        ({"name": "x", "kind": "light", "id": "a.b"}, "$.id"),  # not a subject token
        ({"name": "x", "kind": "light", "location": "/home//x"}, "$.location"),
        ({"name": "", "kind": "light"}, "$.name"),
        ([{"name": "x", "kind": "light"}], "$"),
    ],
)
async def test_an_invalid_device_names_the_field(
    client: AsyncTestClient, body: Any, field: str
) -> None:
    assert_problem(await client.post(DEVICES, json=body), 422, field)


async def test_numbers_as_strings_are_wrong_types(client: AsyncTestClient) -> None:
    device_id = unique_id()
    await client.post(DEVICES, json={"id": device_id, "name": "x", "kind": "light"})

    response = await client.post(
        f"{DEVICES}/{device_id}/commands", json={"action": "turn_on", "expires_s": "60"}
    )

    assert_problem(response, 422, "$.expires_s")


@pytest.mark.parametrize("expires_s", [0, -1, 86401])
async def test_a_command_expiry_out_of_range(client: AsyncTestClient, expires_s: float) -> None:
    device_id = unique_id()
    await client.post(DEVICES, json={"id": device_id, "name": "x", "kind": "light"})

    response = await client.post(
        f"{DEVICES}/{device_id}/commands", json={"action": "turn_on", "expires_s": expires_s}
    )

    assert_problem(response, 422, "$.expires_s")


async def test_an_invalid_event_names_the_field_in_its_data(client: AsyncTestClient) -> None:
    event = {
        "id": unique_id("ev"),
        "source": "test",
        "type": "telemetry",
        "subject": unique_id(),
        "specversion": "1.0",
        "data": [1, 2],
    }

    assert_problem(await client.post("/api/v1/events", json=event), 422, "$.data")


async def test_an_oversize_body_is_refused(client: AsyncTestClient) -> None:
    body = b'{"name": "' + b"x" * (1024 * 1024) + b'", "kind": "light"}'

    problem = assert_problem(await client.post(DEVICES, content=body, headers=JSON), 413)

    assert problem["title"] == "Request Entity Too Large"


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        (DEVICES, {"limit": "many"}, "limit"),
        (DEVICES, {"limit": "0"}, "limit"),
        (DEVICES, {"limit": "501"}, "limit"),
        (DEVICES, {"state": "melted"}, "state"),
        (DEVICES, {"cursor": "not-a-cursor"}, "cursor"),
        ("/api/v1/events", {"since_seq": "-1"}, "since_seq"),
        ("/api/v1/events", {"since": "yesterday"}, "since"),
        ("/api/v1/audit", {"limit": "1001"}, "limit"),
    ],
)
async def test_invalid_query_parameters_are_named(
    client: AsyncTestClient, path: str, params: dict[str, str], field: str
) -> None:
    assert_problem(await client.get(path, params=params), 422, field)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/devices/{id}"),
        ("PATCH", "/api/v1/devices/{id}"),
        ("DELETE", "/api/v1/devices/{id}"),
        ("POST", "/api/v1/devices/{id}/connect"),
        ("POST", "/api/v1/devices/{id}/disconnect"),
        ("GET", "/api/v1/devices/{id}/commands/{id}"),
        ("GET", "/api/v1/rules/{id}"),
        ("DELETE", "/api/v1/rules/{id}"),
        ("GET", "/api/v1/nothing-here"),
    ],
)
async def test_unknown_resources_are_not_found(
    client: AsyncTestClient, method: str, path: str
) -> None:
    body = {"json": {}} if method == "PATCH" else {}
    response = await client.request(method, path.format(id=unique_id()), **body)

    assert_problem(response, 404)


async def test_a_wrong_method_is_not_allowed(client: AsyncTestClient) -> None:
    assert_problem(await client.put(DEVICES, json={}), 405)


async def test_every_answer_carries_a_correlation_id(client: AsyncTestClient) -> None:
    given = await client.get(DEVICES, headers={"X-Correlation-Id": "abc-123"})
    made_up = await client.get(f"{DEVICES}/{unique_id()}")
    unusable = await client.get(DEVICES, headers={"X-Correlation-Id": "no spaces allowed"})

    assert given.headers["X-Correlation-Id"] == "abc-123"
    assert made_up.headers["X-Correlation-Id"]
    assert unusable.headers["X-Correlation-Id"] not in ("", "no spaces allowed")

"""Probes, the API reference, metrics, the UI, the audit log, and answers while a dependency
is down (503 with the reason, never 500)."""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import timedelta
from pathlib import Path

import msgspec
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import embedded_nats
from libs import messages as m
from libs.db.models import AuditEntry
from libs.settings import Settings
from services.gateway.app import create_app
from tests.api import api_client, bearer
from tests.helpers import eventually, unique_id

OPERATIONS = {
    ("post", "/api/v1/devices"): "createDevice",
    ("get", "/api/v1/devices"): "listDevices",
    ("get", "/api/v1/devices/{device_id}"): "getDevice",
    ("patch", "/api/v1/devices/{device_id}"): "updateDevice",
    ("delete", "/api/v1/devices/{device_id}"): "deleteDevice",
    ("post", "/api/v1/devices/{device_id}/connect"): "connectDevice",
    ("post", "/api/v1/devices/{device_id}/disconnect"): "disconnectDevice",
    ("post", "/api/v1/devices/{device_id}/commands"): "sendCommand",
    ("get", "/api/v1/devices/{device_id}/commands/{command_id}"): "getCommand",
    ("get", "/api/v1/devices/{device_id}/history"): "getDeviceHistory",
    ("post", "/api/v1/events"): "publishEvents",
    ("get", "/api/v1/events"): "replayEvents",
    ("get", "/api/v1/events/stream"): "streamEvents",
    ("post", "/api/v1/rules"): "createRule",
    ("get", "/api/v1/rules"): "listRules",
    ("get", "/api/v1/rules/{rule_id}"): "getRule",
    ("put", "/api/v1/rules/{rule_id}"): "replaceRule",
    ("delete", "/api/v1/rules/{rule_id}"): "deleteRule",
    ("get", "/api/v1/rules/{rule_id}/runs"): "listRuleRuns",
    ("get", "/api/v1/audit"): "listAudit",
    ("get", "/health/live"): "live",
    ("get", "/health/ready"): "ready",
}


async def test_live_and_ready(client: AsyncTestClient) -> None:
    live = await client.get("/health/live")
    ready = await client.get("/health/ready")

    assert (live.status_code, live.json()) == (200, {"status": "ok"})
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert (checks["bus"], checks["database"]) == ("ok", "ok")


async def test_the_openapi_document_lists_every_route(client: AsyncTestClient) -> None:
    response = await client.get("/schema/openapi.json")

    assert response.status_code == 200
    paths = response.json()["paths"]
    found = {
        (method, path): operation["operationId"]
        for path, item in paths.items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "operationId" in operation
    }
    assert OPERATIONS.items() <= found.items()
    every = [op for item in paths.values() for op in item.values() if isinstance(op, dict)]
    assert all(op.get("operationId") and op.get("summary") for op in every)
    assert len({op["operationId"] for op in every}) == len(every)
    create = paths["/api/v1/devices"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DeviceCreate"
    }
    assert "application/problem+json" in create["responses"]["422"]["content"]


async def test_metrics_answer_in_the_prometheus_format(client: AsyncTestClient) -> None:
    await client.get("/health/live")

    response = await client.get("/metrics")

    assert response.status_code == 200
    assert "smarthome_gateway_requests_total" in response.text


async def test_the_ui_loads_nothing_from_elsewhere(client: AsyncTestClient) -> None:
    page = await client.get("/")
    scripts = [(await client.get(f"/ui/{name}")).text for name in ("app.js", "session.js")]

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    code = "\n".join(scripts)
    assert all(path in code for path in ("/api/v1", "/devices", "/events/stream", "/audit"))
    for text in (page.text, *scripts):
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
        assert not re.search(r"""fetch\(["'`](https?:)?//""", text)


async def test_the_audit_log_is_filtered_and_paged(
    client: AsyncTestClient, sessions: async_sessionmaker[AsyncSession]
) -> None:
    device_id, correlation_id = unique_id(), unique_id("corr")
    start = m.now() - timedelta(minutes=1)
    first_seq = uuid.uuid4().int % 10**12  # unique, as the recorder's stream sequences are
    async with sessions.begin() as session:  # what the recorder writes
        for i, action in enumerate(["device.created", "command.sent", "command.done"]):
            session.add(
                AuditEntry(
                    time=start + timedelta(seconds=i),
                    actor="user:anonymous",
                    action=action,
                    device_id=device_id,
                    result="ok",
                    correlation_id=correlation_id if i else unique_id("corr"),
                    detail={"i": i},
                    stream="TEST",
                    source_seq=first_seq + i,
                )
            )

    by_device = await client.get("/api/v1/audit", params={"device_id": device_id, "limit": "2"})
    rest = await client.get(
        "/api/v1/audit",
        params={"device_id": device_id, "limit": "2", "cursor": by_device.json()["next_cursor"]},
    )
    by_correlation = await client.get("/api/v1/audit", params={"correlation_id": correlation_id})
    since = await client.get(
        "/api/v1/audit",
        params={"device_id": device_id, "since": (start + timedelta(seconds=2)).isoformat()},
    )

    actions = [e["action"] for e in by_device.json()["items"] + rest.json()["items"]]
    assert actions == ["device.created", "command.sent", "command.done"]
    assert [e["action"] for e in by_correlation.json()["items"]] == ["command.sent", "command.done"]
    assert [e["action"] for e in since.json()["items"]] == ["command.done"]


async def test_an_unreachable_database_answers_503_with_the_reason_and_ingest_stays_ready(
    settings: Settings, tmp_path: Path, admin_token: str
) -> None:
    missing = f"sqlite+aiosqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'smarthome.db'}"

    async with api_client(
        dataclasses.replace(settings, database_url=missing), admin_token
    ) as client:
        ready = await client.get("/health/ready")
        listing = await client.get("/api/v1/devices")
        creating = await client.post("/api/v1/devices", json={"name": "x", "kind": "light"})

    # Publishing needs only the bus: the gateway stays in service, and says what is degraded.
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "degraded"
    assert ready.json()["checks"]["bus"] == "ok"
    assert "the database is unreachable" in ready.json()["degraded"][0]
    for response in (listing, creating):
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "database" in response.json()["detail"]
        assert response.headers["Retry-After"]


async def test_an_unreachable_bus_answers_503_and_reads_go_on(
    settings: Settings, tmp_path: Path, admin_token: str
) -> None:
    port = embedded_nats.free_port()
    server = embedded_nats.start(tmp_path / "nats", port, tmp_path / "nats.log")
    try:
        embedded_nats.wait_for_port("127.0.0.1", port)
        app = create_app(dataclasses.replace(settings, nats_url=f"nats://127.0.0.1:{port}"))
        async with AsyncTestClient(app) as client:
            client.headers.update(bearer(admin_token))
            assert (await client.get("/health/ready")).status_code == 200

            server.terminate()
            server.wait(10)

            async def not_ready() -> bool:
                return (await client.get("/health/ready")).status_code == 503

            await eventually(not_ready)
            ready = await client.get("/health/ready")
            creating = await client.post("/api/v1/devices", json={"name": "x", "kind": "light"})
            event = m.make_event(unique_id(), "telemetry", {"power_w": 1.0})
            publishing = await client.post("/api/v1/events", json=msgspec.to_builtins(event))
            listing = await client.get("/api/v1/devices", params={"limit": "1"})
    finally:
        server.kill()
        server.wait(10)

    assert "bus" in ready.json()["detail"]
    assert creating.status_code == 503
    assert "event bus" in creating.json()["detail"]
    assert publishing.status_code == 503
    assert listing.status_code == 200  # the registry is still readable

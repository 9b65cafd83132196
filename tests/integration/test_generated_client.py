"""A client generated from the served OpenAPI document works against a real gateway.

`openapi-python-client` builds a typed Python package from `/schema/openapi.json` (any
warning about the document fails the test); that package, and nothing else, registers a
device, publishes what the device reports, sends it a command, reads its state (applied by
the actors, a separate process) and a rule with nested conditions, each answer parsed into
the generated models. The gateway runs under uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn

from libs import embedded_nats
from libs.settings import Settings
from services.gateway.app import create_app
from tests.api import bearer
from tests.helpers import eventually, unique_id
from tests.processes import Service

PACKAGE = "smarthome_generated_client"
GENERATOR_CONFIG = {
    "package_name_override": PACKAGE,
    "post_hooks": [],  # formatting the generated code is not what is tested
}
GENERATION_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def actors(service_env: dict[str, str], data_dir: Path, gateway_url: str) -> Iterator[Service]:
    """The actors, once the gateway has provisioned their streams."""
    service = Service("services.actors", service_env, data_dir).start()
    yield service
    assert service.stop() == 0, service.tail()


@pytest.fixture(scope="module")
async def gateway_url(settings: Settings) -> AsyncIterator[str]:
    port = embedded_nats.free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False
        )
    )
    serving = asyncio.create_task(server.serve())
    await eventually(lambda: server.started)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await serving


@pytest.fixture(scope="module")
async def generated(
    gateway_url: str, admin_token: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ModuleType]:
    """The package generated from the served document, imported."""
    where = tmp_path_factory.mktemp("generated_client")
    async with httpx.AsyncClient(base_url=gateway_url, headers=bearer(admin_token)) as http:
        served = await http.get("/schema/openapi.json")
    assert served.status_code == 200, served.text
    (where / "openapi.json").write_bytes(served.content)
    (where / "config.json").write_text(json.dumps(GENERATOR_CONFIG))
    generator = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "openapi_python_client",
        "generate",
        "--path",
        str(where / "openapi.json"),
        "--config",
        str(where / "config.json"),
        "--meta",
        "none",
        "--output-path",
        str(where / PACKAGE),
        "--fail-on-warning",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(generator.communicate(), GENERATION_TIMEOUT_S)
    report = output.decode()
    assert generator.returncode == 0, report
    assert "warning" not in report.lower(), report
    sys.path.insert(0, str(where))
    try:
        importlib.import_module(f"{PACKAGE}.models")  # `package.models`, as the tests use it
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(where))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def _api(package: ModuleType, module: str) -> Any:
    return importlib.import_module(f"{package.__name__}.api.{module}")


@pytest.mark.usefixtures("actors")
async def test_a_generated_client_registers_commands_and_reads_a_device(
    generated: ModuleType, gateway_url: str, admin_token: str
) -> None:
    models = generated.models
    create_device = _api(generated, "devices.create_device")
    get_device = _api(generated, "devices.get_device")
    send_command = _api(generated, "devices.send_command")
    get_command = _api(generated, "devices.get_command")
    publish_events = _api(generated, "events.publish_events")
    device_id = unique_id()

    async with generated.AuthenticatedClient(base_url=gateway_url, token=admin_token) as client:
        device = await create_device.asyncio(
            client=client, body=models.DeviceCreate(id=device_id, name="Lamp", kind="light")
        )
        assert isinstance(device, models.Device), device
        assert (device.id, device.lifecycle) == (device_id, models.DeviceLifecycle.ACTIVE)

        published = await publish_events.asyncio(
            client=client,
            body=models.CloudEvent(
                id=unique_id("event"),
                source=f"device/{device_id}",
                type_="telemetry",
                subject=device_id,
                specversion="1.0",
                data=models.CloudEventDataType0.from_dict(
                    {"on": True, "power_w": 7.5, "level": 80, "mode": "warm"}
                ),
            ),
        )
        assert isinstance(published, models.Published), published
        assert published.seq > 0

        command = await send_command.asyncio(
            device_id,
            client=client,
            body=models.CommandCreate(
                action="set_brightness",
                params=models.CommandCreateParams.from_dict({"level": 80}),
            ),
        )
        assert isinstance(command, models.CommandView), command
        assert (command.device_id, command.action) == (device_id, "set_brightness")
        assert command.params["level"] == 80
        followed = await get_command.asyncio(device_id, command.id, client=client)
        assert isinstance(followed, models.CommandView), followed
        assert followed.id == command.id
        assert isinstance(followed.status, models.CommandViewStatus)

        async def reported() -> Any:
            read = await get_device.asyncio(device_id, client=client)
            assert isinstance(read, models.Device), read
            return read if "power_w" in read.attributes else None

        state = await eventually(reported)
        assert state.attributes.to_dict() == {
            "on": True,
            "power_w": 7.5,
            "level": 80,
            "mode": "warm",
        }
        assert type(state.attributes["level"]) is int
        assert type(state.attributes["power_w"]) is float
        assert isinstance(state.state, models.DeviceState)
        assert state.version >= 1
        assert state.last_seen is not None

        missing = await get_device.asyncio_detailed(unique_id("missing"), client=client)
        assert missing.status_code == 404
        assert isinstance(missing.parsed, models.Problem), missing.content
        assert missing.parsed.status == 404


async def test_a_generated_client_reads_a_rule_as_it_was_written(
    generated: ModuleType, gateway_url: str, admin_token: str
) -> None:
    models = generated.models
    create_device = _api(generated, "devices.create_device")
    create_rule = _api(generated, "rules.create_rule")
    get_rule = _api(generated, "rules.get_rule")
    delete_rule = _api(generated, "rules.delete_rule")
    device_id, rule_id = unique_id(), unique_id("rule")
    written = {
        "id": rule_id,
        "name": "Bright at night",
        "enabled": False,  # never run by a rules service a later test starts
        "trigger": {"type": "threshold", "device_id": device_id, "attribute": "level", "above": 50},
        "conditions": [
            {"type": "attribute", "device_id": device_id, "attribute": "level", "equals": 80},
            {
                "type": "any",
                "conditions": [
                    {"type": "time", "after": "22:00", "before": "06:00"},
                    {
                        "type": "not",
                        "condition": {"type": "state", "device_id": device_id, "state": "off"},
                    },
                ],
            },
        ],
        "actions": [{"type": "command", "device_id": device_id, "action": "turn_off"}],
    }

    async with generated.AuthenticatedClient(base_url=gateway_url, token=admin_token) as client:
        device = await create_device.asyncio(
            client=client, body=models.DeviceCreate(id=device_id, name="Lamp", kind="light")
        )
        assert isinstance(device, models.Device), device
        created = await create_rule.asyncio(client=client, body=models.RuleSpec.from_dict(written))
        assert isinstance(created, models.RuleView), created
        try:
            read = await get_rule.asyncio(rule_id, client=client)
            assert isinstance(read, models.RuleView), read
            equals, either = read.conditions
            assert isinstance(equals, models.AttributeCondition)
            assert equals.equals == 80
            assert isinstance(either, models.AnyOf)
            assert [type(c) for c in either.conditions] == [models.TimeCondition, models.Not]
            assert isinstance(either.conditions[1].condition, models.StateCondition)
            assert isinstance(read.trigger, models.ThresholdTrigger)
            assert (read.trigger.device_id, read.trigger.above) == (device_id, 50)
            assert isinstance(read.actions[0], models.CommandAction)
            assert (read.id, read.enabled, read.version) == (rule_id, False, 1)
        finally:
            deleted = await delete_rule.asyncio_detailed(rule_id, client=client)
            assert deleted.status_code == 204, deleted.content

"""The simulator as a user runs it: its devices register, report and answer commands through
the public protocols, and a run with `--duration` ends by itself with a summary."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from functools import partial

from libs import commands
from libs.db.models import CommandRecord
from libs.settings import Settings
from services.gateway.app import create_app
from tests.helpers import eventually, unique_id
from tests.integration.test_actors import states
from tests.integration.test_gateway_ws import serving
from tests.processes import Service

COUNT = 9  # three of each kind


async def test_a_fleet_registers_reports_answers_and_stops_by_itself(
    settings: Settings, service_env, data_dir, js, sessions, admin_token
) -> None:  # type: ignore[no-untyped-def]
    prefix = unique_id("sim")
    ids = [f"{prefix}-{n}" for n in range(COUNT)]
    actors = Service("services.actors", service_env, data_dir).start()
    busauth = Service("services.busauth", service_env, data_dir).start()
    try:
        async with serving(create_app(settings), admin_token) as gateway:
            simulator = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "devices.simulator",
                "--count", str(COUNT), "--prefix", prefix, "--interval", "0.3",
                "--duration", "8", "--api-url", str(gateway.http.base_url),
                "--nats-url", settings.effective_nats_url,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "SMARTHOME_API_TOKEN": admin_token},
            )  # fmt: skip
            running = partial(_running, simulator)
            reporting = await eventually(
                lambda: running() and _all_reporting(sessions, ids), timeout=20
            )
            light = next(i for i in ids if reporting[i].attributes.get("on") is True)
            command = commands.new(
                device_id=light, action="turn_off", params={}, expires_s=30,
                issued_by="user:test", correlation_id=unique_id("corr"),
            )  # fmt: skip
            await commands.send(sessions, js, command)
            await eventually(lambda: _status(sessions, command.id, "done"), timeout=15)
            off = await eventually(lambda: _light_off(sessions, light), timeout=15)
            out, err = await asyncio.wait_for(simulator.communicate(), timeout=30)
        final = await states(sessions, ids)
    finally:
        actors.stop()
        busauth.stop()
    assert simulator.returncode == 0, err.decode()[-2000:]
    text = out.decode()
    assert f"{COUNT} devices (3 energy_meter, 3 light, 3 sensor)" in text, text
    acked = int(re.search(r"events acknowledged: (\d+)", text).group(1))  # type: ignore[union-attr]
    assert acked >= 3 * COUNT  # hello, readings, goodbye
    assert "not acknowledged: 0" in text
    assert "commands answered: 1; turn_off 1" in text
    assert off.attributes["power_w"] == 0.0
    assert {s.connection for s in final.values()} == {"offline"}  # each said goodbye


def _running(simulator: asyncio.subprocess.Process) -> bool:
    assert simulator.returncode is None, f"the simulator exited {simulator.returncode}"
    return True


async def _all_reporting(sessions, ids: list[str]):  # type: ignore[no-untyped-def]
    found = await states(sessions, ids)
    versions = {i: found[i].version if i in found else 0 for i in ids}
    # A light's readings repeat (no new version); a sensor's or a meter's move.
    wanted = {i: 1 if n % 3 == 1 else 3 for n, i in enumerate(ids)}
    assert all(versions[i] >= wanted[i] for i in ids), versions
    return found


async def _status(sessions, command_id: str, wanted: str) -> bool:  # type: ignore[no-untyped-def]
    async with sessions() as session:
        record = await session.get(CommandRecord, command_id)
    assert record is not None and record.status == wanted, record and record.status
    return True


async def _light_off(sessions, device_id: str):  # type: ignore[no-untyped-def]
    state = (await states(sessions, [device_id]))[device_id]
    return state if state.attributes.get("on") is False else None

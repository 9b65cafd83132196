"""DESIGN.md's guarantees under outages: with the database down, ingest buffers on the bus and
catches up; a bus killed with -9 and restarted keeps every acknowledged event."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from libs import bus, subjects
from libs import messages as m
from libs.db.engine import make_engine, make_sessionmaker
from libs.db.migrate import upgrade
from libs.db.models import CommandRecord, Device
from libs.settings import async_database_url
from tests.helpers import eventually, unique_id
from tests.integration.test_actors import states
from tests.integration.test_actors_resilience import quiet_env
from tests.integration.test_rules import add_devices, add_rule, collected, report, rule_spec
from tests.outage import PrivateNats, PrivatePostgres, postgres_bin
from tests.processes import Service

PER_DEVICE = 50


async def publish(js, devices: list[str], first: int, count: int) -> None:  # type: ignore[no-untyped-def]
    """Publish until every event is acknowledged (a bus just restarted may refuse at first)."""
    events = [
        m.make_event(d, "telemetry", {"n": n}) for n in range(first, first + count) for d in devices
    ]
    batch = [(e.nats_subject, e, e.id) for e in events]

    async def acknowledged() -> bool:
        try:
            await bus.publish_many(js, batch, timeout=5)
            return True
        except Exception:
            return False

    await eventually(acknowledged, timeout=30, interval=0.5)


async def all_at(sessions, devices: list[str], n: int) -> bool:  # type: ignore[no-untyped-def]
    try:
        found = await states(sessions, devices)
    except Exception as exc:
        raise AssertionError(f"database not answering: {exc!r}") from None
    versions = {d: found[d].version if d in found else None for d in devices}
    assert all(v == n for v in versions.values()), versions
    return True


@dataclass
class PrivateDatabase:
    """A private Postgres, migrated, that a test may stop and start."""

    pg: PrivatePostgres
    sessions: async_sessionmaker

    def env(self, service_env: dict[str, str]) -> dict[str, str]:
        env = {**quiet_env(service_env), "DATABASE_URL": self.pg.url}
        env.pop("REDIS_URL", None)  # the database is the only store: nothing may hide the outage
        return env


@pytest.fixture
async def private_db():  # type: ignore[no-untyped-def]
    pg = PrivatePostgres()
    pg.start()
    await asyncio.to_thread(upgrade, async_database_url(pg.url))
    engine = make_engine(async_database_url(pg.url))
    yield PrivateDatabase(pg, make_sessionmaker(engine))
    await engine.dispose()
    pg.remove()


@pytest.mark.skipif(postgres_bin() is None, reason="needs PostgreSQL server binaries to stop one")
async def test_database_outage_buffers_on_the_bus_and_catches_up(
    tmp_path: Path, private_db, service_env, js
) -> None:  # type: ignore[no-untyped-def]
    pg, sessions = private_db.pg, private_db.sessions
    devices = [unique_id("pgdown") for _ in range(5)]
    async with sessions.begin() as session:
        session.add_all([Device(id=d, name=d, kind="sensor") for d in devices])
    actors = Service("services.actors", private_db.env(service_env), tmp_path).start()
    try:
        await publish(js, devices, 0, PER_DEVICE)
        await eventually(lambda: all_at(sessions, devices, PER_DEVICE), timeout=30)
        pg.stop()
        await publish(js, devices, PER_DEVICE, PER_DEVICE)  # acknowledged by the bus
        await eventually(lambda: "state write failed, retrying" in actors.log(), timeout=20)
        pg.start()
        await eventually(lambda: all_at(sessions, devices, 2 * PER_DEVICE), timeout=60)
        final = await states(sessions, devices)
    finally:
        code = actors.stop()
    assert code == 0, actors.tail()
    assert all(s.attributes == {"n": 2 * PER_DEVICE - 1} for s in final.values())


async def test_bus_killed_and_restarted_keeps_acknowledged_events(
    tmp_path: Path, service_env, sessions
) -> None:  # type: ignore[no-untyped-def]
    nats_server = PrivateNats(tmp_path / "nats")
    nats_server.start()
    nc = await bus.connect(nats_server.url, "outage-test")
    js = nc.jetstream()
    await bus.ensure_streams(js)
    devices = [unique_id("busdown") for _ in range(5)]
    async with sessions.begin() as session:
        session.add_all([Device(id=d, name=d, kind="sensor") for d in devices])
    actors = Service(
        "services.actors", {**quiet_env(service_env), "NATS_URL": nats_server.url}, tmp_path
    ).start()
    try:
        await publish(js, devices, 0, PER_DEVICE)
        nats_server.kill9()  # acked = in the files (page cache): kept at any sync_interval
        nats_server.start()
        await eventually(lambda: nc.is_connected, timeout=20)
        await publish(js, devices, PER_DEVICE, PER_DEVICE)
        await eventually(lambda: all_at(sessions, devices, 2 * PER_DEVICE), timeout=60)
        final = await states(sessions, devices)
    finally:
        code = actors.stop()
        await nc.close()
        if nats_server.proc:
            nats_server.proc.terminate()
            nats_server.proc.wait(10)
    assert code == 0, actors.tail()
    assert all(s.attributes == {"n": 2 * PER_DEVICE - 1} for s in final.values())


@pytest.mark.skipif(postgres_bin() is None, reason="needs PostgreSQL server binaries to stop one")
async def test_a_rules_command_sent_while_the_database_is_down_is_recorded_when_it_is_back(
    tmp_path: Path, private_db, service_env, js, nc
) -> None:  # type: ignore[no-untyped-def]
    pg, sessions = private_db.pg, private_db.sessions
    meter, light = unique_id("meter"), unique_id("light")
    await add_devices(sessions, meter, light)
    rule_id = await add_rule(sessions, nc, rule_spec(meter, light, for_s=0))
    env = private_db.env(service_env)
    rules = Service("services.rules", env, tmp_path).start()
    recorder = Service("services.recorder", env, tmp_path).start()
    try:
        await eventually(lambda: "loaded" in rules.log(), timeout=15)
        pg.stop()
        await report(js, meter, 60.0, 1)
        [fired] = await eventually(
            lambda: collected(js, subjects.rule_fired(rule_id), m.rule_fired_decoder), timeout=30
        )
        sent = await collected(js, subjects.commands(light), m.command_decoder)
        pg.start()
        record = await eventually(lambda: _command_row(sessions, sent[0].id), timeout=60)
    finally:
        rules.stop()
        recorder.stop()
    command = fired.outcomes[0]
    assert command.ok and command.command_id == sent[0].id
    assert "recorded later from the bus" in (command.detail or "")
    assert (record.action, record.issued_by, record.correlation_id) == (
        "turn_off",
        f"rule:{rule_id}",
        fired.correlation_id,
    )


async def _command_row(sessions, command_id: str) -> CommandRecord | None:  # type: ignore[no-untyped-def]
    try:
        async with sessions() as session:
            return await session.get(CommandRecord, command_id)
    except Exception as exc:
        raise AssertionError(f"database not answering yet: {exc!r}") from None

"""A dry run of a home's rule replays a device moved there from another home from the move on:
what the rule saw of it live, never what it recorded in its previous home, whoever runs the
dry run; a rule of no home (an administrator's) replays all of it.

The history and audit rows are written as the recorder writes them, around the move's time
(`home_since`) read from the database.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs import subjects
from libs.db.models import AuditEntry
from libs.db.models import Device as DeviceRow
from tests.helpers import unique_id
from tests.integration import test_moved_device_privacy
from tests.integration.test_gateway_rules_dryrun import at, record, window
from tests.integration.test_moved_device_privacy import Homes

RULES = "/api/v1/rules"
DEVICES = "/api/v1/devices"
Headers = dict[str, str]
MINUTE = timedelta(minutes=1)


homes = test_moved_device_privacy.homes  # the two homes and a resident of each


async def moved_lamp(
    client: AsyncTestClient, homes: Homes, sessions: async_sessionmaker[AsyncSession]
) -> tuple[str, datetime]:
    """A lamp registered in home A and moved to home B: (its id, when it came to B)."""
    lamp = unique_id("lamp")
    body = {"id": lamp, "name": "Lamp", "kind": "light", "location": f"{homes.a}/living"}
    assert (await client.post(DEVICES, json=body)).status_code == 201
    moved = await client.patch(f"{DEVICES}/{lamp}", json={"location": f"{homes.b}/hall"})
    assert moved.status_code == 200, moved.text
    async with sessions() as session:
        row = await session.get(DeviceRow, lamp)
    assert row is not None and row.home_since is not None
    return lamp, row.home_since


async def stored_rule(
    client: AsyncTestClient, headers: Headers | None, spec: dict[str, Any]
) -> str:
    created = await client.post(RULES, json=spec, headers=headers)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def dry_run(
    client: AsyncTestClient, rule_id: str, since: datetime, headers: Headers | None = None
) -> dict[str, Any]:
    answer = await client.post(
        f"{RULES}/{rule_id}/test", json=window(since, m.now() + MINUTE), headers=headers
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def pressed_rule(lamp: str, home: str | None = None) -> dict[str, Any]:
    """Fires on each of the lamp's recorded `telemetry` events."""
    return {
        "id": unique_id("rule"),
        "name": "Lamp reports",
        "trigger": {"type": "event", "subject": subjects.device_events(lamp, "telemetry")},
        "actions": [{"type": "notify", "message": "the lamp reported"}],
    } | ({} if home is None else {"home": home})


async def test_a_homes_rule_replays_a_moved_device_from_its_move_on(
    client: AsyncTestClient, homes: Homes, sessions: async_sessionmaker[AsyncSession]
) -> None:
    lamp, moved_in = await moved_lamp(client, homes, sessions)
    in_a = [moved_in - 5 * MINUTE, moved_in - 4 * MINUTE]
    in_b = [moved_in, m.now()]  # from the move (inclusive) to now: the past, as history is
    await record(sessions, lamp, [(t, {"power_w": 5.0}) for t in in_a + in_b])
    rule_b = await stored_rule(client, homes.resident_b, pressed_rule(lamp))
    everywhere = await stored_rule(client, None, pressed_rule(lamp))  # an admin's, no home's
    since = moved_in - 10 * MINUTE

    by_resident = await dry_run(client, rule_b, since, homes.resident_b)
    by_admin = await dry_run(client, rule_b, since)
    of_no_home = await dry_run(client, everywhere, since)

    assert [at(f["at"]) for f in by_resident["firings"]] == in_b
    assert by_resident["evaluated_rows"] == len(in_b)
    # What the rule would have seen is the same whoever asks.
    assert [at(f["at"]) for f in by_admin["firings"]] == in_b
    assert [at(f["at"]) for f in of_no_home["firings"]] == in_a + in_b


async def test_a_heartbeat_timeout_in_the_old_home_does_not_take_the_device_offline(
    client: AsyncTestClient, homes: Homes, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """Heartbeat timeouts come from the audit log: home A's is not replayed for B's rule."""
    lamp, moved_in = await moved_lamp(client, homes, sessions)
    went_silent = moved_in - 9 * MINUTE
    await record(sessions, lamp, [(moved_in - 10 * MINUTE, {})], event_type="hello")
    await record(sessions, lamp, [(moved_in, {})], event_type="hello")
    async with sessions.begin() as session:
        session.add(
            AuditEntry(
                time=went_silent,
                actor="platform:actors",
                action="state.changed",
                device_id=lamp,
                result="active->active (offline)",
                detail={"version": 2, "changed": ["connection"], "cause": "presence_timeout"},
                stream="SYSTEM",
                source_seq=uuid.uuid4().int % 10**12,
            )
        )
    spec = {
        "id": unique_id("rule"),
        "name": "Lamp offline",
        "trigger": {
            "type": "state",
            "device_id": lamp,
            "attribute": "connection",
            "to": "offline",
            "for": "1m",
        },
        "actions": [{"type": "notify", "message": "the lamp is offline"}],
    }
    rule_b = await stored_rule(client, homes.resident_b, spec)
    everywhere = await stored_rule(client, None, spec | {"id": unique_id("rule")})
    since = moved_in - 15 * MINUTE

    in_b = await dry_run(client, rule_b, since, homes.resident_b)
    of_no_home = await dry_run(client, everywhere, since)

    assert (in_b["firings"], in_b["evaluated_rows"]) == ([], 1)  # B's hello only
    assert [at(f["at"]) for f in of_no_home["firings"]] == [went_silent + MINUTE]
    assert of_no_home["evaluated_rows"] == 3

"""A device moved to another home starts afresh there: the gateway publishes its `moved`
event with the move, the actors apply it in order with the device's readings, and its state
(the facts on `system.device.<id>.state` that the new home's rules, live feeds and webhooks
read, and the device view, an administrator's included) keeps nothing it reported in the old
home; what it reports in the new one shows as ever.

The gateway runs in-process; the actors run as a process and apply the events from the bus,
as they do in production. The homes and steps are `test_moved_device_privacy`'s and
`test_moved_device_state`'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from libs import bus, subjects
from libs import messages as m
from tests.helpers import eventually
from tests.integration import test_actors, test_moved_device_privacy
from tests.integration.test_moved_device_privacy import Homes, move, register, report
from tests.integration.test_moved_device_state import applied, switch, viewed

homes = test_moved_device_privacy.homes
actors = test_actors.actors
APPLIED_S = 15.0  # the actors' batches, on a busy machine


class StateFacts:
    """The state facts of one device, as the bus carries them to rules, feeds and webhooks."""

    def __init__(self) -> None:
        self.seen: list[m.DeviceStateFact] = []

    async def on_fact(self, msg: Msg) -> None:
        self.seen.append(m.state_fact_decoder.decode(msg.data))

    def first_after(self, count: int) -> m.DeviceStateFact:
        """The first fact after the first `count` that a presence timeout did not cause (the
        tests' heartbeat timeout is 2s: the lamp may be found silent before it moves)."""
        later = [f for f in self.seen[count:] if f.cause_type != "presence_timeout"]
        assert later, f"no fact after the first {count} but presence timeouts"
        return later[0]


@pytest.fixture
async def lamp_in_a(client: AsyncTestClient, homes: Homes, actors: Any) -> str:
    """A lamp of home A that is on and drew 1 W there, applied by the actors."""
    lamp = await register(client, f"{homes.a}/living")
    await switch(client, lamp, True)
    await report(client, lamp, 1.0)
    await applied(client, lamp, {"on": True, "power_w": 1.0})
    return lamp


@pytest.fixture
async def facts(nc: NATS, lamp_in_a: str) -> AsyncIterator[StateFacts]:
    found = StateFacts()
    subscription = await nc.subscribe(subjects.device_state(lamp_in_a), cb=found.on_fact)
    await nc.flush()  # subscribed at the server before the move
    yield found
    await subscription.unsubscribe()


async def test_a_moved_device_starts_afresh_in_its_new_home(
    client: AsyncTestClient, homes: Homes, lamp_in_a: str, facts: StateFacts, nc: NATS
) -> None:
    lamp = lamp_in_a
    before_move = len(facts.seen)

    await move(client, lamp, f"{homes.b}/hall")

    moved = await eventually(lambda: facts.first_after(before_move), timeout=APPLIED_S)
    assert (moved.cause_type, moved.attributes, moved.stale) == (m.MOVED, {}, [])
    # Its event was published with its own id as the bus's message id, as a device's are.
    stored = subjects.stored_filter(subjects.device_events(lamp, m.MOVED))
    event = await nc.jetstream().get_last_msg(subjects.EVENTS_STREAM, stored)
    assert event.headers is not None
    assert event.headers[bus.MSG_ID] == moved.cause_event_id
    after_move = facts.seen.index(moved) + 1
    device = await applied(client, lamp, {})
    assert device["reports"] == {}

    await report(client, lamp, 2.0)

    reading = await eventually(lambda: facts.first_after(after_move), timeout=APPLIED_S)
    assert (reading.cause_type, reading.attributes) == ("telemetry", {"power_w": 2.0})
    device = await applied(client, lamp, {"power_w": 2.0})
    assert sorted(device["reports"]) == ["power_w"]
    in_b = await viewed(client, lamp, homes.resident_b)
    assert in_b["attributes"] == {"power_w": 2.0}

"""The transactional outbox (libs/outbox.py): a fact is out once after its change commits, never
for a change that rolled back, whatever dies between the steps."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from nats.js import JetStreamContext
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs import messages as m
from libs import outbox, subjects
from libs.db.models import OutboxMessage
from tests.helpers import eventually, unique_id
from tests.integration.test_rules import collected


def fact(item_id: str) -> m.ChangeFact:
    return m.ChangeFact(
        what="location", id=item_id, change="created", actor="tests", correlation_id="c-1",
        time=m.now(), detail={}, home=None,
    )  # fmt: skip


async def committed(sessions: async_sessionmaker[AsyncSession], subject: str) -> str:
    async with sessions.begin() as session:
        return outbox.add(session, subject, fact(subject))


async def stored(js: JetStreamContext, subject: str) -> list[m.ChangeFact]:
    return await collected(js, subject, m.change_fact_decoder)


async def row(sessions: async_sessionmaker[AsyncSession], outbox_id: str) -> OutboxMessage | None:
    async with sessions() as session:
        return await session.scalar(select(OutboxMessage).where(OutboxMessage.id == outbox_id))


class KilledAfterPublishing:
    """A JetStream context whose relay dies right after the bus stored its message, before
    it could mark the row sent."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def publish(self, subject: str, payload: bytes, **kwargs: Any) -> Any:
        await self._js.publish(subject, payload, **kwargs)
        raise ConnectionError("killed between publish and mark")


async def test_a_fact_left_by_a_relay_killed_before_publishing_is_published_by_the_next(
    sessions: async_sessionmaker[AsyncSession], js: JetStreamContext
) -> None:
    subject = subjects.location_changed(unique_id("outbox"))
    outbox_id = await committed(sessions, subject)  # committed; no relay got to it

    published = await outbox.Relay(sessions, js).relay_once()

    assert published is not None and published >= 1
    assert [f.id for f in await stored(js, subject)] == [subject]
    sent = await row(sessions, outbox_id)
    assert sent is not None and sent.sent_at is not None


async def test_a_relay_killed_between_publish_and_mark_resends_and_the_bus_keeps_one(
    sessions: async_sessionmaker[AsyncSession], js: JetStreamContext
) -> None:
    subject = subjects.location_changed(unique_id("outbox"))
    outbox_id = await committed(sessions, subject)

    with pytest.raises(ConnectionError):
        await outbox.Relay(sessions, KilledAfterPublishing(js)).relay_once()  # type: ignore[arg-type]  # only publish is used
    left = await row(sessions, outbox_id)
    await outbox.Relay(sessions, js).relay_once()

    assert left is not None and left.sent_at is None
    assert len(await stored(js, subject)) == 1  # the resend had the same Nats-Msg-Id
    sent = await row(sessions, outbox_id)
    assert sent is not None and sent.sent_at is not None


async def test_a_resent_row_is_stored_once(
    sessions: async_sessionmaker[AsyncSession], js: JetStreamContext
) -> None:
    subject = subjects.location_changed(unique_id("outbox"))
    outbox_id = await committed(sessions, subject)
    relay = outbox.Relay(sessions, js)
    await relay.relay_once()

    async with sessions.begin() as session:  # as if the mark had not committed
        await session.execute(
            update(OutboxMessage).where(OutboxMessage.id == outbox_id).values(sent_at=None)
        )
    resent = await relay.relay_once()

    assert resent is not None and resent >= 1
    assert len(await stored(js, subject)) == 1


async def test_a_rolled_back_change_publishes_nothing(
    sessions: async_sessionmaker[AsyncSession], js: JetStreamContext
) -> None:
    subject = subjects.location_changed(unique_id("outbox"))
    relay = outbox.Relay(sessions, js, poll_s=0.05)
    unwatch = relay.watch()
    running = asyncio.create_task(relay.run())
    try:
        with pytest.raises(RuntimeError):
            async with sessions.begin() as session:
                outbox_id = outbox.add(session, subject, fact(subject))
                await session.flush()
                raise RuntimeError("the change failed after its fact was written")
        marker = subjects.location_changed(unique_id("outbox-after"))
        await committed(sessions, marker)  # published after anything committed before it
        await eventually(lambda: stored(js, marker), timeout=5)
    finally:
        await relay.stop(running)
        unwatch()

    assert await row(sessions, outbox_id) is None
    assert await stored(js, subject) == []


async def test_a_commit_wakes_the_relay_at_once(
    sessions: async_sessionmaker[AsyncSession], js: JetStreamContext
) -> None:
    relay = outbox.Relay(sessions, js, poll_s=60.0)  # only the wake can publish in time
    unwatch = relay.watch()
    running = asyncio.create_task(relay.run())
    latencies = []
    try:
        for _ in range(20):
            subject = subjects.location_changed(unique_id("outbox"))
            started = time.perf_counter()
            await committed(sessions, subject)
            await eventually(lambda: stored(js, subject), timeout=2, interval=0.001)  # noqa: B023
            latencies.append(time.perf_counter() - started)
    finally:
        await relay.stop(running)
        unwatch()

    latencies.sort()
    print(
        f"commit to stored: median {latencies[10] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    )
    assert latencies[-1] < 1.0

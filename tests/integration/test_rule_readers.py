"""A rules partition's consumers read only what its rules need: nothing at all while no rule
needs it, a device's facts once a rule names it, and the bus delivers it nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from libs import subjects
from libs.consumer import Handler, Item, Verdict
from services.rules.readers import Reader
from tests.helpers import eventually, unique_id


def facts_reader(nc: NATS, durable: str, handle: Handler[str]) -> Reader[str]:
    """A reader of state facts as a rules partition's, handing each fact's subject on."""
    return Reader(
        nc,
        subjects.SYSTEM_STREAM,
        durable,
        "facts",
        lambda d: d.subject,
        handle,
        everything=subjects.DEVICE_STATES_ALL,
    )


async def test_a_reader_asks_the_bus_for_what_its_rules_read_and_nothing_else(
    nc: NATS, js: JetStreamContext
) -> None:
    durable = unique_id("reader")
    meter, lamp, other = unique_id("meter"), unique_id("lamp"), unique_id("other")
    handled: list[str] = []

    async def handle(items: list[Item[str]]) -> Mapping[int, Verdict]:
        handled.extend(i.value for i in items)
        return {}

    async def publish(device_id: str) -> None:
        await js.publish(subjects.device_state(device_id), b"{}")

    reader = facts_reader(nc, durable, handle)
    quit = asyncio.Event()
    running = asyncio.create_task(reader.run(quit))
    try:
        await reader.want([], quit)  # no rule reads facts: no consumer on the bus at all
        with pytest.raises(NotFoundError):
            await js.consumer_info(subjects.SYSTEM_STREAM, durable)

        await reader.want([subjects.device_state(meter)], quit)
        await publish(other)
        await publish(meter)
        assert await eventually(lambda: handled == [subjects.device_state(meter)])
        info = await js.consumer_info(subjects.SYSTEM_STREAM, durable)
        assert info.config.filter_subjects == [subjects.device_state(meter)]
        assert info.delivered.consumer_seq == 1  # the other device's fact never came

        # A rule names the lamp too: the consumer is re-filtered and keeps its position.
        await reader.want([subjects.device_state(lamp), subjects.device_state(meter)], quit)
        await publish(lamp)
        await publish(other)
        want = [subjects.device_state(meter), subjects.device_state(lamp)]
        assert await eventually(lambda: handled == want)
        info = await js.consumer_info(subjects.SYSTEM_STREAM, durable)
        assert info.delivered.consumer_seq == 2

        await reader.want([], quit)  # the rules are gone: so is the consumer
        with pytest.raises(NotFoundError):
            await js.consumer_info(subjects.SYSTEM_STREAM, durable)
    finally:
        quit.set()
        await running
        with_consumer = [c.name for c in await js.consumers_info(subjects.SYSTEM_STREAM)]
        if durable in with_consumer:
            await js.delete_consumer(subjects.SYSTEM_STREAM, durable)


async def test_a_reader_told_before_it_runs_waits_for_it_and_one_told_to_quit_returns(
    nc: NATS, js: JetStreamContext
) -> None:
    """A rule change may reload before the partition's readers run: its `want` waits for
    them rather than return with the consumer not yet fitting the rules."""
    durable = unique_id("reader")

    async def handle(items: list[Item[str]]) -> Mapping[int, Verdict]:
        return {}

    reader = facts_reader(nc, durable, handle)
    quit = asyncio.Event()
    wanting = asyncio.create_task(reader.want([subjects.device_state("x")], quit))
    await asyncio.sleep(0)
    assert not wanting.done()
    running = asyncio.create_task(reader.run(quit))
    await asyncio.wait_for(wanting, 10)
    info = await js.consumer_info(subjects.SYSTEM_STREAM, durable)
    assert info.config.filter_subjects == [subjects.device_state("x")]
    quit.set()
    await running
    # Stopped: a reload still waiting, or one that comes late, is let go.
    await asyncio.wait_for(reader.want([subjects.device_state("y")], quit), 1)
    await js.delete_consumer(subjects.SYSTEM_STREAM, durable)


async def test_filters_the_server_refuses_are_read_as_every_event_and_miss_none(
    nc: NATS, js: JetStreamContext
) -> None:
    """`events.<door>.*` stored with the partition last (an install from before stop 21) is
    `events.<door>.*.*`, which covers `events.<door>.opened.x`: the server refuses the two as
    filters, so the reader reads every event, and binds with that (not with the filters
    refused)."""
    durable, door = unique_id("reader"), unique_id("door")
    handled: list[str] = []

    async def handle(items: list[Item[str]]) -> Mapping[int, Verdict]:
        handled.extend(i.value for i in items)
        return {}

    reader = Reader(
        nc,
        subjects.EVENTS_STREAM,
        durable,
        "events",
        lambda d: d.subject,
        handle,
        everything=subjects.EVENTS_ALL,
        stored=lambda s: subjects.stored_filter(s, first=False),
    )
    quit = asyncio.Event()
    running = asyncio.create_task(reader.run(quit))
    try:
        await reader.want([f"events.{door}.*", f"events.{door}.opened.x"], quit)
        info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
        assert info.config.filter_subjects == [subjects.EVENTS_ALL]
        await js.publish(f"events.{door}.opened", b"{}")
        assert await eventually(lambda: any(s.startswith(f"events.{door}.") for s in handled))
    finally:
        quit.set()
        await running
        await js.delete_consumer(subjects.EVENTS_STREAM, durable)

"""The EVENTS stream spreads device events over partitions by device id (its subject
transform), as provisioned by `bus.ensure_streams`; what reads it sees published subjects."""

from __future__ import annotations

import dataclasses

import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NoStreamResponseError

from libs import bus, replay, subjects
from libs import messages as m
from libs.consumer import Consumer
from libs.settings import SettingsError
from tests.consumers import running
from tests.helpers import eventually, unique_id


async def stored_subject(js, seq: int) -> str:  # type: ignore[no-untyped-def]
    return (await js.get_msg(subjects.EVENTS_STREAM, seq)).subject


async def test_one_devices_events_are_stored_in_one_partition(js) -> None:  # type: ignore[no-untyped-def]
    await bus.ensure_streams(js)
    partitions = bus.stream_partitions(await js.stream_info(subjects.EVENTS_STREAM))
    assert partitions == bus.DEFAULT_PARTITIONS
    device = unique_id("lamp")
    stored = []
    for event_type in ("telemetry", "heartbeat", "telemetry"):
        event = m.make_event(device, event_type, {})
        ack = await bus.publish(js, event.nats_subject, event, msg_id=event.id)
        stored.append(await stored_subject(js, ack.seq))
    # `events.~.<partition>.<device>.<type>`: one partition, the device's.
    assert {s.split(".")[:2] == ["events", "~"] for s in stored} == {True}
    assert {s.split(".")[3] for s in stored} == {device}
    assert len({s.split(".")[2] for s in stored}) == 1
    assert 0 <= int(stored[0].split(".")[2]) < partitions
    assert await bus.partition_first(js)
    assert [subjects.published(s) for s in stored] == [
        f"events.{device}.telemetry",
        f"events.{device}.heartbeat",
        f"events.{device}.telemetry",
    ]


async def test_an_event_type_of_more_than_one_token_is_not_taken(js) -> None:  # type: ignore[no-untyped-def]
    await bus.ensure_streams(js)
    with pytest.raises(NoStreamResponseError):
        await js.publish(f"events.{unique_id('lamp')}.a.b", b"{}", timeout=2)


async def test_the_partition_count_is_fixed_at_install(js) -> None:  # type: ignore[no-untyped-def]
    await bus.ensure_streams(js)
    installed = bus.stream_partitions(await js.stream_info(subjects.EVENTS_STREAM))
    with pytest.raises(SettingsError, match=r"SMARTHOME_ACTOR_PARTITIONS=3.*installed with"):
        await bus.ensure_streams(js, partitions=3)
    await bus.ensure_streams(js, partitions=installed)  # the same count is fine


async def test_a_replay_and_a_filtered_consumer_see_published_subjects(js) -> None:  # type: ignore[no-untyped-def]
    await bus.ensure_streams(js)
    device = unique_id("meter")
    event = m.make_event(device, "power", {"power_w": 3.0})
    ack = await bus.publish(js, event.nats_subject, event, msg_id=event.id)
    page = await replay.read(
        js, subjects.EVENTS_STREAM, f"events.{device}.power", limit=5, after_seq=ack.seq - 1
    )
    assert [(s.seq, s.subject) for s in page.messages] == [(ack.seq, event.nats_subject)]


async def test_an_old_exact_filter_is_refiltered_by_the_runtime(js, nc) -> None:  # type: ignore[no-untyped-def]
    """A durable made before partitions filters `events.<d>.<type>`: bound by the runtime
    with the config of today, it follows the stored subjects from where it was."""
    await bus.ensure_streams(js)
    device = unique_id("meter")
    durable = unique_id("old-filter")
    old = ConsumerConfig(
        durable_name=durable,
        filter_subject=f"events.{device}.power",
        ack_policy=AckPolicy.ALL,
    )
    await js.add_consumer(subjects.EVENTS_STREAM, old)
    config = dataclasses.replace(old, filter_subject=subjects.stored_filter(old.filter_subject))
    seen: list[str] = []

    async def handle(items):  # type: ignore[no-untyped-def]
        seen.extend(i.delivery.subject for i in items)
        return {}

    consumer = Consumer(nc, subjects.EVENTS_STREAM, config, lambda d: d.seq, handle)
    event = m.make_event(device, "power", {"power_w": 1.0})
    await bus.publish(js, event.nats_subject, event, msg_id=event.id)
    async with running(consumer):
        await eventually(lambda: seen, timeout=10)
    assert seen == [event.nats_subject]
    info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
    assert info.config.filter_subject == f"events.~.*.{device}.power"

"""The recorder audits a device's transitions (`system.device.<id>.transition`) and never
receives its state facts (`system.device.<id>.state`, one per applied event): against a real
nats-server, the actors and the recorder as processes, and the database."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeout
from sqlalchemy import select

from libs import bus, subjects
from libs import messages as m
from libs.db.models import AuditEntry, Device, HistoryEntry
from tests.helpers import eventually, unique_id
from tests.processes import Service

SYSTEM = subjects.SYSTEM_STREAM
DURABLE = bus.recorder_durable(SYSTEM)
FILTERS = list(bus.RECORDER_SOURCES[SYSTEM])


async def drain(js, durable: str) -> None:  # type: ignore[no-untyped-def]
    """Read and ack all the consumer has for now (as a recorder that kept up would have)."""
    sub = await js.pull_subscribe_bind(durable, stream=SYSTEM)
    try:
        while (await js.consumer_info(SYSTEM, durable)).num_pending:
            try:
                msgs = await sub.fetch(bus.RECORDER_BATCH, timeout=2)
            except NatsTimeout:
                continue
            await msgs[-1].ack_sync()  # AckPolicy.ALL: the batch
    finally:
        await sub.unsubscribe()


async def test_an_installed_recorder_consumer_of_every_system_subject_is_narrowed_in_place(
    js,
) -> None:  # type: ignore[no-untyped-def]
    """An upgrade: `recorder-system` as installed before (`system.>`) is brought to its
    filters where the gateway provisions the bus; what it acked stays acked, and it reads on
    from there what it records, no state fact."""
    installed = await js.consumer_info(SYSTEM, DURABLE)
    old = dataclasses.replace(
        installed.config, filter_subject=subjects.SYSTEM_ALL, filter_subjects=None
    )
    await js.add_consumer(SYSTEM, old)
    try:
        await drain(js, DURABLE)
        before = await js.consumer_info(SYSTEM, DURABLE)
        assert before.config.filter_subject == subjects.SYSTEM_ALL
        device = unique_id("lamp")
        published = [
            subjects.device_state(device),
            subjects.device_transition(device),
            subjects.device_registry(device),
            subjects.device_state(device),
            subjects.alert(device),
            subjects.device_state(device),
        ]
        seqs = [(await bus.publish(js, s, b"{}")).seq for s in published]

        await bus.ensure_streams(js)
        await bus.ensure_streams(js)  # again: nothing more changes

        after = await js.consumer_info(SYSTEM, DURABLE)
        assert (after.config.filter_subjects, after.config.filter_subject) == (FILTERS, None)
        assert after.ack_floor.stream_seq == before.ack_floor.stream_seq
        assert after.num_pending == 3
        sub = await js.pull_subscribe_bind(DURABLE, stream=SYSTEM)
        try:
            msgs = await sub.fetch(10, timeout=2)
            await msgs[-1].ack_sync()
        finally:
            await sub.unsubscribe()
        read = [(msg.metadata.sequence.stream, msg.subject) for msg in msgs]
        assert read == [(seqs[i], published[i]) for i in (1, 2, 4)]
    finally:
        await bus.ensure_streams(js)


@pytest.fixture(scope="module")
def actors(service_env, data_dir):  # type: ignore[no-untyped-def]
    service = Service("services.actors", service_env, data_dir).start()
    yield service
    assert service.stop() == 0, service.tail()


async def caught_up(js):  # type: ignore[no-untyped-def]
    """The recorder's SYSTEM consumer once it has nothing left to deliver or to be acked."""
    info = await js.consumer_info(SYSTEM, DURABLE)
    return info if info.num_pending == 0 and info.num_ack_pending == 0 else None


async def test_transitions_are_audited_once_readings_are_history_and_no_state_fact_is_delivered(
    actors, service_env, data_dir, js, sessions
) -> None:  # type: ignore[no-untyped-def]
    device = unique_id("meter")
    async with sessions.begin() as session:
        session.add(Device(id=device, name=device, kind="sensor", enabled=True, lifecycle="active"))
    recorder = Service("services.recorder", service_env, data_dir).start()
    try:
        start: Any = await eventually(lambda: caught_up(js), timeout=30)
        first_seq = (await js.stream_info(SYSTEM)).state.last_seq + 1
        readings = 30
        # The first reading brings it online (a transition), the others change a value only;
        # its goodbye takes it offline (a transition).
        for n in range(readings):
            event = m.make_event(device, "telemetry", {"temperature": 20.0 + n / 10})
            await bus.publish(js, event.nats_subject, event, msg_id=event.id)
        goodbye = m.make_event(device, "goodbye")
        await bus.publish(js, goodbye.nats_subject, goodbye, msg_id=goodbye.id)

        async def history():  # type: ignore[no-untyped-def]
            async with sessions() as session:
                rows = (
                    await session.scalars(
                        select(HistoryEntry).where(HistoryEntry.device_id == device)
                    )
                ).all()
            return list(rows) if len(rows) >= readings + 1 else None

        async def audited():  # type: ignore[no-untyped-def]
            async with sessions() as session:
                rows = (
                    await session.scalars(
                        select(AuditEntry)
                        .where(AuditEntry.device_id == device)
                        .where(AuditEntry.action == "state.changed")
                        .order_by(AuditEntry.source_seq)
                    )
                ).all()
            return list(rows) if len(rows) >= 2 else None

        recorded: Any = await eventually(history, timeout=30)
        await eventually(audited, timeout=30)
        end: Any = await eventually(lambda: caught_up(js), timeout=30)
        last_seq = end.delivered.stream_seq
        transitions = await audited()
    finally:
        recorder.stop()

    assert len(recorded) == readings + 1  # each reading, and the goodbye
    assert transitions is not None
    assert [(a.result, a.detail["version"]) for a in transitions] == [
        ("off->active (online)", 1),
        ("active->active (offline)", readings + 1),
    ]
    # What reached the recorder's consumer on SYSTEM meanwhile: every message it records,
    # none of the state facts (one per reading here, whatever else the stream holds).
    on_the_stream = [
        (await js.get_msg(SYSTEM, seq)).subject for seq in range(first_seq, last_seq + 1)
    ]
    state_facts = [s for s in on_the_stream if s == subjects.device_state(device)]
    others = [s for s in on_the_stream if not s.endswith(".state")]
    assert len(state_facts) == readings + 1
    assert end.delivered.consumer_seq - start.delivered.consumer_seq == len(others)
    assert subjects.device_transition(device) in others

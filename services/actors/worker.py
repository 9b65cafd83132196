"""The actors' consume loop: fetch → decode → decide → (write ∥ publish facts) → ack.

A batch is decided once, in memory, from the state read for it; then its state is written
(one transaction, then the cache) while its facts are published, and the batch is acked
(AckPolicy.ALL: one ack of its last message) only when both are done. So:

- no event is lost: an un-acked batch is redelivered whole, and nothing is acked before
  its state is committed;
- none is applied twice: each device's state carries the stream sequence of the last event
  applied to it (`last_seq`), written in the same transaction; a redelivered event at or
  below it is only acked again (and its device's latest fact re-sent: a crash may have
  come before that fact reached the bus);
- each fact is published once per version: its message id is `state:<device>:<version>`,
  so a retry or a re-sent fact is dropped by the stream's de-duplication;
- a device's events are applied in order: one worker holds the lease, batches are handled
  one after another, and a batch's facts are stored before the next batch is decided.

Publishing during the write takes the commit out of the event → fact latency. The price:
a fact may reach the bus a few milliseconds before the state it describes is readable from
the cache or the database (it carries that state and its version, so a reader can tell). A
decided batch is kept while the write is retried, so the state committed is the state its
facts announced. Only a worker stopped during a database outage leaves facts of a batch it
did not commit; the redelivered batch is decided again on the same committed state and
produces the same versions, so their facts are duplicates the stream drops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Histogram

from libs import bus, runtime, subjects
from libs import messages as m
from libs.device_state import Applied, Unapplicable, apply
from libs.lease import Lease
from services.actors.store import StateStore

log = logging.getLogger(__name__)

DURABLE = bus.ACTORS_DURABLE
BATCH = bus.ACTORS_BATCH

APPLIED = Counter("smarthome_actor_events_total", "Events handled by the actors", ["outcome"])
BATCH_SECONDS = Histogram("smarthome_actor_batch_seconds", "Time to apply one fetched batch")


@dataclass
class Batch:
    """What one fetched batch produces, gathered before anything is written."""

    snapshots: dict[str, m.DeviceSnapshot] = field(default_factory=dict)
    statuses: list[tuple[str, m.CommandStatusData]] = field(default_factory=list)
    facts: list[tuple[str, bytes, str]] = field(default_factory=list)  # subject, body, msg id


class ActorWorker:
    def __init__(self, nc: NATS, store: StateStore, lease: Lease) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._store = store
        self._lease = lease

    async def run(self, stop: asyncio.Event) -> None:
        """Consume while this worker holds the lease; stand by while another one does."""
        try:
            while await self._lease.acquire(stop):
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._lease.keep(stop))
                    tasks.create_task(self._consume(stop))
        finally:
            await self._lease.release()

    async def _consume(self, stop: asyncio.Event) -> None:
        sub = await self._js.pull_subscribe_bind(DURABLE, stream=subjects.EVENTS_STREAM)
        registry = await self._nc.subscribe(subjects.DEVICE_REGISTRY_ALL, cb=self._on_registry)
        try:
            while not stop.is_set() and self._lease.held.is_set():
                try:
                    msgs = await sub.fetch(BATCH, timeout=1.0)
                except TimeoutError:  # nats-py raises asyncio.TimeoutError here
                    continue
                if not msgs:
                    continue  # nats-py can answer a fetch with nothing (e.g. after a reconnect)
                with BATCH_SECONDS.time():
                    await self.handle(msgs, stop)
        finally:
            # A pull subscription left to drain() waits for the drain timeout.
            await sub.unsubscribe()
            await registry.unsubscribe()

    async def _on_registry(self, msg: Msg) -> None:
        """A registry change (connect, disconnect, delete): read the device afresh next time."""
        try:
            fact = m.registry_fact_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if fact.change == "deleted":
            try:
                await self._store.drop(fact.device_id)
            except Exception as exc:  # the state stays until the next delete; not worth a crash
                log.warning("could not drop the state of %s: %r", fact.device_id, exc)
        else:
            self._store.forget(fact.device_id)

    async def handle(self, msgs: list[Msg], stop: asyncio.Event) -> None:
        decoded: list[tuple[Msg, m.CloudEvent]] = []
        for msg in msgs:
            event = await self._decode(msg)
            if event is not None:
                decoded.append((msg, event))
        batch = await self._decide_until_read(decoded, msgs, stop)
        if batch is None:
            return  # stopping while the database is down: leave the batch un-acked
        publishing = asyncio.ensure_future(self._publish_facts(batch, stop))
        try:
            written = await self._write(batch, msgs, stop)
            published = await publishing
        finally:
            publishing.cancel()  # only when the write was cancelled (the worker stops)
        if not (written and published):
            return  # stopping: the redelivered batch is decided again (see the docstring)
        await msgs[-1].ack()  # AckPolicy.ALL: the whole batch

    async def _decode(self, msg: Msg) -> m.CloudEvent | None:
        """The envelope, checked against its subject; a bad one is dead-lettered and acked."""
        try:
            device_id, event_type = subjects.parse_device_event(msg.subject)
            event = m.cloud_event_decoder.decode(msg.data)
            if (event.subject, event.type) != (device_id, event_type):
                raise ValueError(
                    f"envelope says subject={event.subject!r} type={event.type!r} "
                    f"but was published on {msg.subject!r}"
                )
            return event
        except (msgspec.DecodeError, ValueError) as exc:
            await bus.dead_letter(self._js, msg, f"invalid event: {exc}", DURABLE)
            APPLIED.labels("dead_letter").inc()
            return None

    async def _decide(self, decoded: list[tuple[Msg, m.CloudEvent]]) -> Batch:
        device_ids = sorted({e.subject for _, e in decoded})
        batch = Batch(snapshots=await self._store.load(device_ids))
        enabled = await self._store.registry(device_ids) if device_ids else {}
        for msg, event in decoded:
            seq = msg.metadata.sequence.stream
            current = batch.snapshots[event.subject]
            if seq <= current.last_seq:
                APPLIED.labels("duplicate").inc()  # applied before a crash; ack again only
                if seq == current.last_seq and current.version:
                    # Its fact may not have reached the bus before the crash; the id makes
                    # a second copy harmless.
                    batch.facts.append(_state_fact(current, current.state, ["attributes"], event))
                continue
            reason = _refusal(event, enabled.get(event.subject))
            if reason:
                batch.facts.append(_rejected(event, reason, seq))
                APPLIED.labels("rejected").inc()
                continue
            try:
                result = apply(current, event, seq, msg.metadata.timestamp)
            except Unapplicable as exc:
                await bus.dead_letter(self._js, msg, str(exc), DURABLE)
                APPLIED.labels("dead_letter").inc()
                continue
            self._record(batch, event, current, result)
            APPLIED.labels("applied").inc()
        return batch

    def _record(
        self, batch: Batch, event: m.CloudEvent, before: m.DeviceSnapshot, result: Applied
    ) -> None:
        new = result.snapshot
        batch.snapshots[new.device_id] = new
        if result.command_status:
            batch.statuses.append((new.device_id, result.command_status))
        if result.changed:
            batch.facts.append(_state_fact(new, before.state, result.changed, event))

    async def _decide_until_read(
        self, decoded: list[tuple[Msg, m.CloudEvent]], msgs: list[Msg], stop: asyncio.Event
    ) -> Batch | None:
        """Read the batch's devices and decide; while the database is down, keep trying."""
        done: list[Batch] = []

        async def attempt() -> None:
            done.append(await self._decide(decoded))

        if await runtime.retry_until_stopped(attempt, stop, "state read", _in_progress(msgs)):
            return done[-1]
        return None

    async def _write(self, batch: Batch, msgs: list[Msg], stop: asyncio.Event) -> bool:
        """Commit the decided batch; while the database is down, keep it and retry.

        The decision is not taken again: its facts may already be on the bus."""
        touched = [s for s in batch.snapshots.values() if s.last_seq]
        if not touched and not batch.statuses:
            return True
        return await runtime.retry_until_stopped(
            lambda: self._store.save(touched, batch.statuses),
            stop,
            "state write",
            _in_progress(msgs),
        )

    async def _publish_facts(self, batch: Batch, stop: asyncio.Event) -> bool:
        """Publish what changed; retried until stored (their ids make a retry harmless),
        because the state they describe is already committed."""
        if not batch.facts:
            return True
        return await runtime.retry_until_stopped(
            lambda: bus.publish_many(self._js, batch.facts, timeout=10.0), stop, "fact publish"
        )


def _in_progress(msgs: list[Msg]) -> Callable[[], Awaitable[None]]:
    """Tells the bus that a batch held back by an outage is still being worked on."""

    async def still_working() -> None:
        for msg in msgs:
            await msg.in_progress()

    return still_working


def _state_fact(
    new: m.DeviceSnapshot, previous_state: str, changed: list[str], event: m.CloudEvent
) -> tuple[str, bytes, str]:
    fact = m.DeviceStateFact(
        device_id=new.device_id,
        version=new.version,
        state=new.state,
        connection=new.connection,
        attributes=new.attributes,
        last_seen=new.last_seen,
        changed=changed,
        previous_state=previous_state,  # type: ignore[arg-type]
        cause_event_id=event.id,
        cause_type=event.type,
        correlation_id=event.correlationid,
        time=m.now(),
    )
    return (
        subjects.device_state(new.device_id),
        m.encode(fact),
        f"state:{new.device_id}:{new.version}",
    )


def _refusal(event: m.CloudEvent, enabled: bool | None) -> str | None:
    if enabled is None:
        return "device is not registered"
    if not enabled and event.type != "mark":
        return "device is disconnected by an administrator"
    return None


def _rejected(event: m.CloudEvent, reason: str, seq: int) -> tuple[str, bytes, str]:
    fact = m.RejectedFact(
        device_id=event.subject,
        event_id=event.id,
        event_type=event.type,
        reason=reason,
        correlation_id=event.correlationid,
        time=m.now(),
    )
    return subjects.device_rejected(event.subject), m.encode(fact), f"rejected:{seq}"
